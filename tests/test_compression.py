"""Selective compression: the pure planner, the sampler, and the decision on real tiers."""

from __future__ import annotations

import math
import time
import uuid

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asymstore import Store
from asymstore.backends.memory import MemoryObjectStore
from asymstore.codecs import LZ4, RAW, ZSTD1, blosc_shuffle
from asymstore.compression import (
    CodecDecisions,
    CodecEstimate,
    candidate_specs,
    choose_codec,
    measure_candidates,
    predicted_time,
    sample_slices,
)
from asymstore.errors import ConfigError
from tests.helpers import REMOTE

from .helpers import assert_bitequal

MB = 1e6


def test_compress_only_when_it_is_faster_end_to_end() -> None:
    n = 64 << 20
    good = CodecEstimate(ZSTD1, ratio=0.2, encode_bw=800 * MB)
    # slow tier (50 MB/s): 0.08 s encode + 0.27 s write beats 1.34 s raw
    c = choose_codec(n, [good], 50 * MB)
    assert c.spec == ZSTD1 and c.predicted_s < c.raw_s
    # fast tier (2 GB/s): raw 0.034 s beats 0.084 s encode + 0.007 s write
    assert choose_codec(n, [good], 2000 * MB).spec == RAW
    # incompressible data never pays
    assert choose_codec(n, [CodecEstimate(ZSTD1, 0.99, 800 * MB)], 50 * MB).spec == RAW
    # memory: nothing is worth compressing
    assert choose_codec(n, [good], math.inf).spec == RAW
    with pytest.raises(ConfigError):
        choose_codec(n, [good], 0.0)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 1 << 30),
    st.floats(1e6, 1e10),
    st.lists(
        st.tuples(st.sampled_from([ZSTD1, LZ4, blosc_shuffle(4)]), st.floats(0.01, 1.5), st.floats(1e6, 1e10)),
        max_size=4,
    ),
)
def test_choice_is_the_fastest_and_beats_raw(n, bw, raw_ests) -> None:
    ests = [CodecEstimate(s, r, e) for s, r, e in raw_ests]
    c = choose_codec(n, ests, bw, min_gain=0.05)
    raw = n / bw
    if c.spec == RAW:
        assert all(predicted_time(n, e, bw) >= raw * 0.95 * (1 - 1e-12) for e in ests)
    else:
        assert c.predicted_s < raw * 0.95
        assert all(c.predicted_s <= predicted_time(n, e, bw) * (1 + 1e-12) for e in ests)


def test_sampler_measures_ratio_and_speed() -> None:
    zeros = memoryview(bytes(4 << 20))
    noise = memoryview(np.random.default_rng(0).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes())
    for est in measure_candidates(candidate_specs(4, delta=False), zeros):
        assert est.ratio < 0.05 and est.encode_bw > 0
    for est in measure_candidates([ZSTD1], noise):
        assert est.ratio > 0.95
    # deltas against an identical base are all zeros
    d = measure_candidates(candidate_specs(4, delta=True), noise, base=noise)
    assert any(e.spec.delta and e.ratio < 0.05 for e in d)
    # samples are spread over the partition and small next to it
    sl = sample_slices(memoryview(bytes(64 << 20)))
    assert len(sl) == 4 and sl[0][0] == 0 and sl[-1][1] > 60 << 20
    assert sum(b - a for a, b in sl) <= 256 << 10


class SlowTier(MemoryObjectStore):
    """A tier with a real, slow write path: every byte costs time (about 20 MB/s)."""

    bytes_per_s = 20e6

    def put(self, key, data) -> None:  # type: ignore[no-untyped-def]
        super().put(key, data)
        time.sleep(self.size(key) / self.bytes_per_s)

    put_atomic = put


def test_auto_compresses_what_pays_on_a_slow_tier() -> None:
    slow = SlowTier(f"memory://slow-{uuid.uuid4().hex}")
    slow.capabilities = REMOTE
    noise = torch.from_numpy(np.random.default_rng(1).integers(0, 256, 4 << 20, dtype=np.uint8))  # incompressible
    state = {"zeros": torch.zeros(1 << 20), "noise": noise}
    with Store([slow], chunk_bytes=1 << 16, partition_bytes=4 << 20) as s:
        rep = s.save(state, 1).result().reports["memory"]
        assert_bitequal(s.restore(1), state)
    assert rep.codecs.get("raw", 0) == 1  # the random half does not pay
    assert sum(v for k, v in rep.codecs.items() if k != "raw") == 1  # the zeros half does
    assert rep.stored_bytes < 0.6 * rep.raw_bytes


