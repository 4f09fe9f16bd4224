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
from .validate import MAX_DEPTH

JSON = Any


def _escape(part: str) -> str:
    return part.replace("%", "%25").replace("/", "%2F")


@dataclass
class FlatState:
    """A training state split into ``tensors`` (name -> tensor) and a JSON ``skeleton``."""

    skeleton: JSON
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    numpy_names: set[str] = field(default_factory=set)
    #: tensor name -> the parts of global tensors it holds (DTensors are described automatically;
    #: :mod:`asymstore.globalmeta`)
    global_parts: dict[str, Any] = field(default_factory=dict)


def flatten(state: Any) -> FlatState:
    """Split ``state`` into named tensors and a JSON skeleton.

    Tensors that alias the same memory (tied weights) are stored once and restored as one
    shared tensor. Raises :class:`UnsupportedValueError` naming the path of any value that
    cannot be represented without pickle.
    """
    flat = FlatState(skeleton=None)
    seen: dict[tuple[Any, ...], str] = {}

    def add_tensor(t: torch.Tensor, path: str) -> str:
        where = path or "<root>"
        if t.is_nested:
            raise UnsupportedValueError(
                f"{where}: nested tensors are not supported; store t.unbind() (a list of tensors) or "
                "torch.nested.to_padded_tensor(t, 0.0) with the lengths"
            )
        if t.layout != torch.strided:
            raise UnsupportedValueError(f"{where}: {t.layout} tensors are not supported; call .to_dense()")
        if t.device.type == "meta":
            raise UnsupportedValueError(
                f"{where}: a meta tensor holds no data, so it can be neither saved nor restored into; "
                "materialise it first (e.g. module.to_empty(device='cpu') and load or initialise its weights)"
            )
        try:
            dtypes.info(t.dtype)  # raises for unsupported dtypes
        except UnsupportedValueError as e:
            raise UnsupportedValueError(f"{where}: {e}") from None
        name = where
        if t._is_zerotensor():  # an autograd zero tensor has no storage: store the zeros it stands for
            t = torch.zeros(t.shape, dtype=t.dtype, device=t.device)
        try:
            ptr = t.untyped_storage().data_ptr() if t.numel() > 0 else 0
        except RuntimeError as e:
            raise UnsupportedValueError(
                f"{where}: a {type(t).__name__} without accessible memory ({e}); save real tensors "
                "(e.g. outside torch.compile/fake-tensor tracing, or call .clone() on a materialised value)"
            ) from None
        if t.numel() > 0:
            # the lazy conjugate and negative bits change what the same memory means: x, x.conj() and
            # torch._neg_view(x) share their storage but are three different values
            key = (
                ptr,
                t.storage_offset(),
                tuple(t.shape),
                t.stride(),
                t.dtype,
                t.device,
                t.is_conj(),
                t.is_neg(),
            )
            if key in seen:
                return seen[key]
            seen[key] = name
        if name in flat.tensors:
            raise UnsupportedValueError(f"two values map to the tensor name {name!r}; rename a key")
        flat.tensors[name] = t
        return name

    active: dict[int, str] = {}  # containers on the path being encoded: a circular reference's witness

    def enc(v: Any, path: str, depth: int = 0) -> JSON:
        # the common cases first (a state is mostly tensors in dicts and lists); numpy scalars before the
        # Python number checks: np.float64, np.complex128 and np.str_ subclass the Python types
        if isinstance(v, torch.Tensor):
            if type(v).__name__ == "DTensor":  # its local shard is stored, described as a box of the global tensor
                from .globalmeta import describe_dtensor, is_dtensor

                if is_dtensor(v):
                    local, piece = describe_dtensor(v.detach(), path or "<root>")
                    name = add_tensor(local.detach(), path)
                    flat.global_parts.setdefault(name, (piece,))  # tied: described by its first name
                    return {"__tensor__": name}
            return {"__tensor__": add_tensor(v.detach() if v.requires_grad else v, path)}
        if isinstance(v, (Mapping, list, tuple)):
            if id(v) in active:
                raise UnsupportedValueError(
                    f"{path or '<root>'}: circular reference: this value is also its own ancestor "
                    f"{active[id(v)] or '<root>'}; break the cycle (store the shared part once)"
                )
            if depth >= MAX_DEPTH:
                raise UnsupportedValueError(
                    f"{(path or '<root>')[:80]}...: the state is nested more than {MAX_DEPTH} levels deep; flatten it"
                )
            active[id(v)] = path
            try:
                return enc_container(v, path, depth + 1)
            finally:
                del active[id(v)]
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
            _check_ndarray(v, path or "<root>")
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
        raise UnsupportedValueError(
            f"{path or '<root>'}: values of type {type(v).__module__}.{type(v).__qualname__} cannot be stored "
            "(asymstore never pickles); convert it to tensors, numbers, strings, lists or dicts "
            "(e.g. call its state_dict())"
        )

    def enc_container(v: Mapping[Any, Any] | list[Any] | tuple[Any, ...], path: str, depth: int) -> JSON:
        if isinstance(v, Mapping):
            if all(isinstance(k, str) for k in v):
                return {(("__" + k) if k.startswith("__") else k): enc(x, _child(path, k), depth) for k, x in v.items()}
            return {"__dict__": [[enc_key(k, path), enc(x, _child(path, str(k)), depth)] for k, x in v.items()]}
        if isinstance(v, list):
            return [enc(x, f"{path}/{i}", depth) for i, x in enumerate(v)]
        return {"__tuple__": [enc(x, f"{path}/{i}", depth) for i, x in enumerate(v)]}

    def enc_key(k: Any, path: str) -> JSON:
        if isinstance(k, (str, int, float, bool, tuple, np.generic)) or k is None:
            return enc(k, path)
        raise UnsupportedValueError(f"{path}: dict key {k!r} of type {type(k).__name__} cannot be stored")

    flat.skeleton = enc(state, "")
    return flat


