"""Flattening a nested training state into named tensors plus a JSON skeleton.

No pickle anywhere: the skeleton is plain JSON. Tensors (and numpy arrays) are replaced
by references to named entries; small values are encoded with a few tagged forms:

=================  =========================================
Python value       JSON form
=================  =========================================
str/int/bool/None  itself
float              itself; NaN/±inf as ``{"__float__": "nan"}``
list               JSON list
tuple              ``{"__tuple__": [...]}``
dict (str keys)    JSON object (keys starting "__" are escaped)
other dict         ``{"__dict__": [[key, value], ...]}``
bytes              ``{"__bytes__": base64}``
torch.Tensor       ``{"__tensor__": name}``
numpy.ndarray      ``{"__ndarray__": name}``
numpy scalar       ``{"__npscalar__": [dtype, value]}``
torch.dtype        ``{"__torch_dtype__": name}``
torch.Size         ``{"__size__": [...]}``
=================  =========================================
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import dtypes
from .errors import UnsupportedValueError

JSON = Any


def _escape(part: str) -> str:
    return part.replace("%", "%25").replace("/", "%2F")


@dataclass
class FlatState:
    """A training state split into ``tensors`` (name -> tensor) and a JSON ``skeleton``."""

    skeleton: JSON
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    numpy_names: set[str] = field(default_factory=set)


def flatten(state: Any) -> FlatState:
    """Split ``state`` into named tensors and a JSON skeleton.

    Tensors that alias the same memory (tied weights) are stored once and restored as one
    shared tensor. Raises :class:`UnsupportedValueError` naming the path of any value that
    cannot be represented without pickle.
    """
    flat = FlatState(skeleton=None)
    seen: dict[tuple[Any, ...], str] = {}

    def add_tensor(t: torch.Tensor, path: str) -> str:
        if t.layout != torch.strided:
            raise UnsupportedValueError(f"{path or '<root>'}: {t.layout} tensors are not supported; call .to_dense()")
        dtypes.info(t.dtype)  # raises for unsupported dtypes
        name = path or "<root>"
        if t.numel() > 0 and t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t.device)
            if key in seen:
                return seen[key]
            seen[key] = name
        if name in flat.tensors:
            raise UnsupportedValueError(f"two values map to the tensor name {name!r}; rename a key")
        flat.tensors[name] = t
        return name

    def enc(v: Any, path: str) -> JSON:
        # the common cases first (a state is mostly tensors in dicts and lists); numpy scalars before the
        # Python number checks: np.float64, np.complex128 and np.str_ subclass the Python types
        if isinstance(v, torch.Tensor):
            return {"__tensor__": add_tensor(v.detach() if v.requires_grad else v, path)}
        if isinstance(v, Mapping):
            if all(isinstance(k, str) for k in v):
                return {(("__" + k) if k.startswith("__") else k): enc(x, _child(path, k)) for k, x in v.items()}
            return {"__dict__": [[enc_key(k, path), enc(x, _child(path, str(k)))] for k, x in v.items()]}
        if isinstance(v, list):
            return [enc(x, f"{path}/{i}") for i, x in enumerate(v)]
        if isinstance(v, np.generic):
            if isinstance(v, np.bool_):
                return {"__npscalar__": ["bool", bool(v)]}
            if v.dtype.kind in "fc" and v.dtype.itemsize > (8 if v.dtype.kind == "f" else 16):  # long double
                raise UnsupportedValueError(
                    f"{path}: numpy {v.dtype} scalars cannot be stored exactly; convert to float64"
                )
            if isinstance(v, np.complexfloating):
                return {"__npscalar__": [v.dtype.str, [_float(float(v.real)), _float(float(v.imag))]]}
            if isinstance(v, (np.integer, np.floating, np.str_)):
                item = v.item()
                return {"__npscalar__": [v.dtype.str, _float(item) if isinstance(item, float) else item]}
            raise UnsupportedValueError(
                f"{path}: numpy scalars of type {type(v).__name__} cannot be stored "
                "(asymstore never pickles); convert it to a number or string"
            )
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int):
            return int(v)
        if isinstance(v, float):
            return v if math.isfinite(v) else {"__float__": repr(v)}
        if isinstance(v, np.ndarray):
            if v.dtype.hasobject:
                raise UnsupportedValueError(f"{path}: numpy object arrays cannot be stored without pickle")
            arr = v if v.flags.c_contiguous and v.flags.writeable else v.copy(order="C")  # keeps 0-d arrays 0-d
            name = add_tensor(torch.from_numpy(arr), path)
            flat.numpy_names.add(name)
            return {"__ndarray__": name}
        if isinstance(v, torch.dtype):
            return {"__torch_dtype__": str(v).removeprefix("torch.")}
        if isinstance(v, torch.Size):
            return {"__size__": list(v)}
        if isinstance(v, (bytes, bytearray)):
            return {"__bytes__": base64.b64encode(bytes(v)).decode("ascii")}
        if isinstance(v, tuple):
            return {"__tuple__": [enc(x, f"{path}/{i}") for i, x in enumerate(v)]}
        raise UnsupportedValueError(
            f"{path or '<root>'}: values of type {type(v).__module__}.{type(v).__qualname__} cannot be stored "
            "(asymstore never pickles); convert it to tensors, numbers, strings, lists or dicts "
            "(e.g. call its state_dict())"
        )

    def enc_key(k: Any, path: str) -> JSON:
        if isinstance(k, (str, int, float, bool, tuple, np.generic)) or k is None:
            return enc(k, path)
        raise UnsupportedValueError(f"{path}: dict key {k!r} of type {type(k).__name__} cannot be stored")

    flat.skeleton = enc(state, "")
    return flat


def _float(x: float) -> float | str:
    """A float for JSON: itself, or its repr ("nan", "inf", "-inf") when not finite."""
    return x if math.isfinite(x) else repr(x)


def _child(path: str, key: str) -> str:
    return f"{path}/{_escape(key)}" if path else _escape(key)


def unflatten(skeleton: JSON, get_tensor: Callable[[str], torch.Tensor]) -> Any:
    """Rebuild a state from its skeleton; ``get_tensor(name)`` supplies each tensor."""
    cache: dict[str, torch.Tensor] = {}

    def tensor(name: str) -> torch.Tensor:
        if name not in cache:
            cache[name] = get_tensor(name)
        return cache[name]

    def dec(v: JSON) -> Any:
        if isinstance(v, list):
            return [dec(x) for x in v]
        if not isinstance(v, dict):
            return v
        if len(v) == 1:
            ((tag, x),) = v.items()
            if tag == "__tensor__":
                return tensor(x)
            if tag == "__ndarray__":
                return tensor(x).numpy()
            if tag == "__tuple__":
                return tuple(dec(y) for y in x)
            if tag == "__dict__":
                return {dec(k): dec(y) for k, y in x}
            if tag == "__float__":
                return float(x)
            if tag == "__bytes__":
                return base64.b64decode(x)
            if tag == "__torch_dtype__":
                return dtypes.from_name(x)
            if tag == "__size__":
                return torch.Size(x)
            if tag == "__npscalar__":
                dt, val = x
                if dt == "bool":
                    return np.bool_(val)
                if isinstance(val, list):  # complex: [real, imag]
                    re_, im_ = (float(p) for p in val)
                    return np.dtype(dt).type(complex(re_, im_))
                if isinstance(val, str) and np.dtype(dt).kind == "f":
                    return np.dtype(dt).type(float(val))
                return np.dtype(dt).type(val)
        return {(k[2:] if k.startswith("____") else k): dec(x) for k, x in v.items()}

    return dec(skeleton)
