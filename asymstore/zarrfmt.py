"""The zarr v3 objects asymstore writes: sharded 1-D uint8 partition arrays and groups.

Each codec chain used by a checkpoint is one zarr array ``<step>/<label>/`` of dtype
uint8 whose shards (``<label>/c/<k>``) are the checkpoint's partitions. A shard is
``sharding_indexed``: encoded chunks back to back, then an index of (offset, nbytes)
uint64 pairs protected by a crc32c, at the end. Chunk checksums (crc32c of the stored
bytes) live in the manifest. Everything here is plain data: no I/O.
"""

from __future__ import annotations

import json
import math
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import crc32c as _crc32c
import numpy as np

from .codecs import CodecSpec, encode_chunk
from .errors import CorruptCheckpointError

MISSING = (1 << 64) - 1
_ZERO_CACHE: dict[int, bytes] = {}


def crc32c(data: Any, value: int = 0) -> int:
    """CRC-32C of ``data``, continuing from ``value``."""
    return int(_crc32c.crc32c(data, value))


def zeros(n: int) -> bytes:
    """``n`` zero bytes (cached)."""
    z = _ZERO_CACHE.get(n)
    if z is None:
        z = _ZERO_CACHE[n] = bytes(n)
    return z


def index_nbytes(chunks_per_shard: int) -> int:
    """Size of a shard index: 16 bytes per chunk plus its 4-byte crc32c."""
    return chunks_per_shard * 16 + 4


@dataclass
class EncodedShard:
    """A shard ready to write: ``parts`` back to back make the object."""

    parts: list[Any]
    nbytes: int
    chunk_crcs: list[int]


class ChunkCrcs(Protocol):
    """The crc32c of every fixed-size piece of a stream, as a writer asks for them."""

    def span(self, start: int, end: int, chunk_bytes: int) -> tuple[int, ...] | None:
        """The crcs of the pieces of ``[start, end)``, or ``None`` when they are not this stream's pieces."""
        ...

    def covers(self, start: int, end: int, chunk_bytes: int) -> bool:
        """Whether ``[start, end)`` is a run of this stream's pieces (:meth:`span` can give its crcs)."""
        ...


