"""A strict stand-in for CuPy, so that the GPU path runs (and cannot rot) on machines without a GPU.

Install it as the `cupy` module (`install(monkeypatch)`: `sys.modules["cupy"]` for one test): then
`get_backend("cupy")` and `load_model(..., backend="cupy")` take it, and `nn.xp_of` finds it for
any array that is not a NumPy one. Its arrays (`DeviceArray`) keep their numbers in a NumPy array
that stands for device memory, and behave as CuPy's do at the boundary between host and device,
as read in CuPy's sources (cupy/_core/core.pyx, _kernel.pyx, _routines_indexing.pyx):

refused, as CuPy refuses it
- implicit conversion to NumPy: `np.asarray(device)` raises TypeError (CuPy's `__array__`);
- a NumPy array (of any shape, 0-d included) as an operand of device arithmetic, a ufunc or a
  device function: TypeError (`_kernel._preprocess_arg` takes only device arrays and Python or
  NumPy scalars); also a NumPy array as `out`;
- assigning a non-scalar NumPy array through basic indexing (`dev[2:5] = host`): ValueError
  (CuPy's `fill`, "non-scalar numpy.ndarray cannot be used for fill");
- a NumPy function that CuPy lacks, called on a device array: TypeError (`__array_function__`
  answers NotImplemented); here only the functions this module defines count as CuPy's;
- `get(out=...)` into a host array of another dtype or shape, or a non-contiguous one.

allowed, as CuPy allows it, and counted as a host-device copy (`TRANSFERS`)
- host to device: `asarray`/`array` of host data, a host index array or list (CuPy converts it),
  a host array assigned through advanced indexing (`dev[idx] = host`: converted);
- device to host: `asnumpy`, `.get()`, `.item()`, `.tolist()`, `int()`, `float()`, `bool()` and
  `repr()` of a device array: each one a copy and a synchronization.

Stricter than CuPy in two corners no statemesh code needs: `copyto` of a one-element NumPy array,
and `asarray` of a list of device arrays, are refused. `empty` returns memory filled with NaN
(floats) or the dtype's largest value (integers), so that reading what was never written shows.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np

# ---- what crossed between host and device ---------------------------------------------------------


@dataclass
class Transfers:
    """Host-device copies counted since the last `reset`, with where each was asked for."""

    to_device: int = 0
    to_device_bytes: int = 0
    to_host: int = 0
    to_host_bytes: int = 0
    sites: Counter[str] = field(default_factory=Counter)  # "to_host memory/backend.py:84" -> copies
    # NumPy functions called on device arrays (np.argmax(device), np.concatenate([device, ...])):
    # CuPy runs them on the device (`__array_function__`), but they show code that took a device
    # array for a host one, and their results are device arrays where it expects host ones
    numpy_calls: Counter[str] = field(default_factory=Counter)  # "np.argmax engine/sampling.py:139" -> calls

    def reset(self) -> None:
        self.to_device = self.to_device_bytes = self.to_host = self.to_host_bytes = 0
        self.sites.clear()
        self.numpy_calls.clear()

    @property
    def copies(self) -> int:
        return self.to_device + self.to_host

    def record(self, direction: str, nbytes: int) -> None:
        if direction == "to_device":
            self.to_device += 1
            self.to_device_bytes += nbytes
        else:
            self.to_host += 1
            self.to_host_bytes += nbytes
        self.sites[f"{direction} {_caller()}"] += 1

    def report(self) -> str:
        lines = [
            f"host->device {self.to_device} copies ({self.to_device_bytes} B), "
            f"device->host {self.to_host} copies ({self.to_host_bytes} B)"
        ]
        lines += [f"  {n:4d} x {site}" for site, n in self.sites.most_common()]
        lines += [f"  {n:4d} x numpy on the device: {site}" for site, n in self.numpy_calls.most_common()]
        return "\n".join(lines)


TRANSFERS = Transfers()


def _caller() -> str:
    """Where a copy was asked for: the first frame outside this module, after its caller when that
    frame is a helper of statemesh's own backend (`Backend.index` says little; who called it, much):
    "memory/kv_cache.py:411 > memory/backend.py:52"."""
    frame: Any = sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    site = _where(frame)
    if site.startswith("memory/backend.py") and frame.f_back is not None:
        site = f"{_where(frame.f_back)} > {site}"
    return site


def _where(frame: Any) -> str:
    path = Path(frame.f_code.co_filename)
    return f"{path.parent.name}/{path.name}:{frame.f_lineno}"


def _names(words: str) -> frozenset[str]:
    return frozenset(words.split())


# ---- the device array -----------------------------------------------------------------------------

HOST_ARRAY_REFUSED = (
    "a numpy.ndarray given where a device array or a scalar is needed: CuPy refuses to mix host and "
    "device arrays (move it with cupy.asarray first)"
)


class DeviceArray(np.lib.mixins.NDArrayOperatorsMixin):
    """An array "on the device": its numbers live in `_data` (NumPy), which no one outside this
    module reads. Operators go through `__array_ufunc__` (NDArrayOperatorsMixin), as CuPy's do."""

    __slots__ = ("_data",)
    __hash__ = None  # type: ignore[assignment]  # arrays are not hashable

    def __init__(self, data: np.ndarray):
        assert isinstance(data, np.ndarray), type(data)
        self._data = data

    # -- what CuPy refuses

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise TypeError(
            "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a NumPy "
            "array explicitly."
        )

    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        if ufunc.__name__ not in UFUNCS or method not in ("__call__", "reduce", "accumulate", "outer"):
            return NotImplemented
        call = ufunc if method == "__call__" else getattr(ufunc, method)
        return _on_device(call, inputs, kwargs)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if func.__module__ != "numpy" or func.__name__ not in FUNCTIONS:
            return NotImplemented  # CuPy has no such function: NumPy then raises TypeError
        TRANSFERS.numpy_calls[f"np.{func.__name__} {_caller()}"] += 1
        return FUNCTIONS[func.__name__](*args, **kwargs)

    # -- what CuPy allows, with a copy to the host

    def get(self, stream: Any = None, order: str = "C", out: np.ndarray | None = None, blocking: bool = True) -> Any:
        if out is None:
            TRANSFERS.record("to_host", self._data.nbytes)
            return np.array(self._data, order=order)
        if not isinstance(out, np.ndarray):
            raise TypeError("Only numpy.ndarray can be obtained from cupy.ndarray")
        if out.dtype != self.dtype:
            raise TypeError(f"{out.dtype} array cannot be obtained from {self.dtype} array")
        if out.shape != self.shape:
            raise ValueError(f"Shape mismatch. Expected shape: {self.shape}, actual shape: {out.shape}")
        if not (out.flags.c_contiguous or out.flags.f_contiguous):
            raise RuntimeError("`out` cannot be specified when copying to non-contiguous ndarray")
        TRANSFERS.record("to_host", self._data.nbytes)
        np.copyto(out, self._data)
        return out

    def set(self, arr: np.ndarray) -> None:
        if not isinstance(arr, np.ndarray) or arr.shape != self.shape:
            raise ValueError(f"set takes a numpy.ndarray of shape {self.shape}")
        TRANSFERS.record("to_device", arr.nbytes)
        np.copyto(self._data, arr)

    def item(self) -> Any:
        TRANSFERS.record("to_host", self._data.itemsize)
        return self._data.item()

    def tolist(self) -> Any:
        TRANSFERS.record("to_host", self._data.nbytes)
        return self._data.tolist()

    def __int__(self) -> int:
        return int(self.item())

    def __float__(self) -> float:
        return float(self.item())

    def __complex__(self) -> complex:
        return complex(self.item())

    def __bool__(self) -> bool:
        if self._data.size != 1:
            raise ValueError("The truth value of an array with more than one element is ambiguous.")
        return bool(self.item())

    def __repr__(self) -> str:
        TRANSFERS.record("to_host", self._data.nbytes)
        return "strict_cupy." + repr(self._data)

    # -- device-side properties and methods (no copy)

    shape = property(lambda self: self._data.shape)
    dtype = property(lambda self: self._data.dtype)
    ndim = property(lambda self: self._data.ndim)
    size = property(lambda self: self._data.size)
    nbytes = property(lambda self: self._data.nbytes)
    itemsize = property(lambda self: self._data.itemsize)
    strides = property(lambda self: self._data.strides)
    flags = property(lambda self: self._data.flags)
    T = property(lambda self: DeviceArray(self._data.T))

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Any:
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self)))

    def __getattr__(self, name: str) -> Any:
        if name not in METHODS:
            raise AttributeError(f"strict_cupy.DeviceArray has no attribute {name!r} (nor has this stand-in)")
        method = getattr(self._data, name)
        return lambda *args, **kwargs: _on_device(method, args, kwargs)

    def __getitem__(self, key: Any) -> DeviceArray:
        return _wrap(self._data[_device_key(key)])

    def __setitem__(self, key: Any, value: Any) -> None:
        advanced = _is_advanced(key)
        index = _device_key(key)
        if isinstance(value, DeviceArray):
            value = value._data
        elif isinstance(value, (np.ndarray, list, tuple)):
            host = np.asarray(value)
            if not advanced and host.shape != ():
                raise ValueError("non-scalar numpy.ndarray cannot be used for fill")
            if advanced:  # CuPy converts it: an implicit copy to the device
                TRANSFERS.record("to_device", host.nbytes)
            value = host
        elif not _is_scalar(value):
            raise TypeError(f"cannot assign a {type(value).__name__} to a device array")
        self._data[index] = value


