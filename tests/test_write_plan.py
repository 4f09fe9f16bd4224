"""The write plan and the retention decisions: pure planners, checked by properties.

The planner cuts the stream into objects that cover it exactly once, sizes them in whole chunks within the
staging budget, offers delta bases on the configured cadence and picks the codecs; retention never deletes a
delta base before its dependents, the only durable copy of the newest step, or a step still to be promoted.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asymstore import LatestN, Store, TierSpec, catalog
from asymstore.codecs import RAW
from asymstore.errors import AsymstoreError, ConfigError
from asymstore.layout import plan_layout
from asymstore.retention import (
    DeltaState,
    EveryN,
    KeepAll,
    delta_decision,
    dependents,
    next_delta_state,
    parse_keep,
    plan_retention,
)
from asymstore.write_plan import (
    WriteModel,
    WriteOptions,
    batch_bytes,
    effective_chunk_bytes,
    parse_compression,
    plan_write,
)

KiB = 1 << 10
MiB = 1 << 20


def _layout(nbytes: int, name: str = "w"):
    return plan_layout([(name, "uint8", (nbytes,), nbytes)])


models = st.builds(
    WriteModel,
    latency_s=st.floats(0.0, 0.05),
    bandwidth=st.floats(1e6, 1e11),
    stage_bandwidth=st.one_of(st.just(math.inf), st.floats(1e7, 1e11)),
)


# --- objects and sizes -------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(
    total=st.integers(0, 64 * MiB),
    chunk_log=st.integers(12, 20),
    fixed_chunks=st.one_of(st.none(), st.integers(1, 64)),
    volatile=st.booleans(),
    model=models,
)
def test_objects_cover_the_stream_exactly_once_in_whole_chunks(total, chunk_log, fixed_chunks, volatile, model):
    chunk = 1 << chunk_log
    opts = WriteOptions(
        chunk_bytes=chunk,
        compression="none",
        partition_bytes=None if fixed_chunks is None else fixed_chunks * chunk,
        volatile=volatile,
    )
    plan = plan_write(7, _layout(total), opts, model=model, prefix="step_7/")
    assert plan.chunk_bytes == effective_chunk_bytes(total, chunk) and chunk % plan.chunk_bytes == 0
    assert plan.partition_bytes > 0 and plan.partition_bytes % plan.chunk_bytes == 0
    assert plan.chunks_per_shard * plan.chunk_bytes == plan.partition_bytes
    # contiguous, in order, never empty, every one but the last of B* bytes
    pos = 0
    for i, span in enumerate(plan.spans):
        assert span.index == i and span.start == pos and 0 < span.nbytes <= plan.partition_bytes
        if i + 1 < len(plan.spans):
            assert span.nbytes == plan.partition_bytes
        pos = span.end
    assert pos == total
    # a checkpoint smaller than one partition gets one partition of its own, rounded to chunks
    assert plan.partition_bytes <= max(-(-total // plan.chunk_bytes), 1) * plan.chunk_bytes


@settings(max_examples=200, deadline=None)
@given(
    total=st.integers(1, 1 << 34),
    chunk_log=st.integers(12, 20),
    budget_units=st.integers(1, 64),
    compression=st.sampled_from(["none", "auto", "zstd1"]),
    delta_every=st.sampled_from([0, 4]),
    from_slots=st.booleans(),
    volatile=st.booleans(),
    model=models,
)
def test_b_star_fits_the_staging_budget(
    total, chunk_log, budget_units, compression, delta_every, from_slots, volatile, model
):
    """Two partitions in flight, each holding a source range (unless written from the slots) and an encoded copy
    (unless raw without deltas), fit the budget; raw partitions from the slots are not bounded by it."""
    chunk = 1 << chunk_log
    budget = budget_units * 4 * chunk
    opts = WriteOptions(
        chunk_bytes=chunk,
        compression=parse_compression(compression),
        delta_every=delta_every,
        staging_budget_bytes=budget,
        from_slots_only=from_slots,
        volatile=volatile,
    )
    b = batch_bytes(total, opts, model)
    assert b % chunk == 0 and b >= chunk
    raw = compression == "none" and delta_every == 0
    held = 2 if volatile else (0 if from_slots else 1) + (0 if raw else 1)
    if held:
        assert 2 * held * b <= budget, (b, held, budget)


def test_fixed_partition_bytes_wins_and_b_star_needs_a_model() -> None:
    opts = WriteOptions(chunk_bytes=64 * KiB, partition_bytes=256 * KiB)
    assert not opts.needs_model and batch_bytes(1 << 30, opts, None) == 256 * KiB
    assert WriteOptions(chunk_bytes=64 * KiB, volatile=True).needs_model is False
    measured = WriteOptions(chunk_bytes=64 * KiB)
    assert measured.needs_model
    with pytest.raises(ConfigError, match="write model"):
        batch_bytes(1 << 30, measured, None)
    with pytest.raises(ConfigError, match="multiple"):
        WriteOptions(chunk_bytes=64 * KiB, partition_bytes=100 * KiB)


def test_b_star_grows_with_latency() -> None:
    """Per-write latency is what batching amortises: a slower-to-start tier gets larger objects."""
    opts = WriteOptions(chunk_bytes=MiB, compression="none", from_slots_only=True, staging_budget_bytes=1 << 34)
    fast = batch_bytes(8 << 30, opts, WriteModel(0.0005, 2e9, 5e9))
    slow = batch_bytes(8 << 30, opts, WriteModel(0.05, 2e9, 5e9))
    assert slow > fast


# --- codecs ----------------------------------------------------------------------------------------
def test_codecs_forced_raw_or_measured() -> None:
    lay = _layout(MiB)
    base = DeltaState(base_step=1, signature=lay.signature, since_base=0)

    def plan(compression: str, *, volatile: bool = False, delta: DeltaState | None = None, every: int = 0):
        opts = WriteOptions(
            chunk_bytes=64 * KiB,
            compression=parse_compression(compression),
            partition_bytes=256 * KiB,
            delta_every=every,
            volatile=volatile,
        )
        return plan_write(2, lay, opts, delta=delta, prefix="step_2/")

    assert plan("none").codecs.forced == RAW and not plan("none").codecs.measure
    assert plan("auto", volatile=True).codecs.forced == RAW  # a memory copy: compression never pays
    auto = plan("auto")
    assert auto.codecs.forced is None and auto.codecs.measure
    assert auto.codecs.candidates(4, delta=False) and not plan("none").codecs.candidates(4, delta=False)
    assert any(c.delta for c in auto.codecs.candidates(4, delta=True))
    zstd = plan("zstd3")
    assert zstd.codecs.forced == parse_compression("zstd3")
    # a forced delta chain without a base is written as its plain chain; with one, as the delta
    xor = parse_compression("xor-zstd")
    no_base = plan("xor-zstd").codecs.forced
    assert no_base is not None and not no_base.delta and no_base.label == xor.label.removeprefix("xor-")
    with_base = plan("xor-zstd", delta=base, every=4)
    assert with_base.delta_base == 1 and with_base.codecs.forced == xor
    with pytest.raises(ConfigError, match="unknown compression"):
        parse_compression("brotli")


# --- deltas ----------------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(every=st.integers(1, 7), n=st.integers(1, 40), used=st.lists(st.booleans(), min_size=40, max_size=40))
def test_delta_cadence(every, n, used) -> None:
    """A full base, then up to ``every - 1`` deltas against it; a step offered a base but written in full (the
    measured codec preferred a plain chain) becomes the new base."""
    sig = _layout(4096).signature
    state = DeltaState()
    since_full = 0
    for step in range(n):
        d = delta_decision(step, sig, state, delta_every=every, whole_stream=True)
        if every == 1 or step == 0:
            assert d.base_step is None
        if d.base_step is not None:
            assert d.base_step == state.base_step and since_full < every - 1
        else:
            assert step == 0 or every == 1 or since_full == every - 1 or state.base_step is None
        use = d.base_step is not None and used[step]
        state, new_base = next_delta_state(state, step, sig, delta_every=every, used_delta=use)
        assert new_base == (not use)
        since_full = since_full + 1 if use else 0
        assert state.since_base == since_full
        if not use:
            assert state.base_step == step


def test_no_delta_when_off_read_by_range_or_layout_changed() -> None:
    sig = _layout(4096).signature
    state = DeltaState(base_step=3, signature=sig, since_base=0)
    assert delta_decision(4, sig, state, delta_every=4, whole_stream=True).base_step == 3
    assert delta_decision(4, sig, state, delta_every=0, whole_stream=True).base_step is None
    off = delta_decision(4, sig, state, delta_every=4, whole_stream=False)
    assert off.base_step is None and "range" in off.reason
    assert delta_decision(4, _layout(8192).signature, state, delta_every=4, whole_stream=True).base_step is None
    assert delta_decision(3, sig, state, delta_every=4, whole_stream=True).base_step is None  # the base itself
    assert next_delta_state(state, 4, sig, delta_every=0, used_delta=False) == (state, False)


def test_deltas_on_a_tier_follow_the_cadence(tmp_path) -> None:
    """End to end: a forced delta chain on a local tier writes bases at steps 0, 3, 6 and deltas between."""
    state = {"w": torch.zeros(50_000)}
    with Store([str(tmp_path)], chunk_bytes=4096, compression="xor-zstd", delta_every=3) as s:
        for step in range(8):
            state["w"][step] = step
            s.save(state, step)
        bases = [s.tiers[0].commit_info(step).get("delta_base") for step in range(8)]
        assert bases == [None, 0, 0, None, 3, 3, None, 6]
        assert torch.equal(s.restore(7)["w"], state["w"])


def test_multi_rank_deltas_protect_their_base(tmp_path) -> None:
    """A multi-rank step's global marker names its ranks' delta bases, so listing and retention that read only
    that marker see the dependency: the base is neither deleted by retention nor by ``Store.delete``."""
    opts = dict(chunk_bytes=4096, compression="xor-zstd", delta_every=4, commit_timeout_s=30)
    root = str(tmp_path)
    ranks = [Store([TierSpec(root, keep=1)], rank=r, world_size=2, **opts) for r in (1, 0)]
    try:
        states = [{"w": torch.zeros(20_000) + r} for r in (1, 0)]
        for step in range(3):
            for st_, s in zip(states, ranks, strict=True):
                st_["w"][step] = step
                s.save(st_, step, blocking=s.rank == 0)
        backend = ranks[1].tiers[0].backend
        commit = catalog.commit_info(backend, 2)
        assert commit["ranks"] == 2 and commit["delta_bases"] == [0] and commit["delta_base"] == 0
        # keep=1 keeps only step 2, which needs step 0: step 1 went, step 0 stays
        assert catalog.committed_steps(backend) == [0, 2]
        assert catalog.dependents(backend, 0) == [2]
        with pytest.raises(AsymstoreError, match="delta base"):
            ranks[1].delete(0)
        assert torch.equal(ranks[1].restore(2)["w"], states[1]["w"])
    finally:
        for s in ranks:
            s.close()


def test_retention_follows_every_base_of_a_step() -> None:
    """A step with several bases (its ranks' deltas differ) keeps each of them."""
    steps = [1, 2, 3, 4]
    bases = {1: None, 2: None, 3: None, 4: [1, 2]}
    assert plan_retention(steps, {}, [LatestN(1)], delta_bases=bases) == [3]
    assert dependents(1, bases) == [4] and dependents(2, bases) == [4] and dependents(3, bases) == []


# --- retention -------------------------------------------------------------------------------------
def _delta_chain(steps: list[int], every: int) -> dict[int, int | None]:
    """Delta bases as a tier writes them: every ``every``-th step (by position) full, the others against it."""
    bases: dict[int, int | None] = {}
    base = None
    for i, s in enumerate(steps):
        if i % every == 0:
            base = s
            bases[s] = None
        else:
            bases[s] = base
    return bases


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(st.integers(0, 300), min_size=0, max_size=30, unique=True),
    every=st.integers(1, 5),
    n=st.integers(1, 5),
    multiple=st.integers(1, 9),
    elsewhere=st.sets(st.integers(0, 300), max_size=10),
    pending=st.sets(st.integers(0, 300), max_size=4),
    budget=st.one_of(st.none(), st.integers(0, 200)),
)
def test_retention_never_loses_what_must_stay(steps, every, n, multiple, elsewhere, pending, budget) -> None:
    from asymstore import ByteBudget

    steps = sorted(steps)
    bases = _delta_chain(steps, every)
    sizes = {s: 10 + s % 7 for s in steps}
    policies = [LatestN(n), EveryN(multiple)] if budget is None else [ByteBudget(budget)]
    doomed = plan_retention(
        steps, sizes, policies, delta_bases=bases, durable_elsewhere=elsewhere, pending=pending & set(steps)
    )
    kept = set(steps) - set(doomed)
    assert set(doomed) <= set(steps) and len(doomed) == len(set(doomed))
    assert not set(doomed) & pending  # a lower tier still has to receive it
    if steps and max(steps) not in elsewhere:
        assert max(steps) in kept  # never the only durable copy of the newest step
    for s in kept:  # every kept delta keeps its base
        if bases[s] is not None:
            assert bases[s] in kept
    order = {s: i for i, s in enumerate(doomed)}
    for s in doomed:  # dependents are deleted before their base
        if bases[s] is not None and bases[s] in order:
            assert order[s] < order[bases[s]]
    policy_kept = set().union(*(p.keep(steps, sizes) for p in policies)) if steps else set()
    assert not set(doomed) & policy_kept  # only what no policy keeps


