"""Shared helpers for the format tests: deterministic tensors and bit-exact comparison."""

from __future__ import annotations

import hashlib
import math
import os
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from asymstore.interfaces import Capabilities

PY = os.environ.get("ASYMSTORE_TEST_PYTHON") or None  # interpreter for child processes (default: sys.executable)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of ``t`` in C order (what asymstore stores)."""
    c = t.detach().cpu().contiguous().reshape(-1)
    if c.numel() == 0:
        return b""
    return c.view(torch.uint8).numpy().tobytes()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random *bit patterns* of ``dtype`` (NaNs, infs, subnormals included); bool gets 0/1."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=g, dtype=torch.uint8).view(torch.bool).reshape(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * itemsize,), generator=g, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)


def assert_bitequal(got: Any, want: Any, path: str = "<root>") -> None:
    """Recursive equality that compares tensors/arrays/floats by their bytes (NaN-safe) and checks types."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{path}: expected a tensor, got {type(got)}"
        assert got.dtype == want.dtype, f"{path}: dtype {got.dtype} != {want.dtype}"
        assert tuple(got.shape) == tuple(want.shape), f"{path}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        g, w = tensor_bytes(got), tensor_bytes(want)
        if g != w:
            first = next((i for i, (a, b) in enumerate(zip(g, w, strict=False)) if a != b), min(len(g), len(w)))
            raise AssertionError(f"{path}: tensor bytes differ (first at byte {first})")
        return
    if isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray), f"{path}: expected ndarray, got {type(got)}"
        assert got.dtype == want.dtype and got.shape == want.shape, (
            f"{path}: {got.dtype}{got.shape} != {want.dtype}{want.shape}"
        )
        assert np.ascontiguousarray(got).tobytes() == np.ascontiguousarray(want).tobytes(), f"{path}: bytes differ"
        return
    if isinstance(want, np.generic):
        assert type(got) is type(want), f"{path}: type {type(got)} != {type(want)}"
        assert got.tobytes() == want.tobytes(), f"{path}: {got!r} != {want!r}"
        return
    assert type(got) is type(want), f"{path}: type {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, float):
        assert struct.pack("<d", got) == struct.pack("<d", want) or (math.isnan(got) and math.isnan(want)), (
            f"{path}: {got!r} != {want!r}"
        )
    elif isinstance(want, Mapping):
        assert list(got.keys()) == list(want.keys()), f"{path}: keys {list(got)} != {list(want)}"
        for k in want:
            assert_bitequal(got[k], want[k], f"{path}/{k!r}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{path}: length {len(got)} != {len(want)}"
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_bitequal(a, b, f"{path}/{i}")
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def step_files(root: str, step: int) -> list[str]:
    """Every stored object of a step on a local tier, relative to the tier root, sorted."""
    d = os.path.join(root, f"step_{step:012d}")
    out = []
    for dirpath, _dirs, files in os.walk(d):
        for f in files:
            out.append(os.path.relpath(os.path.join(dirpath, f), root))
    return sorted(out)


def flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


#: capabilities of a remote durable tier, for in-memory fakes that stand in for one
REMOTE = Capabilities(durable=True, volatile=False, atomic_rename=True, ranged_reads=True)