def _check_ndarray(v: np.ndarray, path: str) -> None:
    """Refuse numpy arrays the format cannot hold, saying how to convert them."""
    kind = v.dtype.kind
    if v.dtype.hasobject:
        raise UnsupportedValueError(
            f"{path}: numpy object arrays cannot be stored without pickle; convert it to a numeric array "
            "or to a list (arr.tolist())"
        )
    if kind in "Mm":
        raise UnsupportedValueError(
            f"{path}: numpy {v.dtype} arrays are not supported; store arr.astype('int64') and the unit "
            f"({np.datetime_data(v.dtype)[0]!r}) separately"
        )
    if kind in "USV":
        raise UnsupportedValueError(
            f"{path}: numpy {v.dtype} arrays (strings, bytes, records) are not supported; store arr.tolist()"
        )
    if not v.dtype.isnative:
        raise UnsupportedValueError(
            f"{path}: numpy {v.dtype} is not in this machine's byte order; store arr.astype(arr.dtype.newbyteorder('='))"
        )
    if kind not in "biufc" or (kind in "fc" and v.dtype.itemsize > (8 if kind == "f" else 16)):
        raise UnsupportedValueError(f"{path}: numpy {v.dtype} arrays are not supported; convert it (e.g. to float64)")


def decode_npscalar(x: Any) -> Any:
    """The numpy scalar of a skeleton's ``{"__npscalar__": [dtype, value]}``; ``ValueError``/``TypeError``
    when it is malformed."""
    if not isinstance(x, list) or len(x) != 2 or not isinstance(x[0], str):
        raise ValueError("expected [dtype, value]")
    dt, val = x
    if dt == "bool":
        if not isinstance(val, bool):
            raise TypeError("a numpy bool needs true or false")
        return np.bool_(val)
    d = np.dtype(dt)
    if d.kind not in "iufcU" or d.itemsize > (1 << 22 if d.kind == "U" else 16):
        raise ValueError(f"numpy dtype {dt!r} is not a numeric or string scalar type")
    if isinstance(val, list):  # complex: [real, imag]
        if d.kind != "c" or len(val) != 2:
            raise ValueError("only complex scalars are [real, imag]")
        re_, im_ = (float(p) for p in val)
        return d.type(complex(re_, im_))  # type: ignore[arg-type]
    if isinstance(val, bool) or not isinstance(val, (int, float, str)):
        raise TypeError(f"{type(val).__name__} is not a numpy {dt} value")
    if d.kind == "U" and not isinstance(val, str):
        raise TypeError("a numpy string needs a string")
    if d.kind in "iu" and not isinstance(val, int):
        raise TypeError("a numpy integer needs an integer")
    if isinstance(val, str) and d.kind == "f":
        return d.type(float(val))
    if isinstance(val, str) and d.kind != "U":
        raise TypeError(f"a numpy {dt} value cannot be a string")
    return d.type(val)


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
                return decode_npscalar(x)
        return {(k[2:] if k.startswith("____") else k): dec(x) for k, x in v.items()}

    return dec(skeleton)
