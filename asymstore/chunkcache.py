"""A range source that fetches whole chunks and keeps the ends of recent reads, so that neighbouring ranged
reads of one stream (the partitions or small tensors of one saved rank lie next to each other) never fetch, verify
and decode a chunk twice."""

from __future__ import annotations

from typing import Any


class ChunkCache:
    """A range source that fetches whole chunks and keeps the last few, so that neighbouring ranged reads
    (the partitions of one saved rank lie next to each other in its stream) never fetch a chunk twice.

    ``source``: a :class:`~asymstore.interfaces.RangeSource` whose reads fetch ``chunk``-byte chunks of a
    ``total``-byte stream; ``keep``: how many chunks to keep (the ends of recent reads)."""

    def __init__(self, source: Any, chunk: int, total: int, keep: int = 8) -> None:
        self.source, self.chunk, self.total, self.keep = source, chunk, total, keep
        self._cache: dict[int, bytes] = {}

    @property
    def bytes_read(self) -> int:
        """Stored bytes the underlying source fetched."""
        return int(self.source.bytes_read)

    def read_range_into(self, start: int, end: int, out: memoryview) -> None:
        """Bytes ``[start, end)`` of the stream into ``out``."""
        out = memoryview(out).cast("B")
        if end <= start:
            return
        c = self.chunk
        first, last = start // c, (end - 1) // c
        lo, hi = first, last
        while lo <= hi and lo in self._cache:
            lo += 1
        while hi >= lo and hi in self._cache:
            hi -= 1
        fetched = bytearray()
        if lo <= hi:  # one read of the chunks not kept (whole chunks: no chunk is fetched twice)
            a, b = lo * c, min((hi + 1) * c, self.total)
            fetched = bytearray(b - a)
            self.source.read_range_into(a, b, memoryview(fetched))
        for k in range(first, last + 1):
            if lo <= k <= hi:
                data = memoryview(fetched)[(k - lo) * c : (k - lo + 1) * c]
            else:
                data = memoryview(self._cache[k])
            ca = k * c
            s0, s1 = max(start, ca), min(end, ca + len(data))
            out[s0 - start : s1 - start] = data[s0 - ca : s1 - ca]
        for k in (first, last):  # the ends are what a neighbouring read may need again
            if lo <= k <= hi:
                self._cache[k] = bytes(memoryview(fetched)[(k - lo) * c : (k - lo + 1) * c])
        while len(self._cache) > self.keep:
            self._cache.pop(next(iter(self._cache)))


def cached_source(ck: Any) -> Any:
    """The range source of an opened checkpoint (:class:`asymstore.lazy.LazyCheckpoint`) behind a
    :class:`ChunkCache` of its chunk size, or its plain source where it has no stored chunks (host memory)."""
    if ck.reader is None:
        return ck.source
    return ChunkCache(ck.source, ck.reader.manifest.chunk_bytes, ck.layout.total_bytes)
