"""Persisting one snapshot stream to a tier's backend: the executor of a :class:`~asymstore.write_plan.WritePlan`.

:meth:`CheckpointWriter.write` decides nothing the plan decides; it runs these phases, in order:

1. claim the plan's prefix (its ``CLAIM`` object, created exclusively: :mod:`.claims`; refused with
   :class:`~asymstore.errors.StepExistsError` if the step is committed or another writer holds the claim),
   then remove leftovers of an interrupted attempt under it. The claim is removed once the step's marker is
   written (for a rank directory: by rank 0, just before the global marker), so a committed step holds exactly
   the objects its marker counts;
2. per partition of the plan: pick its codec chain (the forced one, or measured: selective compression,
   :mod:`.compression`), apply the XOR delta against the plan's base if the chain is a delta, encode the
   shard (checksums, compression) and write it (one object). Two stages in a pipeline: partition ``i+1`` is
   encoded on a helper thread while partition ``i`` is written (``buffers=2`` in :mod:`.batch_plan`'s time
   model; at most two encoded partitions are held);
3. write one zarr array ``zarr.json`` per codec chain used;
4. write the step group's ``zarr.json`` carrying the manifest;
5. ``barrier``: make every name durable;
6. write the commit marker, atomically, exclusively and last.

A crash anywhere before 6 leaves a step without a marker, which no reader lists. A write that fails removes
what it wrote (its claim last), so a failed save leaves no partial files.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from . import claims, dtypes
from .codecs import RAW, CodecSpec, xor_into
from .compression import MIN_GAIN, CodecDecisions, choose_codec, measure_candidates
from .errors import ConfigError, StepExistsError
from .interfaces import ObjectStore, StreamSource
from .layout import Layout, PartitionSpan, dominant_itemsize
from .manifest import COMMIT_KEY, GROUP_KEY, Manifest, PartitionRecord, commit_record, step_dir
from .write_plan import CheckpointContent, WritePlan
from .zarrfmt import (
    ChunkCrcs,
    EncodedShard,
    array_metadata,
    dumps,
    encode_shard,
    group_metadata,
    raw_chunk_crcs,
    shard_key,
)

if TYPE_CHECKING:
    from .reader import CheckpointReader

Progress = Callable[[int, int], None]

log = logging.getLogger("asymstore")


@dataclass
class DeltaBase:
    """The raw stream of a full checkpoint that later ones may be XOR-encoded against."""

    step: int
    signature: str
    stream: memoryview


class ReaderSource:
    """Stream bytes read range by range from a committed checkpoint on another tier (a :class:`StreamSource`).

    Two buffers, used in turn: the range returned by one call stays valid while the next one is read (the
    writer encodes partition ``i+1`` while it writes partition ``i``). The second is allocated only when a
    second range is read.
    """

    def __init__(self, reader: CheckpointReader, max_range: int) -> None:
        self.reader = reader
        self.max_range = max_range
        self._total = reader.manifest.layout.total_bytes
        self._bufs: list[bytearray | None] = [None, None]
        self._calls = 0

    @property
    def total_bytes(self) -> int:
        """Length of the checkpoint's stream."""
        return self._total

    def read(self, start: int, end: int) -> memoryview:
        """Stream bytes ``[start, end)`` (at most ``max_range`` of them), verified."""
        if end - start > self.max_range:
            raise ValueError(f"range of {end - start} bytes exceeds this source's {self.max_range}")
        k = self._calls % 2
        self._calls += 1
        buf = self._bufs[k]
        if buf is None:
            buf = self._bufs[k] = bytearray(self.max_range)
        out = memoryview(buf)[: end - start]
        self.reader.read_range_into(start, end, out)
        return out


@dataclass
class _Encoded:
    """One partition ready to write."""

    span: PartitionSpan
    spec: CodecSpec
    shard: EncodedShard
    seconds: float  # codec choice + delta + encode
    #: a raw shard written before its chunk checksums are known: gives them once the stream's are (a sealing slot)
    checksums: Callable[[], list[int]] | None = None


