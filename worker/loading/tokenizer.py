"""`Tokenizer`: text <-> token ids for a model, from a GGUF file's vocabulary or a `tokenizer.json`,
with the chat template and a streaming detokenizer that never splits a UTF-8 character.

GGUF files of BPE models (`tokenizer.ggml.model == "gpt2"`) carry the tokens, the merges, the token
types and the name of the pre-tokenizer (`tokenizer.ggml.pre`); they are rebuilt here as a Hugging
Face `tokenizers` byte-level BPE with the pre-tokenizer llama.cpp uses for that name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from statemesh.worker.errors import InvalidTokens, ModelError

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level_after(split: str | None, digits: bool = False) -> pre_tokenizers.PreTokenizer:
    steps: list[pre_tokenizers.PreTokenizer] = []
    if digits:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if split is not None:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None))
    return pre_tokenizers.Sequence(steps)


# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) -> the same splitting in `tokenizers`
PRE_TOKENIZERS = {
    "default": lambda: _byte_level_after(None),
    "gpt2": lambda: _byte_level_after(None),
    "smollm": lambda: _byte_level_after(None, digits=True),  # each digit alone, then GPT-2's regex
    "starcoder": lambda: _byte_level_after(None, digits=True),
    "refact": lambda: _byte_level_after(None, digits=True),
    "llama-bpe": lambda: _byte_level_after(LLAMA3_SPLIT),
    "llama3": lambda: _byte_level_after(LLAMA3_SPLIT),
    "qwen2": lambda: _byte_level_after(QWEN2_SPLIT),
}


@dataclass
class Tokenizer:
    """Wraps a `tokenizers.Tokenizer`; `eos_ids` end a generation; `chat_template` is Jinja.

    `n_ids` is the model's id space, its embedding's rows, which exports often pad past the
    tokenizer's own tokens (Qwen2, Llama 3, Gemma). One rule holds everywhere: an id in
    `0 .. n_ids - 1` is valid (the model may sample it), and an id the tokenizer does not know
    decodes to nothing, as in vLLM and transformers; ids outside `n_ids` are refused."""

    hf: HFTokenizer
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    add_bos: bool = False
    chat_template: str | None = None
    special_ids: frozenset[int] = field(default_factory=frozenset)
    n_ids: int | None = None  # the model's id space; None: the tokenizer's own tokens

    @property
    def vocab_size(self) -> int:
        """The tokens this tokenizer knows."""
        return int(self.hf.get_vocab_size(with_added_tokens=True))

    @property
    def id_space(self) -> int:
        """Valid ids run 0 .. id_space - 1: the model's, when it was given (`n_ids`)."""
        return self.vocab_size if self.n_ids is None else self.n_ids

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text (e.g. `<|im_start|>`) are parsed as
        such unless `parse_special` is False; BOS is added when the model asks for it."""
        if not isinstance(text, str):
            raise InvalidTokens(f"encode takes a str, got {type(text).__name__}")
        ids = list(self.hf.encode(text, add_special_tokens=False).ids) if parse_special else self._encode_plain(text)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        """Encode with special tokens treated as plain text: split on them first."""
        saved = self.hf.encode_special_tokens
        self.hf.encode_special_tokens = True
        try:
            return list(self.hf.encode(text, add_special_tokens=False).ids)
        finally:
            self.hf.encode_special_tokens = saved

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """The text of `ids`; ids past the tokenizer's own tokens (a padded vocabulary) give none."""
        self.check_ids(ids)
        known = self.vocab_size
        return str(self.hf.decode([int(i) for i in ids if int(i) < known], skip_special_tokens=skip_special))

    def check_ids(self, ids: Any) -> None:
        bad = [int(i) for i in ids if not 0 <= int(i) < self.id_space]
        if bad:
            raise InvalidTokens(f"token ids {bad[:5]} are outside the vocabulary 0 .. {self.id_space - 1}")

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation, by the model's own template."""
        if not self.chat_template:
            raise ModelError("this model has no chat template; send a plain prompt instead of messages")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        template = env.from_string(self.chat_template)
        eos = self.eos_ids[0] if self.eos_ids else None
        return template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token(self.bos_id),
            eos_token=self._token(eos),
        )

    def _token(self, token_id: int | None) -> str:
        return "" if token_id is None else str(self.hf.id_to_token(token_id) or "")

    def stream(self) -> StreamingDetokenizer:
        return StreamingDetokenizer(self)


