"""statemesh.worker: model loading, architectures, tokenizer, sampling, the engine and the Ray actor
that hosts a shard. Depends on statemesh.memory only (DESIGN.md). Built by issues 3 and 4."""
