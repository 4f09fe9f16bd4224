"""Lazy, partial reads of a checkpoint: tensors with shape and dtype, read on slicing.

A :class:`LazyCheckpoint` reads from a :class:`~asymstore.interfaces.RangeSource`: a tier's
:class:`~asymstore.reader.CheckpointReader`, a host snapshot slot, or a
:class:`~asymstore.catalog.FallbackSource` over several copies in the catalog's read order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from asymstore.backends import open_object_store

from . import catalog, validate
from .dtypes import from_name, info
from .errors import StepNotFoundError
from .hostpool import HostPool, Slot
from .interfaces import ObjectStore, RangeSource
from .layout import Layout, TensorEntry
from .reader import CheckpointReader
from .state import unflatten

Fallbacks = Sequence[tuple[str, Callable[[], RangeSource]]]


class _HostSource(RangeSource):
    """Reads from a host snapshot slot (no I/O).

    With its ``pool``, every read leases the slot, so a slot reused for a newer step is never read: the read
    raises :class:`~asymstore.errors.StepNotFoundError` instead (and a :class:`~asymstore.catalog.FallbackSource`
    moves on to the next copy).
    """

    def __init__(self, slot: Slot, pool: HostPool | None = None) -> None:
        assert slot.buffer is not None and slot.layout is not None and slot.step is not None
        self.slot = slot
        self.step = slot.step
        self.pool = pool
        self._bytes_read = 0

    @property
    def bytes_read(self) -> int:
        """Bytes copied out of the slot so far."""
        return self._bytes_read

    def read_range_into(self, start: int, end: int, out: memoryview) -> None:
        """Copy stream bytes ``[start, end)`` of the slot into ``out``."""
        slot = self.pool.lease(self.step) if self.pool is not None else self.slot
        if slot is None or slot.buffer is None:
            raise StepNotFoundError(f"step {self.step} left host memory")
        try:
            out[:] = slot.buffer[start:end].numpy().data.cast("B")
        finally:
            if self.pool is not None:
                self.pool.unlease(slot)
        self._bytes_read += end - start


class LazyTensor:
    """One stored tensor. ``t[rows]`` reads only the chunks holding those rows; ``read()`` all of it."""

    def __init__(self, entry: TensorEntry, source: RangeSource) -> None:
        self.entry = entry
        self._src = source
        self.name = entry.name
        self.shape = torch.Size(entry.shape)
        self.dtype = from_name(entry.dtype)
        self.nbytes = entry.nbytes
        self.itemsize = info(self.dtype).itemsize

    @property
    def ndim(self) -> int:
        """Number of dimensions."""
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

    def read_flat_into(self, start: int, out: torch.Tensor) -> None:
        """Read elements ``[start, start + out.numel())`` of the flattened tensor straight into ``out``
        (a contiguous CPU tensor of the same dtype), touching only the chunks that hold them."""
        n = out.numel()
        if out.dtype != self.dtype or not out.is_contiguous() or out.device.type != "cpu":
            raise ValueError(f"{self.name}: read_flat_into needs a contiguous CPU {self.dtype} tensor, got {out.dtype}")
        if start < 0 or start + n > math.prod(self.shape):
            raise IndexError(f"{self.name}: elements [{start}, {start + n}) out of {math.prod(self.shape)}")
        if n:
            raw = out.detach().reshape(-1).view(torch.uint8).numpy()
            self._src.read_range_into(
                self.entry.offset + start * self.itemsize, self.entry.offset + (start + n) * self.itemsize, raw.data
            )

    def read(self) -> torch.Tensor:
        """The whole tensor (a new CPU tensor)."""
        raw = self._read_bytes(0, self.nbytes)
        return raw.view(self.dtype).view(self.shape) if self.nbytes else torch.empty(self.shape, dtype=self.dtype)

    def numpy(self) -> np.ndarray:
        """The whole tensor as a numpy array (dtypes numpy lacks come back as their raw bit patterns)."""
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
            every: tuple[Any, ...] = (slice(None, None, step), *rest)
            return rows[every]
        return self.read()[index]


class LazyCheckpoint(Mapping[str, LazyTensor]):
    """A committed checkpoint: name -> :class:`LazyTensor`; ``skeleton`` and ``user`` metadata.

    ``fallbacks``: ``(name, opener)`` of further copies of the same step, in read order; a range that is
    damaged on one copy is read from the next (:class:`~asymstore.catalog.FallbackSource`).
    """

    def __init__(self, reader: CheckpointReader, *, fallbacks: Fallbacks = ()) -> None:
        m = reader.manifest
        self.reader: CheckpointReader | None = reader
        self._init(reader, fallbacks, step=m.step, layout=m.layout, skeleton=m.skeleton, user=m.user)

    def _init(
        self, first: RangeSource, fallbacks: Fallbacks, *, step: int, layout: Layout, skeleton: Any, user: Any
    ) -> None:
        self._src: RangeSource = catalog.FallbackSource(first, fallbacks) if fallbacks else first
        self.step, self.layout, self.skeleton, self.user = step, layout, skeleton, user
        self._entries = layout.by_name()

    @classmethod
    def from_host(cls, slot: Slot, *, pool: HostPool | None = None, fallbacks: Fallbacks = ()) -> LazyCheckpoint:
        """A checkpoint read straight from a ready host snapshot slot (leased per read when ``pool`` is given)."""
        self = cls.__new__(cls)
        self.reader = None
        assert slot.layout is not None and slot.step is not None
        self._init(
            _HostSource(slot, pool),
            fallbacks,
            step=slot.step,
            layout=slot.layout,
            skeleton=slot.skeleton,
            user=slot.user,
        )
        return self

    def with_fallbacks(self, fallbacks: Fallbacks) -> LazyCheckpoint:
        """This checkpoint, reading from ``fallbacks`` (in order) when a range is damaged or gone on its source."""
        if fallbacks:
            self._src = catalog.FallbackSource(self._src, fallbacks)
        return self

    @property
    def source(self) -> RangeSource:
        """Where the tensors' bytes are read from."""
        return self._src

    @property
    def bytes_read(self) -> int:
        """Stored bytes fetched so far by reads of this checkpoint."""
        return self._src.bytes_read

    def __getitem__(self, name: str) -> LazyTensor:
        """The tensor of stored name ``name`` (docs/format.md 8.1) or of a real key path: the state's own keys
        joined with ``/`` (``ck["with/slash"]`` for ``{"with/slash": t}``) or ``.`` (``ck["model.lm_head.weight"]``,
        the names ``asymstore export`` writes; a tied weight under each of its names)."""
        entry = self._entries.get(name)
        if entry is None:
            entry = self._entries.get(self._real_names().get(name, ""))
        if entry is None:
            raise KeyError(f"no tensor {name!r} in step {self.step}")
        return LazyTensor(entry, self._src)

    def _real_names(self) -> dict[str, str]:
        """Real key path (joined with ``/`` and with ``.``) -> stored name; paths two tensors share are left out."""
        if getattr(self, "_real", None) is None:
            from .export import tensor_paths

            real: dict[str, str | None] = {}
            for path, stored in tensor_paths(self.skeleton):
                for key in {"/".join(path), ".".join(path)}:
                    real[key] = stored if real.get(key, stored) == stored else None
            self._real = {k: v for k, v in real.items() if v is not None}
        return self._real

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def load(self) -> Any:
        """The whole state, as :meth:`Store.restore` would return it."""
        cache = {n: self[n].read() for n in self._entries}
        return unflatten(self.skeleton, cache.__getitem__)


def open_checkpoint(url: str | ObjectStore, step: int | None = None, *, rank: int | None = None) -> LazyCheckpoint:
    """Open a committed checkpoint lazily straight from a tier URL (newest step by default; ``rank``: which
    rank's part of a multi-rank step, default rank 0)."""
    if step is not None:
        step = validate.step_number(step)  # np.int64, a 0-d tensor ... as a plain int; a bool or -1 refused
    backend = url if isinstance(url, ObjectStore) else open_object_store(url)
    if step is None:
        steps = catalog.committed_steps(backend)
        if not steps:
            raise StepNotFoundError(f"no committed checkpoint in {backend.url}")
        step = steps[-1]
    return LazyCheckpoint(catalog.open_reader(backend, step, rank=rank))
