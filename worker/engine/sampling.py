"""Sampling: what a request asks for (`SamplingParams`), the per-request state that travels with a
migrated sequence (`SamplerState`, plain data), and choosing the next token from one row of logits.

Order of the transforms, as vLLM applies them:
    penalties (repetition over prompt + output; presence and frequency over the output)
    -> temperature (0: greedy) -> top-k -> top-p -> min-p -> draw with the request's own RNG
Each request draws from its own generator seeded by its seed, so the same seed gives the same tokens
whatever else runs beside it. Logprobs are of the model's raw distribution (log-softmax of the logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from statemesh.memory.errors import InvalidInput


class InvalidSampling(InvalidInput):
    """Sampling parameters outside their allowed ranges."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidSampling(message)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: int | None = None  # None: none; 0: the chosen token's; n: also the top n
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        _check(
            isinstance(self.max_tokens, int) and self.max_tokens >= 1,
            f"max_tokens must be >= 1, got {self.max_tokens!r}",
        )
        _check(
            0.0 <= self.temperature <= 100.0, f"temperature must be in [0, 100] (0 = greedy), got {self.temperature}"
        )
        _check(
            isinstance(self.top_k, int) and self.top_k >= 0,
            f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}",
        )
        _check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        _check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        _check(
            0.0 < self.repetition_penalty <= 10.0,
            f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}",
        )
        _check(
            -2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"
        )
        _check(
            -2.0 <= self.frequency_penalty <= 2.0, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"
        )
        _check(
            self.seed is None or (isinstance(self.seed, int) and 0 <= self.seed < 2**63),
            f"seed must be an integer in [0, 2^63), got {self.seed!r}",
        )
        _check(
            self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
            f"logprobs must be in [0, 20], got {self.logprobs!r}",
        )
        _check(
            all(isinstance(s, str) and s for s in self.stop),
            f"stop strings must be non-empty strings, got {self.stop!r}",
        )
        _check(len(self.stop) <= 16, f"at most 16 stop strings, got {len(self.stop)}")  # fmt: skip

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class SamplerState:
    """Everything sampling remembers for one request, as plain data (it travels with a migrated
    sequence): the RNG's state, the prompt's distinct tokens and the output's token counts."""

    seed: int
    rng: dict[str, Any]  # numpy PCG64 bit generator state: ints and strings only
    prompt_tokens: set[int] = field(default_factory=set)
    output_counts: dict[int, int] = field(default_factory=dict)

    @staticmethod
    def start(params: SamplingParams, prompt: list[int]) -> SamplerState:
        seed = params.seed if params.seed is not None else int(np.random.default_rng().integers(0, 2**63))
        return SamplerState(seed, dict(np.random.PCG64(seed).state), set(prompt))

    def record(self, token: int) -> None:
        self.output_counts[token] = self.output_counts.get(token, 0) + 1

    def to_json(self) -> dict[str, Any]:
        """The state as JSON-ready data (what a migration sends with the sequence's snapshot)."""
        return {
            "seed": self.seed,
            "rng": {**self.rng, "state": {k: str(v) for k, v in self.rng["state"].items()}},
            "prompt_tokens": sorted(self.prompt_tokens),
            "output_counts": [[t, n] for t, n in sorted(self.output_counts.items())],
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> SamplerState:
        rng = dict(data["rng"])
        rng["state"] = {k: int(v) for k, v in rng["state"].items()}  # 128-bit ints travel as strings
        return SamplerState(
            int(data["seed"]), rng, {int(t) for t in data["prompt_tokens"]},
            {int(t): int(n) for t, n in data["output_counts"]},
        )  # fmt: skip


@dataclass(frozen=True)
class Sample:
    token: int
    logprob: float | None  # of the chosen token under the raw distribution
    top_logprobs: tuple[tuple[int, float], ...] = ()


def sample(logits: np.ndarray, params: SamplingParams, state: SamplerState) -> Sample:
    """The next token from one row of logits [V]; advances the state's RNG when it draws."""
    repeated, counted = _penalties(params, state)
    if params.greedy and params.logprobs is None and not (repeated or counted):
        token = int(np.argmax(logits))  # float32 as it came: the same argmax as float64, without converting V values
        state.record(token)
        return Sample(token, None)
    raw = np.asarray(logits, dtype=np.float64)
    x = _penalize(raw, params, state, repeated, counted)
    token = int(np.argmax(x)) if params.greedy else _draw(x / params.temperature, params, state)
    state.record(token)
    if params.logprobs is None:
        return Sample(token, None)
    logprobs = raw - raw.max() - np.log(np.exp(raw - raw.max()).sum())  # log-softmax [V]
    top = np.argsort(-logprobs, kind="stable")[: params.logprobs]
    return Sample(token, float(logprobs[token]), tuple((int(t), float(logprobs[t])) for t in top))


def _penalties(params: SamplingParams, state: SamplerState) -> tuple[bool, bool]:
    """Which penalties change the logits now: (repetition, presence or frequency); each needs
    tokens seen to act on."""
    repeated = params.repetition_penalty != 1.0 and bool(state.prompt_tokens or state.output_counts)
    counted = bool(state.output_counts) and bool(params.presence_penalty or params.frequency_penalty)
    return repeated, counted


def _penalize(
    raw: np.ndarray, params: SamplingParams, state: SamplerState, repeated: bool, counted: bool
) -> np.ndarray:
    """The logits after the request's penalties: `raw` itself when none applies (no copy of a
    vocabulary-long row per token), else a penalized copy (`raw` stays for the logprobs)."""
    if not (repeated or counted):
        return raw
    x = raw.copy()
    if repeated:
        seen = np.fromiter(state.prompt_tokens | state.output_counts.keys(), dtype=np.int64)
        values = x[seen]
        x[seen] = np.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if counted:
        tokens = np.fromiter(state.output_counts.keys(), dtype=np.int64)
        counts = np.fromiter(state.output_counts.values(), dtype=np.float64)
        x[tokens] -= params.presence_penalty + params.frequency_penalty * counts
    return x


def skip_draw(state: SamplerState) -> None:
    """Advance the generator as one draw of `_draw` does, without logits: a replayed token (taken,
    not sampled) leaves the generator where its sampling left it. `Generator.choice` with `p`
    takes one uniform double, whatever the candidates (tests/worker/test_sampling.py pins this)."""
    generator = np.random.Generator(np.random.PCG64())
    generator.bit_generator.state = state.rng
    generator.random()
    state.rng = dict(generator.bit_generator.state)


def _draw(x: np.ndarray, params: SamplingParams, state: SamplerState) -> int:
    """Filter by top-k, top-p and min-p, then draw one token with the request's generator."""
    order = np.argsort(-x, kind="stable")  # tokens by descending logit
    if params.top_k:
        order = order[: params.top_k]
    kept = x[order]
    probs = np.exp(kept - kept[0])
    probs /= probs.sum()
    if params.top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p (at least one token)
        cut = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
        order, probs = order[:cut], probs[:cut] / probs[:cut].sum()
    if params.min_p > 0.0:
        keep = probs >= params.min_p * probs[0]
        order, probs = order[keep], probs[keep] / probs[keep].sum()
    generator = np.random.Generator(np.random.PCG64())
    generator.bit_generator.state = state.rng
    choice = int(generator.choice(len(order), p=probs))
    state.rng = dict(generator.bit_generator.state)
    return int(order[choice])