@dataclass
class WriteReport:
    """What one checkpoint write did: bytes raw and stored, objects, codec chains used, time spent."""

    step: int
    raw_bytes: int
    stored_bytes: int
    objects: int
    codecs: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    encode_seconds: float = 0.0
    write_seconds: float = 0.0
    delta_base: int | None = None

    @property
    def ratio(self) -> float:
        """Stored over raw bytes (1.0 for an empty checkpoint)."""
        return self.stored_bytes / self.raw_bytes if self.raw_bytes else 1.0


_ITEMSIZES = {dtypes.info(d).torch_name: dtypes.info(d).itemsize for d in dtypes.supported_dtypes()}


class CheckpointWriter:
    """Writes checkpoints to one backend as their :class:`WritePlan` says.

    ``tier_bandwidth()`` is the tier's current write bandwidth (measured codec choices weigh against it),
    ``on_write(nbytes, seconds)`` observes every partition write, ``decisions`` remembers measured codec
    choices across checkpoints (``None``: measure every partition of every checkpoint).
    """

    def __init__(
        self,
        backend: ObjectStore,
        *,
        tier_bandwidth: Callable[[], float] = lambda: float("inf"),
        on_write: Callable[[int, float], None] | None = None,
        min_gain: float = MIN_GAIN,
        decisions: CodecDecisions | None = None,
    ) -> None:
        self.backend = backend
        self.tier_bandwidth = tier_bandwidth
        self.on_write = on_write
        self.min_gain = min_gain
        self.decisions = decisions

    def _choose(
        self, plan: WritePlan, layout: Layout, data: memoryview, span: PartitionSpan, base: memoryview | None
    ) -> CodecSpec:
        forced = plan.codecs.forced
        if forced is not None:
            return forced
        bw = self.tier_bandwidth()
        if not plan.codecs.measure or bw == float("inf"):
            return RAW
        key: Hashable = (layout.signature, span.start, span.end, base is not None)
        # a delta's size depends on how much this step changed: measured every time a base is offered
        decisions = self.decisions if base is None else None
        if decisions is not None:
            known = decisions.get(key, bw)
            if known is not None:
                return known
        typesize = dominant_itemsize(layout, span.start, span.end, _ITEMSIZES)
        ests = measure_candidates(plan.codecs.candidates(typesize, delta=base is not None), data, base)
        choice = choose_codec(len(data), ests, bw, min_gain=self.min_gain)
        if decisions is not None:
            decisions.put(key, choice.spec, bw, nbytes=len(data), estimates=ests, min_gain=self.min_gain)
        return choice.spec

    def write(
        self,
        plan: WritePlan,
        stream: memoryview | StreamSource,
        content: CheckpointContent,
        *,
        delta_base: DeltaBase | None = None,
        progress: Progress | None = None,
        crcs: ChunkCrcs | None = None,
    ) -> WriteReport:
        """Write ``plan``'s step from ``stream`` (one buffer, or a source read range by range).

        ``delta_base`` is the stream of the plan's delta base (needed when the plan offers one). ``crcs``: the
        stream's chunk checksums when already known (a sealed host slot): raw partitions reuse them.
        """
        t_start = time.perf_counter()
        src, base = self._sources(plan, stream, content, delta_base)
        token = self._begin(plan)
        try:
            if self.decisions is not None:
                self.decisions.next_checkpoint()
            report = WriteReport(plan.step, plan.total_bytes, 0, 0)
            records, used = self._write_partitions(plan, content.layout, src, base, report, progress, crcs)
            self._commit(plan, content, records, used, report)
        except BaseException:
            self._discard_attempt(plan)
            raise
        finally:
            claims.release(token)
        report.seconds = time.perf_counter() - t_start
        return report

    # --- phases ------------------------------------------------------------------------------------
    def _committed_error(self, plan: WritePlan) -> StepExistsError:
        marker = step_dir(plan.step) + "/" + COMMIT_KEY
        return StepExistsError(
            f"step {plan.step} is already committed in {self.backend.url} ({marker}); delete "
            "it first or save under another step"
        )

    def _begin(self, plan: WritePlan) -> str:
        """Claim ``plan.prefix`` for this write and clear an interrupted attempt's leftovers; the claim's token."""
        marker = step_dir(plan.step) + "/" + COMMIT_KEY
        if self.backend.exists(marker):
            raise self._committed_error(plan)
        key = plan.prefix + claims.CLAIM_KEY
        token, record = claims.new_claim(f"step {plan.step}")
        try:
            won = self.backend.create_exclusive(key, record)
            if not won:
                held = claims.parse(self.backend.get(key))
                if claims.is_own_abandoned(held):  # a failed save of this process that could not clean up
                    self._remove_objects(plan.prefix)
                    won = self.backend.create_exclusive(key, record)
                if not won:
                    if self.backend.exists(marker):
                        raise self._committed_error(plan)
                    raise self._claimed_error(plan, key, held)
            if self.backend.exists(marker):  # committed meanwhile by a writer that claims nothing
                self.backend.delete(key)
                raise self._committed_error(plan)
            # leftovers of an interrupted attempt, including a rank's marker of a step that was never committed
            # globally (another rank died): this attempt replaces them
            self._remove_objects(plan.prefix, keep=key)
        except BaseException:
            claims.release(token)
            raise
        return token

    def _claimed_error(self, plan: WritePlan, key: str, held: claims.Claim | None) -> StepExistsError:
        where = f"{self.backend.url}/{key}"
        if held is None:
            who = "another writer (its claim record is unreadable)"
        else:
            who = held.describe()
        dead = claims.is_dead(held)
        hint = (
            "it is the leftover of a save that crashed: reopen the store or call discard_uncommitted() to "
            "remove it, then save again"
            if dead
            else "two processes are saving the same step into one root: give each job its own directory "
            "or save under another step"
        )
        return StepExistsError(f"step {plan.step} is being saved by {who} ({where}); {hint}")

    def _remove_objects(self, prefix: str, *, keep: str | None = None) -> None:
        """Delete every object under ``prefix`` except ``keep`` (and the temporaries there)."""
        for k in list(self.backend.list(prefix)):
            if k != keep:
                self.backend.delete(k)
        self.backend.remove_temporaries(prefix)

    def _discard_attempt(self, plan: WritePlan) -> None:
        """Remove what a failed write of ``plan`` wrote: its marker first, its claim last (best effort)."""
        key = plan.prefix + claims.CLAIM_KEY
        try:
            self.backend.delete(plan.prefix + COMMIT_KEY)
            self._remove_objects(plan.prefix, keep=key)
            self.backend.delete(key)
            if not any(True for _ in self.backend.list(plan.prefix)):
                self.backend.delete_prefix(plan.prefix)  # the directories left empty
        except Exception as e:  # e.g. the tier is gone: the next attempt (or opening the store) cleans up
            log.warning("could not remove the partial files of step %s in %s: %s", plan.step, self.backend.url, e)

    @staticmethod
    def _sources(
        plan: WritePlan, stream: memoryview | StreamSource, content: CheckpointContent, delta_base: DeltaBase | None
    ) -> tuple[memoryview | StreamSource, memoryview | None]:
        src: memoryview | StreamSource
        if isinstance(stream, memoryview):
            flat = stream.cast("B") if stream.format != "B" or stream.ndim != 1 else stream
            src, have = flat, len(flat)
        else:
            src, have = stream, stream.total_bytes
        if have < plan.total_bytes or content.layout.total_bytes != plan.total_bytes:
            raise ConfigError(f"snapshot buffer has {have} bytes, layout needs {content.layout.total_bytes}")
        if plan.delta_base is None:
            return src, None
        if not isinstance(src, memoryview) or delta_base is None or delta_base.step != plan.delta_base:
            raise ConfigError(f"the plan of step {plan.step} offers delta base {plan.delta_base}: pass its stream")
        return src, delta_base.stream

    def _write_partitions(
        self,
        plan: WritePlan,
        layout: Layout,
        src: memoryview | StreamSource,
        base: memoryview | None,
        report: WriteReport,
        progress: Progress | None,
        crcs: ChunkCrcs | None = None,
    ) -> tuple[list[PartitionRecord], dict[str, CodecSpec]]:
        spans = plan.spans
        records: list[PartitionRecord] = []
        used: dict[str, CodecSpec] = {}
        shards: dict[str, int] = {}
        scratch: list[np.ndarray | None] = [None, None]  # XOR deltas: one per pipeline stage

        def encode(k: int, span: PartitionSpan) -> _Encoded:
            data = src[span.start : span.end] if isinstance(src, memoryview) else src.read(span.start, span.end)
            t0 = time.perf_counter()
            base_part = base[span.start : span.end] if base is not None else None
            spec = self._choose(plan, layout, data, span, base_part)
            if spec.delta:
                if base_part is None:
                    raise ConfigError(f"codec chain {spec.label} needs a delta base; the plan offers none")
                buf = scratch[k % 2]
                if buf is None:
                    buf = scratch[k % 2] = np.empty(plan.partition_bytes, np.uint8)
                xor_into(buf, data, base_part)
                data = buf[: span.nbytes].data
            C = plan.chunk_bytes
            if crcs is not None and not spec.delta and not spec.compresses and crcs.covers(span.start, span.end, C):
                # raw from a slot whose checksums are (being) computed: write now, take them after the write
                shard = encode_shard(spec, data, C, plan.chunks_per_shard, checksum=False)

                def checksums() -> list[int]:
                    return raw_chunk_crcs(data, C, crcs.span(span.start, span.end, C))

                return _Encoded(span, spec, shard, time.perf_counter() - t0, checksums)
            shard = encode_shard(spec, data, C, plan.chunks_per_shard)
            return _Encoded(span, spec, shard, time.perf_counter() - t0)

        # encode i+1 (helper thread) while i is written; the helper inherits this thread's priority
        pool = ThreadPoolExecutor(1, thread_name_prefix="asymstore-encode")
        try:
            ahead: Future[_Encoded] | None = pool.submit(encode, 0, spans[0]) if spans else None
            for k in range(len(spans)):
                assert ahead is not None
                item = ahead.result()
                ahead = pool.submit(encode, k + 1, spans[k + 1]) if k + 1 < len(spans) else None
                records.append(self._put(plan, item, shards, used, report))
                if progress:
                    progress(item.span.end, plan.total_bytes)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return records, used

    def _put(
        self, plan: WritePlan, item: _Encoded, shards: dict[str, int], used: dict[str, CodecSpec], report: WriteReport
    ) -> PartitionRecord:
        spec, enc = item.spec, item.shard
        if spec.delta:
            report.delta_base = plan.delta_base
        shard = shards.get(spec.label, 0)
        shards[spec.label] = shard + 1
        used[spec.label] = spec
        t1 = time.perf_counter()
        self.backend.put(plan.prefix + shard_key(spec.label, shard), enc.parts)
        t2 = time.perf_counter()
        if item.checksums is not None:
            enc.chunk_crcs = item.checksums()
        if self.on_write:
            self.on_write(enc.nbytes, t2 - t1)
        report.encode_seconds += item.seconds
        report.write_seconds += t2 - t1
        report.stored_bytes += enc.nbytes
        report.objects += 1
        report.codecs[spec.label] = report.codecs.get(spec.label, 0) + 1
        return PartitionRecord(item.span, spec.label, shard, enc.nbytes, enc.chunk_crcs)

    def _commit(
        self,
        plan: WritePlan,
        content: CheckpointContent,
        records: list[PartitionRecord],
        used: dict[str, CodecSpec],
        report: WriteReport,
    ) -> None:
        if content.lossy is not None:  # a lossy checkpoint depends on its residual base (format.md section 15)
            report.delta_base = content.lossy.get("base")
        manifest = Manifest(
            step=plan.step,
            layout=content.layout,
            skeleton=content.skeleton,
            numpy_names=list(content.numpy_names),
            partition_bytes=plan.partition_bytes,
            chunk_bytes=plan.chunk_bytes,
            partitions=records,
            codecs=used,
            delta_base=report.delta_base,
            user=dict(content.user),
            lossy=dict(content.lossy) if content.lossy is not None else None,
            global_parts=dict(content.global_parts),
        )
        array_meta: dict[str, bytes] = {}
        for label, spec in used.items():
            attrs = {
                "asymstore": {
                    "codec": spec.to_json(),
                    "transform": {"xor_with_step": report.delta_base} if spec.delta else None,
                }
            }
            meta = dumps(
                array_metadata(
                    nbytes=manifest.array_nbytes(label),
                    partition_bytes=plan.partition_bytes,
                    chunk_bytes=plan.chunk_bytes,
                    spec=spec,
                    attributes=attrs,
                )
            )
            self.backend.put(plan.prefix + f"{label}/zarr.json", meta)
            array_meta[label] = meta
        group = dumps(group_metadata({"asymstore": manifest.to_json()}))
        self.backend.put(plan.prefix + GROUP_KEY, group)
        self.backend.barrier(plan.prefix)
        created = self.backend.create_exclusive(
            plan.prefix + COMMIT_KEY,
            commit_record(
                plan.step,
                group,
                array_meta,
                report.stored_bytes,
                report.objects + len(array_meta) + 2,
                plan.total_bytes,
                report.delta_base,
                world_size=plan.world_size if plan.world_size > 1 else None,
            ),
        )
        if not created:  # only a writer that ignored the claim can get here
            raise StepExistsError(f"step {plan.step}: a commit marker appeared in {self.backend.url}/{plan.prefix}")
        if plan.prefix == step_dir(plan.step) + "/":
            # committed: the marker now refuses other writers; a committed step holds exactly the objects its
            # marker counts. (A rank directory keeps its claim until rank 0 writes the step's global marker.)
            self._release_claim(plan.prefix)

    def _release_claim(self, prefix: str) -> None:
        try:
            self.backend.delete(prefix + claims.CLAIM_KEY)
        except Exception as e:  # committed all the same; the next clean-up removes the claim
            log.warning("could not remove the claim of %s in %s: %s", prefix, self.backend.url, e)


