r"""Optimal flush batch size for writes to a slower tier. Pure: no I/O, no torch.

A time model of flushing a checkpoint in batches (per-write latency, bandwidth, staging throughput, staging
memory) and the exact minimiser B* of it among allowed sizes (:func:`optimal_batch_bytes`), plus
:class:`LatencyBandwidthModel`, which fits the model from observed writes. The model and the derivation of
B*: docs/planning.md, section 2.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from asymstore.errors import ConfigError

__all__ = [
    "DEFAULT_BATCH_ALIGN",
    "DEFAULT_MAX_BATCH_BYTES",
    "LatencyBandwidthModel",
    "WriteCostFit",
    "continuous_optimal_batch_bytes",
    "flush_time",
    "optimal_batch_bytes",
]

MiB: Final = 1 << 20
DEFAULT_BATCH_ALIGN: Final = MiB
DEFAULT_MAX_BATCH_BYTES: Final = 4 << 30  # one object on the slow tier; HDFS-friendly, bounded staging
_EXACT_SEARCH_LIMIT: Final = 1 << 20  # feasible aligned sizes evaluated exhaustively up to this count


def _num(name: str, value: object, *, positive: bool = False, allow_inf: bool = False) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    f = float(value)
    if math.isnan(f) or (math.isinf(f) and not allow_inf) or f < 0 or (positive and f == 0):
        kind = "> 0" if positive else ">= 0"
        raise ConfigError(f"{name} must be {kind}{'' if allow_inf else ' and finite'}, got {value!r}")
    return f


def _int(name: str, value: object, *, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _flush_times(
    C: int, B: npt.NDArray[np.float64], T_d: float, BW: float, BW_in: float, buffers: int
) -> npt.NDArray[np.float64]:
    """Vectorised exact model for batch sizes ``B`` (each 0 < B, any B >= C meaning one batch)."""
    B = np.minimum(B, float(C))
    n = np.ceil(C / B)
    last = C - (n - 1) * B
    inv_in = 0.0 if math.isinf(BW_in) else 1.0 / BW_in
    inv_bw = 0.0 if math.isinf(BW) else 1.0 / BW
    s_b, s_l = B * inv_in, last * inv_in
    w_b, w_l = T_d + B * inv_bw, T_d + last * inv_bw
    if buffers == 1:
        return np.asarray(C * inv_in + n * T_d + C * inv_bw, dtype=np.float64)
    t = np.maximum.reduce(
        [
            s_b + (n - 1) * w_b + w_l,
            (n - 1) * s_b + w_b + w_l,
            (n - 1) * s_b + s_l + w_l,
        ]
    )
    return np.asarray(np.where(n == 1, s_l + w_l, t), dtype=np.float64)


def flush_time(
    C: int,
    B: int,
    T_d: float,
    BW: float,
    *,
    stage_bandwidth: float = math.inf,
    buffers: int = 2,
) -> float:
    """Predicted seconds to flush ``C`` bytes in batches of ``B`` bytes (model in the module docstring).

    ``T_d``: per-write latency (s); ``BW``: write bandwidth (bytes/s, ``inf`` allowed); ``stage_bandwidth``:
    ``BW_in``, bytes/s at which a batch is staged (``inf``: already staged). ``C == 0`` takes no time.
    """
    C = _int("C", C, minimum=0)
    B = _int("B", B, minimum=1)
    T_d = _num("T_d", T_d)
    BW = _num("BW", BW, positive=True, allow_inf=True)
    BW_in = _num("stage_bandwidth", stage_bandwidth, positive=True, allow_inf=True)
    buffers = _int("buffers", buffers, minimum=1)
    if C == 0:
        return 0.0
    return float(_flush_times(C, np.array([float(B)]), T_d, BW, BW_in, buffers)[0])


def continuous_optimal_batch_bytes(
    C: int,
    T_d: float,
    BW: float,
    *,
    stage_bandwidth: float = math.inf,
    memory_cost_s_per_byte: float = 0.0,
    buffers: int = 2,
) -> float:
    """The unclamped closed form ``min(B_c, B_x)`` (may be ``inf``); see the module docstring."""
    C = _int("C", C, minimum=0)
    T_d = _num("T_d", T_d)
    BW = _num("BW", BW, positive=True, allow_inf=True)
    BW_in = _num("stage_bandwidth", stage_bandwidth, positive=True, allow_inf=True)
    lam = _num("memory_cost_s_per_byte", memory_cost_s_per_byte)
    buffers = _int("buffers", buffers, minimum=1)
    inv_in = 0.0 if math.isinf(BW_in) else 1.0 / BW_in
    inv_bw = 0.0 if math.isinf(BW) else 1.0 / BW
    kappa = (inv_in if buffers > 1 else 0.0) + lam * buffers
    b_c = math.inf if kappa == 0.0 else math.sqrt(C * T_d / kappa)
    if buffers > 1 and inv_in > inv_bw:
        b_c = min(b_c, T_d / (inv_in - inv_bw))
    return b_c


def optimal_batch_bytes(
    C: int,
    T_d: float,
    BW: float,
    *,
    stage_bandwidth: float = math.inf,
    memory_cost_s_per_byte: float = 0.0,
    staging_budget_bytes: int | None = None,
    buffers: int = 2,
    min_batch_bytes: int = DEFAULT_BATCH_ALIGN,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    align: int = DEFAULT_BATCH_ALIGN,
) -> int:
    """Batch size minimising ``flush_time + memory_cost_s_per_byte * buffers * B`` over feasible sizes.

    Feasible: multiples of ``align`` in ``[min_batch_bytes, hi]`` with
    ``hi = min(max_batch_bytes, staging_budget_bytes // buffers)``, plus ``C`` itself if ``C <= hi``. The
    staging budget is a hard limit; ``min_batch_bytes`` yields to it (then the result is the largest aligned
    size within the budget). Ties go to the smaller batch (less memory). Returns 0 for ``C == 0``.
    Raises :class:`ConfigError` when not even one ``align``-sized batch fits the staging budget.
    """
    C = _int("C", C, minimum=0)
    T_d = _num("T_d", T_d)
    BW = _num("BW", BW, positive=True, allow_inf=True)
    BW_in = _num("stage_bandwidth", stage_bandwidth, positive=True, allow_inf=True)
    lam = _num("memory_cost_s_per_byte", memory_cost_s_per_byte)
    buffers = _int("buffers", buffers, minimum=1)
    align = _int("align", align, minimum=1)
    lo = _int("min_batch_bytes", min_batch_bytes, minimum=0)
    hi = _int("max_batch_bytes", max_batch_bytes, minimum=1)
    if staging_budget_bytes is not None:
        budget = _int("staging_budget_bytes", staging_budget_bytes, minimum=0)
        hi = min(hi, budget // buffers)
    if C == 0:
        return 0
    if hi < min(align, C):
        raise ConfigError(
            f"no batch fits: at most {hi} bytes per batch (max_batch_bytes / staging budget over {buffers} "
            f"buffers) but batches are multiples of align={align} and C={C}"
        )
    if min(hi, max(lo, align)) >= C:
        return C  # one write of everything is allowed and no aligned batch is both >= lo and < C
    k_hi = hi // align
    k_lo = min(max(1, -(-lo // align)), k_hi)  # min_batch_bytes yields to the budget
    # sizes >= C all mean "one batch of everything": represented by C itself, appended below
    k_hi = min(k_hi, -(-C // align) - 1)
    count = max(0, k_hi - k_lo + 1)
    if count <= _EXACT_SEARCH_LIMIT:
        ks = np.arange(k_lo, k_hi + 1, dtype=np.float64)
    else:  # approximate: a log grid over the whole range, dense around the closed form
        b_star = continuous_optimal_batch_bytes(
            C, T_d, BW, stage_bandwidth=BW_in, memory_cost_s_per_byte=lam, buffers=buffers
        )
        k_star = min(max(b_star / align, k_lo), k_hi)
        grid = np.geomspace(k_lo, k_hi, 1 << 14)
        near = np.arange(max(k_lo, math.floor(k_star) - 4096), min(k_hi, math.floor(k_star) + 4096) + 1)
        ks = np.unique(np.concatenate([np.floor(grid), np.ceil(grid), near.astype(np.float64)]))
        ks = ks[(ks >= k_lo) & (ks <= k_hi)]
    sizes = ks * align if count else np.zeros(0, dtype=np.float64)
    if hi >= C:
        sizes = np.append(sizes, float(C))
    cost = _flush_times(C, sizes, T_d, BW, BW_in, buffers) + lam * buffers * np.minimum(sizes, C)
    best = int(np.argmin(cost))  # first minimum: sizes ascend, so ties pick the smaller batch
    return int(sizes[best])


# --------------------------------------------------------------------------------------------------------------
# fitting T_d and BW from real writes


@dataclass(frozen=True, slots=True)
class WriteCostFit:
    """``seconds ~ latency_s + bytes / bandwidth`` fitted from ``samples`` writes.

    ``identifiable`` is False when the samples cannot separate latency from bandwidth (one sample, or all of
    the same size); then ``latency_s`` is the model's prior and ``bandwidth`` explains the rest.
    ``bandwidth`` may be ``inf`` when the writes show no size dependence.
    """

    latency_s: float
    bandwidth: float
    samples: int
    identifiable: bool

    def predict(self, nbytes: float) -> float:
        """Predicted seconds of one write of ``nbytes``."""
        return self.latency_s + (0.0 if math.isinf(self.bandwidth) else nbytes / self.bandwidth)


class LatencyBandwidthModel:
    """Least-squares fit of per-write latency ``T_d`` and bandwidth ``BW`` from observed writes.

    Keeps the latest ``max_samples`` samples (so it follows drift) and caches the fit until new samples arrive.
    The fit minimises ``sum (t_i - T_d - b_i / BW)^2`` subject to ``T_d >= 0`` and ``1/BW >= 0`` (an
    unconstrained solution outside that region is replaced by the best one on its boundary). One sample or
    all-equal sizes cannot separate the two: ``T_d`` is then ``prior_latency_s`` (capped below the mean time)
    and ``BW`` explains the rest.
    """

    def __init__(self, *, max_samples: int = 256, prior_latency_s: float = 0.0) -> None:
        self._max = _int("max_samples", max_samples, minimum=1)
        self._prior = _num("prior_latency_s", prior_latency_s)
        self._samples: deque[tuple[float, float]] = deque(maxlen=self._max)
        self._fit: WriteCostFit | None = None

    def add(self, nbytes: int, seconds: float) -> None:
        """Record one write of ``nbytes`` bytes that took ``seconds``."""
        b = float(_int("nbytes", nbytes, minimum=0))
        t = _num("seconds", seconds)
        self._samples.append((b, t))
        self._fit = None

    def extend(self, samples: Iterable[tuple[int, float]]) -> None:
        """Record several ``(bytes, seconds)`` writes."""
        for nbytes, seconds in samples:
            self.add(nbytes, seconds)

    def clear(self) -> None:
        """Forget every sample (e.g. after the tier's hardware changed)."""
        self._samples.clear()
        self._fit = None

    def __len__(self) -> int:
        return len(self._samples)

    def fit(self) -> WriteCostFit:
        """The (cached) fit; raises :class:`ConfigError` with no samples."""
        if self._fit is None:
            self._fit = self._solve()
        return self._fit

    @property
    def latency_s(self) -> float:
        """The fitted per-write latency ``T_d`` (s)."""
        return self.fit().latency_s

    @property
    def bandwidth(self) -> float:
        """The fitted write bandwidth ``BW`` (bytes/s, may be ``inf``)."""
        return self.fit().bandwidth

    def optimal_batch_bytes(self, C: int, **kwargs: object) -> int:
        """:func:`optimal_batch_bytes` with this model's ``T_d`` and ``BW``; keyword options pass through."""
        f = self.fit()
        return optimal_batch_bytes(C, f.latency_s, f.bandwidth, **kwargs)  # type: ignore[arg-type]

    def _solve(self) -> WriteCostFit:
        n = len(self._samples)
        if n == 0:
            raise ConfigError("LatencyBandwidthModel has no samples; add() observed writes first")
        bs = [b for b, _ in self._samples]
        ts = [t for _, t in self._samples]
        mb = math.fsum(bs) / n
        mt = math.fsum(ts) / n
        sbb = math.fsum((b - mb) ** 2 for b in bs)
        sbt = math.fsum((b - mb) * (t - mt) for b, t in zip(bs, ts, strict=True))
        spread = max(bs) - min(bs)
        if n == 1 or spread <= 1e-9 * max(mb, 1.0) or sbb <= 0.0:
            lat = min(self._prior, mt)
            rest = mt - lat
            bw = math.inf if rest <= 0.0 or mb == 0.0 else mb / rest
            return WriteCostFit(lat, bw, n, False)
        slope = sbt / sbb  # seconds per byte
        lat = mt - slope * mb
        if slope <= 0.0:  # no size dependence visible: pure latency
            return WriteCostFit(max(mt, 0.0), math.inf, n, True)
        if lat < 0.0:  # best fit through the origin: t = b * slope
            sb2 = math.fsum(b * b for b in bs)
            slope = math.fsum(b * t for b, t in zip(bs, ts, strict=True)) / sb2
            lat = 0.0
            if slope <= 0.0:
                return WriteCostFit(0.0, math.inf, n, True)
        return WriteCostFit(lat, 1.0 / slope, n, True)