def _piece_range(c: int, n: int, start: int, end: int, chunk_bytes: int) -> tuple[int, int] | None:
    """Which of ``n`` pieces of ``c`` bytes ``[start, end)`` covers, or ``None`` when it is not a run of them
    (another chunk size, or a span that does not start on a piece or end on one or at the stream's end)."""
    if chunk_bytes != c or start % c or (end % c and -(-end // c) != n):
        return None
    return start // c, -(-end // c)


@dataclass(frozen=True)
class StreamCrcs:
    """crc32c of every ``chunk_bytes`` piece of a stream, computed once (when a host slot is sealed) so a raw
    write of the same bytes need not read them again to checksum them. The last piece may be short."""

    chunk_bytes: int
    crcs: tuple[int, ...]

    def covers(self, start: int, end: int, chunk_bytes: int) -> bool:
        """Whether ``[start, end)`` is a run of this stream's pieces."""
        return _piece_range(self.chunk_bytes, len(self.crcs), start, end, chunk_bytes) is not None

    def span(self, start: int, end: int, chunk_bytes: int) -> tuple[int, ...] | None:
        """The crcs of the pieces of ``[start, end)`` (``None``: not a run of this stream's pieces)."""
        r = _piece_range(self.chunk_bytes, len(self.crcs), start, end, chunk_bytes)
        return None if r is None else self.crcs[r[0] : r[1]]


class StreamingCrcs:
    """The crc32c of every ``chunk_bytes`` piece of a stream while one thread computes them in order
    (:meth:`compute`) and another already writes the stream: :meth:`span` waits until the pieces it asks for
    are done. Where computing failed, ``span`` returns ``None`` (the writer then checksums the bytes itself)."""

    def __init__(self, chunk_bytes: int, total_bytes: int) -> None:
        self.chunk_bytes = chunk_bytes
        self.n = -(-total_bytes // chunk_bytes)
        self._crcs: list[int] = []
        self._failed = False
        self._cv = threading.Condition()

    def compute(self, view: memoryview) -> tuple[int, ...]:
        """Checksum ``view`` piece by piece, publishing each; all of them once done."""
        c = self.chunk_bytes
        try:
            for k in range(self.n):
                crc = crc32c(view[k * c : (k + 1) * c])
                with self._cv:
                    self._crcs.append(crc)
                    if len(self._crcs) % 16 == 0 or len(self._crcs) == self.n:
                        self._cv.notify_all()
        except BaseException:
            self.fail()
            raise
        return tuple(self._crcs)

    def fail(self) -> None:
        """Computing stopped: waiters get ``None``."""
        with self._cv:
            self._failed = True
            self._cv.notify_all()

    def covers(self, start: int, end: int, chunk_bytes: int) -> bool:
        """Whether ``[start, end)`` is a run of this stream's pieces."""
        return _piece_range(self.chunk_bytes, self.n, start, end, chunk_bytes) is not None

    def span(self, start: int, end: int, chunk_bytes: int) -> tuple[int, ...] | None:
        """The crcs of the pieces of ``[start, end)`` once computed (``None``: not a run of this stream's pieces,
        or computing failed)."""
        r = _piece_range(self.chunk_bytes, self.n, start, end, chunk_bytes)
        if r is None:
            return None
        with self._cv:
            self._cv.wait_for(lambda: self._failed or len(self._crcs) >= r[1])
            return None if len(self._crcs) < r[1] else tuple(self._crcs[r[0] : r[1]])


def raw_chunk_crcs(data: memoryview, chunk_bytes: int, crcs: Sequence[int] | None = None) -> list[int]:
    """The stored-chunk checksums of a raw shard of ``data``: each ``chunk_bytes`` piece's crc32c, the edge chunk's
    over its zero padding too. ``crcs``: the pieces' crc32c (the last one unpadded) when already known."""
    n = len(data)
    nchunks = math.ceil(n / chunk_bytes)
    known = list(crcs) if crcs is not None and len(crcs) == nchunks else None
    pad = nchunks * chunk_bytes - n
    out: list[int] = []
    for k in range(nchunks):
        crc = known[k] if known is not None else crc32c(data[k * chunk_bytes : (k + 1) * chunk_bytes])
        out.append(crc32c(zeros(pad), crc) if pad and k == nchunks - 1 else crc)
    return out


def encode_shard(
    spec: CodecSpec,
    data: memoryview,
    chunk_bytes: int,
    chunks_per_shard: int,
    crcs: Sequence[int] | None = None,
    *,
    checksum: bool = True,
) -> EncodedShard:
    """Encode one partition's bytes (delta already applied) into a shard object. ``crcs``: the crc32c of each
    ``chunk_bytes`` piece of ``data`` (the last one unpadded) when already known; used for a raw chain only.
    ``checksum=False``: a raw shard's ``chunk_crcs`` are left empty for the caller to fill
    (:func:`raw_chunk_crcs`), e.g. once another thread has computed them; its bytes do not depend on them."""
    n = len(data)
    nchunks = math.ceil(n / chunk_bytes)
    if nchunks > chunks_per_shard:
        raise ValueError(f"partition of {n} bytes does not fit {chunks_per_shard} chunks of {chunk_bytes}")
    index = np.full((chunks_per_shard, 2), MISSING, dtype="<u8")
    out: list[int] = []
    pad = nchunks * chunk_bytes - n  # the edge chunk is stored full size, zero-padded (zarr fill value)
    if not spec.compresses:
        # raw: the partition's bytes are the chunks, back to back: one run, written without a copy
        out = raw_chunk_crcs(data, chunk_bytes, crcs) if checksum else []
        for k in range(nchunks):
            index[k] = (k * chunk_bytes, chunk_bytes)
        parts: list[Any] = [data] + ([zeros(pad)] if pad else [])
        off = nchunks * chunk_bytes
    else:
        parts = []
        off = 0
        for k in range(nchunks):
            piece = data[k * chunk_bytes : (k + 1) * chunk_bytes]
            if len(piece) < chunk_bytes:
                piece = memoryview(bytes(piece) + zeros(chunk_bytes - len(piece)))
            stored = encode_chunk(spec, piece)
            parts.append(stored)
            out.append(crc32c(stored))
            index[k] = (off, len(stored))
            off += len(stored)
    ib = index.tobytes()
    parts.append(ib + struct.pack("<I", crc32c(ib)))
    return EncodedShard(parts, off + len(ib) + 4, out)


def decode_index(raw: bytes, chunks_per_shard: int, where: str) -> np.ndarray:
    """Parse and verify a shard index (the last ``index_nbytes`` bytes of the shard)."""
    if len(raw) != index_nbytes(chunks_per_shard):
        raise CorruptCheckpointError(f"{where}: shard index truncated", (where,))
    body, (crc,) = raw[:-4], struct.unpack("<I", raw[-4:])
    if crc32c(body) != crc:
        raise CorruptCheckpointError(f"{where}: shard index checksum mismatch", (where,))
    return np.frombuffer(body, dtype="<u8").reshape(chunks_per_shard, 2)


def array_metadata(
    *, nbytes: int, partition_bytes: int, chunk_bytes: int, spec: CodecSpec, attributes: dict[str, Any]
) -> dict[str, Any]:
    """The ``zarr.json`` of a codec chain's 1-D uint8 array (docs/format.md section 6)."""
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": [nbytes],
        "data_type": "uint8",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [partition_bytes]}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": 0,
        "codecs": [
            {
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": [chunk_bytes],
                    "codecs": spec.zarr_chunk_codecs(),
                    "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                    "index_location": "end",
                },
            }
        ],
        "attributes": attributes,
    }


def group_metadata(attributes: dict[str, Any]) -> dict[str, Any]:
    """The ``zarr.json`` of a group with ``attributes``."""
    return {"zarr_format": 3, "node_type": "group", "attributes": attributes}


def dumps(obj: Any) -> bytes:
    """Compact JSON bytes, as every asymstore metadata object is written."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def shard_key(label: str, shard: int) -> str:
    """The object key of shard ``shard`` of array ``label``."""
    return f"{label}/c/{shard}"