def test_codec_decisions_are_reused_then_measured_again() -> None:
    d = CodecDecisions(reuse=3, bw_tolerance=0.25)
    key = ("layout", 0, 1 << 20, False)
    d.next_checkpoint()
    assert d.get(key, 1e9) is None  # nothing known yet
    d.put(key, ZSTD1, 1e9)
    for _ in range(2):  # the next two checkpoints reuse it
        d.next_checkpoint()
        assert d.get(key, 1e9) == ZSTD1
    d.next_checkpoint()
    assert d.get(key, 1e9) is None  # three checkpoints old: measure again
    d.put(key, RAW, 1e9)
    d.next_checkpoint()
    assert d.get(key, 1.2e9) == RAW  # bandwidth within 25%
    assert d.get(key, 1.3e9) is None  # moved by 30%: the choice may flip, measure again
    assert d.get(("layout", 1 << 20, 2 << 20, False), 1e9) is None  # another partition
    assert (d.hits, d.measured) == (3, 2)
    with pytest.raises(ConfigError):
        CodecDecisions(reuse=0)


def test_a_moved_bandwidth_chooses_again_from_the_remembered_estimates() -> None:
    n = 8 << 20
    # zstd halves the bytes at 400 MB/s of encoding: it pays on a 100 MB/s tier, not on a 2 GB/s one
    ests = [CodecEstimate(RAW, 1.0, float("inf")), CodecEstimate(ZSTD1, 0.5, 400e6)]
    assert choose_codec(n, ests, 2e9).spec == RAW and choose_codec(n, ests, 100e6).spec == ZSTD1
    d = CodecDecisions(reuse=4, bw_tolerance=0.25)
    key = ("layout", 0, n, False)
    d.next_checkpoint()
    d.put(key, RAW, 2e9, nbytes=n, estimates=ests)
    d.next_checkpoint()
    assert d.get(key, 2.2e9) == RAW  # within the tolerance: reused as it was
    assert d.get(key, 100e6) == ZSTD1  # the tier slowed down: chosen again, nothing encoded
    assert d.get(key, 110e6) == ZSTD1  # and remembered at the new bandwidth
    assert d.get(key, 2e9) == RAW  # fast again: raw again
    assert (d.hits, d.measured, d.rechosen) == (4, 1, 2)
    for _ in range(3):
        d.next_checkpoint()
    assert d.get(key, 2e9) is None  # re-choosing does not renew it: after `reuse` checkpoints, measured again


@pytest.mark.parametrize("reuse", [1, 4])
def test_writer_measures_each_partition_once_per_reuse_window(monkeypatch, reuse) -> None:
    import asymstore.writer as writer_mod

    calls = []
    real = writer_mod.measure_candidates
    monkeypatch.setattr(writer_mod, "measure_candidates", lambda *a, **k: calls.append(1) or real(*a, **k))
    # at about 20 MB/s a raw 1 MiB write costs ~50 ms: the zeros' encoding wins by a margin a busy CPU's stall
    # during the measurement does not erase (at 200 MB/s, 5 ms, it once measured raw faster on a loaded machine)
    slow = SlowTier(f"memory://slow-{uuid.uuid4().hex}")
    slow.capabilities = REMOTE
    noise = torch.from_numpy(np.random.default_rng(1).integers(0, 256, 1 << 20, dtype=np.uint8))
    state = {"zeros": torch.zeros(1 << 18), "noise": noise}
    with Store([slow], chunk_bytes=1 << 16, partition_bytes=1 << 20, codec_reuse=reuse) as s:
        for step in range(1, 9):
            state["noise"][step] = step  # the state changes a little every step
            rep = s.save(state, step).result().reports["memory"]
            assert rep.codecs.get("raw", 0) == 1 and sum(rep.codecs.values()) == 2, rep.codecs
            assert_bitequal(s.restore(step), state)
        tier = s.tiers[0]
        if reuse == 1:
            assert len(calls) == 16 and tier.codec_decisions.hits == 0
        else:
            # measured at checkpoints 1 and 5 only: a moved bandwidth estimate chooses again from the estimates
            assert len(calls) == 4 and tier.codec_decisions.hits == 12


# --- deltas that pay in bytes: never a full step where a delta is >= 10x smaller ------------------------
XOR_ZSTD = blosc_shuffle(4).with_delta()


def test_a_much_smaller_delta_wins_even_when_a_full_chain_looks_faster() -> None:
    n = 16 << 20
    # a busy CPU: encoding measured at 30 MB/s against a 2 GB/s tier; the nearly unchanged step XORs to 0.5%
    ests = [CodecEstimate(ZSTD1, 0.9, 30 * MB), CodecEstimate(XOR_ZSTD, 0.005, 30 * MB)]
    c = choose_codec(n, ests, 2000 * MB)
    assert c.spec == XOR_ZSTD and c.ratio == 0.005
    # a delta only 5x smaller than raw does not override the time model (raw is faster here)
    assert choose_codec(n, [CodecEstimate(XOR_ZSTD, 0.2, 30 * MB)], 2000 * MB).spec == RAW
    # it is weighed against the chosen full chain, not raw: zstd at 0.04 vs a delta at 0.01 (4x) stays zstd
    slow = [CodecEstimate(ZSTD1, 0.04, 800 * MB), CodecEstimate(XOR_ZSTD, 0.01, 30 * MB)]
    assert choose_codec(n, slow, 50 * MB).spec == ZSTD1
    with pytest.raises(ConfigError):
        choose_codec(n, ests, 2000 * MB, delta_gain=0.5)