#: the root group's attributes: what marks a directory as an asymstore root
ROOT_ATTRS = {"asymstore": {"root": True}}


def _root_problem(backend: ObjectStore) -> str | None:
    """Why the root of ``backend`` is not an asymstore root it may create or open (``None``: it is fine).

    The root is listed before its ``zarr.json`` is read: a store's root group is its first object, so another
    process creating the same store at this moment has written it before anything the listing can see.
    """
    import json

    from .manifest import parse_step_dir

    dirs = backend.list_dirs("")
    empty = not dirs and not any(True for _ in backend.list(""))
    raw = backend.get(GROUP_KEY)
    if raw is not None:
        try:
            attrs = json.loads(raw).get("attributes", {})
        except (ValueError, AttributeError):
            attrs = None
        if isinstance(attrs, dict) and isinstance(attrs.get("asymstore"), dict):
            return None
        return f"{backend.url} holds a {GROUP_KEY} that is not an asymstore root"
    if empty or any(parse_step_dir(d) is not None for d in dirs):
        return None  # empty, or checkpoints without a root group (written before there was one): a store
    return f"{backend.url} is not empty and holds no asymstore checkpoints"


def ensure_root_group(backend: ObjectStore, *, create: bool = True) -> None:
    """Make sure the tier root is an asymstore root (a zarr group too, so plain zarr can browse the steps).

    An existing store is opened as it is. An empty or missing root is made a store when ``create`` (else
    :class:`~asymstore.errors.ConfigError`). A directory that holds other things is never written into: a
    ``ConfigError`` says so.
    """
    from .errors import ConfigError

    problem = _root_problem(backend)
    if problem is not None:
        raise ConfigError(
            f"{problem}: refusing to create a checkpoint store there. Use an empty or new directory "
            "(e.g. a 'checkpoints' subdirectory)."
        )
    if backend.exists(GROUP_KEY):
        return
    if not create and not backend.list_dirs(""):  # (a store of steps without a root group is one: opened)
        raise ConfigError(f"no asymstore store at {backend.url} (create=False): pass create=True to make one")
    backend.put_atomic(GROUP_KEY, dumps(group_metadata(ROOT_ATTRS)))


__all__ = [
    "CheckpointWriter",
    "DeltaBase",
    "ReaderSource",
    "WriteReport",
    "ensure_root_group",
]
