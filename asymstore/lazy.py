"""Lazy, partial reads of a checkpoint: tensors with shape and dtype, read on slicing."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from asymstore.backends import open_object_store
from asymstore.backends.base import ObjectStore

from .dtypes import from_name, info
from .errors import StepNotFoundError
from .hostpool import Slot
from .layout import Layout, TensorEntry
from .reader import CheckpointReader, committed_steps
from .state import unflatten


class _HostSource:
    """Reads from a host snapshot slot (no I/O)."""

    def __init__(self, slot: Slot) -> None:
        assert slot.buffer is not None and slot.layout is not None
        self.buffer = slot.buffer
        self.layout = slot.layout
        self.bytes_read = 0

    def read_range_into(self, start: int, end: int, out: memoryview) -> None:
        out[:] = self.buffer[start:end].numpy().data.cast("B")
        self.bytes_read += end - start


class LazyTensor:
    """One stored tensor. ``t[rows]`` reads only the chunks holding those rows; ``read()`` all of it."""

    def __init__(self, entry: TensorEntry, source: CheckpointReader | _HostSource) -> None:
        self.entry = entry
        self._src = source
        self.name = entry.name
        self.shape = torch.Size(entry.shape)
        self.dtype = from_name(entry.dtype)
        self.nbytes = entry.nbytes
        self.itemsize = info(self.dtype).itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __repr__(self) -> str:
        return f"LazyTensor({self.name!r}, shape={tuple(self.shape)}, dtype={self.dtype})"

    def _read_bytes(self, start: int, end: int) -> torch.Tensor:
        buf = torch.empty(max(end - start, 1), dtype=torch.uint8)
        if end > start:
            self._src.read_range_into(self.entry.offset + start, self.entry.offset + end, buf.numpy().data)
        return buf[: end - start]

    def read(self) -> torch.Tensor:
        """The whole tensor (a new CPU tensor)."""
        raw = self._read_bytes(0, self.nbytes)
        return raw.view(self.dtype).view(self.shape) if self.nbytes else torch.empty(self.shape, dtype=self.dtype)

    def numpy(self) -> np.ndarray:
        t = self.read()
        view = info(self.dtype).view_dtype
        return (
            t.view(torch.uint8).numpy().view(view).reshape(self.shape)
            if not info(self.dtype).exact_numpy
            else t.numpy()
        )

    def __getitem__(self, index: Any) -> torch.Tensor:
        """Index like a tensor. Rows of the leading dimension are read selectively."""
        if not isinstance(index, tuple):
            index = (index,)
        if not self.shape or not index or index[0] is Ellipsis or index[0] is None:
            return self.read()[index]
        first, rest = index[0], index[1:]
        n = self.shape[0]
        row_bytes = math.prod(self.shape[1:]) * self.itemsize
        if isinstance(first, int):
            i = first + n if first < 0 else first
            if not 0 <= i < n:
                raise IndexError(f"index {first} is out of bounds for dimension 0 with size {n}")
            raw = self._read_bytes(i * row_bytes, (i + 1) * row_bytes)
            row = (
                raw.view(self.dtype).view(self.shape[1:])
                if row_bytes
                else torch.empty(self.shape[1:], dtype=self.dtype)
            )
            return row[rest] if rest else row
        if isinstance(first, slice):
            start, stop, step = first.indices(n)
            if step < 0 or stop <= start:
                return self.read()[index]
            raw = self._read_bytes(start * row_bytes, stop * row_bytes)
            rows = (
                raw.view(self.dtype).view((stop - start, *self.shape[1:]))
                if row_bytes
                else torch.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
            )
            return rows[(slice(None, None, step),) + tuple(rest)]
        return self.read()[index]


class LazyCheckpoint(Mapping[str, LazyTensor]):
    """A committed checkpoint: name -> :class:`LazyTensor`; ``skeleton`` and ``user`` metadata."""

    def __init__(self, reader: CheckpointReader) -> None:
        self._src: CheckpointReader | _HostSource = reader
        self.reader: CheckpointReader | None = reader
        m = reader.manifest
        self.step = m.step
        self.layout: Layout = m.layout
        self.skeleton = m.skeleton
        self.user = m.user
        self._entries = m.layout.by_name()

    @classmethod
    def from_host(cls, slot: Slot) -> LazyCheckpoint:
        self = cls.__new__(cls)
        self._src = _HostSource(slot)
        self.reader = None
        assert slot.layout is not None and slot.step is not None
        self.step, self.layout, self.skeleton, self.user = slot.step, slot.layout, slot.skeleton, slot.user
        self._entries = slot.layout.by_name()
        return self

    @property
    def bytes_read(self) -> int:
        return self._src.bytes_read

    def __getitem__(self, name: str) -> LazyTensor:
        try:
            return LazyTensor(self._entries[name], self._src)
        except KeyError:
            raise KeyError(f"no tensor {name!r} in step {self.step}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def load(self) -> Any:
        """The whole state, as :meth:`Store.restore` would return it."""
        cache = {n: self[n].read() for n in self._entries}
        return unflatten(self.skeleton, cache.__getitem__)


def open_checkpoint(url: str | ObjectStore, step: int | None = None) -> LazyCheckpoint:
    """Open a committed checkpoint lazily straight from a tier URL (newest step by default)."""
    store = url if isinstance(url, ObjectStore) else open_object_store(url)
    if step is None:
        steps = committed_steps(store)
        if not steps:
            raise StepNotFoundError(f"no committed checkpoint in {store.url}")
        step = steps[-1]

    def reader(s: int) -> CheckpointReader:
        return CheckpointReader.open(store, s, base_reader=reader)

    return LazyCheckpoint(reader(step))
