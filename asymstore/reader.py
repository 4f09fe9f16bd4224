"""Reading a committed checkpoint from one tier: whole, by byte range, and verifying it.

Every byte is checked: the commit marker carries its own crc32c and those of the
metadata objects; each shard's index has a crc32c; the manifest holds the crc32c of
every stored chunk. Damage raises :class:`CorruptCheckpointError` naming the object.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import validate
from .codecs import decode_chunk
from .errors import CorruptCheckpointError, StepNotFoundError
from .interfaces import ByteRange, ObjectStore, RangeSource
from .layout import PartitionSpan, cut_stream, overlapping
from .manifest import COMMIT_KEY, GROUP_KEY, Manifest, PartitionRecord, parse_commit, rank_dir_name, step_dir
from .prefault import Prefaulter, address
from .zarrfmt import crc32c, decode_index, index_nbytes, shard_key

Progress = Callable[[int, int], None]

#: raw partitions are read in pieces of this size, each checked while the next is read
_READ_PIECE = 32 << 20


def _rank_marker(raw: bytes, key: str, step: int) -> dict[str, Any]:
    """The parsed marker ``key`` of a rank directory of a multi-rank step (a step's global marker there is
    damage)."""
    commit = parse_commit(raw, key, step=step)
    if "ranks" in commit:
        raise CorruptCheckpointError(f"{key}: a rank's marker with ranks", (key,))
    return commit


@dataclass
class VerifyReport:
    """What :meth:`CheckpointReader.verify` found: objects and bytes checked, and each problem."""

    step: int
    ok: bool = True
    checked_objects: int = 0
    checked_bytes: int = 0
    problems: list[tuple[str, str]] = field(default_factory=list)  # (object key, message)


class CheckpointReader(RangeSource):
    """A committed step on one backend, verified as it is read. Open with :meth:`open` (or, with its delta
    base wired, :func:`asymstore.catalog.open_reader`)."""

    def __init__(
        self,
        backend: ObjectStore,
        manifest: Manifest,
        commit: dict[str, object],
        base_reader: Callable[[int], CheckpointReader] | None = None,
        prefix: str | None = None,
    ) -> None:
        self.backend = backend
        self.manifest = manifest
        self.commit = commit
        self.step = manifest.step
        self.prefix = prefix or step_dir(manifest.step) + "/"
        self._spans = cut_stream(manifest.layout.total_bytes, manifest.partition_bytes, manifest.chunk_bytes)
        self._records = {r.span.index: r for r in manifest.partitions}
        self._indexes: dict[int, np.ndarray] = {}
        self._base_factory = base_reader
        self._base: CheckpointReader | None = None
        self._bytes_read = 0  # stored bytes fetched from the backend (for lazy-read accounting)

    @property
    def bytes_read(self) -> int:
        """Stored bytes fetched from the backend so far (for lazy-read accounting)."""
        return self._bytes_read

    @property
    def store(self) -> ObjectStore:
        """Deprecated alias of :attr:`backend` (the tier's object store)."""
        warnings.warn("CheckpointReader.store is deprecated; use .backend", DeprecationWarning, stacklevel=2)
        return self.backend

    # --- opening -----------------------------------------------------------------
    @classmethod
    def open(
        cls,
        backend: ObjectStore,
        step: int,
        base_reader: Callable[[int], CheckpointReader] | None = None,
        *,
        rank: int | None = None,
    ) -> CheckpointReader:
        """Open a committed step; for a multi-rank step, the rank directory of ``rank`` (default 0)."""
        prefix = step_dir(step) + "/"
        raw_commit = backend.get(prefix + COMMIT_KEY)
        if raw_commit is None:
            raise StepNotFoundError(f"step {step} is not committed in {backend.url}")
        commit = parse_commit(raw_commit, prefix + COMMIT_KEY, step=step)
        if "ranks" in commit:  # multi-rank: the global marker vouches for each rank's marker
            ranks = int(commit["ranks"])
            r = 0 if rank is None else rank
            if not 0 <= r < ranks:
                raise StepNotFoundError(f"step {step} has ranks 0..{ranks - 1}, not rank {r}")
            prefix = f"{prefix}{rank_dir_name(r)}/"
            raw_rank = backend.get(prefix + COMMIT_KEY)
            want = dict(commit["shards_crc32c"]).get(str(r))
            if raw_rank is None or crc32c(raw_rank) != want:
                raise CorruptCheckpointError(
                    f"{prefix}{COMMIT_KEY}: missing or does not match the step's marker", (prefix + COMMIT_KEY,)
                )
            commit = _rank_marker(raw_rank, prefix + COMMIT_KEY, step)
            if commit.get("world_size", ranks) != ranks:
                raise CorruptCheckpointError(
                    f"{prefix}{COMMIT_KEY}: the rank's marker says {commit['world_size']} ranks, the step's {ranks}",
                    (prefix + COMMIT_KEY,),
                )
            commit["ranks"] = ranks
        return cls._with_commit(backend, step, commit, prefix, base_reader)

    @classmethod
    def open_rank_part(
        cls,
        backend: ObjectStore,
        step: int,
        rank: int,
        world_size: int,
        base_reader: Callable[[int], CheckpointReader] | None = None,
    ) -> CheckpointReader:
        """Open ``rank``'s committed directory of a multi-rank step whose step marker is missing (rank 0 had not
        written it yet): vouched for by the rank's own marker only, every chunk still verified when read."""
        prefix = f"{step_dir(step)}/{rank_dir_name(rank)}/"
        raw = backend.get(prefix + COMMIT_KEY)
        if raw is None:
            raise StepNotFoundError(f"rank {rank}'s part of step {step} is not committed in {backend.url}")
        commit = _rank_marker(raw, prefix + COMMIT_KEY, step)
        if commit.get("world_size") != world_size:
            raise StepNotFoundError(
                f"rank {rank}'s part of step {step} in {backend.url} was written by a job of "
                f"{commit.get('world_size', 'unrecorded')} ranks, not {world_size}: without the step's marker it "
                "cannot be restored on its own"
            )
        commit["ranks"] = world_size
        return cls._with_commit(backend, step, commit, prefix, base_reader)

    @classmethod
    def _with_commit(
        cls,
        backend: ObjectStore,
        step: int,
        commit: dict[str, Any],
        prefix: str,
        base_reader: Callable[[int], CheckpointReader] | None,
    ) -> CheckpointReader:
        """A reader of the checkpoint under ``prefix`` whose marker is ``commit``: its group metadata and
        manifest are checked against the marker, and every partition object's size against the manifest."""
        key = prefix + GROUP_KEY
        group = backend.get(key)
        if group is None:
            raise CorruptCheckpointError(f"{key} is missing although step {step} is committed", (key,))
        if crc32c(group) != commit["group_crc32c"]:
            raise CorruptCheckpointError(f"{key}: checksum mismatch", (key,))
        doc = validate.load_json(group, key)
        attrs = doc.get("attributes") if isinstance(doc, dict) else None
        manifest = Manifest.from_json(attrs.get("asymstore") if isinstance(attrs, dict) else None, key, step=step)
        validate.commit_matches_manifest(commit, manifest, prefix + COMMIT_KEY)
        reader = cls(backend, manifest, commit, base_reader, prefix)
        reader._check_sizes()
        return reader

    def _check_sizes(self) -> None:
        """Every partition object exists with its recorded size, before anything is allocated for it."""
        for rec in self.manifest.partitions:
            key = self._key(rec)
            size = self.backend.size(key)
            if size is None:
                raise CorruptCheckpointError(f"{key} is missing", (key,))
            if size != rec.stored_bytes:
                raise CorruptCheckpointError(f"{key}: size {size} != recorded {rec.stored_bytes}", (key,))

    def _key(self, rec: PartitionRecord) -> str:
        return self.prefix + shard_key(rec.label, rec.shard)

    def _base_reader(self) -> CheckpointReader:
        if self._base is None:
            base = self.manifest.delta_base
            where = self.prefix + GROUP_KEY
            if base is None or self._base_factory is None:
                raise CorruptCheckpointError(
                    f"step {self.step} is a delta of step {base}, which cannot be opened", (where,)
                )
            try:
                reader = self._base_factory(base)
            except StepNotFoundError as e:
                raise CorruptCheckpointError(
                    f"step {self.step} is an XOR delta of step {base}, which is not readable here ({e})", (where,)
                ) from e
            if reader.manifest.layout.signature != self.manifest.layout.signature:
                raise CorruptCheckpointError(
                    f"step {self.step} is an XOR delta of step {base}, whose layout differs", (where,)
                )
            self._base = reader
        return self._base

    # --- shard pieces ------------------------------------------------------------
    def _index(self, rec: PartitionRecord) -> np.ndarray:
        idx = self._indexes.get(rec.span.index)
        if idx is None:
            cps = self.manifest.chunks_per_shard
            key = self._key(rec)
            raw = self.backend.get(key, ByteRange(-index_nbytes(cps), index_nbytes(cps)))
            if raw is None:
                raise CorruptCheckpointError(f"{key} is missing", (key,))
            self._bytes_read += len(raw)
            idx = decode_index(raw, cps, key)
            self._indexes[rec.span.index] = idx
        return idx

    def _decode_chunk_into(self, rec: PartitionRecord, k: int, stored: bytes | memoryview, out: memoryview) -> None:
        key = self._key(rec)
        if crc32c(stored) != rec.chunk_crcs[k]:
            raise CorruptCheckpointError(f"{key}: chunk {k} checksum mismatch", (key,))
        spec = self.manifest.codecs[rec.label]
        C = self.manifest.chunk_bytes
        if spec.kind == "raw":
            if len(stored) != C:
                raise CorruptCheckpointError(f"{key}: raw chunk {k} has {len(stored)} bytes, not {C}", (key,))
            out[:] = stored[: len(out)]
            return
        if len(out) == C:
            decode_chunk(spec, stored, out)
        else:  # edge chunk: decode the padded chunk, keep the prefix
            tmp = bytearray(C)
            decode_chunk(spec, stored, memoryview(tmp))
            out[:] = memoryview(tmp)[: len(out)]

    def _read_partition_into(self, rec: PartitionRecord, out: memoryview) -> None:
        """Read one whole partition (one object) into ``out`` (its raw bytes), verified."""
        for check in self._fetch_partition(rec, out):
            check()

    def _fetch_partition(
        self, rec: PartitionRecord, out: memoryview, ready: Callable[[int], None] | None = None
    ) -> Iterator[Callable[[], None]]:
        """Fetch one partition into ``out`` piece by piece; after each piece, yield the check of what it fetched
        (verify those chunks against the manifest's crc32c, decode them into ``out``); the last check applies a
        delta. The checks must run in the order yielded, each after the fetch that yielded it, and may run on
        another thread (:meth:`read_all_into` checks a piece while the next one is read). A raw partition is
        read straight into ``out`` in pieces of about ``_READ_PIECE`` bytes, ``ready(end)`` called before the piece
        that ends at partition offset ``end`` is fetched; any other in one request."""
        key = self._key(rec)
        size = rec.stored_bytes  # the object's real size: checked when the reader was opened
        cps = self.manifest.chunks_per_shard
        C = self.manifest.chunk_bytes
        spec = self.manifest.codecs[rec.label]
        n = rec.span.nbytes
        nchunks = -(-n // C)
        if spec.kind == "raw":
            # the shard's data region is the partition's bytes: read straight into place, then the tail that
            # follows it on disk (the edge chunk's zero padding and the index) with the last piece, so the reads
            # of a partition run front to back
            pad = nchunks * C - n
            self._bytes_read += size
            edge: list[bytes] = []  # the tail, once read

            def check_raw(k0: int, k1: int) -> None:
                for k in range(k0, k1):
                    lo, hi = k * C, min((k + 1) * C, n)
                    crc = crc32c(out[lo:hi])
                    if hi - lo < C:
                        crc = crc32c(edge[0][:pad], crc)
                    if crc != rec.chunk_crcs[k]:
                        raise CorruptCheckpointError(f"{key}: chunk {k} checksum mismatch", (key,))

            per = max(1, _READ_PIECE // C)  # chunks per piece
            for k0 in range(0, nchunks, per):
                k1 = min(k0 + per, nchunks)
                if ready is not None:
                    ready(min(k1 * C, n))
                if not self.backend.get_into(key, out[k0 * C : min(k1 * C, n)], k0 * C):
                    raise CorruptCheckpointError(f"{key} is missing", (key,))
                if k1 == nchunks:
                    tail = self.backend.get(key, ByteRange(n, size - n))
                    if tail is None or len(tail) != size - n:
                        raise CorruptCheckpointError(f"{key} is missing or truncated", (key,))
                    idx = decode_index(tail[pad:], cps, key)
                    if not np.array_equal(idx[:nchunks, 0], np.arange(nchunks, dtype=idx.dtype) * C):
                        raise CorruptCheckpointError(f"{key}: the shard index does not match a raw partition", (key,))
                    edge.append(tail)
                yield functools.partial(check_raw, k0, k1)
            if spec.delta:
                yield functools.partial(self._apply_delta, rec.span, out[:n])
            return
        blob = self.backend.get(key)
        if blob is None:
            raise CorruptCheckpointError(f"{key} is missing", (key,))
        self._bytes_read += len(blob)

        def check_decode() -> None:
            idx = decode_index(blob[-index_nbytes(cps) :], cps, key)
            mv = memoryview(blob)
            for k in range(nchunks):
                off, sz = int(idx[k, 0]), int(idx[k, 1])
                if off + sz > len(blob) - index_nbytes(cps):
                    raise CorruptCheckpointError(f"{key}: chunk {k} lies outside the shard", (key,))
                lo, hi = k * C, min((k + 1) * C, n)
                self._decode_chunk_into(rec, k, mv[off : off + sz], out[lo:hi])
            if spec.delta:
                self._apply_delta(rec.span, out[:n])

        yield check_decode

    def _apply_delta(self, span: PartitionSpan, out: memoryview) -> None:
        base = bytearray(span.nbytes)
        self._base_reader().read_range_into(span.start, span.end, memoryview(base))
        a = np.frombuffer(out, np.uint8)
        np.bitwise_xor(a, np.frombuffer(base, np.uint8), out=a)

    def _array_metadata_problems(self) -> list[tuple[str, str]]:
        """Each codec array's ``zarr.json`` against the crc32c in the commit marker."""
        want = dict(self.commit.get("arrays_crc32c", {}))  # type: ignore[call-overload]
        out = []
        for label in self.manifest.codecs:
            key = f"{self.prefix}{label}/zarr.json"
            raw = self.backend.get(key)
            if raw is None or crc32c(raw) != want.get(label):
                out.append((key, "missing" if raw is None else "checksum mismatch"))
        return out

    # --- public reads ------------------------------------------------------------
    def read_all_into(self, out: memoryview, progress: Progress | None = None) -> None:
        """Read the whole stream into ``out`` (at least ``total_bytes`` long), verified.

        The arrays' ``zarr.json`` are checked too: a checkpoint that plain zarr readers
        cannot open is damaged even though asymstore itself does not need those objects.
        """
        bad = self._array_metadata_problems()
        if bad:
            raise CorruptCheckpointError("; ".join(f"{k}: {m}" for k, m in bad), tuple(k for k, _ in bad))
        out = memoryview(out).cast("B")
        total = self.manifest.layout.total_bytes

        # a piece is checked on a helper thread while the next one is read; the output's pages are faulted in
        # ahead of the reads on another (new memory: :mod:`.prefault`)
        def finish(done: tuple[list[Future[None]], int]) -> None:
            for f in done[0]:
                f.result()
            if progress:
                progress(done[1], total)

        pieces = [(a, min(a + _READ_PIECE, total)) for a in range(0, total, _READ_PIECE)]
        with (
            Prefaulter(address(out), pieces if len(pieces) > 1 else []) as ahead,
            ThreadPoolExecutor(1, thread_name_prefix="asymstore-verify") as pool,  # exit waits for it
        ):
            pending: tuple[list[Future[None]], int] | None = None  # the checks of the previous partition
            for span in self._spans:
                checks: list[Future[None]] = []
                rec, part = self._records[span.index], out[span.start : span.end]
                ready = functools.partial(_wait_faulted, ahead, span.start)
                for check in self._fetch_partition(rec, part, ready):
                    if checks and checks[-1].done():
                        checks[-1].result()  # damage found: stop reading
                    checks.append(pool.submit(check))
                if pending is not None:
                    finish(pending)
                pending = (checks, span.end)
            if pending is not None:
                finish(pending)

    def read_range_into(self, start: int, end: int, out: memoryview) -> None:
        """Read stream bytes ``[start, end)`` touching only the chunks that hold them."""
        out = memoryview(out).cast("B")
        C = self.manifest.chunk_bytes
        for span in overlapping(self._spans, self.manifest.partition_bytes, start, end):
            rec = self._records[span.index]
            spec = self.manifest.codecs[rec.label]
            idx = self._index(rec)
            key = self._key(rec)
            lo, hi = max(start, span.start), min(end, span.end)
            k0, k1 = (lo - span.start) // C, (hi - span.start - 1) // C
            # one ranged read for the run of chunks, then decode each
            data_end = rec.stored_bytes - index_nbytes(self.manifest.chunks_per_shard)
            for k in range(k0, k1 + 1):
                off, sz = int(idx[k, 0]), int(idx[k, 1])
                if off + sz > data_end or (k > k0 and off < int(idx[k - 1, 0]) + int(idx[k - 1, 1])):
                    raise CorruptCheckpointError(f"{key}: chunk {k} lies outside the shard", (key,))
            off0 = int(idx[k0, 0])
            off1 = int(idx[k1, 0]) + int(idx[k1, 1])
            blob = self.backend.get(key, ByteRange(off0, off1 - off0))
            if blob is None or len(blob) != off1 - off0:
                raise CorruptCheckpointError(f"{key} is missing or truncated", (key,))
            self._bytes_read += len(blob)
            mv = memoryview(blob)
            for k in range(k0, k1 + 1):
                off, sz = int(idx[k, 0]) - off0, int(idx[k, 1])
                c_lo = span.start + k * C
                c_hi = min(c_lo + C, span.end)
                chunk = bytearray(c_hi - c_lo)
                self._decode_chunk_into(rec, k, mv[off : off + sz], memoryview(chunk))
                a, b = max(lo, c_lo), min(hi, c_hi)
                out[a - start : b - start] = memoryview(chunk)[a - c_lo : b - c_lo]
            if spec.delta:
                self._apply_delta(PartitionSpan(-1, lo, hi - lo), out[lo - start : hi - start])

    # --- verification ------------------------------------------------------------
    def verify(self, progress: Progress | None = None) -> VerifyReport:
        """Check every stored object of this step; never raises for damage, reports it."""
        rep = VerifyReport(self.step)
        rep.checked_objects += len(self.manifest.codecs)
        rep.problems += self._array_metadata_problems()
        scratch = bytearray(max((sp.nbytes for sp in self._spans), default=0))
        total = self.manifest.layout.total_bytes
        for span in self._spans:
            rec = self._records[span.index]
            try:
                self._read_partition_into(rec, memoryview(scratch)[: span.nbytes])
            except CorruptCheckpointError as e:
                rep.problems.append((e.objects[0] if e.objects else self._key(rec), str(e)))
            rep.checked_objects += 1
            rep.checked_bytes += rec.stored_bytes
            if progress:
                progress(span.end, total)
        rep.ok = not rep.problems
        return rep


def _wait_faulted(ahead: Prefaulter, start: int, end: int) -> None:
    """Wait until ``ahead`` has faulted in the output up to stream offset ``start + end``."""
    if end > 0:
        ahead.wait((start + end - 1) // _READ_PIECE)


def committed_steps(backend: ObjectStore) -> list[int]:
    """Steps with a commit marker on ``backend``, oldest first.

    Deprecated alias of :func:`asymstore.catalog.committed_steps`.
    """
    from .catalog import committed_steps as listing

    return listing(backend)
