"""Tests of the asymmetric partition planner (docs/planning.md): unit, worked examples and properties."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from asymstore.errors import ConfigError
from asymstore.snapshot_plan import (
    REMAINDER_WINDOW,
    Partition,
    SnapshotPlan,
    WindowProfile,
    plan_all_at_step,
    plan_asymmetric,
    plan_uniform,
    should_replan,
)

GB = 1e9

# ---------------------------------------------------------------------------------------------------------------
# helpers


def assert_well_formed(plan: SnapshotPlan, total: int, align: int) -> None:
    """Coverage exactly once, stream order, window order, alignment."""
    parts = plan.partitions
    pos = 0
    for p in parts:
        assert p.start == pos, f"gap or overlap at {pos}: {p}"
        assert p.end > p.start
        if p.end != total:
            assert p.end % align == 0, f"unaligned boundary {p.end} (align {align})"
        pos = p.end
    assert pos == total
    assert plan.total_bytes == total
    assert plan.hidden_bytes + plan.remainder_bytes == total
    assert sum(p.nbytes for p in parts) == total
    for phase, nwin in ((plan.forward, len(plan.fwd_windows)), (plan.backward, len(plan.bwd_windows))):
        wins = [p.window for p in phase]
        assert wins == sorted(set(wins)), "at most one partition per window, in window order"
        assert all(0 <= w < nwin for w in wins)
    if plan.remainder is not None:
        assert plan.remainder.window == REMAINDER_WINDOW
        assert plan.remainder.end == total


def sizes(parts: tuple[Partition, ...]) -> list[int]:
    return [p.nbytes for p in parts]


windows_st = st.lists(st.floats(min_value=0.0, max_value=0.5, allow_nan=False), max_size=10)
align_st = st.sampled_from([1, 8, 64, 512, 4096])
bw_st = st.floats(min_value=1e5, max_value=1e11)
safety_st = st.floats(min_value=0.05, max_value=1.0)
total_st = st.integers(min_value=0, max_value=10**11)


# ---------------------------------------------------------------------------------------------------------------
# worked examples (exact numbers)


def test_proportional_split_over_both_passes_sums_to_R() -> None:
    # forward + backward *together* carry R (the original made each list sum to R)
    plan = plan_asymmetric([1.0, 1.0], [2.0, 2.0], 6000, 1e12, align=1)
    assert sizes(plan.forward) == [1000, 1000]
    assert sizes(plan.backward) == [2000, 2000]
    assert plan.remainder is None
    assert plan.hidden_bytes == 6000
    assert plan.predicted_stall_s == 0.0


def test_caps_bind_and_remainder_is_the_tail() -> None:
    # caps = 1 * 500 B/s * t = [500, 500, 1000, 1000]; targets [1000, 1000, 2000, 2000]
    plan = plan_asymmetric([1.0, 1.0], [2.0, 2.0], 6000, 500.0, align=1, safety=1.0)
    assert sizes(plan.forward) == [500, 500]
    assert sizes(plan.backward) == [1000, 1000]
    assert plan.remainder == Partition(REMAINDER_WINDOW, 3000, 6000)
    assert plan.predicted_stall_s == pytest.approx(3000 / 500.0)


def test_safety_factor_shrinks_caps() -> None:
    plan = plan_asymmetric([1.0], [2.0], 3000, 1000.0, align=1, safety=0.5)
    assert sizes(plan.forward) == [500]
    assert sizes(plan.backward) == [1000]
    assert plan.remainder_bytes == 1500


def test_alignment_rounds_targets_to_nearest_boundary() -> None:
    plan = plan_asymmetric([1.0, 1.0, 1.0], [], 1000, 1e12, align=64)
    # targets 333.3, 666.7, 1000 -> nearest multiples of 64: 320, 640, then total
    assert [p.end for p in plan.forward] == [320, 640, 1000]


def test_zero_length_windows_get_nothing() -> None:
    plan = plan_asymmetric([0.0, 1.0, 0.0], [0.0, 3.0], 4000, 1e12, align=1)
    assert [(p.window, p.nbytes) for p in plan.forward] == [(1, 1000)]
    assert [(p.window, p.nbytes) for p in plan.backward] == [(1, 3000)]


def test_forward_partitions_smaller_than_backward() -> None:
    plan = plan_asymmetric([0.01] * 12, [0.02] * 12, 1 << 30, 50 * GB)
    assert plan.remainder is None
    assert max(sizes(plan.forward)) < min(sizes(plan.backward))
    ratio = sum(sizes(plan.backward)) / sum(sizes(plan.forward))
    assert ratio == pytest.approx(2.0, rel=1e-3)


def test_min_partition_bytes_merges_small_partitions_into_later_windows() -> None:
    fwd = [0.001] * 10
    plan = plan_asymmetric(fwd, [0.1], 1_100_000, 1e12, align=1, min_partition_bytes=50_000)
    # each forward target is 10_000 bytes: too small; they merge until 50_000 bytes accumulate
    assert all(p.nbytes >= 50_000 for p in plan.partitions)
    assert [p.window for p in plan.forward] == [4, 9]
    assert plan.remainder is None
    without = plan_asymmetric(fwd, [0.1], 1_100_000, 1e12, align=1)
    assert len(without.forward) == 10


def test_min_partition_bytes_yields_when_no_later_window_could_issue() -> None:
    # the only window whose cap reaches min_partition_bytes is the first; a small partition is better than a stall
    plan = plan_asymmetric([1.0], [0.001], 1000, 2000.0, align=1, min_partition_bytes=1500, safety=1.0)
    # shares 999 and 1 (caps 2000 and 2): both below the minimum, but deferring would only create a stall
    assert sizes(plan.forward) == [999] and sizes(plan.backward) == [1]
    assert plan.remainder is None


def test_snap_to_tensor_boundaries() -> None:
    extents = [(i * 1500, 1500) for i in range(4)]  # cut points 0, 1500, 3000, 4500, 6000
    plan = plan_asymmetric([1.0, 1.0], [2.0, 2.0], 6000, 1e12, align=1, tensor_extents=extents, split_tensors=False)
    # cumulative targets 1000, 2000, 4000, 6000 snap to the nearest cut point: 1500, 1500, 4500, 6000
    assert [(p.window, p.start, p.end) for p in plan.forward] == [(0, 0, 1500)]
    assert [(p.window, p.start, p.end) for p in plan.backward] == [(0, 1500, 4500), (1, 4500, 6000)]
    # split mode with the same extents ignores them
    split = plan_asymmetric([1.0, 1.0], [2.0, 2.0], 6000, 1e12, align=1, tensor_extents=extents)
    assert sizes(split.forward) == [1000, 1000]


def test_snap_caps_round_down_to_a_tensor_boundary() -> None:
    extents = [(i * 100, 100) for i in range(10)]
    # cap 250 per window: only two tensors (200 bytes) fit, never 300
    plan = plan_asymmetric([1.0] * 4, [], 1000, 250.0, align=1, safety=1.0, tensor_extents=extents, split_tensors=False)
    assert sizes(plan.forward) == [200, 200, 200, 200]
    assert plan.remainder_bytes == 200


def test_snap_padding_travels_with_the_tensor() -> None:
    extents = [(0, 100), (128, 100), (256, 10)]  # aligned to 64, padding after each
    plan = plan_asymmetric([1.0, 1.0, 1.0], [], 266, 1e12, align=64, tensor_extents=extents, split_tensors=False)
    assert {p.start for p in plan.partitions} <= {0, 128, 256}
    assert_well_formed(plan, 266, 64)


def test_oversized_tensor_goes_to_the_longest_remaining_window() -> None:
    # a 50 MB tensor; caps are 9 MB (forward) and 18 MB (backward): it fits nowhere
    extents = [(0, 1024), (1024, 50_000_000), (50_001_024, 1000)]
    total = 50_002_048
    plan = plan_asymmetric([0.01] * 4, [0.02] * 4, total, 1e9, tensor_extents=extents, split_tensors=False)
    assert_well_formed(plan, total, 64)
    big = [p for p in plan.partitions if p.start == 1024]
    assert big == [Partition(0, 1024, 50_001_024)] and big[0] in plan.backward  # first longest window
    assert plan.oversized == (big[0],)
    assert plan.remainder is None
    # the 50 ms copy opened at 40 ms ends at 90 ms, inside the 120 ms of windows: no stall predicted
    assert plan.predicted_stall_s == pytest.approx(0.0)
    # one long window less and the spill shows up as a predicted stall
    short = plan_asymmetric([0.01] * 4, [0.02, 0.001], total, 1e9, tensor_extents=extents, split_tensors=False)
    assert short.predicted_stall_s > 0.0
    assert short.predicted_stall_s > short.remainder_bytes / 1e9


def test_tensor_that_fits_only_a_later_window_waits_for_it() -> None:
    extents = [(0, 1500)]
    plan = plan_asymmetric([1.0], [2.0], 1500, 1000.0, safety=1.0, align=1, tensor_extents=extents, split_tensors=False)
    assert plan.forward == ()
    assert plan.backward == (Partition(0, 0, 1500),)
    assert plan.oversized == ()


# ---------------------------------------------------------------------------------------------------------------
# degenerate inputs


def test_no_windows_everything_is_remainder() -> None:
    plan = plan_asymmetric([], [], 1000, 1e9)
    assert plan.forward == () and plan.backward == ()
    assert plan.remainder == Partition(REMAINDER_WINDOW, 0, 1000)
    assert plan.predicted_stall_s == pytest.approx(1000 / 1e9)


def test_all_zero_windows_everything_is_remainder() -> None:
    plan = plan_asymmetric([0.0, 0.0], [0.0], 1000, 1e9)
    assert plan.hidden_bytes == 0 and plan.remainder_bytes == 1000


def test_zero_bytes() -> None:
    plan = plan_asymmetric([0.1], [0.2], 0, 1e9)
    assert plan.partitions == () and plan.total_bytes == 0
    assert plan.predicted_stall_s == 0.0
    assert SnapshotPlan.from_json(plan.to_json()) == plan


def test_one_layer() -> None:
    plan = plan_asymmetric([0.1], [0.2], 3 * 64 * 1000, 1e12)
    assert sizes(plan.forward) == [64 * 1000] and sizes(plan.backward) == [2 * 64 * 1000]


def test_huge_state_mostly_remainder() -> None:
    bw, t = 10 * GB, [0.01] * 4
    plan = plan_asymmetric(t, [0.02] * 4, 1 << 40, bw)
    capacity = 0.9 * bw * 0.12
    assert capacity - 8 * 64 <= plan.hidden_bytes <= capacity
    assert plan.remainder_bytes > 0.99 * (1 << 40)
    assert plan.predicted_stall_s == pytest.approx(plan.remainder_bytes / bw)


def test_state_smaller_than_align() -> None:
    plan = plan_asymmetric([0.1, 0.1], [0.2], 10, 1e9, align=64)
    assert_well_formed(plan, 10, 64)
    assert plan.remainder is None and len(plan.partitions) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fwd_windows": [float("nan")]},
        {"fwd_windows": [-0.1]},
        {"bwd_windows": [float("inf")]},
        {"bwd_windows": ["0.1"]},
        {"bwd_windows": "0.1"},
        {"copy_bandwidth": 0.0},
        {"copy_bandwidth": -1.0},
        {"copy_bandwidth": float("nan")},
        {"copy_bandwidth": float("inf")},
        {"total_bytes": -1},
        {"total_bytes": 10.0},
        {"total_bytes": True},
        {"align": 0},
        {"safety": 0.0},
        {"safety": 1.5},
        {"safety": float("nan")},
        {"min_partition_bytes": -1},
        {"split_tensors": False},  # without tensor_extents
        {"tensor_extents": [(3, 10)]},  # misaligned
        {"tensor_extents": [(0, 100), (64, 10)]},  # overlap
        {"tensor_extents": [(0, 2000)]},  # past total
        {"tensor_extents": [(0,)]},
    ],
)
def test_invalid_inputs_raise_config_error(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {
        "fwd_windows": [0.1],
        "bwd_windows": [0.2],
        "total_bytes": 1000,
        "copy_bandwidth": 1e9,
    }
    args.update(kwargs)
    with pytest.raises(ConfigError) as info:
        plan_asymmetric(**args)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------------------------------------------------------
# properties


@settings(max_examples=300, deadline=None)
@given(
    fwd=windows_st,
    bwd=windows_st,
    total=total_st,
    bw=bw_st,
    align=align_st,
    safety=safety_st,
    min_bytes=st.integers(0, 10**7),
)
def test_property_split_plan_invariants(
    fwd: list[float], bwd: list[float], total: int, bw: float, align: int, safety: float, min_bytes: int
) -> None:
    plan = plan_asymmetric(fwd, bwd, total, bw, align=align, safety=safety, min_partition_bytes=min_bytes)
    assert_well_formed(plan, total, align)
    # caps respected exactly: every partition fits its window
    for p in plan.forward:
        assert p.nbytes <= safety * bw * fwd[p.window]
    for p in plan.backward:
        assert p.nbytes <= safety * bw * bwd[p.window]
    assert plan.oversized == ()
    # hidden bytes never exceed what the windows can carry
    assert plan.hidden_bytes <= safety * bw * math.fsum(fwd + bwd) + 1
    # with all caps honoured the only stall is the remainder, and no copy outlives its window
    assert plan.predict_overrun_s() == 0.0
    assert plan.predicted_stall_s == pytest.approx(plan.remainder_bytes / bw, rel=1e-9, abs=1e-12)
    # small partitions only where no later window could have issued one of the minimum size
    windows = fwd + bwd
    for p in plan.forward + plan.backward:
        if p.nbytes < min_bytes and p.end != total:
            k = p.window + (0 if p in plan.forward else len(fwd))
            assert all(safety * bw * t < min_bytes for t in windows[k + 1 :])


@settings(max_examples=200, deadline=None)
@given(fwd=windows_st, bwd=windows_st, total=st.integers(0, 10**10), align=align_st, safety=safety_st)
def test_property_ample_windows_leave_no_remainder_and_follow_the_rule(
    fwd: list[float], bwd: list[float], total: int, align: int, safety: float
) -> None:
    windows = fwd + bwd
    t_sum = math.fsum(windows)
    assume(t_sum > 0)
    positive = [t for t in windows if safety * t > 0]  # every window that can carry a byte
    assume(positive)
    # bandwidth so large that every cap exceeds its share r_i by two alignment steps
    bw = max((total * t / t_sum + 2 * align) / (safety * t) for t in positive) * 1.01
    assume(math.isfinite(bw))
    plan = plan_asymmetric(fwd, bwd, total, bw, align=align, safety=safety)
    assert_well_formed(plan, total, align)
    assert plan.remainder is None
    assert plan.hidden_bytes == total
    # each partition is its share r_i = R t_i / (T_f + T_b) up to alignment rounding
    shares = {("f", i): total * t / t_sum for i, t in enumerate(fwd)}
    shares.update({("b", i): total * t / t_sum for i, t in enumerate(bwd)})
    issued = {("f", p.window): p.nbytes for p in plan.forward}
    issued.update({("b", p.window): p.nbytes for p in plan.backward})
    for key, r in shares.items():
        assert abs(issued.get(key, 0) - r) <= align + 1e-6 * total
    # the forward list alone carries only the forward share (not R)
    assert abs(sum(sizes(plan.forward)) - total * math.fsum(fwd) / t_sum) <= align / 2 + 1e-6 * total + 1


@settings(max_examples=100, deadline=None)
@given(n_f=st.integers(1, 12), n_b=st.integers(1, 12), t=st.floats(1e-4, 0.1), total=st.integers(10**6, 10**10))
def test_property_forward_smaller_than_backward_when_windows_are(n_f: int, n_b: int, t: float, total: int) -> None:
    fwd, bwd = [t] * n_f, [2 * t] * n_b
    # share of a forward window must exceed alignment noise
    assume(total * t / (t * (n_f + 2 * n_b)) > 4 * 64)
    plan = plan_asymmetric(fwd, bwd, total, 1e15)
    assert max(sizes(plan.forward)) < min(sizes(plan.backward))


@settings(max_examples=150, deadline=None)
@given(fwd=windows_st, bwd=windows_st, bw=bw_st, align=align_st, safety=safety_st)
def test_property_huge_state_fills_every_window_to_its_cap(
    fwd: list[float], bwd: list[float], bw: float, align: int, safety: float
) -> None:
    windows = fwd + bwd
    capacity = safety * bw * math.fsum(windows)
    total = int(capacity) + 10 * align + 10**6
    plan = plan_asymmetric(fwd, bwd, total, bw, align=align, safety=safety)
    assert_well_formed(plan, total, align)
    floor = math.fsum(max(0.0, safety * bw * t - align) for t in windows)
    assert floor - 1 <= plan.hidden_bytes <= capacity + 1
    assert plan.remainder is not None


@st.composite
def tensor_layouts(draw: st.DrawFn) -> tuple[list[tuple[int, int]], int, int]:
    align = draw(st.sampled_from([1, 64, 256]))
    n = draw(st.integers(0, 25))
    extents: list[tuple[int, int]] = []
    pos = 0
    for _ in range(n):
        nbytes = draw(st.one_of(st.integers(0, 5000), st.integers(0, 10**7)))
        extents.append((pos, nbytes))
        pos = -(-(pos + nbytes) // align) * align
    total = max(pos, extents[-1][0] + extents[-1][1]) if extents else draw(st.integers(0, 1000))
    if extents and bool(draw(st.booleans())):
        total = extents[-1][0] + extents[-1][1]  # no padding after the last tensor
    return extents, total, align


@settings(max_examples=300, deadline=None)
@given(
    layout=tensor_layouts(),
    fwd=windows_st,
    bwd=windows_st,
    bw=st.floats(1e4, 1e10),
    safety=safety_st,
    min_bytes=st.integers(0, 10**5),
)
def test_property_snap_plan_invariants(
    layout: tuple[list[tuple[int, int]], int, int],
    fwd: list[float],
    bwd: list[float],
    bw: float,
    safety: float,
    min_bytes: int,
) -> None:
    extents, total, align = layout
    plan = plan_asymmetric(
        fwd,
        bwd,
        total,
        bw,
        tensor_extents=extents,
        split_tensors=False,
        align=align,
        safety=safety,
        min_partition_bytes=min_bytes,
    )
    assert_well_formed(plan, total, align)
    cut_points = {0, total} | {o for o, _ in extents}
    for p in plan.partitions:
        assert p.start in cut_points and p.end in cut_points, "boundaries snap to tensor starts"
    windows = fwd + bwd
    for p in plan.oversized:
        k = p.window + (0 if p in plan.forward else len(fwd))
        # an oversized partition is one indivisible unit that no later window could hold either,
        # placed in the longest remaining window
        assert not any(p.start < c < p.end for c in cut_points)
        assert all(p.nbytes > safety * bw * t for t in windows[k + 1 :])
        assert all(windows[k] >= t for t in windows[k + 1 :])
    stall = plan.predicted_stall_s
    assert stall >= plan.remainder_bytes / bw - 1e-12
    if not plan.oversized:
        assert stall == pytest.approx(plan.remainder_bytes / bw, rel=1e-9, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# baselines


def test_uniform_equal_partitions_ignore_window_lengths() -> None:
    plan = plan_uniform([0.001, 0.001], [0.5, 0.5], 4096, copy_bandwidth=1e9, align=64)
    assert sizes(plan.forward) == [1024, 1024] and sizes(plan.backward) == [1024, 1024]
    assert plan.strategy == "uniform"
    assert plan.remainder is None


def test_uniform_spill_is_predicted_and_asymmetric_avoids_it() -> None:
    # one usable forward window and three zero-length ones: uniform queues 3/4 of the state past the windows
    fwd, bwd, bw = [1.0], [0.0, 0.0, 0.0], 1000.0
    uniform = plan_uniform(fwd, bwd, 1000, copy_bandwidth=bw, align=1)
    asym = plan_asymmetric(fwd, bwd, 1000, bw, align=1)
    assert uniform.predicted_stall_s == pytest.approx(0.75)
    assert asym.predicted_stall_s == pytest.approx(0.1)  # the 10 % safety margin is the remainder


def test_uniform_overruns_short_forward_windows_where_asymmetric_does_not() -> None:
    fwd, bwd, bw = [0.01] * 4, [0.02] * 4, 1e9
    total = int(0.8 * bw * 0.12)  # fits the windows with room to spare
    uniform = plan_uniform(fwd, bwd, total, copy_bandwidth=bw)
    asym = plan_asymmetric(fwd, bwd, total, bw)
    # the queue drains before the step either way ...
    assert uniform.predicted_stall_s == pytest.approx(0.0) and asym.predicted_stall_s == 0.0
    # ... but uniform's 12 ms copies spill past every 10 ms forward window into the next one
    assert asym.predict_overrun_s() == 0.0
    # backlog grows 2 ms per forward window: 2 + 4 + 6 + 8 ms outside their windows, drained in backward
    assert uniform.predict_overrun_s() == pytest.approx(0.002 + 0.004 + 0.006 + 0.008, abs=2e-6)


@settings(max_examples=200, deadline=None)
@given(fwd=windows_st, bwd=windows_st, total=total_st, align=align_st)
def test_property_uniform_plan(fwd: list[float], bwd: list[float], total: int, align: int) -> None:
    plan = plan_uniform(fwd, bwd, total, align=align)
    assert_well_formed(plan, total, align)
    n = len(fwd) + len(bwd)
    if n == 0:
        assert plan.remainder_bytes == total
        return
    assert plan.remainder is None
    for p in plan.forward + plan.backward:
        assert abs(p.nbytes - total / n) <= align
    if total / n >= 2 * align:
        assert len(plan.forward) == len(fwd) and len(plan.backward) == len(bwd)


def test_all_at_step() -> None:
    plan = plan_all_at_step(5000, copy_bandwidth=1000.0)
    assert plan.remainder == Partition(REMAINDER_WINDOW, 0, 5000)
    assert plan.hidden_bytes == 0 and plan.predicted_stall_s == pytest.approx(5.0)
    assert plan_all_at_step(0).partitions == ()
    with pytest.raises(ConfigError):
        _ = plan_all_at_step(10).predicted_stall_s  # no bandwidth recorded
    assert plan_all_at_step(10).predict_stall_s(10.0) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------------
# plan object, JSON


def test_lookup_by_window() -> None:
    plan = plan_asymmetric([0.0, 1.0], [2.0], 3000, 1e12, align=1)
    assert plan.forward_partition(0) is None
    assert plan.forward_partition(1) == Partition(1, 0, 1000)
    assert plan.backward_partition(0) == Partition(0, 1000, 3000)
    assert plan.backward_partition(5) is None


def test_plan_is_frozen() -> None:
    plan = plan_asymmetric([1.0], [2.0], 3000, 1e12)
    with pytest.raises(AttributeError):
        plan.remainder = None  # type: ignore[misc]
    with pytest.raises(AttributeError):
        plan.forward[0].end = 5  # type: ignore[misc]


@settings(max_examples=100, deadline=None)
@given(fwd=windows_st, bwd=windows_st, total=total_st, bw=bw_st, align=align_st)
def test_property_json_round_trip(fwd: list[float], bwd: list[float], total: int, bw: float, align: int) -> None:
    for plan in (
        plan_asymmetric(fwd, bwd, total, bw, align=align),
        plan_uniform(fwd, bwd, total, copy_bandwidth=bw, align=align),
    ):
        back = SnapshotPlan.from_json(plan.to_json())
        assert back == plan
        assert back.predicted_stall_s == plan.predicted_stall_s


def _good_dict() -> dict[str, object]:
    return plan_asymmetric([1.0], [2.0], 3000, 1e12, align=1).to_dict()


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(format="other"),
        lambda d: d.update(forward=[[0, 0, 1000]], backward=[[0, 900, 3000]]),  # overlap
        lambda d: d.update(forward=[[0, 0, 1000]], backward=[[0, 1100, 3000]]),  # gap
        lambda d: d.update(forward=[[3, 0, 1000]]),  # window out of range
        lambda d: d.update(total_bytes=4000),
        lambda d: d.update(remainder=[10, 20]),
        lambda d: d.update(fwd_windows=[-1.0]),
        lambda d: d.pop("backward"),
    ],
)
def test_from_json_rejects_inconsistent_plans(mutate: object) -> None:
    d = _good_dict()
    mutate(d)  # type: ignore[operator]
    with pytest.raises(ConfigError):
        SnapshotPlan.from_json(json.dumps(d))


def test_from_json_rejects_garbage() -> None:
    with pytest.raises(ConfigError):
        SnapshotPlan.from_json("{not json")
    with pytest.raises(ConfigError):
        SnapshotPlan.from_json("[1, 2]")


@pytest.mark.parametrize("args", [(0, 5, 5), (0, -1, 5), (-2, 0, 5), (0, 0.0, 5)])
def test_partition_validation(args: tuple[int, int, int]) -> None:
    with pytest.raises(ConfigError):
        Partition(*args)


# ---------------------------------------------------------------------------------------------------------------
# drift and profiling


def test_should_replan() -> None:
    planned = [0.010, 0.010, 0.020, 0.020]
    assert not should_replan(planned, planned)
    assert not should_replan(planned, [0.011, 0.009, 0.021, 0.019])  # jitter
    assert should_replan(planned, [0.010, 0.010, 0.020, 0.030])  # one large window +50 %
    assert should_replan(planned, [0.010, 0.010, 0.020, 0.010])  # one large window -50 %
    assert should_replan(planned, planned[:3])  # structure changed
    assert should_replan(planned, [w * 1.3 for w in planned])  # everything slower
    # a tiny window doubling stays under the absolute floor
    assert not should_replan([0.0001, 0.02], [0.0002, 0.02])
    assert should_replan([0.0001, 0.02], [0.0002, 0.02], abs_tol_s=0.0)
    # many tiny windows each drifting under the absolute floor still add up to a large total drift
    assert should_replan([0.0001] * 100, [0.0019] * 100)
    # a tighter relative tolerance catches smaller drift
    assert should_replan(planned, [0.011, 0.009, 0.021, 0.019], rel_tol=0.05, abs_tol_s=0.0005)
    with pytest.raises(ConfigError):
        should_replan(planned, [float("nan")] * 4)
    with pytest.raises(ConfigError):
        should_replan(planned, planned, rel_tol=-1.0)


def test_plan_needs_replan() -> None:
    plan = plan_asymmetric([0.01, 0.01], [0.02, 0.02], 10**6, 1e9)
    assert not plan.needs_replan([0.01, 0.01], [0.02, 0.02])
    assert plan.needs_replan([0.01, 0.01], [0.02, 0.04])
    # same total count but a window moved from forward to backward is a different structure
    assert plan.needs_replan([0.01], [0.01, 0.02, 0.02])


def test_window_profile_median_is_robust() -> None:
    prof = WindowProfile()
    for i in range(5):
        slow = 10.0 if i == 2 else 1.0
        prof.add([0.01 * slow, 0.012], [0.02, 0.025 * slow])
    fwd, bwd = prof.estimate()
    assert fwd == pytest.approx((0.01, 0.012))
    assert bwd == pytest.approx((0.02, 0.025))
    assert prof.iterations == 5
    plan = plan_asymmetric(fwd, bwd, 10**6, 1e9)
    assert plan.fwd_windows == fwd


def test_window_profile_skip_first_and_rolling() -> None:
    prof = WindowProfile(skip_first=1, max_iterations=3)
    prof.add([100.0], [100.0])  # compile / cold cache: dropped
    for t in (1.0, 2.0, 3.0, 4.0, 5.0):
        prof.add([t], [2 * t])
    assert prof.iterations == 3
    assert prof.estimate() == ((4.0,), (8.0,))
    prof.reset()
    assert prof.iterations == 0
    with pytest.raises(ConfigError):
        prof.estimate()


def test_window_profile_rejects_structure_change_and_bad_values() -> None:
    prof = WindowProfile()
    prof.add([0.1, 0.1], [0.2])
    with pytest.raises(ConfigError):
        prof.add([0.1], [0.2])
    with pytest.raises(ConfigError):
        prof.add([0.1, float("nan")], [0.2])
    with pytest.raises(ConfigError):
        WindowProfile(max_iterations=0)


def test_replan_gate_needs_a_sustained_drift() -> None:
    """Hysteresis: one noisy check never re-plans; ``sustain`` drifted checks in a row do; a changed number of
    windows re-plans at once."""
    from asymstore.snapshot_plan import ReplanGate

    gate = ReplanGate(sustain=3, rel_tol=0.25)
    planned = [0.010, 0.020, 0.030]
    noisy = [0.010, 0.040, 0.030]  # one window doubled once
    assert not gate.check(planned, noisy)
    assert not gate.check(planned, planned)  # back to normal: the streak restarts
    assert not gate.check(planned, noisy) and not gate.check(planned, noisy)
    assert gate.check(planned, noisy) and gate.replans == 1 and "3 checks in a row" in gate.last_reason
    assert not gate.check(planned, noisy)  # a new streak starts after a re-plan
    assert gate.check(planned, [0.01, 0.02]) and gate.replans == 2 and "windows" in gate.last_reason
    with pytest.raises(ConfigError):
        ReplanGate(sustain=0)


@given(
    st.lists(st.floats(min_value=1e-4, max_value=0.1), min_size=1, max_size=8),
    st.lists(st.floats(min_value=0.5, max_value=2.0), min_size=8, max_size=40),
)
def test_replan_gate_replans_at_most_once_per_sustain_checks(planned: list[float], factors: list[float]) -> None:
    from asymstore.snapshot_plan import ReplanGate

    gate = ReplanGate(sustain=3)
    decisions = [gate.check(planned, [p * f for p in planned]) for f in factors]
    assert gate.replans == sum(decisions) <= len(factors) // 3