@dataclass
class StreamingDetokenizer:
    """Turns token ids into text deltas as they arrive. A delta never ends inside a UTF-8 character
    (a byte-level token may carry half of one): text is held back while the decoded tail ends in
    the replacement character. Its state (`ids`, `prefix`, `read`) is plain data, so it can travel
    with a migrated sequence."""

    tokenizer: Tokenizer
    ids: list[int] = field(default_factory=list)
    prefix: int = 0  # ids before this are already emitted and no longer needed for context
    read: int = 0  # ids before this are emitted

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        now = self.tokenizer.decode(self.ids[self.prefix :])
        if now.endswith("\ufffd") or len(now) <= len(before):
            return ""  # an incomplete character: wait for the bytes that finish it
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before) :]

    def flush(self) -> str:
        """What is still held back at the end (an incomplete character decodes as U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        now = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return now[len(before) :]


def tokenizer_from_gguf(meta: dict[str, Any]) -> Tokenizer:
    """Rebuild a GGUF file's BPE tokenizer. `meta` maps GGUF keys to their values."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelError(f"GGUF tokenizer model {kind!r} is not supported yet (supported: 'gpt2', byte-level BPE)")
    pre = str(meta.get("tokenizer.ggml.pre", "default"))
    if pre not in PRE_TOKENIZERS:
        raise ModelError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: {sorted(PRE_TOKENIZERS)}")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    # "a b" -> ("a", "b"): partition splits at the first space as split(" ", 1) does, in half the time
    merges = [m.partition(" ")[::2] for m in meta.get("tokenizer.ggml.merges", [])]
    vocab = dict(zip(tokens, range(len(tokens)), strict=True))
    try:
        bpe = models.BPE(vocab=vocab, merges=merges, ignore_merges=False)
    except Exception as e:  # the library raises a bare Exception for a merge of unknown tokens
        raise ModelError(f"GGUF tokenizer merges do not fit its {len(tokens)} tokens: {e}") from e
    hf = HFTokenizer(bpe)
    hf.pre_tokenizer = PRE_TOKENIZERS[pre]()
    hf.decoder = decoders.ByteLevel()
    special = [i for i, t in enumerate(types) if t in (3, 4)]  # control and user-defined tokens
    hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special])
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    return Tokenizer(
        hf=hf,
        bos_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_ids=tuple(int(i) for i in dict.fromkeys(x for x in (eos, eot) if x is not None)),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
        special_ids=frozenset(special),
    )


def tokenizer_from_hf(tokenizer_json: str, config: dict[str, Any], tokenizer_config: dict[str, Any]) -> Tokenizer:
    """A Hugging Face folder's `tokenizer.json` (+ `tokenizer_config.json` for BOS and the template)."""
    hf = HFTokenizer.from_file(tokenizer_json)
    added = {t.content: i for i, t in hf.get_added_tokens_decoder().items()}

    def token_id(value: Any) -> int | None:
        if isinstance(value, dict):
            value = value.get("content")
        return added.get(value) if isinstance(value, str) else None

    eos = config.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    if not eos_ids and token_id(tokenizer_config.get("eos_token")) is not None:
        eos_ids = (int(token_id(tokenizer_config.get("eos_token")) or 0),)
    bos = config.get("bos_token_id", token_id(tokenizer_config.get("bos_token")))
    return Tokenizer(
        hf=hf,
        bos_id=bos,
        eos_ids=tuple(int(i) for i in eos_ids),
        add_bos=bool(tokenizer_config.get("add_bos_token", False)),
        chat_template=tokenizer_config.get("chat_template"),
        special_ids=frozenset(i for i, t in hf.get_added_tokens_decoder().items() if t.special),
    )
