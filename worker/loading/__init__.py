"""Loading a checkpoint: GGUF files and Hugging Face folders into a `ModelConfig`, float32 weights and
a `Tokenizer` (`load_model` hands them to the architecture that the config names)."""
