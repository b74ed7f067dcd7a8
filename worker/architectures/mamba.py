"""Mamba (selective state space) and Mamba-2 (state space duality), over the recurrent memory.

Every layer: x = x + mixer(rmsnorm(x)). The mixers, for each sequence's run of T tokens:

Mamba-1 (channels I, state N, conv width K, dt rank R):
    x, z = h W_in                                   [T, I] each
    x = silu(causal_conv(x))                        the conv state is the last K-1 inputs
    dt, B, C = x W_x                                [T, R], [T, N], [T, N]
    dt = softplus(dt W_dt + b_dt)                   [T, I] (the bias inside the softplus)
    s_t = exp(dt_t A) * s_{t-1} + dt_t B_t x_t      s: [I, N], A = -exp(A_log)
    y_t = s_t C_t + D x_t;   out = (y * silu(z)) W_out

Mamba-2 (heads H of width P, groups G, state N; I = H * P):
    z, xBC, dt = h W_in                             [T, I], [T, I + 2GN], [T, H]
    x, B, C = silu(causal_conv(xBC))                x [T, H, P], B and C [T, G, N]
    dt = clamp(softplus(dt + dt_bias))              [T, H]
    s_t = exp(dt_t A) s_{t-1} + dt_t x_t B_t^T      s: [H, P, N], A = -exp(A_log) per head
    y_t = s_t C_t + D x_t;  out = gated_rmsnorm(y, z, per group) W_out

Micro-batches hold equal runs of whole sequences (ub.n_seq_tokens), so rows view as [S, T, ...].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from statemesh.memory import Backend, MemorySpec, MicroBatch, RecurrentSpec
from statemesh.worker.config import ModelConfig
from statemesh.worker.model import Model
from statemesh.worker.nn import Weights, rms_norm, silu, xp_of
from statemesh.worker.tokenizer import Tokenizer


def json_float(value: Any) -> float:
    """A float from config.json, where transformers writes infinity as {"__float__": "Infinity"}."""
    return float(value["__float__"] if isinstance(value, dict) else value)


def softplus(x: Any) -> Any:
    xp = xp_of(x)
    return xp.logaddexp(xp.float32(0), x)


def causal_conv(x: Any, state: Any, w: Any, b: Any | None) -> tuple[Any, Any]:
    """Depthwise causal convolution over a run: x [S, T, C] new inputs, state [S, C, K-1] the inputs
    before them, w [C, K] -> (out [S, T, C], the new state [S, C, K-1]).
    out[t] = sum_j w[:, j] * inputs[t + j] over the K inputs ending at t (K=4, t=0: 3 from the state)."""
    xp = xp_of(x)
    t, k = x.shape[1], w.shape[1]
    inputs = xp.concatenate([state.transpose(0, 2, 1), x], axis=1)  # [S, K-1+T, C]
    out = sum(inputs[:, j : j + t, :] * w[:, j] for j in range(k))  # [S, T, C]
    if b is not None:
        out = out + b
    return out, xp.ascontiguousarray(inputs[:, t:, :].transpose(0, 2, 1))  # last K-1 inputs: [S, C, K-1]


def gated_rms_norm(y: Any, z: Any, w: Any, groups: int, eps: float) -> Any:
    """rmsnorm(y * silu(z)) over each of `groups` equal slices of the last axis, times w."""
    shape = y.shape
    g = (y * silu(z)).reshape(*shape[:-1], groups, shape[-1] // groups)  # [..., G, I/G]
    xp = xp_of(y)
    mean_square = (g * g).mean(axis=-1, keepdims=True)
    return (g / xp.sqrt(mean_square + xp.float32(eps))).reshape(shape) * w


@dataclass(frozen=True)
class Mamba1Layer:
    norm: Any  # [E]
    w_in: Any  # [E, 2I]
    conv_w: Any  # [I, K]
    conv_b: Any | None  # [I]
    w_x: Any  # [I, R + 2N]
    w_dt: Any  # [R, I]
    b_dt: Any  # [I]
    a: Any  # [I, N] = -exp(A_log)
    d: Any  # [I]
    w_out: Any  # [I, E]


@dataclass(frozen=True)
class Mamba2Layer:
    norm: Any  # [E]
    w_in: Any  # [E, 2I + 2GN + H]
    conv_w: Any  # [I + 2GN, K]
    conv_b: Any | None  # [I + 2GN]
    dt_bias: Any  # [H]
    a: Any  # [H] = -exp(A_log)
    d: Any  # [H]
    gate_norm: Any  # [I]
    w_out: Any  # [I, E]


class MambaModel(Model):
    def __init__(self, config: ModelConfig, tensors: dict[str, np.ndarray], tokenizer: Tokenizer, backend: Backend):
        self.config, self.tokenizer, self.backend = config, tokenizer, backend
        raw = config.extra
        self.version = 2 if config.architecture == "mamba2" else 1
        e = config.hidden_size
        self.n_state = int(raw["state_size"])  # N
        self.conv_k = int(raw["conv_kernel"])  # K
        self.inner = int(raw.get("intermediate_size") or int(raw["expand"] * e))  # I
        if self.version == 2:
            self.n_heads, self.head_width = int(raw["num_heads"]), int(raw["head_dim"])  # H, P
            self.groups = int(raw["n_groups"])  # G
            low, high = raw.get("time_step_limit", (0.0, float("inf")))
            self.dt_limit = (json_float(low), json_float(high))
        else:
            self.dt_rank = int(raw["time_step_rank"])  # R
        w = Weights(tensors, backend)
        embedding = w.get("backbone.embeddings.weight", (config.vocab_size, e))
        self.embedding = w.put(embedding)
        tied = config.tie_word_embeddings or "lm_head.weight" not in tensors
        self.lm_head_t = w.put((embedding if tied else w.get("lm_head.weight", (config.vocab_size, e))).T)
        self.final_norm = w.put(w.get("backbone.norm_f.weight", (e,)))
        build = self._layer2 if self.version == 2 else self._layer1
        self.layers = [build(w, f"backbone.layers.{i}.") for i in range(config.n_layers)]

    @property
    def conv_channels(self) -> int:
        return self.inner + 2 * self.groups * self.n_state if self.version == 2 else self.inner

    def _layer1(self, w: Weights, p: str) -> Mamba1Layer:
        e, i, n, r, k = self.config.hidden_size, self.inner, self.n_state, self.dt_rank, self.conv_k
        m = p + "mixer."
        return Mamba1Layer(
            norm=w.put(w.get(p + "norm.weight", (e,))),
            w_in=w.put(w.get(m + "in_proj.weight", (2 * i, e)).T),
            conv_w=w.put(w.get(m + "conv1d.weight", (i, 1, k))[:, 0, :]),
            conv_b=w.put(w.get(m + "conv1d.bias", (i,))) if m + "conv1d.bias" in w.tensors else None,
            w_x=w.put(w.get(m + "x_proj.weight", (r + 2 * n, i)).T),
            w_dt=w.put(w.get(m + "dt_proj.weight", (i, r)).T),
            b_dt=w.put(w.get(m + "dt_proj.bias", (i,))),
            a=w.put(-np.exp(w.get(m + "A_log", (i, n)))),
            d=w.put(w.get(m + "D", (i,))),
            w_out=w.put(w.get(m + "out_proj.weight", (e, i)).T),
        )

    def _layer2(self, w: Weights, p: str) -> Mamba2Layer:
        e, i, h, k, c = self.config.hidden_size, self.inner, self.n_heads, self.conv_k, self.conv_channels
        m = p + "mixer."
        return Mamba2Layer(
            norm=w.put(w.get(p + "norm.weight", (e,))),
            w_in=w.put(w.get(m + "in_proj.weight", (i + c + h, e)).T),
            conv_w=w.put(w.get(m + "conv1d.weight", (c, 1, k))[:, 0, :]),
            conv_b=w.put(w.get(m + "conv1d.bias", (c,))) if m + "conv1d.bias" in w.tensors else None,
            dt_bias=w.put(w.get(m + "dt_bias", (h,))),
            a=w.put(-np.exp(w.get(m + "A_log", (h,)))),
            d=w.put(w.get(m + "D", (h,))),
            gate_norm=w.put(w.get(m + "norm.weight", (i,))),
            w_out=w.put(w.get(m + "out_proj.weight", (e, i)).T),
        )

    def memory_spec(self) -> MemorySpec:
        ssm = (self.n_heads, self.head_width, self.n_state) if self.version == 2 else (self.inner, self.n_state)
        layer = RecurrentSpec((self.conv_channels, self.conv_k - 1), ssm)
        return MemorySpec(tuple(layer for _ in range(self.config.n_layers)), model=self.config.name or "mamba")

    def embed(self, tokens: np.ndarray) -> Any:
        return self.embedding[self.backend.index(tokens)]

    def block(self, layer: int, x: Any, ub: MicroBatch, shared: Any) -> Any:
        w = self.layers[layer]
        s, t = len(ub.seqs), ub.n_seq_tokens
        assert t is not None, "recurrent layers run on equal-split micro-batches"
        h = rms_norm(x, w.norm, self.config.rms_norm_eps).reshape(s, t, -1)  # [n, E] -> [S, T, E]
        conv_state, ssm_state = ub.state(layer)
        mixer = self._mixer2 if isinstance(w, Mamba2Layer) else self._mixer1
        out, conv_state, ssm_state = mixer(w, h, conv_state, ssm_state)  # type: ignore[arg-type]
        ub.store_state(layer, conv_state, ssm_state)
        return x + out.reshape(x.shape)

    def _mixer1(self, w: Mamba1Layer, h: Any, conv_state: Any, ssm_state: Any) -> tuple[Any, Any, Any]:
        xp, i, n, r = self.backend.xp, self.inner, self.n_state, self.dt_rank
        xz = h @ w.w_in  # [S, T, E] @ [E, 2I] -> [S, T, 2I]
        x, z = xz[..., :i], xz[..., i:]
        x, conv_state = causal_conv(x, conv_state, w.conv_w, w.conv_b)
        x = silu(x)  # [S, T, I]
        dbc = x @ w.w_x  # [S, T, I] @ [I, R+2N] -> [S, T, R+2N]
        dt = softplus(dbc[..., :r] @ w.w_dt + w.b_dt)  # [S, T, R] @ [R, I] -> [S, T, I]
        b, c = dbc[..., r : r + n], dbc[..., r + n :]  # [S, T, N] each
        decay = xp.exp(dt[..., None] * w.a)  # [S, T, I, N]
        inflow = (dt * x)[..., None] * b[:, :, None, :]  # [S, T, I, N]
        ys = []
        for step in range(h.shape[1]):
            ssm_state = decay[:, step] * ssm_state + inflow[:, step]  # [S, I, N]
            ys.append(xp.einsum("sin,sn->si", ssm_state, c[:, step]))  # [S, I]
        y = xp.stack(ys, axis=1) + x * w.d  # [S, T, I]
        return (y * silu(z)) @ w.w_out, conv_state, ssm_state  # [S, T, I] @ [I, E] -> [S, T, E]

    def _mixer2(self, w: Mamba2Layer, h: Any, conv_state: Any, ssm_state: Any) -> tuple[Any, Any, Any]:
        xp = self.backend.xp
        i, c_dim, n_heads, p, g, n = (
            self.inner,
            self.conv_channels,
            self.n_heads,
            self.head_width,
            self.groups,
            self.n_state,
        )
        s, t = h.shape[0], h.shape[1]
        proj = h @ w.w_in  # [S, T, E] @ [E, I + C + H] -> [S, T, I + C + H]
        z, xbc, dt = proj[..., :i], proj[..., i : i + c_dim], proj[..., i + c_dim :]
        xbc, conv_state = causal_conv(xbc, conv_state, w.conv_w, w.conv_b)
        xbc = silu(xbc)
        x = xbc[..., :i].reshape(s, t, n_heads, p)  # [S, T, H, P]
        per_group = n_heads // g
        b = xp.repeat(xbc[..., i : i + g * n].reshape(s, t, g, n), per_group, axis=2)  # [S, T, H, N]
        c = xp.repeat(xbc[..., i + g * n :].reshape(s, t, g, n), per_group, axis=2)  # [S, T, H, N]
        dt = xp.clip(softplus(dt + w.dt_bias), self.dt_limit[0], self.dt_limit[1])  # [S, T, H]
        decay = xp.exp(dt * w.a)  # [S, T, H]
        ys = []
        for step in range(t):
            inflow = (dt[:, step, :, None] * x[:, step])[..., None] * b[:, step, :, None, :]  # [S, H, P, N]
            ssm_state = ssm_state * decay[:, step, :, None, None] + inflow
            ys.append(xp.einsum("shpn,shn->shp", ssm_state, c[:, step]))  # [S, H, P]
        y = xp.stack(ys, axis=1) + x * w.d[:, None]  # [S, T, H, P]
        y = gated_rms_norm(y.reshape(s, t, i), z, w.gate_norm, g, self.config.rms_norm_eps)
        return y @ w.w_out, conv_state, ssm_state  # [S, T, I] @ [I, E] -> [S, T, E]

    def head(self, x: Any) -> Any:
        return rms_norm(x, self.final_norm, self.config.rms_norm_eps) @ self.lm_head_t
