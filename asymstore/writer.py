"""Persisting one snapshot stream to a tier's object store (the executor of the planners).

:meth:`CheckpointWriter.write` runs these phases, in order:

1. cut the stream into partitions of ``partition_bytes`` (chunks of ``chunk_bytes``);
2. per partition: choose its codec chain (selective compression, :mod:`.compression`),
   apply the XOR delta if chosen, encode the shard (checksums, compression) and write it (one object).
   Two stages in a pipeline: partition ``i+1`` is encoded on a helper thread while partition ``i`` is
   written (``buffers=2`` in :mod:`.batch_plan`'s time model; at most two encoded partitions are held);
3. write one zarr array ``zarr.json`` per codec chain used;
4. write the step group's ``zarr.json`` carrying the manifest;
5. ``barrier``: make every name durable;
6. write the commit marker, atomically and last.

A crash anywhere before 6 leaves a step without a marker, which no reader lists.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from asymstore.backends.base import ObjectStore

from . import dtypes
from .codecs import RAW, CodecSpec, xor_into
from .compression import CodecDecisions, CodecEstimate, candidate_specs, choose_codec, measure_candidates
from .errors import ConfigError, StepExistsError
from .layout import Layout, PartitionSpan, cut_stream, dominant_itemsize
from .manifest import COMMIT_KEY, GROUP_KEY, Manifest, PartitionRecord, commit_record, step_dir
from .zarrfmt import EncodedShard, array_metadata, dumps, encode_shard, group_metadata, shard_key

Progress = Callable[[int, int], None]


@dataclass
class DeltaBase:
    """The raw stream of a full checkpoint that later ones may be XOR-encoded against."""

    step: int
    signature: str
    stream: memoryview


class StreamSource:
    """Where a writer reads the stream from when it is not one buffer (e.g. another tier)."""

    total_bytes: int

    def read(self, start: int, end: int) -> memoryview:
        raise NotImplementedError


class ReaderSource(StreamSource):
    """Stream bytes read range by range from a committed checkpoint on another tier.

    Two buffers, used in turn: the range returned by one call stays valid while the next one is read (the
    writer encodes partition ``i+1`` while it writes partition ``i``). The second is allocated only when a
    second range is read.
    """

    def __init__(self, reader: Any, max_range: int) -> None:
        self.reader = reader
        self.total_bytes = reader.manifest.layout.total_bytes
        self.max_range = max_range
        self._bufs: list[bytearray | None] = [None, None]
        self._calls = 0

    def read(self, start: int, end: int) -> memoryview:
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


@dataclass
class WriteReport:
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
        return self.stored_bytes / self.raw_bytes if self.raw_bytes else 1.0


def parse_compression(value: str | CodecSpec) -> str | CodecSpec:
    """``"auto"``, ``"none"`` or a forced chain (a :class:`CodecSpec` or its label)."""
    if isinstance(value, CodecSpec):
        return value
    if value in ("auto", "none"):
        return value
    from .codecs import LZ4, ZSTD1, ZSTD3, blosc_shuffle

    named = {
        "raw": RAW,
        "lz4": LZ4,
        "zstd1": ZSTD1,
        "zstd3": ZSTD3,
        "zstd": ZSTD3,
        "blosc-shuffle": blosc_shuffle(4),
        "xor-zstd": blosc_shuffle(4).with_delta(),
    }
    if value not in named:
        raise ConfigError(f"unknown compression {value!r}; use 'auto', 'none' or one of {sorted(named)}")
    return named[value]


_ITEMSIZES = {dtypes.info(d).torch_name: dtypes.info(d).itemsize for d in dtypes.supported_dtypes()}


class CheckpointWriter:
    def __init__(
        self,
        store: ObjectStore,
        *,
        partition_bytes: int,
        chunk_bytes: int,
        compression: str | CodecSpec = "auto",
        tier_bandwidth: Callable[[], float] = lambda: float("inf"),
        on_write: Callable[[int, float], None] | None = None,
        min_gain: float = 0.05,
        decisions: CodecDecisions | None = None,
    ) -> None:
        if partition_bytes % chunk_bytes:
            raise ConfigError("partition_bytes must be a multiple of chunk_bytes")
        self.store = store
        self.partition_bytes = partition_bytes
        self.chunk_bytes = chunk_bytes
        self.compression = parse_compression(compression)
        self.tier_bandwidth = tier_bandwidth
        self.on_write = on_write
        self.min_gain = min_gain
        #: the tier's remembered choices (``None``: measure every partition of every checkpoint)
        self.decisions = decisions
        self.last_choices: list[tuple[str, list[CodecEstimate]]] = []

    def _choose(self, data: memoryview, typesize: int, base: memoryview | None, key: Any = None) -> CodecSpec:
        if isinstance(self.compression, CodecSpec):
            if self.compression.delta and base is None:
                return CodecSpec(
                    self.compression.kind,
                    self.compression.level,
                    self.compression.cname,
                    self.compression.shuffle,
                    self.compression.typesize,
                )
            return self.compression
        if self.compression == "none":
            return RAW
        bw = self.tier_bandwidth()
        if bw == float("inf"):
            return RAW
        if self.decisions is not None and key is not None:
            known = self.decisions.get(key, bw)
            if known is not None:
                return known
        ests = measure_candidates(candidate_specs(typesize, delta=base is not None), data, base)
        choice = choose_codec(len(data), ests, bw, min_gain=self.min_gain)
        self.last_choices.append((choice.spec.label, ests))
        if self.decisions is not None and key is not None:
            self.decisions.put(key, choice.spec, bw)
        return choice.spec

    def write(
        self,
        step: int,
        stream: memoryview | StreamSource,
        layout: Layout,
        skeleton: Any,
        *,
        numpy_names: list[str],
        user: dict[str, Any] | None = None,
        delta_base: DeltaBase | None = None,
        progress: Progress | None = None,
        prefix: str | None = None,
    ) -> WriteReport:
        """Write ``step`` under ``prefix`` (default: the step's directory; a rank's shard directory
        for multi-rank checkpoints)."""
        t_start = time.perf_counter()
        prefix = prefix or step_dir(step) + "/"
        marker = step_dir(step) + "/" + COMMIT_KEY
        if self.store.exists(marker):
            raise StepExistsError(
                f"step {step} is already committed in {self.store.url} ({marker}); delete "
                "it first or save under another step"
            )
        # leftovers of an interrupted attempt, including a rank's shard marker of a step that was
        # never committed globally (another rank died): this attempt replaces them
        self.store.delete_prefix(prefix)
        if isinstance(stream, StreamSource):
            src: StreamSource | memoryview = stream
            have = stream.total_bytes
            delta_base = None  # deltas need the whole stream at hand
        else:
            src = memoryview(stream).cast("B")
            have = len(src)
        if have < layout.total_bytes:
            raise ConfigError(f"snapshot buffer has {have} bytes, layout needs {layout.total_bytes}")
        base = None
        if delta_base is not None and delta_base.signature == layout.signature and delta_base.step != step:
            base = delta_base.stream
        chunk = effective_chunk_bytes(layout.total_bytes, self.chunk_bytes)
        # a checkpoint smaller than one partition gets one partition of its own (rounded to chunks),
        # so the shard index (16 bytes per chunk slot) stays proportional to the data
        part = min(self.partition_bytes, -(-max(layout.total_bytes, 1) // chunk) * chunk)
        spans = cut_stream(layout.total_bytes, part, chunk)
        cps = part // chunk
        report = WriteReport(step, layout.total_bytes, 0, 0)
        records: list[PartitionRecord] = []
        used: dict[str, CodecSpec] = {}
        shards: dict[str, int] = {}
        scratch: list[np.ndarray | None] = [None, None]  # XOR deltas: one per pipeline stage
        self.last_choices = []
        if self.decisions is not None:
            self.decisions.next_checkpoint()

        def encode(k: int, span: PartitionSpan) -> _Encoded:
            data = src[span.start : span.end] if isinstance(src, memoryview) else src.read(span.start, span.end)
            t0 = time.perf_counter()
            typesize = dominant_itemsize(layout, span.start, span.end, _ITEMSIZES)
            base_part = base[span.start : span.end] if base is not None else None
            spec = self._choose(
                data, typesize, base_part, key=(layout.signature, span.start, span.end, base is not None)
            )
            if spec.delta:
                assert base_part is not None
                buf = scratch[k % 2]
                if buf is None:
                    buf = scratch[k % 2] = np.empty(part, np.uint8)
                xor_into(buf, data, base_part)
                data = buf[: span.nbytes].data
            return _Encoded(span, spec, encode_shard(spec, data, chunk, cps), time.perf_counter() - t0)

        # encode i+1 (helper thread) while i is written; the helper inherits this thread's priority
        pool = ThreadPoolExecutor(1, thread_name_prefix="asymstore-encode")
        try:
            ahead: Future[_Encoded] | None = pool.submit(encode, 0, spans[0]) if spans else None
            for k in range(len(spans)):
                assert ahead is not None
                item = ahead.result()
                ahead = pool.submit(encode, k + 1, spans[k + 1]) if k + 1 < len(spans) else None
                spec, enc = item.spec, item.shard
                if spec.delta:
                    report.delta_base = delta_base.step if delta_base else None
                shard = shards.get(spec.label, 0)
                shards[spec.label] = shard + 1
                used[spec.label] = spec
                t1 = time.perf_counter()
                self.store.put(prefix + shard_key(spec.label, shard), enc.parts)
                t2 = time.perf_counter()
                if self.on_write:
                    self.on_write(enc.nbytes, t2 - t1)
                report.encode_seconds += item.seconds
                report.write_seconds += t2 - t1
                report.stored_bytes += enc.nbytes
                report.objects += 1
                report.codecs[spec.label] = report.codecs.get(spec.label, 0) + 1
                records.append(PartitionRecord(item.span, spec.label, shard, enc.nbytes, enc.chunk_crcs))
                if progress:
                    progress(item.span.end, layout.total_bytes)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        manifest = Manifest(
            step=step,
            layout=layout,
            skeleton=skeleton,
            numpy_names=sorted(numpy_names),
            partition_bytes=part,
            chunk_bytes=chunk,
            partitions=records,
            codecs=used,
            delta_base=report.delta_base,
            user=dict(user or {}),
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
                    partition_bytes=part,
                    chunk_bytes=chunk,
                    spec=spec,
                    attributes=attrs,
                )
            )
            self.store.put(prefix + f"{label}/zarr.json", meta)
            array_meta[label] = meta
        group = dumps(group_metadata({"asymstore": manifest.to_json()}))
        self.store.put(prefix + GROUP_KEY, group)
        self.store.barrier(prefix)
        self.store.put_atomic(
            prefix + COMMIT_KEY,
            commit_record(
                step,
                group,
                array_meta,
                report.stored_bytes,
                report.objects + len(array_meta) + 2,
                layout.total_bytes,
                report.delta_base,
            ),
        )
        report.seconds = time.perf_counter() - t_start
        return report


def effective_chunk_bytes(total_bytes: int, chunk_bytes: int) -> int:
    """Small checkpoints get smaller chunks, so the zero padding of the edge chunk stays under 1/16."""
    if total_bytes >= 16 * chunk_bytes:
        return chunk_bytes
    want = max(total_bytes // 16, 4096)
    return min(chunk_bytes, 1 << (want - 1).bit_length())


def ensure_root_group(store: ObjectStore) -> None:
    """The tier root is a zarr group too, so plain zarr can browse the steps."""
    if not store.exists(GROUP_KEY):
        store.put_atomic(GROUP_KEY, dumps(group_metadata({"asymstore": {"root": True}})))
