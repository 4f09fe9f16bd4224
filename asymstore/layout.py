"""Pure planning of where tensors sit in a checkpoint's byte stream and how it is cut.

A checkpoint is one logical byte stream: every tensor's raw little-endian bytes at an
offset aligned to ``align`` bytes. The stream is the host snapshot buffer's layout, and
each persistent tier cuts it into fixed-size *partitions* (one stored object each),
made of fixed-size *chunks* (the unit of compression and of partial reads).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

from .errors import ConfigError

DEFAULT_ALIGN = 64


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the stream: name, torch dtype name, shape, offset and size in bytes."""

    name: str
    dtype: str  # torch dtype name
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        """First stream byte after the tensor."""
        return self.offset + self.nbytes


@dataclass(frozen=True)
class Layout:
    """Where every tensor sits in a checkpoint's stream (docs/format.md section 5)."""

    tensors: tuple[TensorEntry, ...]
    total_bytes: int
    align: int

    @cached_property
    def signature(self) -> str:
        """Digest of names, dtypes, shapes and offsets: equal signatures mean byte-compatible streams (computed
        once per layout: the writer asks for it per partition)."""
        h = hashlib.sha256()
        h.update(json.dumps([[t.name, t.dtype, list(t.shape), t.offset] for t in self.tensors]).encode())
        h.update(str(self.total_bytes).encode())
        return h.hexdigest()[:32]

    def by_name(self) -> dict[str, TensorEntry]:
        """The entries keyed by tensor name."""
        return {t.name: t for t in self.tensors}


def align_up(n: int, align: int) -> int:
    """``n`` rounded up to a multiple of ``align``."""
    return -(-n // align) * align


def plan_layout(entries: Iterable[tuple[str, str, Sequence[int], int]], *, align: int = DEFAULT_ALIGN) -> Layout:
    """Place tensors ``(name, dtype, shape, nbytes)`` back to back, each at an aligned offset."""
    if align <= 0 or align & (align - 1):
        raise ConfigError(f"align must be a power of two, got {align}")
    out: list[TensorEntry] = []
    off = 0
    names: set[str] = set()
    for name, dtype, shape, nbytes in entries:
        if name in names:
            raise ConfigError(f"duplicate tensor name {name!r}")
        names.add(name)
        if nbytes < 0:
            raise ConfigError(f"{name}: negative size")
        off = align_up(off, align)
        out.append(TensorEntry(name, dtype, tuple(int(s) for s in shape), off, int(nbytes)))
        off += nbytes
    return Layout(tuple(out), off, align)


@dataclass(frozen=True)
class PartitionSpan:
    """Partition ``index`` covers stream bytes ``[start, start + nbytes)``."""

    index: int
    start: int
    nbytes: int

    @property
    def end(self) -> int:
        """First stream byte after the partition."""
        return self.start + self.nbytes


def cut_stream(total_bytes: int, partition_bytes: int, chunk_bytes: int) -> list[PartitionSpan]:
    """Cut ``[0, total_bytes)`` into partitions of ``partition_bytes`` (last one shorter)."""
    if chunk_bytes <= 0 or partition_bytes <= 0:
        raise ConfigError("partition and chunk sizes must be positive")
    if partition_bytes % chunk_bytes:
        raise ConfigError(f"partition size {partition_bytes} must be a multiple of the chunk size {chunk_bytes}")
    n = math.ceil(total_bytes / partition_bytes)
    return [
        PartitionSpan(i, i * partition_bytes, min(partition_bytes, total_bytes - i * partition_bytes)) for i in range(n)
    ]


def overlapping(spans: Sequence[PartitionSpan], partition_bytes: int, start: int, end: int) -> list[PartitionSpan]:
    """Partitions (as cut by :func:`cut_stream`) that intersect ``[start, end)``."""
    if end <= start or not spans:
        return []
    return list(spans[start // partition_bytes : (end - 1) // partition_bytes + 1])


def dominant_itemsize(layout: Layout, start: int, end: int, itemsizes: dict[str, int]) -> int:
    """Element size (bytes) covering most of ``[start, end)``; used as the blosc shuffle width."""
    import bisect

    offsets = [t.offset for t in layout.tensors]
    i = max(bisect.bisect_right(offsets, start) - 1, 0)
    weight: dict[int, int] = {}
    while i < len(layout.tensors) and layout.tensors[i].offset < end:
        t = layout.tensors[i]
        overlap = min(t.end, end) - max(t.offset, start)
        if overlap > 0:
            size = itemsizes.get(t.dtype, 1)
            weight[size] = weight.get(size, 0) + overlap
        i += 1
    return max(weight, key=lambda k: weight[k]) if weight else 1