def test_retention_examples() -> None:
    steps = [1, 2, 3, 4, 5]
    full = dict.fromkeys(steps)
    assert plan_retention(steps, {}, [LatestN(2)], delta_bases=full) == [3, 2, 1]
    # 4 and 5 are deltas against 3: 3 stays while they do
    chain = {1: None, 2: 1, 3: None, 4: 3, 5: 3}
    assert plan_retention(steps, {}, [LatestN(2)], delta_bases=chain) == [2, 1]
    assert plan_retention(steps, {}, [LatestN(1)], delta_bases=full, pending=[2]) == [4, 3, 1]
    assert plan_retention([], {}, [LatestN(1)], delta_bases={}) == []


class OddSteps:
    """A retention policy that is not a subclass of the library's base: only the protocol."""

    def keep(self, steps, sizes):
        return {s for s in steps if s % 2}

    def wants(self, step, age):
        return bool(step % 2)


def test_any_object_with_the_protocol_is_a_policy(tmp_path) -> None:
    assert parse_keep(OddSteps())[0].__class__ is OddSteps
    assert isinstance(parse_keep(None)[0], KeepAll) and parse_keep(3) == (LatestN(3),)
    with pytest.raises(ConfigError):
        parse_keep(["not a policy"])  # type: ignore[list-item]
    with Store([TierSpec(str(tmp_path), keep=OddSteps())], chunk_bytes=4096) as s:
        for step in range(1, 6):
            s.save({"w": torch.full((10,), float(step))}, step)
        assert s.tiers[0].committed_steps() == [1, 3, 5]


def test_plan_is_frozen() -> None:
    plan = plan_write(1, _layout(100), WriteOptions(chunk_bytes=4096, volatile=True), prefix="step_1/")
    with pytest.raises(AttributeError):
        plan.partition_bytes = 1  # type: ignore[misc]