# ndarray methods CuPy's ndarray has too (each computed on the device, returning device arrays)
METHODS = _names(
    "all any argmax argmin argsort astype clip copy cumsum diagonal dot fill flatten max mean min nonzero "
    "prod ravel repeat reshape round sort squeeze std sum swapaxes take trace transpose var view"
)


def _is_scalar(x: Any) -> bool:
    return isinstance(x, (bool, int, float, complex, np.generic))


def _is_advanced(key: Any) -> bool:
    """Whether an index holds an array or a list (advanced indexing), as CuPy's `_view_getitem` sees it."""
    parts = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, (DeviceArray, np.ndarray, list)) for k in parts)


def _device_key(key: Any) -> Any:
    """An index as the device uses it: device arrays as they are, host index arrays and lists copied
    to the device (CuPy converts them, one copy each)."""
    if isinstance(key, tuple):
        return tuple(_device_key(k) for k in key)
    if isinstance(key, DeviceArray):
        return key._data
    if isinstance(key, (np.ndarray, list)):
        host = np.asarray(key)
        if host.dtype.kind not in "biu" and host.size:
            raise IndexError(f"arrays used as indices must be of integer or boolean type (actual: {host.dtype})")
        TRANSFERS.record("to_device", host.nbytes)
        return host
    return key


