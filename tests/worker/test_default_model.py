"""The default model, SmolLM2-135M-Instruct (GGUF, Q4_1 dequantized to float32), against the
published behaviour of the reference implementations (issue 3): llama.cpp's token ids and top-3,
and Hugging Face transformers' float32 greedy continuation."""

from __future__ import annotations

import numpy as np
import pytest

from statemesh.memory import Batch, merge_snapshots
from statemesh.worker import Model, default_model_path, load_model

PROMPT = "The capital of France is"
LLAMA_CPP_IDS = [504, 3575, 282, 4649, 314]  # llama.cpp, no BOS
TOP3 = [7042, 260, 4528]  # " Paris", " the", " London" in both references
HF_GREEDY_20 = [7042, 30, 198, 198, 504, 2988, 314, 42, 216, 34, 32, 33, 40, 29, 32, 33, 29, 34, 34, 216]


@pytest.fixture(scope="module")
def model() -> Model:
    return load_model(default_model_path(), backend="numpy", progress=False)


def greedy(model: Model, mem, prompt: list[int], n: int, seq: int = 0, start: int = 0) -> list[int]:  # type: ignore[no-untyped-def]
    logits = model.decode(mem, Batch(list(range(start, start + len(prompt))), [seq] * len(prompt), tokens=prompt))
    out, pos = [], start + len(prompt)
    for _ in range(n):
        out.append(int(np.argmax(logits[-1])))
        logits = model.decode(mem, Batch([pos], [seq], tokens=[out[-1]]))
        pos += 1
    return out


def test_tokenizer_matches_llama_cpp(model: Model) -> None:
    assert model.tokenizer.encode(PROMPT) == LLAMA_CPP_IDS
    assert model.tokenizer.decode(LLAMA_CPP_IDS) == PROMPT
    assert model.tokenizer.encode("<|im_start|>user") == [1, 4093]  # special tokens parse as one id
    assert model.tokenizer.eos_ids == (2,)


def test_first_step_top3_and_twenty_greedy_tokens_match_the_references(model: Model) -> None:
    mem = model.create_memory(n_ctx=64, n_seq_max=1)
    logits = model.decode(mem, Batch(list(range(5)), [0] * 5, tokens=LLAMA_CPP_IDS))
    assert logits.shape == (5, 49152) and logits.dtype == np.float32
    assert np.argsort(-logits[-1])[:3].tolist() == TOP3
    mem.seq_rm(0)
    assert greedy(model, mem, LLAMA_CPP_IDS, 20) == HF_GREEDY_20


def test_chunked_prefill_equals_one_pass_equals_token_by_token(model: Model) -> None:
    ids = model.tokenizer.encode("Paris is the capital and most populous city of France, with an estimated population")
    one = model.create_memory(n_ctx=64, n_seq_max=1)
    full = model.decode(one, Batch(list(range(len(ids))), [0] * len(ids), tokens=ids))
    chunked = model.create_memory(n_ctx=64, n_seq_max=1)
    parts = [
        model.decode(
            chunked, Batch(list(range(a, min(a + 5, len(ids)))), [0] * len(ids[a : a + 5]), tokens=ids[a : a + 5])
        )
        for a in range(0, len(ids), 5)
    ]
    np.testing.assert_allclose(np.concatenate(parts), full, rtol=0, atol=2e-3 * np.abs(full).max())
    small_ubatches = model.create_memory(n_ctx=64, n_seq_max=1)
    tiny = model.decode(small_ubatches, Batch(list(range(len(ids))), [0] * len(ids), tokens=ids), n_ubatch=1)
    np.testing.assert_allclose(tiny, full, rtol=0, atol=2e-3 * np.abs(full).max())


def test_fork_snapshot_and_pipeline_shards_continue_identically(model: Model) -> None:
    ids = LLAMA_CPP_IDS
    mem = model.create_memory(n_ctx=64, n_seq_max=3)
    logits = model.decode(mem, Batch(list(range(5)), [0] * 5, tokens=ids, logits=[False] * 4 + [True]))
    assert logits.shape == (1, 49152)
    mem.seq_cp(0, 1)
    a = model.decode(mem, Batch([5, 5], [0, 1], tokens=[7042, 7042]))
    np.testing.assert_array_equal(a[0], a[1])  # the fork sees exactly what the source sees
    # snapshot -> a fresh memory under another id -> the next logits are identical
    other = model.create_memory(n_ctx=32, n_seq_max=4)
    other.state_read(mem.state_write(0), seq=3)
    b = model.decode(other, Batch([6], [3], tokens=[30]))
    c = model.decode(mem, Batch([6], [0], tokens=[30]))
    np.testing.assert_array_equal(b, c)
    # two pipeline shards, their snapshots merged into a one-piece memory
    cut = model.n_layers // 2
    front, back = model.shard(0, cut), model.shard(cut, model.n_layers)
    mem_front = model.create_memory(n_ctx=32, n_seq_max=1, layers=range(0, cut))
    mem_back = model.create_memory(n_ctx=32, n_seq_max=1, layers=range(cut, model.n_layers))
    batch = Batch(list(range(5)), [0] * 5, tokens=ids)
    split_logits = back.forward(mem_back, batch, hidden=front.forward(mem_front, batch))
    np.testing.assert_allclose(split_logits[-1], logits[0], rtol=0, atol=1e-4 * np.abs(logits).max())
    whole = model.create_memory(n_ctx=32, n_seq_max=1)
    whole.state_read(merge_snapshots([mem_front.state_write(), mem_back.state_write()]))
    d = model.decode(whole, Batch([5], [0], tokens=[7042]))
    np.testing.assert_allclose(d[0], a[0], rtol=0, atol=1e-4 * np.abs(a).max())


def test_bad_token_ids_are_refused_before_memory_changes(model: Model) -> None:
    from statemesh.worker import InvalidTokens

    mem = model.create_memory(n_ctx=16, n_seq_max=1)
    with pytest.raises(InvalidTokens, match=r"\[49152\] are outside the vocabulary 0 .. 49151"):
        model.decode(mem, Batch([0, 1], [0, 0], tokens=[5, 49152]))
    with pytest.raises(InvalidTokens, match=r"needs batch\.tokens"):
        model.decode(mem, Batch([0], [0]))
    assert mem.seq_ids() == []


def test_streaming_detokenizer_never_splits_a_character(model: Model) -> None:
    text = "héllo 😀 wörld — 東京 123"
    ids = model.tokenizer.encode(text)
    stream = model.tokenizer.stream()
    deltas = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_chat_template_from_the_gguf(model: Model) -> None:
    prompt = model.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert model.tokenizer.encode(prompt)[0] == 1  # <|im_start|>
