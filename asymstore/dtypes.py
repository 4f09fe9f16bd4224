"""Mapping between torch dtypes and the dtypes a plain zarr/numpy reader can use.

Tensors are stored as raw little-endian bytes. numpy has no bfloat16 or float8, so
those are described by a same-width unsigned-int view (``view_dtype``) plus the
torch dtype name; any reader can reinterpret the bytes.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import torch

from .errors import UnsupportedValueError

if sys.byteorder != "little":  # pragma: no cover - no big-endian CI machine
    raise ImportError("asymstore stores tensors little-endian and needs a little-endian host")


@dataclass(frozen=True)
class DTypeInfo:
    """How one torch dtype is stored: its name, element size and the numpy dtype that views its bytes."""

    torch_name: str  # e.g. "bfloat16" (torch.<name>)
    itemsize: int
    view_dtype: str  # numpy dtype string a plain reader can use, e.g. "<u2"
    exact_numpy: bool  # True when view_dtype *is* the value type (not a bit view)


def _build() -> dict[torch.dtype, DTypeInfo]:
    table: dict[torch.dtype, DTypeInfo] = {}

    def add(dt: torch.dtype, view: str, exact: bool) -> None:
        name = str(dt).removeprefix("torch.")
        with warnings.catch_warnings():  # complex32 warns that it is experimental
            warnings.simplefilter("ignore")
            size = torch.empty((), dtype=dt).element_size()
        table[dt] = DTypeInfo(name, size, view, exact)

    add(torch.float64, "<f8", True)
    add(torch.float32, "<f4", True)
    add(torch.float16, "<f2", True)
    add(torch.bfloat16, "<u2", False)
    add(torch.complex128, "<c16", True)
    add(torch.complex64, "<c8", True)
    add(torch.complex32, "<u4", False)
    add(torch.int64, "<i8", True)
    add(torch.int32, "<i4", True)
    add(torch.int16, "<i2", True)
    add(torch.int8, "|i1", True)
    add(torch.uint8, "|u1", True)
    add(torch.bool, "|b1", True)
    for name, view, exact in (("uint16", "<u2", True), ("uint32", "<u4", True), ("uint64", "<u8", True)):
        dt = getattr(torch, name, None)
        if isinstance(dt, torch.dtype):
            add(dt, view, exact)
    for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu"):
        dt = getattr(torch, name, None)
        if isinstance(dt, torch.dtype):
            add(dt, "|u1", False)
    return table


_BY_DTYPE = _build()
_BY_NAME = {info.torch_name: dt for dt, info in _BY_DTYPE.items()}


def info(dtype: torch.dtype) -> DTypeInfo:
    """The storage description of ``dtype``; raises :class:`UnsupportedValueError` for dtypes the format lacks."""
    try:
        return _BY_DTYPE[dtype]
    except KeyError:
        raise UnsupportedValueError(
            f"tensor dtype {dtype} is not supported by the asymstore format; convert it to a supported dtype "
            f"({', '.join(sorted(_BY_NAME))})"
        ) from None


def from_name(name: str) -> torch.dtype:
    """The torch dtype named ``name`` (as written in a manifest)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnsupportedValueError(
            f"checkpoint uses dtype {name!r}, which this torch ({torch.__version__}) does not have"
        ) from None


def supported_dtypes() -> list[torch.dtype]:
    """Every torch dtype the format can store."""
    return list(_BY_DTYPE)