def _unwrap(x: Any) -> Any:
    """Arguments of a device computation: device arrays by their data, scalars and everything else
    (shapes, dtypes, axes) as they are, host arrays refused."""
    if isinstance(x, DeviceArray):
        return x._data
    if isinstance(x, np.ndarray):
        raise TypeError(HOST_ARRAY_REFUSED)
    if isinstance(x, (list, tuple)):
        return type(x)(_unwrap(v) for v in x)
    return x


def _wrap(x: Any) -> Any:
    """Results of a device computation: arrays (and NumPy scalars, which CuPy returns as 0-d arrays)
    on the device; tuples of them element by element; Python values as they are."""
    if isinstance(x, np.ndarray):
        return DeviceArray(x)
    if isinstance(x, np.generic):
        return DeviceArray(np.asarray(x))
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    return x


def _on_device(func: Callable[..., Any], args: Any, kwargs: dict[str, Any]) -> Any:
    """func over the data of device arrays; `out=` given back as the very device array passed."""
    out = kwargs.get("out")
    if isinstance(out, tuple) and len(out) == 1:
        out = out[0]
    result = func(*_unwrap(tuple(args)), **{k: _unwrap(v) for k, v in kwargs.items()})
    if isinstance(out, DeviceArray) and result is out._data:
        return out
    return _wrap(result)


# ---- the module's functions, as `cupy.*` --------------------------------------------------------