_SPECS = [ZSTD1, LZ4, blosc_shuffle(4), XOR_ZSTD, blosc_shuffle(4, "lz4", 5).with_delta()]


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 1 << 30),
    st.floats(1e6, 1e10),
    st.lists(st.tuples(st.sampled_from(_SPECS), st.floats(0.0001, 1.5), st.floats(1e6, 1e10)), max_size=5),
)
def test_no_full_chain_where_a_delta_is_ten_times_smaller(n, bw, raw_ests) -> None:
    ests = [CodecEstimate(s, r, e) for s, r, e in raw_ests]
    c = choose_codec(n, ests, bw)
    full = [e for e in ests if not e.spec.delta]
    # the full chain the time model alone would take (raw unless one beats it by 5%)
    best_full = choose_codec(n, full, bw)
    smaller = [e for e in ests if e.spec.delta and e.ratio * 10 <= best_full.ratio]
    if not c.spec.delta:
        assert not smaller
        assert c == best_full
    else:
        chosen = next(e for e in ests if e.spec == c.spec and e.ratio == c.ratio)
        if smaller:  # the fastest of the much smaller deltas, unless a delta is also fastest overall
            assert c.predicted_s <= min(predicted_time(n, e, bw) for e in smaller) * (1 + 1e-12)
        assert chosen.ratio <= best_full.ratio or c.predicted_s < best_full.predicted_s


def test_auto_writes_a_nearly_unchanged_step_as_a_delta_under_load(monkeypatch) -> None:
    """The time model alone picks raw here (a loaded CPU, simulated by dividing the measured encode speed by
    1000); the planner still writes each nearly unchanged step as a delta and keeps the cadence."""
    import dataclasses

    import asymstore.writer as writer_mod

    real = writer_mod.measure_candidates

    def loaded(*a, **k):  # type: ignore[no-untyped-def]
        return [dataclasses.replace(e, encode_bw=e.encode_bw / 1000) for e in real(*a, **k)]

    monkeypatch.setattr(writer_mod, "measure_candidates", loaded)
    tier = SlowTier(f"memory://fast-{uuid.uuid4().hex}")
    tier.bytes_per_s = 2e9
    tier.capabilities = REMOTE
    noise = torch.from_numpy(np.random.default_rng(2).standard_normal(1 << 20).astype(np.float32))
    state = {"w": noise}
    with Store([tier], chunk_bytes=1 << 16, partition_bytes=1 << 20, delta_every=4, codec_reuse=1) as s:
        reps = []
        for step in range(1, 6):
            state["w"][step] += 1.0
            reps.append(s.save(state, step).result().reports["memory"])
            assert_bitequal(s.restore(step), state)
    assert [r.delta_base for r in reps] == [None, 1, 1, 1, None]  # bases only where the cadence asks
    for r in reps[1:4]:
        assert r.stored_bytes * 10 <= r.raw_bytes, (r.stored_bytes, r.raw_bytes)


def test_remembered_codec_choices_never_hide_a_small_delta(monkeypatch) -> None:
    """Codec choices are reused across checkpoints, but not where a delta base is offered: a step that
    changed everything (its delta did not pay, raw was remembered) must not make the next, nearly unchanged
    one full."""
    import dataclasses

    import asymstore.writer as writer_mod

    real = writer_mod.measure_candidates
    monkeypatch.setattr(
        writer_mod,
        "measure_candidates",
        lambda *a, **k: [dataclasses.replace(e, encode_bw=e.encode_bw / 1000) for e in real(*a, **k)],
    )
    tier = SlowTier(f"memory://fast-{uuid.uuid4().hex}")
    tier.bytes_per_s = 2e9
    tier.capabilities = REMOTE
    rng = np.random.default_rng(3)
    first = torch.from_numpy(rng.standard_normal(1 << 20).astype(np.float32))
    with Store([tier], chunk_bytes=1 << 16, partition_bytes=1 << 20, delta_every=8, codec_reuse=8) as s:
        s.save({"w": first}, 1).result()
        other = torch.from_numpy(rng.standard_normal(1 << 20).astype(np.float32))
        r2 = s.save({"w": other}, 2).result().reports["memory"]  # all changed: full, the new base
        near = other.clone()
        near[7] += 1.0
        r3 = s.save({"w": near}, 3).result().reports["memory"]
        assert_bitequal(s.restore(3), {"w": near})
    assert r2.delta_base is None
    assert r3.delta_base == 2 and r3.stored_bytes * 10 <= r3.raw_bytes
