"""Tests of the flush batch-size model and planner (design 2.3) and the T_d / BW fit."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from asymstore.batch_plan import (
    LatencyBandwidthModel,
    continuous_optimal_batch_bytes,
    flush_time,
    optimal_batch_bytes,
)
from asymstore.errors import ConfigError

MiB = 1 << 20
GiB = 1 << 30


def simulate(C: int, B: int, T_d: float, BW: float, BW_in: float, buffers: int) -> float:
    """Event-by-event reference: stage into one of ``buffers`` buffers, then write; serial stager and writer."""
    sizes = [B] * (C // B) + ([C % B] if C % B else [])
    staged: list[float] = []
    written: list[float] = []
    for i, x in enumerate(sizes):
        free_at = written[i - buffers] if i >= buffers else 0.0  # buffer of batch i-buffers released
        start = max(staged[-1] if staged else 0.0, free_at)
        staged.append(start + x / BW_in)
        written.append(max(written[-1] if written else 0.0, staged[-1]) + T_d + x / BW)
    return written[-1] if written else 0.0


def cost(C: int, B: int, T_d: float, BW: float, BW_in: float, lam: float, buffers: int) -> float:
    return flush_time(C, B, T_d, BW, stage_bandwidth=BW_in, buffers=buffers) + lam * buffers * min(B, C)


# ---------------------------------------------------------------------------------------------------------------
# flush_time


def test_flush_time_examples() -> None:
    # free staging: n writes of T_d + B/BW
    assert flush_time(10 * MiB, 1 * MiB, 0.01, float(MiB)) == pytest.approx(10 * 0.01 + 10.0)
    assert flush_time(10 * MiB, 4 * MiB, 0.01, float(MiB)) == pytest.approx(3 * 0.01 + 10.0)
    # writer-bound pipeline: fill of the first batch, then the writer never idles
    t = flush_time(8 * MiB, 2 * MiB, 0.0, float(MiB), stage_bandwidth=4.0 * MiB)
    assert t == pytest.approx(0.5 + 8.0)
    # stager-bound: all staging, then the last write
    t = flush_time(8 * MiB, 2 * MiB, 0.0, 4.0 * MiB, stage_bandwidth=float(MiB))
    assert t == pytest.approx(8.0 + 0.5)
    # no overlap with one buffer
    t = flush_time(8 * MiB, 2 * MiB, 0.1, 4.0 * MiB, stage_bandwidth=float(MiB), buffers=1)
    assert t == pytest.approx(8.0 + 4 * 0.1 + 2.0)
    assert flush_time(0, MiB, 0.1, 1e9) == 0.0
    assert flush_time(5, MiB, 0.1, math.inf) == pytest.approx(0.1)


@settings(max_examples=300, deadline=None)
@given(
    C=st.integers(1, 10**9),
    n_hint=st.integers(1, 150),
    T_d=st.floats(0.0, 0.1),
    BW=st.floats(1e6, 1e10),
    BW_in=st.one_of(st.just(math.inf), st.floats(1e6, 1e10)),
    buffers=st.integers(1, 4),
)
def test_property_flush_time_matches_pipeline_simulation(
    C: int, n_hint: int, T_d: float, BW: float, BW_in: float, buffers: int
) -> None:
    B = max(1, -(-C // n_hint))
    expected = simulate(C, B, T_d, BW, BW_in, buffers)
    assert flush_time(C, B, T_d, BW, stage_bandwidth=BW_in, buffers=buffers) == pytest.approx(
        expected, rel=1e-9, abs=1e-12
    )


# ---------------------------------------------------------------------------------------------------------------
# optimal batch size


params = dict(
    C=st.integers(1, 3 * GiB),
    T_d=st.floats(0.0, 0.2),
    BW=st.floats(5e7, 2e10),
    BW_in=st.one_of(st.just(math.inf), st.floats(5e7, 2e10)),
    lam=st.one_of(st.just(0.0), st.floats(0.0, 1e-9)),
    buffers=st.integers(1, 3),
    align=st.sampled_from([MiB, 4 * MiB, 3 * MiB + 17]),
)


@settings(max_examples=200, deadline=None)
@given(**params)
def test_property_optimum_beats_every_feasible_size(
    C: int, T_d: float, BW: float, BW_in: float, lam: float, buffers: int, align: int
) -> None:
    B = optimal_batch_bytes(
        C,
        T_d,
        BW,
        stage_bandwidth=BW_in,
        memory_cost_s_per_byte=lam,
        buffers=buffers,
        align=align,
        min_batch_bytes=0,
        max_batch_bytes=1 << 40,
    )
    assert 0 < B <= C
    assert B == C or B % align == 0
    best = cost(C, B, T_d, BW, BW_in, lam, buffers)
    sweep = [*range(align, C, align), C]
    for other in sweep:
        assert best <= cost(C, other, T_d, BW, BW_in, lam, buffers) * (1 + 1e-12) + 1e-12


@settings(max_examples=100, deadline=None)
@given(**params, budget=st.integers(0, 4 * GiB), lo=st.integers(0, 512 * MiB), hi=st.integers(1, 2 * GiB))
def test_property_clamps(
    C: int,
    T_d: float,
    BW: float,
    BW_in: float,
    lam: float,
    buffers: int,
    align: int,
    budget: int,
    lo: int,
    hi: int,
) -> None:
    limit = min(hi, budget // buffers)
    kwargs = dict(
        stage_bandwidth=BW_in,
        memory_cost_s_per_byte=lam,
        buffers=buffers,
        align=align,
        min_batch_bytes=lo,
        max_batch_bytes=hi,
        staging_budget_bytes=budget,
    )
    if limit < min(align, C):
        with pytest.raises(ConfigError):
            optimal_batch_bytes(C, T_d, BW, **kwargs)  # type: ignore[arg-type]
        return
    B = optimal_batch_bytes(C, T_d, BW, **kwargs)  # type: ignore[arg-type]
    assert 0 < B <= C, "never more than the checkpoint"
    assert limit >= B, "never more than max_batch_bytes nor the staging budget"
    assert B == C or B % align == 0
    if min(limit, max(lo, align)) >= C:
        assert B == C  # the whole checkpoint fits one batch no larger than the minimum: one write
        return
    k_hi = limit // align
    k_lo = min(max(1, -(-lo // align)), k_hi)  # min_batch_bytes yields to the budget
    if -(-lo // align) <= k_hi:
        assert lo <= B or B == C
    feasible = [k * align for k in range(k_lo, k_hi + 1) if k * align < C] + ([C] if limit >= C else [])
    assert B in feasible
    best = cost(C, B, T_d, BW, BW_in, lam, buffers)
    for other in feasible:
        assert best <= cost(C, other, T_d, BW, BW_in, lam, buffers) * (1 + 1e-12) + 1e-12


def test_closed_form_writer_bound() -> None:
    C, T_d, BW, BW_in = 100 * GiB, 0.005, 1.4e9, 10e9
    b_c = continuous_optimal_batch_bytes(C, T_d, BW, stage_bandwidth=BW_in)
    assert b_c == pytest.approx(math.sqrt(C * T_d * BW_in))
    B = optimal_batch_bytes(C, T_d, BW, stage_bandwidth=BW_in)
    assert pytest.approx(b_c, rel=0.05) == B
    # the continuous model is flat near B_c: every size within 2x of it is within 1 % of the best time
    t_best = flush_time(C, B, T_d, BW, stage_bandwidth=BW_in)
    assert flush_time(C, int(b_c), T_d, BW, stage_bandwidth=BW_in) <= t_best * 1.01


def test_closed_form_stager_bound_caps_at_regime_boundary() -> None:
    C, T_d, BW, BW_in = 10 * GiB, 0.005, 1.4e9, 0.5e9  # compression (staging) slower than the write
    b_x = T_d / (1 / BW_in - 1 / BW)
    assert continuous_optimal_batch_bytes(C, T_d, BW, stage_bandwidth=BW_in) == pytest.approx(b_x)
    B = optimal_batch_bytes(C, T_d, BW, stage_bandwidth=BW_in)
    assert abs(B - b_x) <= MiB


def test_memory_price_shrinks_the_batch() -> None:
    C, T_d, BW = 10 * GiB, 0.02, 1e9
    free = optimal_batch_bytes(C, T_d, BW, stage_bandwidth=4e9)
    priced = optimal_batch_bytes(C, T_d, BW, stage_bandwidth=4e9, memory_cost_s_per_byte=1e-9)
    assert priced < free
    kappa = 1 / 4e9 + 2 * 1e-9  # staging fill + price of two staging buffers
    b_c = continuous_optimal_batch_bytes(C, T_d, BW, stage_bandwidth=4e9, memory_cost_s_per_byte=1e-9)
    assert b_c == pytest.approx(math.sqrt(C * T_d / kappa))
    assert priced == pytest.approx(b_c, rel=0.1)
    # one buffer: staging never overlaps writing, so only the memory price limits the batch
    b_1 = continuous_optimal_batch_bytes(C, T_d, BW, stage_bandwidth=4e9, memory_cost_s_per_byte=1e-9, buffers=1)
    assert b_1 == pytest.approx(math.sqrt(C * T_d / 1e-9))
    assert optimal_batch_bytes(C, T_d, BW, stage_bandwidth=4e9, memory_cost_s_per_byte=1e-9, buffers=1) == (
        pytest.approx(b_1, rel=0.1)
    )
    assert continuous_optimal_batch_bytes(C, T_d, BW, stage_bandwidth=4e9, buffers=1) == math.inf


def test_beats_the_hard_coded_64_mib_when_latency_is_high() -> None:
    C, T_d, BW, BW_in = 10 * GiB, 0.05, 3e8, 1e10  # HDFS-like: 50 ms per write
    B = optimal_batch_bytes(C, T_d, BW, stage_bandwidth=BW_in)
    assert 64 * MiB < B
    assert flush_time(C, B, T_d, BW, stage_bandwidth=BW_in) < 0.9 * flush_time(
        C, 64 * MiB, T_d, BW, stage_bandwidth=BW_in
    )


def test_free_staging_means_as_few_writes_as_the_clamps_allow() -> None:
    assert optimal_batch_bytes(3 * GiB, 0.01, 1e9) == 3 * GiB  # one write of everything
    # above the maximum: the fewest batches, each as small as that count allows
    B = optimal_batch_bytes(10 * GiB, 0.01, 1e9, max_batch_bytes=4 * GiB)
    assert math.ceil(10 * GiB / B) == 3 and math.ceil(10 * GiB / 3 / MiB) * MiB == B


def test_clamp_examples() -> None:
    assert optimal_batch_bytes(0, 0.01, 1e9) == 0
    assert optimal_batch_bytes(1000, 0.01, 1e9) == 1000  # smaller than align: one write
    assert optimal_batch_bytes(3 * GiB, 0.01, 1e9, staging_budget_bytes=256 * MiB) == 128 * MiB
    assert optimal_batch_bytes(3 * GiB, 0.01, 1e9, staging_budget_bytes=256 * MiB, buffers=4) == 64 * MiB
    # min_batch_bytes is respected when feasible
    assert optimal_batch_bytes(3 * GiB, 0.0, 1e9, stage_bandwidth=1e9, min_batch_bytes=32 * MiB) >= 32 * MiB
    # ... and yields to the staging budget
    assert optimal_batch_bytes(3 * GiB, 0.0, 1e9, min_batch_bytes=GiB, staging_budget_bytes=64 * MiB) == 32 * MiB
    with pytest.raises(ConfigError):
        optimal_batch_bytes(3 * GiB, 0.01, 1e9, staging_budget_bytes=MiB)  # half a MiB per buffer


@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((GiB, float("nan"), 1e9), {}),
        ((GiB, -0.1, 1e9), {}),
        ((GiB, 0.01, 0.0), {}),
        ((GiB, 0.01, float("nan")), {}),
        ((-1, 0.01, 1e9), {}),
        ((1.5, 0.01, 1e9), {}),
        ((GiB, 0.01, 1e9), {"stage_bandwidth": 0.0}),
        ((GiB, 0.01, 1e9), {"buffers": 0}),
        ((GiB, 0.01, 1e9), {"align": 0}),
        ((GiB, 0.01, 1e9), {"memory_cost_s_per_byte": -1.0}),
        ((GiB, 0.01, 1e9), {"staging_budget_bytes": -1}),
    ],
)
def test_invalid_inputs(args: tuple[object, ...], kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        optimal_batch_bytes(*args, **kwargs)  # type: ignore[arg-type]


def test_flush_time_invalid_inputs() -> None:
    with pytest.raises(ConfigError):
        flush_time(GiB, 0, 0.01, 1e9)
    with pytest.raises(ConfigError):
        flush_time(GiB, MiB, 0.01, -1.0)


# ---------------------------------------------------------------------------------------------------------------
# LatencyBandwidthModel


@settings(max_examples=200, deadline=None)
@given(
    T_d=st.floats(0.0, 0.5),
    BW=st.floats(1e6, 1e11),
    sizes=st.lists(st.integers(0, 10**10), min_size=2, max_size=40),
)
def test_property_fit_recovers_exact_parameters(T_d: float, BW: float, sizes: list[int]) -> None:
    assume(max(sizes) - min(sizes) >= 1e-3 * max(sizes) and max(sizes) > 0)
    # the size-dependent part must be visible at all in double precision
    assume((max(sizes) - min(sizes)) / BW > 1e-9 * (T_d + max(sizes) / BW))
    model = LatencyBandwidthModel()
    model.extend((b, T_d + b / BW) for b in sizes)
    fit = model.fit()
    assert fit.identifiable
    assert fit.latency_s == pytest.approx(T_d, rel=1e-6, abs=1e-9 + 1e-7 * max(sizes) / BW)
    assert fit.bandwidth == pytest.approx(BW, rel=1e-5)


def test_fit_with_noise() -> None:
    rng = random.Random(7)
    T_d, BW = 0.004, 1.2e9
    model = LatencyBandwidthModel()
    for _ in range(200):
        b = rng.choice([MiB, 4 * MiB, 16 * MiB, 64 * MiB, 256 * MiB])
        model.add(b, (T_d + b / BW) * rng.uniform(0.95, 1.05))
    assert model.latency_s == pytest.approx(T_d, rel=0.3)
    assert model.bandwidth == pytest.approx(BW, rel=0.05)


def test_fit_one_sample_and_equal_sizes() -> None:
    model = LatencyBandwidthModel(prior_latency_s=0.002)
    model.add(10 * MiB, 0.012)
    fit = model.fit()
    assert not fit.identifiable
    assert fit.latency_s == 0.002
    assert fit.predict(10 * MiB) == pytest.approx(0.012)
    model.extend([(10 * MiB, 0.010), (10 * MiB, 0.014)])
    fit = model.fit()
    assert not fit.identifiable and fit.samples == 3
    assert fit.predict(10 * MiB) == pytest.approx(0.012)
    # prior larger than the observed time: everything is latency, bandwidth unbounded
    model = LatencyBandwidthModel(prior_latency_s=1.0)
    model.add(MiB, 0.01)
    assert model.latency_s == pytest.approx(0.01) and model.bandwidth == math.inf
    # no prior: all time is transfer
    model = LatencyBandwidthModel()
    model.add(MiB, 0.5)
    assert model.latency_s == 0.0 and model.bandwidth == pytest.approx(2 * MiB)


def test_fit_constrained_to_physical_values() -> None:
    model = LatencyBandwidthModel()
    model.extend([(MiB, 0.0005), (100 * MiB, 0.1)])  # intercept would be negative
    assert model.latency_s == 0.0
    assert model.bandwidth > 0
    model = LatencyBandwidthModel()
    model.extend([(MiB, 0.02), (100 * MiB, 0.01)])  # bigger writes faster: no size dependence
    assert model.bandwidth == math.inf
    assert model.latency_s == pytest.approx(0.015)


def test_fit_cache_refresh_and_rolling_window() -> None:
    model = LatencyBandwidthModel(max_samples=4)
    with pytest.raises(ConfigError):
        model.fit()
    model.extend([(MiB, 0.01 + MiB / 1e9), (8 * MiB, 0.01 + 8 * MiB / 1e9)])
    first = model.fit()
    assert model.fit() is first  # cached
    # the tier got slower: after max_samples new writes the old regime is forgotten
    model.extend([(b, 0.05 + b / 2e8) for b in (MiB, 2 * MiB, 4 * MiB, 8 * MiB)])
    second = model.fit()
    assert second is not first and len(model) == 4
    assert second.latency_s == pytest.approx(0.05) and second.bandwidth == pytest.approx(2e8)
    assert model.optimal_batch_bytes(GiB, stage_bandwidth=1e10) == optimal_batch_bytes(
        GiB, 0.05, second.bandwidth, stage_bandwidth=1e10
    )
    model.clear()
    assert len(model) == 0
    with pytest.raises(ConfigError):
        model.add(-1, 0.1)
    with pytest.raises(ConfigError):
        model.add(1, float("nan"))
