"""The write plan: everything decided before a checkpoint's stream is written to a tier. Pure: no I/O.

:func:`plan_write` turns what is known about a write (the checkpoint's size, the tier's measured write model,
the tier's settings and its delta state) into a frozen :class:`WritePlan`: the stored objects (partition
spans) and their size B*, the chunk size, the codecs to try or the forced chain, and the delta base offered
(or why none). :class:`~asymstore.writer.CheckpointWriter` only executes a plan.

B* is decided here only (:func:`batch_bytes`, which calls :mod:`.batch_plan`'s time model); whether a step
is a delta is decided by :mod:`.retention` and recorded here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .batch_plan import optimal_batch_bytes
from .codecs import LZ4, RAW, ZSTD1, ZSTD3, CodecSpec, blosc_shuffle
from .compression import candidate_specs
from .errors import ConfigError
from .layout import Layout, PartitionSpan, cut_stream
from .manifest import Manifest
from .retention import DeltaState, delta_decision

Compression = Literal["auto", "none"] | CodecSpec

_NAMED: dict[str, CodecSpec] = {
    "raw": RAW,
    "lz4": LZ4,
    "zstd1": ZSTD1,
    "zstd3": ZSTD3,
    "zstd": ZSTD3,
    "blosc-shuffle": blosc_shuffle(4),
    "xor-zstd": blosc_shuffle(4).with_delta(),
}


def parse_compression(value: str | CodecSpec) -> Compression:
    """``"auto"``, ``"none"`` or a forced chain (a :class:`CodecSpec` or its label)."""
    if isinstance(value, CodecSpec):
        return value
    if value == "auto":
        return "auto"
    if value == "none":
        return "none"
    if value in ("excp", "lossy"):
        raise ConfigError(
            "compression is lossless only; the lossy ExCP codec is enabled per archive tier: "
            "TierSpec(url, lossy='excp') on a tier below the first"
        )
    if value not in _NAMED:
        raise ConfigError(f"unknown compression {value!r}; use 'auto', 'none' or one of {sorted(_NAMED)}")
    return _NAMED[value]


@dataclass(frozen=True)
class CheckpointContent:
    """What a checkpoint holds besides its byte stream: the stream's layout, the state's skeleton, the names
    of tensors that were numpy arrays, and the user's metadata. Travels from the host slot (or a manifest)
    through the tier manager to the writer, which records it in the manifest."""

    layout: Layout
    skeleton: Any
    numpy_names: tuple[str, ...] = ()
    user: Mapping[str, Any] = field(default_factory=dict)
    #: the manifest's ``lossy`` member of a lossy checkpoint (docs/format.md section 15)
    lossy: Mapping[str, Any] | None = None
    #: tensor name -> the parts of global tensors it holds (:mod:`asymstore.globalmeta`); empty: none
    global_parts: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "numpy_names", tuple(sorted(self.numpy_names)))

    @classmethod
    def of_manifest(cls, manifest: Manifest) -> CheckpointContent:
        """The content a committed checkpoint's manifest records."""
        return cls(
            manifest.layout,
            manifest.skeleton,
            tuple(manifest.numpy_names),
            dict(manifest.user),
            global_parts=dict(manifest.global_parts),
        )


@dataclass(frozen=True)
class WriteModel:
    """A tier's measured write costs: per-write latency (s), bandwidth and stage (checksum) bandwidth (B/s)."""

    latency_s: float
    bandwidth: float
    stage_bandwidth: float = math.inf


@dataclass(frozen=True)
class WriteOptions:
    """How a tier is written: the configuration, the tier's role and its backend's capabilities."""

    chunk_bytes: int
    compression: Compression = "auto"
    #: fixed object size (``None``: B* from the write model)
    partition_bytes: int | None = None
    delta_every: int = 0
    staging_budget_bytes: int = 512 << 20
    #: written only from host snapshot slots (no source ranges staged)
    from_slots_only: bool = False
    #: the backend lives in this process's memory (``Capabilities.volatile``)
    volatile: bool = False

    def __post_init__(self) -> None:
        if self.chunk_bytes <= 0:
            raise ConfigError(f"chunk_bytes must be positive, got {self.chunk_bytes}")
        if self.partition_bytes is not None and (self.partition_bytes <= 0 or self.partition_bytes % self.chunk_bytes):
            raise ConfigError("partition_bytes must be a multiple of chunk_bytes")

    @property
    def needs_model(self) -> bool:
        """Whether B* needs the tier's measured write model (else the plan is made without one)."""
        return not self.partition_bytes and not self.volatile


@dataclass(frozen=True)
class CodecPlan:
    """The codecs of a write: one forced chain for every partition, raw, or measured per partition."""

    #: every partition uses this chain (already without its delta when no base is offered)
    forced: CodecSpec | None = None
    #: measure candidate chains per partition against the tier's bandwidth ("auto" on a non-volatile tier)
    measure: bool = False

    def candidates(self, typesize: int, *, delta: bool) -> list[CodecSpec]:
        """The chains to measure for a partition of elements of ``typesize`` bytes."""
        return candidate_specs(typesize, delta=delta) if self.measure else []