def asarray(a: Any, dtype: Any = None, order: Any = None) -> DeviceArray:
    """A device array as it is (cast when dtype differs); host data copied to the device."""
    if isinstance(a, DeviceArray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else DeviceArray(a._data.astype(dtype))
    host = np.array(a, dtype=dtype, order=order or "K", copy=True)  # a copy: the host's may change after
    TRANSFERS.record("to_device", host.nbytes)
    return DeviceArray(host)


def array(a: Any, dtype: Any = None, copy: bool = True, order: Any = None) -> DeviceArray:
    if isinstance(a, DeviceArray):
        return DeviceArray(np.array(a._data, dtype=dtype, copy=copy, order=order or "K"))
    return asarray(a, dtype, order)


def asnumpy(a: Any, stream: Any = None, order: str = "C", out: np.ndarray | None = None, blocking: bool = True) -> Any:
    if isinstance(a, DeviceArray):
        return a.get(stream, order, out)
    return np.asarray(a, order=order)  # already on the host: CuPy copies nothing either


def _created_on_device(maker: Callable[..., np.ndarray], uninitialized: bool = False) -> Callable[..., DeviceArray]:
    """A creation function (zeros, empty, ...): its result is made on the device, nothing is copied.
    Uninitialized memory is poisoned: NaN, or an integer no one would mistake, so that reading
    what was never written shows."""

    def create(*args: Any, **kwargs: Any) -> DeviceArray:
        data = maker(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()})
        if uninitialized and data.dtype.kind == "f":
            data.fill(np.nan)
        elif uninitialized and data.dtype.kind in "iu":
            data.fill(np.iinfo(data.dtype).max)
        return DeviceArray(data)

    return create


def _device_function(func: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return _on_device(func, args, kwargs)

    return call


# ufuncs CuPy has (called as operators, through NumPy, or as cupy.<name>)
UFUNCS = _names(
    "absolute add arccos arcsin arctan arctan2 bitwise_and bitwise_not bitwise_or bitwise_xor ceil cos cosh "
    "divide equal exp exp2 expm1 floor floor_divide fmax fmin greater greater_equal invert isfinite isinf isnan "
    "left_shift less less_equal log log10 log1p log2 logaddexp logical_and logical_not logical_or logical_xor "
    "matmul maximum minimum multiply negative not_equal positive power reciprocal remainder right_shift rint "
    "sign sin sinh sqrt square subtract tan tanh true_divide"
)
# other functions CuPy has, over device arrays
OTHER_FUNCTIONS = _names(
    "all allclose any argmax argmin argsort array_equal ascontiguousarray broadcast_to clip concatenate copyto "
    "cumsum einsum expand_dims flatnonzero full_like max mean min moveaxis nonzero ones_like outer prod ravel "
    "repeat reshape sort split squeeze stack sum swapaxes take take_along_axis tile transpose tril triu where "
    "zeros_like"
)
FUNCTIONS: dict[str, Callable[..., Any]] = {
    **{name: _device_function(getattr(np, name)) for name in sorted(UFUNCS | OTHER_FUNCTIONS)},
    "abs": _device_function(np.absolute),
    "empty_like": _created_on_device(np.empty_like, uninitialized=True),
    "zeros": _created_on_device(np.zeros),
    "ones": _created_on_device(np.ones),
    "full": _created_on_device(np.full),
    "arange": _created_on_device(np.arange),
    "empty": _created_on_device(np.empty, uninitialized=True),
}


def _module() -> ModuleType:
    """The stand-in as a module named cupy: what statemesh reaches through `xp`."""
    cupy = ModuleType("cupy", __doc__)
    vars(cupy).update(FUNCTIONS)
    vars(cupy).update(
        ndarray=DeviceArray,
        asarray=asarray,
        array=array,
        asnumpy=asnumpy,
        cuda=SimpleNamespace(is_available=lambda: True),
    )
    # dtypes and constants: CuPy re-exports NumPy's
    for name in _names(
        "bool_ int8 int16 int32 int64 intp uint8 uint16 uint32 uint64 float16 float32 float64 complex64 "
        "complex128 dtype finfo iinfo inf nan pi e newaxis"
    ):
        setattr(cupy, name, getattr(np, name))
    return cupy


cupy = _module()


def install(monkeypatch: Any) -> ModuleType:
    """The stand-in as `cupy` for one test (pytest's monkeypatch puts the real one, if any, back),
    its counters at zero. `get_backend("cupy")` and `nn.xp_of` then find it."""
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    TRANSFERS.reset()
    return cupy
