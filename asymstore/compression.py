"""Selective partition compression: a pure planner and a sampler that feeds it.

A partition is compressed only when that is faster end to end to its tier::

    t_compress(p) + size_c(p) / BW_tier  <  size(p) / BW_tier

with the compression ratio and codec speed measured on a small sample of the partition
and BW_tier measured by real writes to the tier. The planner (:func:`choose_codec`) is
pure; :func:`measure_candidates` does the sampling.
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from .codecs import LZ4, RAW, CodecSpec, blosc_shuffle, encode_chunk, xor_into
from .errors import ConfigError


@dataclass(frozen=True)
class CodecEstimate:
    """Measured behaviour of a codec on a sample: stored/raw ratio and encode speed (bytes/s)."""

    spec: CodecSpec
    ratio: float
    encode_bw: float


@dataclass(frozen=True)
class CodecChoice:
    """The planner's pick for one partition: the chain, its predicted time, raw's time and the ratio."""

    spec: CodecSpec
    predicted_s: float
    raw_s: float
    ratio: float


def predicted_time(nbytes: int, est: CodecEstimate, tier_bw: float) -> float:
    """Encode + write time of ``nbytes`` with codec ``est`` to a tier of ``tier_bw`` bytes/s."""
    if est.spec.kind == "raw" and not est.spec.delta:
        return nbytes / tier_bw
    return nbytes / est.encode_bw + nbytes * est.ratio / tier_bw


#: a delta at least this many times smaller than the best full chain is always written as a delta
DELTA_GAIN = 10.0
#: a chain is taken only when it is predicted faster than raw by at least this fraction
MIN_GAIN = 0.05


def choose_codec(
    nbytes: int,
    estimates: Sequence[CodecEstimate],
    tier_bw: float,
    *,
    min_gain: float = MIN_GAIN,
    delta_gain: float = DELTA_GAIN,
) -> CodecChoice:
    """Pick the fastest chain end to end; compress only if it beats raw by ``min_gain`` (fraction).

    Bytes count too, not only time: when a delta chain stores at least ``delta_gain`` times fewer bytes
    than the chosen full chain (raw included), the fastest such delta is taken even if a full chain is
    predicted faster (a busy CPU makes encoding look slow; writing a nearly unchanged step in full would
    also end the delta cadence, see :func:`asymstore.retention.next_delta_state`). ``tier_bw`` may be
    ``inf`` (memory): then nothing is ever compressed.
    """
    if not (tier_bw > 0) or math.isnan(tier_bw):
        raise ConfigError(f"tier bandwidth must be positive, got {tier_bw}")
    if not delta_gain >= 1.0:
        raise ConfigError(f"delta_gain must be >= 1, got {delta_gain}")
    raw_s = nbytes / tier_bw
    best = CodecChoice(RAW, raw_s, raw_s, 1.0)
    usable = [e for e in estimates if e.spec != RAW and e.encode_bw > 0 and e.ratio >= 0]
    for est in usable:
        t = predicted_time(nbytes, est, tier_bw)
        if t < best.predicted_s and t < raw_s * (1.0 - min_gain):
            best = CodecChoice(est.spec, t, raw_s, est.ratio)
    if best.spec.delta:
        return best
    small = [e for e in usable if e.spec.delta and e.ratio * delta_gain <= best.ratio]
    if small:
        est = min(small, key=lambda e: predicted_time(nbytes, e, tier_bw))
        return CodecChoice(est.spec, predicted_time(nbytes, est, tier_bw), raw_s, est.ratio)
    return best


def candidate_specs(typesize: int, *, delta: bool) -> list[CodecSpec]:
    """The lossless chains the planner weighs: lz4, zstd-1, blosc-zstd with byte shuffle, and XOR deltas."""
    specs = [LZ4, CodecSpec("zstd", 1), blosc_shuffle(typesize if typesize in (2, 4, 8) else 4, "zstd", 1)]
    if delta:
        specs += [
            blosc_shuffle(typesize if typesize in (2, 4, 8) else 4, "zstd", 1).with_delta(),
            CodecSpec("blosc", 5, "lz4", "shuffle", typesize if typesize in (2, 4, 8) else 4).with_delta(),
        ]
    return specs


def sample_slices(
    data: memoryview, *, sample_bytes: int = 256 << 10, pieces: int = 4, align: int = 64
) -> list[tuple[int, int]]:
    """Byte ranges ``(start, end)`` spread evenly over ``data`` totalling about ``sample_bytes``."""
    n = len(data)
    if n <= sample_bytes:
        return [(0, n)] if n else []
    piece = max(align, (sample_bytes // pieces) // align * align)
    stride = (n - piece) // max(pieces - 1, 1)
    return [(s, s + piece) for s in (i * stride // align * align for i in range(pieces))]


def measure_candidates(
    specs: Sequence[CodecSpec], data: memoryview, base: memoryview | None = None, *, sample_bytes: int = 256 << 10
) -> list[CodecEstimate]:
    """Encode a sample of ``data`` with each spec; delta specs XOR against ``base`` first."""
    out: list[CodecEstimate] = []
    # 1/16 of a large partition (64 KiB at least, for stable speed estimates), so sampling stays a
    # small fraction of the encode work
    sample_bytes = min(sample_bytes, max(len(data) // 16, 64 << 10))
    ranges = sample_slices(data, sample_bytes=sample_bytes)
    if not ranges:
        return out
    scratch: np.ndarray | None = None
    for spec in specs:
        if spec.delta and base is None:
            continue
        raw_total = stored = 0
        t0 = time.perf_counter()
        for a, b in ranges:
            piece = data[a:b]
            if spec.delta:
                assert base is not None
                if scratch is None or len(scratch) < b - a:
                    scratch = np.empty(b - a, np.uint8)
                xor_into(scratch, piece, base[a:b])
                piece = scratch[: b - a].data
            stored += len(encode_chunk(spec, piece))
            raw_total += b - a
        dt = max(time.perf_counter() - t0, 1e-7)
        out.append(CodecEstimate(spec, stored / raw_total, raw_total / dt))
    return out


@dataclass(frozen=True)
class _Decision:
    spec: CodecSpec
    tier_bw: float
    made_at: int  # the decisions' checkpoint counter when it was measured
    #: what the choice was made from (empty: unknown): a new bandwidth is weighed against them again
    nbytes: int = 0
    estimates: tuple[CodecEstimate, ...] = ()
    min_gain: float = MIN_GAIN


class CodecDecisions:
    """Codec choices remembered per partition across checkpoints.

    A partition's bytes change every step, its compressibility hardly (a float32 moment stays a float32
    moment): re-sampling every partition of every checkpoint costs CPU beside training for nothing. A choice
    is reused for ``reuse`` checkpoints. When the tier's measured bandwidth has moved by more than
    ``bw_tolerance`` since (that can flip it), the choice is made again from the estimates it was made from
    (ratio and encode speed do not depend on the tier; :func:`choose_codec` at the new bandwidth, no encoding),
    or measured again where none were given. ``reuse=1`` measures every checkpoint. Only speed depends on it:
    every codec is lossless.
    """

    def __init__(self, *, reuse: int = 8, bw_tolerance: float = 0.25, max_entries: int = 4096) -> None:
        if reuse < 1:
            raise ConfigError(f"codec reuse must be >= 1 checkpoint, got {reuse}")
        self.reuse = reuse
        self.bw_tolerance = bw_tolerance
        self.max_entries = max_entries
        self.checkpoints = 0
        self.hits = 0
        self.measured = 0
        #: choices made again at a moved bandwidth from remembered estimates (counted in ``hits`` too)
        self.rechosen = 0
        self._d: dict[Hashable, _Decision] = {}

    def next_checkpoint(self) -> None:
        """A new checkpoint starts: remembered choices age by one."""
        self.checkpoints += 1

    def get(self, key: Hashable, tier_bw: float) -> CodecSpec | None:
        """The remembered chain of partition ``key``; ``None`` (measure it) when unknown, too old, or the
        bandwidth moved and no estimates were remembered to choose again from."""
        d = self._d.get(key)
        if d is None or self.checkpoints - d.made_at >= self.reuse:
            return None
        if abs(tier_bw - d.tier_bw) > self.bw_tolerance * d.tier_bw:
            if not d.estimates:
                return None
            spec = choose_codec(d.nbytes, d.estimates, tier_bw, min_gain=d.min_gain).spec
            self._d[key] = d = replace(d, spec=spec, tier_bw=tier_bw)  # still aged from its measurement
            self.rechosen += 1
        self.hits += 1
        return d.spec

    def put(
        self,
        key: Hashable,
        spec: CodecSpec,
        tier_bw: float,
        *,
        nbytes: int = 0,
        estimates: Sequence[CodecEstimate] = (),
        min_gain: float = MIN_GAIN,
    ) -> None:
        """Remember the chain measured for partition ``key`` (of ``nbytes``) at bandwidth ``tier_bw``, and the
        ``estimates`` (with ``min_gain``) :func:`choose_codec` picked it from."""
        if len(self._d) >= self.max_entries and key not in self._d:
            self._d.clear()  # a new layout: the old one's partitions will not come back
        self._d[key] = _Decision(spec, tier_bw, self.checkpoints, nbytes, tuple(estimates), min_gain)
        self.measured += 1