@dataclass(frozen=True)
class WritePlan:
    """One checkpoint's write to one tier, decided before a byte is written."""

    step: int
    #: where the objects go: the step's directory, or a rank's directory within it (ends with '/')
    prefix: str
    total_bytes: int
    #: B*: the size of every stored object but the last
    partition_bytes: int
    chunk_bytes: int
    spans: tuple[PartitionSpan, ...]
    codecs: CodecPlan
    #: the step the stream may be XOR-encoded against (``None``: written in full), and why
    delta_base: int | None
    delta_reason: str
    #: the ranks of the job writing the step (> 1: ``prefix`` is this rank's directory, whose marker records it)
    world_size: int = 1

    @property
    def chunks_per_shard(self) -> int:
        """Chunk slots per zarr shard (one shard per partition)."""
        return self.partition_bytes // self.chunk_bytes


def effective_chunk_bytes(total_bytes: int, chunk_bytes: int) -> int:
    """Small checkpoints get smaller chunks, so the zero padding of the edge chunk stays under 1/16."""
    if total_bytes >= 16 * chunk_bytes:
        return chunk_bytes
    want = max(total_bytes // 16, 4096)
    return min(chunk_bytes, 1 << (want - 1).bit_length())


def batch_bytes(checkpoint_bytes: int, options: WriteOptions, model: WriteModel | None) -> int:
    """B*: the batch (= stored object) size minimising the modelled flush time, a multiple of the chunk.

    A fixed ``partition_bytes`` wins. A volatile backend has no write latency to amortise: as large as the
    staging budget allows, which two pipeline stages share, each holding at most a source range and an encoded
    copy. Otherwise :func:`~asymstore.batch_plan.optimal_batch_bytes` over ``model`` with two buffers (the
    writer encodes partition ``i+1`` while it writes partition ``i``), the budget divided by what each stage
    holds: a source range unless written from the slots only, an encoded copy unless raw and without deltas.
    """
    chunk = options.chunk_bytes
    if options.partition_bytes:
        return options.partition_bytes
    if options.volatile:
        b = min(max(checkpoint_bytes, chunk), options.staging_budget_bytes // 4)
    else:
        if model is None:
            raise ConfigError("B* of a non-volatile tier needs its measured write model")
        raw = options.compression == "none" and options.delta_every <= 0
        held = (0 if options.from_slots_only else 1) + (0 if raw else 1)
        b = optimal_batch_bytes(
            max(checkpoint_bytes, 1),
            model.latency_s,
            model.bandwidth or 1e9,
            stage_bandwidth=model.stage_bandwidth,
            buffers=2,
            staging_budget_bytes=options.staging_budget_bytes // held if held else None,
            min_batch_bytes=chunk,
            align=chunk,
        )
    return max(-(-b // chunk), 1) * chunk


def _codec_plan(compression: Compression, *, volatile: bool, delta_base: int | None) -> CodecPlan:
    if isinstance(compression, CodecSpec):
        if compression.delta and delta_base is None:
            c = compression
            return CodecPlan(forced=CodecSpec(c.kind, c.level, c.cname, c.shuffle, c.typesize))
        return CodecPlan(forced=compression)
    if compression == "none":
        return CodecPlan(forced=RAW)
    return CodecPlan(forced=RAW) if volatile else CodecPlan(measure=True)


def plan_write(
    step: int,
    layout: Layout,
    options: WriteOptions,
    *,
    model: WriteModel | None = None,
    delta: DeltaState | None = None,
    whole_stream: bool = True,
    prefix: str,
    world_size: int = 1,
) -> WritePlan:
    """The plan for writing ``step`` (laid out as ``layout``) to a tier under ``prefix``.

    ``model``: the tier's measured write costs (needed when ``options.needs_model``); ``delta``: the tier's
    delta state; ``whole_stream``: the stream is one buffer at hand (a host slot), not read range by range;
    ``world_size``: the ranks of the job (``prefix`` is then a rank's directory).
    """
    total = layout.total_bytes
    chunk = effective_chunk_bytes(total, options.chunk_bytes)
    # a checkpoint smaller than one partition gets one partition of its own (rounded to chunks), so the shard
    # index (16 bytes per chunk slot) stays proportional to the data
    part = min(batch_bytes(total, options, model), -(-max(total, 1) // chunk) * chunk)
    decision = delta_decision(
        step, layout.signature, delta or DeltaState(), delta_every=options.delta_every, whole_stream=whole_stream
    )
    return WritePlan(
        step=step,
        prefix=prefix,
        total_bytes=total,
        partition_bytes=part,
        chunk_bytes=chunk,
        spans=tuple(cut_stream(total, part, chunk)),
        codecs=_codec_plan(options.compression, volatile=options.volatile, delta_base=decision.base_step),
        delta_base=decision.base_step,
        delta_reason=decision.reason,
        world_size=world_size,
    )


__all__ = [
    "CheckpointContent",
    "CodecPlan",
    "Compression",
    "WriteModel",
    "WriteOptions",
    "WritePlan",
    "batch_bytes",
    "effective_chunk_bytes",
    "parse_compression",
    "plan_write",
]
