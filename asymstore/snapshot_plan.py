"""The snapshot copy planner: which bytes of the state stream are copied to host memory in which window.

The state after optimizer step t does not change during forward(t+1) and backward(t+1), so its copy to host
memory is spread over the idle windows of those passes, one *copy range* per window, sized to the window
(:func:`plan_asymmetric`), with :func:`plan_uniform` and :func:`plan_all_at_step` as baselines. Pure: no I/O,
no torch. The sizing rule and its derivation: docs/planning.md, section 1.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from asymstore.errors import ConfigError

__all__ = [
    "DEFAULT_ALIGN",
    "DEFAULT_SAFETY",
    "REMAINDER_WINDOW",
    "CopyRange",
    "Partition",
    "SnapshotPlan",
    "WindowProfile",
    "plan_all_at_step",
    "plan_asymmetric",
    "plan_uniform",
    "should_replan",
]

DEFAULT_ALIGN: Final = 64
DEFAULT_SAFETY: Final = 0.9
REMAINDER_WINDOW: Final = -1
"""``CopyRange.window`` of the remainder: it is copied at the optimizer step, in no window."""

_FORMAT: Final = "asymstore.snapshot_plan/1"


# --------------------------------------------------------------------------------------------------------------
# validation helpers


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: object, *, minimum: int) -> int:
    if not _is_int(value):
        raise ConfigError(f"{name} must be an int, got {value!r}")
    assert isinstance(value, int)
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_seconds(name: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{name} must be a number of seconds, got {value!r}")
    f = float(value)
    if not math.isfinite(f) or f < 0.0:
        raise ConfigError(f"{name} must be finite and >= 0 seconds, got {value!r}")
    return f


def _check_windows(name: str, windows: Iterable[float]) -> tuple[float, ...]:
    if isinstance(windows, (str, bytes)):
        raise ConfigError(f"{name} must be a sequence of seconds, got {windows!r}")
    try:
        items = list(windows)
    except TypeError:
        raise ConfigError(f"{name} must be a sequence of seconds, got {windows!r}") from None
    return tuple(_check_seconds(f"{name}[{i}]", w) for i, w in enumerate(items))


def _check_bandwidth(value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"copy_bandwidth must be a number of bytes/s, got {value!r}")
    f = float(value)
    if not (math.isfinite(f) and f > 0.0):
        raise ConfigError(f"copy_bandwidth must be finite and > 0 bytes/s, got {value!r}")
    return f


def _check_safety(value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"safety must be a number in (0, 1], got {value!r}")
    f = float(value)
    if not (0.0 < f <= 1.0):  # also rejects NaN
        raise ConfigError(f"safety must be in (0, 1], got {value!r}")
    return f


# --------------------------------------------------------------------------------------------------------------
# plan types


@dataclass(frozen=True, slots=True)
class CopyRange:
    """The byte range ``[start, end)`` of the state stream, copied in window ``window`` of its list.

    ``window`` indexes ``fwd_windows`` for a forward copy range, ``bwd_windows`` for a backward one, and is
    :data:`REMAINDER_WINDOW` (-1) for the remainder copied at the optimizer step.
    """

    window: int
    start: int
    end: int

    def __post_init__(self) -> None:
        for name in ("window", "start", "end"):
            if not _is_int(getattr(self, name)):
                raise ConfigError(f"CopyRange.{name} must be an int, got {getattr(self, name)!r}")
        if self.window < REMAINDER_WINDOW:
            raise ConfigError(f"CopyRange.window must be >= {REMAINDER_WINDOW}, got {self.window}")
        if not 0 <= self.start < self.end:
            raise ConfigError(f"CopyRange needs 0 <= start < end, got [{self.start}, {self.end})")

    @property
    def nbytes(self) -> int:
        """Bytes in the range."""
        return self.end - self.start


def _copy_queue_end(windows: Sequence[float], sizes: Sequence[int], bandwidth: float) -> tuple[float, float]:
    """Simulate the serial copy queue; return ``(end of last window, time the last issued copy finishes)``.

    CopyRange ``k`` is issued when window ``k`` opens and starts once the previous copy has finished.
    """
    now = 0.0
    busy = 0.0
    for t, nbytes in zip(windows, sizes, strict=True):
        if nbytes:
            busy = max(now, busy) + nbytes / bandwidth
        now += t
    return now, busy


@dataclass(frozen=True)
class SnapshotPlan:
    """Which bytes of the state stream are copied in which hook window; frozen, JSON round-trippable.

    ``forward`` and ``backward`` hold only the windows that issue a copy (at most one copy range per window), in
    window order, which is also stream order: forward copy ranges cover ``[0, a)``, backward ones ``[a, b)`` and
    the remainder ``[b, total_bytes)``. The window lists the plan was made for are kept, so the plan can predict
    its stall and tell when measured windows have drifted (:meth:`needs_replan`).
    """

    forward: tuple[CopyRange, ...]
    backward: tuple[CopyRange, ...]
    remainder: CopyRange | None
    fwd_windows: tuple[float, ...] = ()
    bwd_windows: tuple[float, ...] = ()
    copy_bandwidth: float | None = None
    strategy: str = "asymmetric"
    safety: float = 1.0
    _by_window: dict[tuple[str, int], CopyRange] = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "forward", tuple(self.forward))
        object.__setattr__(self, "backward", tuple(self.backward))
        object.__setattr__(self, "fwd_windows", _check_windows("fwd_windows", self.fwd_windows))
        object.__setattr__(self, "bwd_windows", _check_windows("bwd_windows", self.bwd_windows))
        if self.copy_bandwidth is not None:
            object.__setattr__(self, "copy_bandwidth", _check_bandwidth(self.copy_bandwidth))
        object.__setattr__(self, "safety", _check_safety(self.safety))
        if not isinstance(self.strategy, str):
            raise ConfigError(f"strategy must be a str, got {self.strategy!r}")
        pos = 0
        for phase, parts, windows in (
            ("forward", self.forward, self.fwd_windows),
            ("backward", self.backward, self.bwd_windows),
        ):
            last_window = -1
            for p in parts:
                if not isinstance(p, CopyRange):
                    raise ConfigError(f"{phase} holds {p!r}, not a CopyRange")
                if not last_window < p.window < len(windows):
                    raise ConfigError(
                        f"{phase} copy range {p} has window {p.window}; windows must increase and be "
                        f"< {len(windows)} (the number of {phase} windows)"
                    )
                if p.start != pos:
                    raise ConfigError(f"{phase} copy range {p} starts at {p.start}, expected {pos} (contiguous)")
                last_window = p.window
                pos = p.end
                self._by_window[(phase, p.window)] = p
        if self.remainder is not None:
            r = self.remainder
            if not isinstance(r, CopyRange) or r.window != REMAINDER_WINDOW or r.start != pos:
                raise ConfigError(
                    f"remainder must be CopyRange(window={REMAINDER_WINDOW}, start={pos}, ...), got {r!r}"
                )

    # -- derived ---------------------------------------------------------------------------------------------

    @property
    def copy_ranges(self) -> tuple[CopyRange, ...]:
        """All copy ranges in stream order, the remainder last."""
        tail = (self.remainder,) if self.remainder is not None else ()
        return self.forward + self.backward + tail

    @property
    def total_bytes(self) -> int:
        """Length of the planned stream."""
        parts = self.copy_ranges
        return parts[-1].end if parts else 0

    @property
    def hidden_bytes(self) -> int:
        """Bytes copied during the forward and backward passes."""
        return sum(p.nbytes for p in self.forward) + sum(p.nbytes for p in self.backward)

    @property
    def remainder_bytes(self) -> int:
        """Bytes copied at the optimizer step."""
        return self.remainder.nbytes if self.remainder is not None else 0

    @property
    def windows(self) -> tuple[float, ...]:
        """Forward then backward windows: the timeline the plan was made for."""
        return self.fwd_windows + self.bwd_windows

    def forward_range(self, window: int) -> CopyRange | None:
        """The copy range the forward hook of ``window`` issues, or ``None``."""
        return self._by_window.get(("forward", window))

    def backward_range(self, window: int) -> CopyRange | None:
        """The copy range the backward hook of ``window`` issues, or ``None``."""
        return self._by_window.get(("backward", window))

    @property
    def partitions(self) -> tuple[CopyRange, ...]:
        """All copy ranges in stream order, the remainder last.

        Deprecated alias of :attr:`copy_ranges`.
        """
        return self.copy_ranges

    def forward_partition(self, window: int) -> CopyRange | None:
        """The copy range the forward hook of ``window`` issues. Deprecated alias of :meth:`forward_range`."""
        return self.forward_range(window)

    def backward_partition(self, window: int) -> CopyRange | None:
        """The copy range the backward hook of ``window`` issues. Deprecated alias of :meth:`backward_range`."""
        return self.backward_range(window)

    def _window_sizes(self) -> list[int]:
        sizes = [0] * (len(self.fwd_windows) + len(self.bwd_windows))
        for p in self.forward:
            sizes[p.window] = p.nbytes
        for p in self.backward:
            sizes[len(self.fwd_windows) + p.window] = p.nbytes
        return sizes

    def caps(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-window byte caps ``safety * copy_bandwidth * t_i`` (forward, backward)."""
        bw = self._bandwidth(None)
        return (
            tuple(self.safety * bw * t for t in self.fwd_windows),
            tuple(self.safety * bw * t for t in self.bwd_windows),
        )

    @property
    def oversized(self) -> tuple[CopyRange, ...]:
        """Forward/backward copy ranges larger than their window's cap (only unsplittable tensors)."""
        fcaps, bcaps = self.caps()
        return tuple(p for p in self.forward if p.nbytes > fcaps[p.window]) + tuple(
            p for p in self.backward if p.nbytes > bcaps[p.window]
        )

    def _bandwidth(self, copy_bandwidth: float | None) -> float:
        bw = copy_bandwidth if copy_bandwidth is not None else self.copy_bandwidth
        if bw is None:
            raise ConfigError("this plan records no copy_bandwidth; pass one to predict_stall_s()")
        return _check_bandwidth(bw)

    def predict_stall_s(self, copy_bandwidth: float | None = None) -> float:
        """Seconds the optimizer step waits for the snapshot, at ``copy_bandwidth`` (default: the plan's).

        Simulates the serial copy queue over the window timeline: any spill of the in-pass copies past the last
        window, plus the remainder copy. For a plan whose copy ranges all respect their caps this is exactly
        ``remainder_bytes / copy_bandwidth``.
        """
        bw = self._bandwidth(copy_bandwidth)
        end_of_windows, busy = _copy_queue_end(self.windows, self._window_sizes(), bw)
        return max(0.0, busy - end_of_windows) + self.remainder_bytes / bw

    def predict_overrun_s(self, copy_bandwidth: float | None = None) -> float:
        """Seconds the copy engine spends on in-pass copy ranges *after* their own window has closed.

        Such copies compete with compute they were meant to stay clear of (PCIe, host memory, the GIL on CPU),
        even when the queue still drains before the optimizer step and :attr:`predicted_stall_s` is 0. Zero for
        a plan whose copy ranges respect their caps; the main cost of :func:`plan_uniform` on uneven windows.
        """
        bw = self._bandwidth(copy_bandwidth)
        now = busy = overrun = 0.0
        for t, nbytes in zip(self.windows, self._window_sizes(), strict=True):
            if nbytes:
                start = max(now, busy)
                busy = start + nbytes / bw
                overrun += max(0.0, busy - max(start, now + t))
            now += t
        return overrun

    @property
    def predicted_stall_s(self) -> float:
        """:meth:`predict_stall_s` at the plan's own bandwidth (``remainder_bytes / bw`` when caps hold)."""
        return self.predict_stall_s()

    def needs_replan(
        self,
        fwd_windows: Sequence[float],
        bwd_windows: Sequence[float],
        *,
        rel_tol: float = 0.25,
        abs_tol_s: float = 0.002,
    ) -> bool:
        """:func:`should_replan` against the windows this plan was made for."""
        if len(fwd_windows) != len(self.fwd_windows):
            return True
        return should_replan(
            self.windows, tuple(fwd_windows) + tuple(bwd_windows), rel_tol=rel_tol, abs_tol_s=abs_tol_s
        )

    # -- JSON ------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The plan as plain JSON-able data."""

        def parts(ps: Iterable[CopyRange]) -> list[list[int]]:
            return [[p.window, p.start, p.end] for p in ps]

        return {
            "format": _FORMAT,
            "strategy": self.strategy,
            "total_bytes": self.total_bytes,
            "copy_bandwidth": self.copy_bandwidth,
            "safety": self.safety,
            "fwd_windows": list(self.fwd_windows),
            "bwd_windows": list(self.bwd_windows),
            "forward": parts(self.forward),
            "backward": parts(self.backward),
            "remainder": None if self.remainder is None else [self.remainder.start, self.remainder.end],
        }

    def to_json(self) -> str:
        """Compact JSON for telemetry; :meth:`from_json` rebuilds an equal plan."""
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_dict(cls, data: Any) -> SnapshotPlan:
        """A plan from :meth:`to_dict`'s data, validated."""
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ConfigError(f"not a snapshot plan (expected format {_FORMAT!r})")
        try:

            def parts(key: str) -> tuple[CopyRange, ...]:
                return tuple(CopyRange(int(w), int(s), int(e)) for w, s, e in data[key])

            rem = data["remainder"]
            plan = cls(
                forward=parts("forward"),
                backward=parts("backward"),
                remainder=None if rem is None else CopyRange(REMAINDER_WINDOW, int(rem[0]), int(rem[1])),
                fwd_windows=tuple(data["fwd_windows"]),
                bwd_windows=tuple(data["bwd_windows"]),
                copy_bandwidth=data["copy_bandwidth"],
                strategy=data["strategy"],
                safety=data["safety"],
            )
        except ConfigError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed snapshot plan: {exc!r}") from exc
        if plan.total_bytes != data.get("total_bytes"):
            raise ConfigError(f"snapshot plan covers {plan.total_bytes} bytes, header says {data.get('total_bytes')}")
        return plan

    @classmethod
    def from_json(cls, text: str | bytes) -> SnapshotPlan:
        """A plan from its JSON text."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"snapshot plan is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


# --------------------------------------------------------------------------------------------------------------
# boundaries


class _Cuts:
    """Allowed copy range boundaries: multiples of ``align`` (plus ``total``), or an explicit sorted list."""

    def __init__(self, total: int, align: int, points: list[int] | None) -> None:
        self.total = total
        self.align = align
        self.points = points  # sorted, unique, starts with 0, ends with total

    def floor(self, x: float) -> int:
        """Largest boundary <= x (x >= 0)."""
        if x >= self.total:
            return self.total
        if self.points is None:
            return (math.floor(x) // self.align) * self.align
        return self.points[bisect.bisect_right(self.points, x) - 1]

    def after(self, p: int) -> int:
        """Smallest boundary > p (p < total)."""
        if self.points is None:
            return min((p // self.align + 1) * self.align, self.total)
        return self.points[bisect.bisect_right(self.points, p)]

    def nearest(self, x: float) -> int:
        """Nearest boundary to x (the lower one on ties)."""
        lo = self.floor(x)
        if lo >= self.total:
            return self.total
        hi = self.after(lo)
        return lo if x - lo <= hi - x else hi


def _tensor_cut_points(extents: Sequence[tuple[int, int]], total: int, align: int) -> list[int]:
    spans: list[tuple[int, int]] = []
    for i, ext in enumerate(extents):
        try:
            off, nbytes = ext
        except (TypeError, ValueError):
            raise ConfigError(f"tensor_extents[{i}] must be (offset, nbytes), got {ext!r}") from None
        _check_int(f"tensor_extents[{i}] offset", off, minimum=0)
        _check_int(f"tensor_extents[{i}] nbytes", nbytes, minimum=0)
        if off % align:
            raise ConfigError(f"tensor_extents[{i}] offset {off} is not a multiple of align={align}")
        if off + nbytes > total:
            raise ConfigError(f"tensor_extents[{i}] = ({off}, {nbytes}) ends past total_bytes={total}")
        spans.append((off, nbytes))
    spans.sort()
    for (o1, n1), (o2, _) in itertools.pairwise(spans):
        if o1 + n1 > o2:
            raise ConfigError(f"tensor extents overlap: ({o1}, {n1}) and one starting at {o2}")
    return sorted({0, total, *(o for o, _ in spans if o < total)})


# --------------------------------------------------------------------------------------------------------------
# strategies


def _assemble(
    fwd: tuple[float, ...],
    bwd: tuple[float, ...],
    ends: Sequence[tuple[int, int, int]],
    total: int,
    bandwidth: float | None,
    strategy: str,
    safety: float,
) -> SnapshotPlan:
    """Build the plan from ``(timeline_index, start, end)`` triples in order; the rest is remainder."""
    nf = len(fwd)
    forward = tuple(CopyRange(k, s, e) for k, s, e in ends if k < nf)
    backward = tuple(CopyRange(k - nf, s, e) for k, s, e in ends if k >= nf)
    pos = ends[-1][2] if ends else 0
    remainder = CopyRange(REMAINDER_WINDOW, pos, total) if pos < total else None
    return SnapshotPlan(
        forward=forward,
        backward=backward,
        remainder=remainder,
        fwd_windows=fwd,
        bwd_windows=bwd,
        copy_bandwidth=bandwidth,
        strategy=strategy,
        safety=safety,
    )


def plan_asymmetric(
    fwd_windows: Sequence[float],
    bwd_windows: Sequence[float],
    total_bytes: int,
    copy_bandwidth: float,
    *,
    tensor_extents: Sequence[tuple[int, int]] | None = None,
    align: int = DEFAULT_ALIGN,
    min_range_bytes: int = 0,
    safety: float = DEFAULT_SAFETY,
    split_tensors: bool = True,
    min_partition_bytes: int | None = None,
) -> SnapshotPlan:
    """Plan the copy of ``total_bytes`` over the forward and backward windows (docs/planning.md, section 1).

    ``fwd_windows`` / ``bwd_windows``: overlap seconds per hook window, in execution order. ``copy_bandwidth``:
    measured device-to-host bytes/s. ``tensor_extents``: ``(offset, nbytes)`` of each tensor in the stream,
    offsets multiples of ``align``; required with ``split_tensors=False``. Raises :class:`ConfigError` on
    invalid input (negative/NaN/inf windows, non-positive or NaN bandwidth, ``safety`` outside (0, 1], ...).
    ``min_partition_bytes``: deprecated alias of ``min_range_bytes``.
    """
    if min_partition_bytes is not None:
        min_range_bytes = min_partition_bytes
    fwd = _check_windows("fwd_windows", fwd_windows)
    bwd = _check_windows("bwd_windows", bwd_windows)
    total = _check_int("total_bytes", total_bytes, minimum=0)
    bw = _check_bandwidth(copy_bandwidth)
    align = _check_int("align", align, minimum=1)
    min_bytes = _check_int("min_range_bytes", min_range_bytes, minimum=0)
    safety = _check_safety(safety)
    if not isinstance(split_tensors, bool):
        raise ConfigError(f"split_tensors must be a bool, got {split_tensors!r}")
    points: list[int] | None = None
    if tensor_extents is not None:
        points = _tensor_cut_points(tensor_extents, total, align)
    if not split_tensors and points is None:
        raise ConfigError("split_tensors=False needs tensor_extents (the tensor boundaries to snap to)")
    cuts = _Cuts(total, align, None if split_tensors else points)

    windows = fwd + bwd
    n = len(windows)
    t_sum = math.fsum(windows)
    if total == 0 or t_sum == 0.0:
        return _assemble(fwd, bwd, [], total, bw, "asymmetric", safety)

    static_caps = [safety * bw * t for t in windows]
    later_cap = [0.0] * n  # max cap of windows after k
    later_t = [0.0] * n  # max length of windows after k
    for k in range(n - 2, -1, -1):
        later_cap[k] = max(later_cap[k + 1], static_caps[k + 1])
        later_t[k] = max(later_t[k + 1], windows[k + 1])

    ends: list[tuple[int, int, int]] = []
    pos = 0
    now = 0.0  # opening time of window k on the iteration's timeline
    busy = 0.0  # time the copy queue drains
    t_cum = 0.0
    for k, t in enumerate(windows):
        t_cum += t
        target = float(total) if k == n - 1 else min(float(total), total * (t_cum / t_sum))
        # overlap time left in this window once earlier copies have drained (all of it unless a copy overran)
        usable = t if busy <= now else max(0.0, now + t - busy)
        cap = safety * bw * usable
        opened = now
        now += t
        if pos >= total:
            break
        end = min(cuts.nearest(target), cuts.floor(pos + math.floor(cap)))  # integer: the cap is exact
        if end <= pos:
            end = pos
            unit_end = cuts.after(pos)
            unit = unit_end - pos
            if unit > later_cap[k]:  # no later window could take the next unit on its own
                if unit <= cap:
                    end = unit_end  # last chance: pull it forward
                elif not split_tensors and t > 0.0 and t >= later_t[k]:
                    end = unit_end  # oversized tensor: this is the longest remaining window
        size = end - pos
        if 0 < size < min_bytes and later_cap[k] >= min_bytes:
            continue  # too small to issue; a later window can take these bytes with more
        if size > 0:
            ends.append((k, pos, end))
            busy = max(opened, busy) + size / bw
            pos = end
    return _assemble(fwd, bwd, ends, total, bw, "asymmetric", safety)


def plan_uniform(
    fwd_windows: Sequence[float],
    bwd_windows: Sequence[float],
    total_bytes: int,
    *,
    copy_bandwidth: float | None = None,
    align: int = DEFAULT_ALIGN,
) -> SnapshotPlan:
    """Baseline (DataStates-LLM style): equal copy ranges over all windows, no caps, window lengths ignored.

    Boundary ``k`` is ``k * total / n`` rounded to the nearest multiple of ``align``; a window whose share
    rounds to nothing issues no copy range. ``copy_bandwidth`` is only recorded, to predict the stall (which
    includes the copy queue spilling past the windows, since nothing is capped).
    """
    fwd = _check_windows("fwd_windows", fwd_windows)
    bwd = _check_windows("bwd_windows", bwd_windows)
    total = _check_int("total_bytes", total_bytes, minimum=0)
    bw = None if copy_bandwidth is None else _check_bandwidth(copy_bandwidth)
    align = _check_int("align", align, minimum=1)
    n = len(fwd) + len(bwd)
    cuts = _Cuts(total, align, None)
    ends: list[tuple[int, int, int]] = []
    pos = 0
    for k in range(n):
        end = total if k == n - 1 else cuts.nearest(total * (k + 1) / n)
        if end > pos:
            ends.append((k, pos, end))
            pos = end
    return _assemble(fwd, bwd, ends, total, bw, "uniform", 1.0)


def plan_all_at_step(total_bytes: int, *, copy_bandwidth: float | None = None) -> SnapshotPlan:
    """Baseline (CheckFreq / synchronous snapshot): nothing overlaps, everything is copied at the step."""
    total = _check_int("total_bytes", total_bytes, minimum=0)
    bw = None if copy_bandwidth is None else _check_bandwidth(copy_bandwidth)
    return _assemble((), (), [], total, bw, "all_at_step", 1.0)


# --------------------------------------------------------------------------------------------------------------
# drift detection and profiling


def should_replan(
    planned_windows: Sequence[float],
    measured_windows: Sequence[float],
    *,
    rel_tol: float = 0.25,
    abs_tol_s: float = 0.002,
) -> bool:
    """Whether measured windows have drifted far enough from the planned ones to make a new plan.

    Both are the concatenated forward+backward window lists. True when the number of windows differs (the model
    or its hooks changed), when the total window time moved by more than ``max(rel_tol * planned_total,
    abs_tol_s)``, or when any single window moved by more than ``max(rel_tol * planned_i, abs_tol_s)``. The
    absolute floor keeps jitter of tiny windows (which carry tiny copy ranges) from triggering re-plans; a
    shrinking window matters because its copy range would overrun, a growing one because capacity is wasted.
    """
    planned = _check_windows("planned_windows", planned_windows)
    measured = _check_windows("measured_windows", measured_windows)
    if not (isinstance(rel_tol, (int, float)) and math.isfinite(rel_tol) and rel_tol >= 0):
        raise ConfigError(f"rel_tol must be finite and >= 0, got {rel_tol!r}")
    abs_tol = _check_seconds("abs_tol_s", abs_tol_s)
    if len(planned) != len(measured):
        return True
    tp, tm = math.fsum(planned), math.fsum(measured)
    if abs(tm - tp) > max(rel_tol * tp, abs_tol):
        return True
    return any(abs(m - p) > max(rel_tol * p, abs_tol) for p, m in zip(planned, measured, strict=False))


@dataclass
class ReplanGate:
    """Re-plan on a *sustained* drift only (hysteresis): :func:`should_replan` must hold for ``sustain``
    consecutive checks against the windows of the current plan; one noisy iteration (a page fault, a
    preempted thread, a GC pause) never re-plans. A change in the number of windows re-plans at once.
    ``replans`` counts the decisions, ``last_reason`` says why the last one was taken."""

    sustain: int = 3
    rel_tol: float = 0.25
    abs_tol_s: float = 0.002
    streak: int = 0
    replans: int = 0
    last_reason: str = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.sustain, int) and self.sustain >= 1):
            raise ConfigError(f"sustain must be an int >= 1, got {self.sustain!r}")

    def check(self, planned_windows: Sequence[float], measured_windows: Sequence[float]) -> bool:
        """Whether to re-plan now (and so the measured windows become the plan's)."""
        if len(planned_windows) != len(measured_windows):
            self.streak = 0
            return self._replan(f"{len(planned_windows)} -> {len(measured_windows)} windows")
        if should_replan(planned_windows, measured_windows, rel_tol=self.rel_tol, abs_tol_s=self.abs_tol_s):
            self.streak += 1
        else:
            self.streak = 0
        if self.streak < self.sustain:
            return False
        self.streak = 0
        tp, tm = math.fsum(planned_windows), math.fsum(measured_windows)
        return self._replan(f"windows {tp * 1e3:.1f} -> {tm * 1e3:.1f} ms, drifted {self.sustain} checks in a row")

    def _replan(self, reason: str) -> bool:
        self.replans += 1
        self.last_reason = reason
        return True


class WindowProfile:
    """Accumulates per-window timings over warm-up iterations; estimates each window by its median.

    The median ignores the odd slow iteration (allocator growth, a GC pause, a first-call compile).
    ``skip_first`` drops the first iterations entirely; ``max_iterations`` keeps only the most recent ones, so a
    long-lived profile follows drift (compare its estimate with the plan's windows via :func:`should_replan`).
    """

    def __init__(self, *, max_iterations: int | None = None, skip_first: int = 0) -> None:
        if max_iterations is not None:
            _check_int("max_iterations", max_iterations, minimum=1)
        self._skip = _check_int("skip_first", skip_first, minimum=0)
        self._fwd: deque[tuple[float, ...]] = deque(maxlen=max_iterations)
        self._bwd: deque[tuple[float, ...]] = deque(maxlen=max_iterations)
        self._seen = 0

    def add(self, forward: Sequence[float], backward: Sequence[float]) -> None:
        """Record one iteration's window times (seconds, execution order)."""
        fwd = _check_windows("forward", forward)
        bwd = _check_windows("backward", backward)
        if self._fwd and (len(fwd), len(bwd)) != (len(self._fwd[0]), len(self._bwd[0])):
            raise ConfigError(
                f"window count changed from ({len(self._fwd[0])}, {len(self._bwd[0])}) to "
                f"({len(fwd)}, {len(bwd)}) forward/backward windows; call reset() after changing the model"
            )
        self._seen += 1
        if self._seen <= self._skip:
            return
        self._fwd.append(fwd)
        self._bwd.append(bwd)

    def reset(self) -> None:
        """Forget every profiled iteration."""
        self._fwd.clear()
        self._bwd.clear()
        self._seen = 0

    @property
    def iterations(self) -> int:
        """Iterations currently contributing to the estimate."""
        return len(self._fwd)

    def estimate(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Median of each forward and each backward window over the recorded iterations."""
        if not self._fwd:
            raise ConfigError("WindowProfile has no iterations recorded yet")

        def med(rows: deque[tuple[float, ...]]) -> tuple[float, ...]:
            return tuple(float(statistics.median(col)) for col in zip(*rows, strict=False))

        return med(self._fwd), med(self._bwd)


Partition = CopyRange
"""Deprecated alias of :class:`CopyRange` (a copy range of the snapshot, not a stored partition)."""
