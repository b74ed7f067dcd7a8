"""The selective state space mixers, shared by Mamba models and the hybrids.

For each sequence's run of T tokens (micro-batches hold equal runs, so rows view as [S, T, ...]):

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from statemesh.memory import RecurrentSpec
from statemesh.worker.kernels.nn import Weights, rms_norm, silu, xp_of


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


def gated_rms_norm(y: Any, z: Any, w: Any, groups: int, eps: float, norm_before_gate: bool = False) -> Any:
    """RMSNorm over each of `groups` equal slices of the last axis, times w, gated by silu(z): the
    gate is applied before the norm (Mamba-2's default) or after it (`norm_before_gate`)."""
    xp = xp_of(y)
    shape = y.shape
    g = y if norm_before_gate else y * silu(z)
    g = g.reshape(*shape[:-1], groups, shape[-1] // groups)  # [..., G, I/G]
    mean_square = (g * g).mean(axis=-1, keepdims=True)
    out = (g / xp.sqrt(mean_square + xp.float32(eps))).reshape(shape) * w
    return out * silu(z) if norm_before_gate else out


def _optional(w: Weights, name: str, shape: tuple[int, ...]) -> Any | None:
    return w.put(w.get(name, shape)) if name in w.tensors else None


@dataclass(frozen=True)
class Mamba1Dims:
    inner: int  # I
    n_state: int  # N
    dt_rank: int  # R
    conv_k: int  # K
    norm_eps: float = 0.0  # of Jamba's dt/B/C norms

    @property
    def state_spec(self) -> RecurrentSpec:
        """What each layer of these dims keeps per sequence (known from the config alone, so a model
        that holds some layers still knows every layer's)."""
        return RecurrentSpec((self.inner, self.conv_k - 1), (self.inner, self.n_state))


@dataclass(frozen=True)
class Mamba1Mixer:
    inner: int  # I
    n_state: int  # N
    dt_rank: int  # R
    conv_k: int  # K
    w_in: Any  # [E, 2I]
    conv_w: Any  # [I, K]
    conv_b: Any | None  # [I]
    w_x: Any  # [I, R + 2N]
    w_dt: Any  # [R, I]
    b_dt: Any  # [I]
    a: Any  # [I, N] = -exp(A_log)
    d: Any  # [I]
    w_out: Any  # [I, E]
    # Jamba normalizes dt, B and C (RMSNorm) between x_proj and their use
    dt_norm: Any | None = None  # [R]
    b_norm: Any | None = None  # [N]
    c_norm: Any | None = None  # [N]
    norm_eps: float = 0.0

    @staticmethod
    def load(w: Weights, m: str, hidden: int, dims: Mamba1Dims) -> Mamba1Mixer:
        """The mixer whose tensors are named `m` + "in_proj.weight", ... (with Jamba's
        dt/b/c_layernorm when the checkpoint has them)."""
        e, i, n, r, k = hidden, dims.inner, dims.n_state, dims.dt_rank, dims.conv_k
        return Mamba1Mixer(
            inner=i, n_state=n, dt_rank=r, conv_k=k,
            w_in=w.put(w.get(m + "in_proj.weight", (2 * i, e)).T),
            conv_w=w.put(w.get(m + "conv1d.weight", (i, 1, k))[:, 0, :]),
            conv_b=_optional(w, m + "conv1d.bias", (i,)),
            w_x=w.put(w.get(m + "x_proj.weight", (r + 2 * n, i)).T),
            w_dt=w.put(w.get(m + "dt_proj.weight", (i, r)).T),
            b_dt=w.put(w.get(m + "dt_proj.bias", (i,))),
            a=w.put(-np.exp(w.get(m + "A_log", (i, n)))),
            d=w.put(w.get(m + "D", (i,))),
            w_out=w.put(w.get(m + "out_proj.weight", (e, i)).T),
            dt_norm=_optional(w, m + "dt_layernorm.weight", (r,)),
            b_norm=_optional(w, m + "b_layernorm.weight", (n,)),
            c_norm=_optional(w, m + "c_layernorm.weight", (n,)),
            norm_eps=dims.norm_eps,
        )  # fmt: skip

    def __call__(self, h: Any, conv_state: Any, ssm_state: Any) -> tuple[Any, Any, Any]:
        """h [S, T, E], states as stored -> (out [S, T, E], new conv state, new SSM state)."""
        xp, i, n, r = xp_of(h), self.inner, self.n_state, self.dt_rank
        xz = h @ self.w_in  # [S, T, E] @ [E, 2I] -> [S, T, 2I]
        x, z = xz[..., :i], xz[..., i:]
        x, conv_state = causal_conv(x, conv_state, self.conv_w, self.conv_b)
        x = silu(x)  # [S, T, I]
        dbc = x @ self.w_x  # [S, T, I] @ [I, R+2N] -> [S, T, R+2N]
        dt, b, c = dbc[..., :r], dbc[..., r : r + n], dbc[..., r + n :]  # [S, T, R], [S, T, N], [S, T, N]
        if self.dt_norm is not None:
            dt = rms_norm(dt, self.dt_norm, self.norm_eps)
            b, c = rms_norm(b, self.b_norm, self.norm_eps), rms_norm(c, self.c_norm, self.norm_eps)
        dt = softplus(dt @ self.w_dt + self.b_dt)  # [S, T, R] @ [R, I] -> [S, T, I]
        decay = xp.exp(dt[..., None] * self.a)  # [S, T, I, N]
        inflow = (dt * x)[..., None] * b[:, :, None, :]  # [S, T, I, N]
        ys = []
        for step in range(h.shape[1]):
            ssm_state = decay[:, step] * ssm_state + inflow[:, step]  # [S, I, N]
            ys.append(xp.einsum("sin,sn->si", ssm_state, c[:, step]))  # [S, I]
        y = xp.stack(ys, axis=1) + x * self.d  # [S, T, I]
        return (y * silu(z)) @ self.w_out, conv_state, ssm_state  # [S, T, I] @ [I, E] -> [S, T, E]


@dataclass(frozen=True)
class Mamba2Dims:
    n_heads: int  # H
    head_width: int  # P
    groups: int  # G
    n_state: int  # N
    conv_k: int  # K
    eps: float
    dt_limit: tuple[float, float]

    @staticmethod
    def from_mamba_config(raw: dict[str, Any], eps: float, head_width: int) -> Mamba2Dims:
        """From the `mamba_*` keys that Bamba, GraniteMoeHybrid and Falcon-H1 configs share."""
        low, high = raw.get("time_step_limit", (0.0, float("inf")))
        return Mamba2Dims(
            n_heads=int(raw["mamba_n_heads"]),
            head_width=head_width,
            groups=int(raw["mamba_n_groups"]),
            n_state=int(raw["mamba_d_state"]),
            conv_k=int(raw["mamba_d_conv"]),
            eps=eps,
            dt_limit=(json_float(low), json_float(high)),
        )

    @property
    def inner(self) -> int:  # I
        return self.n_heads * self.head_width

    @property
    def conv_channels(self) -> int:  # C = I + 2GN
        return self.inner + 2 * self.groups * self.n_state

    @property
    def state_spec(self) -> RecurrentSpec:
        """What each layer of these dims keeps per sequence (from the config alone, as Mamba-1's)."""
        return RecurrentSpec((self.conv_channels, self.conv_k - 1), (self.n_heads, self.head_width, self.n_state))


@dataclass(frozen=True)
class Mamba2Mixer:
    dims: Mamba2Dims
    w_in: Any  # [E, I + C + H]
    conv_w: Any  # [C, K]
    conv_b: Any | None  # [C]
    dt_bias: Any  # [H]
    a: Any  # [H] = -exp(A_log)
    d: Any  # [H]
    gate_norm: Any | None  # [I]; None: the output is only gated, y * silu(z) (Falcon-H1 may do that)
    w_out: Any  # [I, E]
    b_in: Any | None = None  # [I + C + H]
    b_out: Any | None = None  # [E]
    norm_before_gate: bool = False

    @staticmethod
    def load(
        w: Weights,
        m: str,
        hidden: int,
        dims: Mamba2Dims,
        norm: bool = True,
        norm_before_gate: bool = False,
        in_scale: np.ndarray | None = None,
    ) -> Mamba2Mixer:
        """`in_scale` [I + C + H] multiplies each output of in_proj (Falcon-H1's muP vector: one
        factor for z, x, B, C and dt each), folded into the weights here."""
        e, i, h, k, c = hidden, dims.inner, dims.n_heads, dims.conv_k, dims.conv_channels
        scale = np.ones(i + c + h, dtype=np.float32) if in_scale is None else in_scale
        b_in = w.get(m + "in_proj.bias", (i + c + h,)) * scale if m + "in_proj.bias" in w.tensors else None
        return Mamba2Mixer(
            dims=dims,
            w_in=w.put(w.get(m + "in_proj.weight", (i + c + h, e)).T * scale),
            conv_w=w.put(w.get(m + "conv1d.weight", (c, 1, k))[:, 0, :]),
            conv_b=_optional(w, m + "conv1d.bias", (c,)),
            dt_bias=w.put(w.get(m + "dt_bias", (h,))),
            a=w.put(-np.exp(w.get(m + "A_log", (h,)))),
            d=w.put(w.get(m + "D", (h,))),
            gate_norm=w.put(w.get(m + "norm.weight", (i,))) if norm else None,
            w_out=w.put(w.get(m + "out_proj.weight", (e, i)).T),
            b_in=None if b_in is None else w.put(b_in),
            b_out=_optional(w, m + "out_proj.bias", (e,)),
            norm_before_gate=norm_before_gate,
        )  # fmt: skip

    def __call__(self, h: Any, conv_state: Any, ssm_state: Any) -> tuple[Any, Any, Any]:
        """h [S, T, E], states as stored -> (out [S, T, E], new conv state, new SSM state)."""
        xp, d = xp_of(h), self.dims
        i, c_dim, g, n = d.inner, d.conv_channels, d.groups, d.n_state
        s, t = h.shape[0], h.shape[1]
        proj = h @ self.w_in  # [S, T, E] @ [E, I + C + H] -> [S, T, I + C + H]
        if self.b_in is not None:
            proj = proj + self.b_in
        z, xbc, dt = proj[..., :i], proj[..., i : i + c_dim], proj[..., i + c_dim :]
        xbc, conv_state = causal_conv(xbc, conv_state, self.conv_w, self.conv_b)
        xbc = silu(xbc)
        x = xbc[..., :i].reshape(s, t, d.n_heads, d.head_width)  # [S, T, H, P]
        per_group = d.n_heads // g
        b = xp.repeat(xbc[..., i : i + g * n].reshape(s, t, g, n), per_group, axis=2)  # [S, T, H, N]
        c = xp.repeat(xbc[..., i + g * n :].reshape(s, t, g, n), per_group, axis=2)  # [S, T, H, N]
        dt = xp.clip(softplus(dt + self.dt_bias), d.dt_limit[0], d.dt_limit[1])  # [S, T, H]
        decay = xp.exp(dt * self.a)  # [S, T, H]
        ys = []
        for step in range(t):
            inflow = (dt[:, step, :, None] * x[:, step])[..., None] * b[:, step, :, None, :]  # [S, H, P, N]
            ssm_state = ssm_state * decay[:, step, :, None, None] + inflow
            ys.append(xp.einsum("shpn,shn->shp", ssm_state, c[:, step]))  # [S, H, P]
        y = xp.stack(ys, axis=1) + x * self.d[:, None]  # [S, T, H, P]
        y = y.reshape(s, t, i)
        if self.gate_norm is None:
            y = y * silu(z)
        else:
            y = gated_rms_norm(y, z, self.gate_norm, g, d.eps, self.norm_before_gate)
        out = y @ self.w_out  # [S, T, I] @ [I, E] -> [S, T, E]
        return (out if self.b_out is None else out + self.b_out), conv_state, ssm_state
