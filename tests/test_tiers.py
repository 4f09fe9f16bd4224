"""Tier chain: promotion in the background, retention, B*-sized objects, recovery across tiers."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asymstore import EveryN, LatestN, Store, TierSpec, catalog
from asymstore.backends.local import LocalObjectStore
from asymstore.backends.memory import MemoryObjectStore
from asymstore.errors import CheckpointFailedError, CorruptCheckpointError, StepNotFoundError
from asymstore.retention import ByteBudget, plan_deletions, promotion_wanted
from asymstore.zarrfmt import crc32c, dumps
from tests.helpers import REMOTE

from .helpers import assert_bitequal

SMALL = dict(chunk_bytes=4096)


def _state(step: int, n: int = 20000) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(n, generator=g), "b": torch.randint(0, 9, (7,), generator=g), "step": step}


# --- pure policies -------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 200), min_size=0, max_size=40, unique=True),
    st.integers(1, 6),
    st.integers(1, 7),
    st.sets(st.integers(0, 200), max_size=5),
)
def test_plan_deletions_respects_policies_and_protection(steps, n, every, protected) -> None:
    steps = sorted(steps)
    pols = [LatestN(n), EveryN(every)]
    doomed = plan_deletions(steps, {}, pols, protected=protected)
    kept = set(steps) - set(doomed)
    assert set(sorted(steps)[-n:]) <= kept
    assert {s for s in steps if s % every == 0} <= kept
    assert not (set(doomed) & set(protected))
    assert set(doomed) <= set(steps)
    # deleted steps are exactly those no policy keeps
    assert all(s not in sorted(steps)[-n:] and s % every for s in doomed)


def test_byte_budget_keeps_newest_within_budget() -> None:
    sizes = {1: 10, 2: 10, 3: 10, 4: 10}
    assert plan_deletions([1, 2, 3, 4], sizes, [ByteBudget(25)]) == [1, 2]
    assert plan_deletions([1, 2], {1: 100, 2: 100}, [ByteBudget(10)]) == [1]  # the newest always stays


def test_promotion_wanted() -> None:
    pols = [EveryN(10), LatestN(1)]
    assert promotion_wanted(pols, 20, age=4)
    assert not promotion_wanted(pols, 21, age=1)
    assert promotion_wanted(pols, 21, age=0)
    assert promotion_wanted([LatestN(3)], 5, age=2)
    assert not promotion_wanted([LatestN(3)], 5, age=3)


# --- the chain on real local tiers ------------------------------------------------------------


def test_promotion_and_retention(tmp_path) -> None:
    a, b = str(tmp_path / "nvme"), str(tmp_path / "far")
    with Store([TierSpec(a, keep=3), TierSpec(b, keep=[EveryN(5), LatestN(1)])], **SMALL) as s:
        for step in range(1, 13):
            s.save(_state(step), step)
        assert s.flush(30)
        status = {t["name"]: t for t in s.status()["tiers"]}
    assert status["file"]["steps"] == [10, 11, 12]
    assert status["file2"]["steps"] == [5, 10, 12]
    assert status["file2"]["promoted"] >= 3 and status["file2"]["errors"] == 0
    with Store([b]) as far:
        for step in (5, 10, 12):
            assert_bitequal(far.restore(step), _state(step))


def test_node_loss_recovers_from_the_lower_tier(tmp_path) -> None:
    a, b = str(tmp_path / "nvme"), str(tmp_path / "far")
    with Store([TierSpec(a, keep=2), TierSpec(b, keep=2)], **SMALL) as s:
        for step in range(1, 5):
            s.save(_state(step), step)
    shutil.rmtree(a)  # the node is gone: its local tier with it
    with Store([a, b], **SMALL) as s2:
        assert s2.steps() == [3, 4] and s2.where(4) == ["file2"]
        got = s2.restore()
        assert s2.last_restore.step == 4 and s2.last_restore.tier == "file2"
        assert_bitequal(got, _state(4))


class GatedStore(MemoryObjectStore):
    """A slow tier: every put waits for ``gate``; failures can be injected."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.gate = threading.Event()
        self.fail = 0

    def put(self, key, data) -> None:  # type: ignore[no-untyped-def]
        if key.startswith("step_") and not self.gate.wait(60):  # probes and the root group pass
            raise TimeoutError("gate never opened")
        if key.startswith("step_") and self.fail > 0:
            self.fail -= 1
            raise ConnectionError("injected: tier unreachable")
        super().put(key, data)

    put_atomic = put


def test_a_blocked_lower_tier_never_blocks_training(tmp_path) -> None:
    slow = GatedStore(f"memory://gated-{uuid.uuid4().hex}")
    slow.capabilities = REMOTE  # act like a remote durable tier
    with Store(
        [TierSpec(str(tmp_path), keep=2), TierSpec(slow, keep=None)], **SMALL, host_slots=2, partition_bytes=1 << 16
    ) as s:
        t0 = time.perf_counter()
        for step in range(1, 7):
            s.save(_state(step), step)  # blocking save: durable on the first tier
        elapsed = time.perf_counter() - t0
        st_ = {t["name"]: t for t in s.status()["tiers"]}
        assert st_["file"]["steps"][-1] == 6
        assert st_["memory"]["steps"] == []  # nothing reached the blocked tier
        # the first tier keeps what the lower tier still has to receive, despite keep=2
        assert st_["file"]["steps"] == [1, 2, 3, 4, 5, 6]
        assert elapsed < 30
        slow.fail = 2  # the tier comes back flaky: two failed writes, then fine
        slow.gate.set()
        assert s.flush(60)
        st_ = {t["name"]: t for t in s.status()["tiers"]}
        assert st_["memory"]["steps"] == [1, 2, 3, 4, 5, 6]
        assert st_["memory"]["errors"] >= 1
        assert st_["file"]["steps"] == [5, 6]  # retention caught up once promoted


def test_objects_per_checkpoint_follow_the_batch_size(tmp_path) -> None:
    part = 1 << 18
    with Store([TierSpec(str(tmp_path), partition_bytes=part)], chunk_bytes=1 << 16, compression="none") as s:
        state = {f"t{i}": torch.randn(1000 + i) for i in range(300)}  # many small tensors
        state["big"] = torch.randn(1 << 20)
        rep = s.save(state, 1).result().reports["file"]
    files = [f for _, _, fs in os.walk(tmp_path / "step_000000000001") for f in fs]
    bound = -(-rep.raw_bytes // part) + 5  # partitions + array metadata + group + commit
    assert len(files) <= bound, (len(files), bound)
    assert rep.objects == -(-rep.raw_bytes // part)


def test_b_star_is_derived_from_measurements(tmp_path) -> None:
    with Store([str(tmp_path)]) as s:
        tier = s.tiers[0]
        b = tier.partition_bytes(1 << 30)
        st_ = tier.stats
        assert st_.bandwidth > 0 and st_.latency_s >= 0 and len(st_.model) >= 5
        assert b % s.config.chunk_bytes == 0 and s.config.chunk_bytes <= b <= s.config.staging_budget_bytes
        assert tier.partition_bytes(1 << 20) <= max(1 << 20, s.config.chunk_bytes)  # never beyond the checkpoint


@pytest.mark.slow
@pytest.mark.parametrize("rank_count", [2, 3])
def test_multi_rank_commit_needs_every_shard(tmp_path, rank_count) -> None:
    root = str(tmp_path)
    stores = [Store([root], rank=r, world_size=rank_count, commit_timeout_s=3, **SMALL) for r in range(rank_count)]
    try:
        handles = [s.save(_state(10 * i + 1), 1, blocking=False) for i, s in enumerate(stores)]
        for h in handles:
            h.result(30)
        assert stores[0].tiers[0].committed_steps() == [1]
        for r, s in enumerate(stores):
            assert_bitequal(s.restore(1), _state(10 * r + 1))
        # rank > 0 never writes: rank 0 gives the step up, nothing lists as complete
        h = stores[0].save(_state(2), 2, blocking=False)
        with pytest.raises(Exception, match="did not finish"):
            h.result(30)
        assert stores[0].tiers[0].committed_steps() == [1]
        # another world size reads rank 0's shard (replicated/consolidated state)
        with Store([root]) as one:
            assert_bitequal(one.restore(1), _state(1))
    finally:
        for s in stores:
            try:
                s.close()
            except Exception:
                pass


def test_leftovers_of_a_rank_that_died_do_not_block_or_mix(tmp_path) -> None:
    root = str(tmp_path)
    s0 = Store([root], rank=0, world_size=2, commit_timeout_s=1, **SMALL)
    s1 = Store([root], rank=1, world_size=2, commit_timeout_s=1, **SMALL)
    try:
        s1.save(_state(101), 1)  # rank 1 wrote its shard of step 1 ...
        h = s0.save(_state(1), 1, blocking=False)
        h.result(30)  # ... and rank 0 committed: step 1 is complete
        # step 2: rank 1's shard exists, rank 0 died before writing: never committed
        s1.save(_state(102), 2)
        assert s0.tiers[0].committed_steps() == [1]
        # after a restart every rank discards its uncommitted leftovers, then step 2 can be saved again
        assert s1.discard_uncommitted() == {"file": [2]}
        assert s0.discard_uncommitted() == {}
        s1.save(_state(202), 2)
        s0.save(_state(2), 2, blocking=False).result(30)
        assert_bitequal(s1.restore(2), _state(202))
        assert_bitequal(s0.restore(2), _state(2))
        # a rank re-saving a step whose own shard marker is stale (never committed globally) replaces it
        s1.save(_state(103), 3)
        s1.save(_state(303), 3)  # no StepExistsError: step 3 was never committed
        s0.save(_state(3), 3, blocking=False).result(30)
        assert_bitequal(s1.restore(3), _state(303))
    finally:
        s0.close()
        s1.close()


def test_a_step_whose_parts_are_committed_but_not_its_marker_is_restored_and_marked(tmp_path) -> None:
    """Rank 0 gave up waiting for rank 1's part of step 1 (its process died there in a real job), then rank 1's
    part arrived: every part is committed, the step's marker is not. Restarted, each rank restores step 1 from
    its own part when asked for it, and rank 0 writes the missing marker."""
    root = str(tmp_path)
    cfg = dict(SMALL, host_memory="private")
    s0 = Store([root], rank=0, world_size=2, commit_timeout_s=0.5, **cfg)
    s1 = Store([root], rank=1, world_size=2, **cfg)
    try:
        with pytest.raises(CheckpointFailedError, match="ranks \\[1\\] did not"):
            s0.save(_state(1), 1)
        s1.save(_state(101), 1)
    finally:
        s0.close()
        s1.close()
    assert (tmp_path / "step_000000000001" / "r00000" / "COMMIT").exists()
    assert (tmp_path / "step_000000000001" / "r00001" / "COMMIT").exists()
    assert not (tmp_path / "step_000000000001" / "COMMIT").exists()
    with Store([root], rank=1, world_size=2, **cfg) as r1, Store([root], rank=0, world_size=2, **cfg) as r0:
        assert r1.steps() == [] and r1.durable_steps() == []
        with pytest.raises(StepNotFoundError, match="step 2 is not complete"):
            r1.restore(2)
        assert_bitequal(r1.restore(1), _state(101))
        assert r1.last_restore is not None and "rank 1's part" in r1.last_restore.detail
        assert torch.equal(r1.open_checkpoint(1)["w"].read(), _state(101)["w"])  # lazily too, once resumed from
        assert_bitequal(r0.restore(1), _state(1))
        assert r0.last_restore is not None and "rank 0's part" in r0.last_restore.detail
        assert r0.flush(timeout=60)
        assert r0.tiers[0].committed_steps() == [1]
    with Store([root], rank=1, world_size=2, **cfg) as again:  # an ordinary durable step now
        assert again.steps() == [1]
        assert_bitequal(again.restore(), _state(101))
        assert again.last_restore is not None and "marker pending" not in again.last_restore.detail


def test_parts_left_by_a_job_of_another_world_size_never_make_a_step(tmp_path) -> None:
    """A job of 4 ranks died with only ranks 0 and 1 of step 1 committed (their markers record 4 ranks); the job
    restarts on 2 ranks. Those two parts must not pass for a complete 2-rank step 1: not listed as parts, not
    restorable, and no marker for 2 ranks is written over them."""
    root = str(tmp_path)
    cfg = dict(SMALL, host_memory="private")
    s0 = Store([root], rank=0, world_size=4, commit_timeout_s=0.5, **cfg)
    s1 = Store([root], rank=1, world_size=4, **cfg)
    try:
        s1.save(_state(101), 1)
        with pytest.raises(CheckpointFailedError, match="ranks \\[2, 3\\] did not"):
            s0.save(_state(1), 1)
    finally:
        s0.close()
        s1.close()
    marker = json.loads((tmp_path / "step_000000000001" / "r00001" / "COMMIT").read_bytes())
    assert marker["world_size"] == 4
    backend = LocalObjectStore(root)
    assert catalog.committed_parts(backend, rank=1, world_size=4) == [1]
    assert catalog.committed_parts(backend, rank=1, world_size=2) == []
    with pytest.raises(StepNotFoundError, match="written by a job of 4 ranks, not 2"):
        catalog.open_rank_part(backend, 1, rank=1, world_size=2)
    with Store([root], rank=1, world_size=2, **cfg) as r1, Store([root], rank=0, world_size=2, **cfg) as r0:
        for r in (r0, r1):
            with pytest.raises(StepNotFoundError, match="step 1 is not complete"):
                r.restore(1)
        with pytest.raises(CheckpointFailedError, match="written by a job of \\[4\\] ranks, this one has 2"):
            r0.tiers[0].finalize(1, timeout=5)
    assert not (tmp_path / "step_000000000001" / "COMMIT").exists()


def _resealed(body: dict) -> bytes:
    """``body`` (a marker without its checksum) serialised with a recomputed ``crc32c``."""
    body["crc32c"] = crc32c(dumps(body))
    return dumps(body)


def test_a_rank_marker_naming_another_world_size_than_its_step_is_damage(tmp_path) -> None:
    """A committed 2-rank step whose rank 1 marker says 3 ranks (checksums recomputed, the global marker vouching
    for the new bytes): the two markers contradict each other, so rank 1's part is refused as corrupt."""
    root = str(tmp_path)
    cfg = dict(SMALL, host_memory="private")
    with Store([root], rank=0, world_size=2, **cfg) as s0, Store([root], rank=1, world_size=2, **cfg) as s1:
        s1.save(_state(101), 1)
        s0.save(_state(1), 1)
    d = tmp_path / "step_000000000001"
    rank = json.loads((d / "r00001" / "COMMIT").read_bytes())
    rank.pop("crc32c")
    rank["world_size"] = 3
    raw = _resealed(rank)
    (d / "r00001" / "COMMIT").write_bytes(raw)
    step = json.loads((d / "COMMIT").read_bytes())
    step.pop("crc32c")
    step["shards_crc32c"]["1"] = crc32c(raw)
    (d / "COMMIT").write_bytes(_resealed(step))
    with pytest.raises(CorruptCheckpointError, match="says 3 ranks, the step's 2"):
        catalog.open_reader(LocalObjectStore(root), 1, rank=1)
    with Store([root], rank=0, world_size=2, **cfg) as r0:  # rank 0's part is intact
        assert_bitequal(r0.restore(1), _state(1))


def test_a_rank_above_0_promotes_a_step_rank_0_committed_after_it_last_listed(tmp_path) -> None:
    """Rank 1 writes its rank directory, lists the tier before rank 0's global marker exists, then rank 0 commits:
    rank 1 must notice (its listing is stale), promote its part down the chain, and flush must wait for that."""
    tiers = [str(tmp_path / "a"), str(tmp_path / "b")]
    s0 = Store(tiers, rank=0, world_size=2, commit_timeout_s=30, **SMALL)
    s1 = Store(tiers, rank=1, world_size=2, commit_timeout_s=30, **SMALL)
    try:
        s1.save(_state(101), 1)
        assert s1.manager is not None
        assert s1.manager.steps_of(s1.tiers[0], refresh=True) == []  # no global marker yet: listed as absent
        h = s0.save(_state(1), 1, blocking=False)
        h.result(30)
        flushed0: list[bool] = []
        t = threading.Thread(target=lambda: flushed0.append(s0.flush(timeout=60)))
        t.start()
        assert s1.flush(timeout=60)
        t.join(70)
        assert flushed0 == [True]
        assert s0.tiers[1].committed_steps() == [1]
    finally:
        s0.close()
        s1.close()
    with Store([tiers[1]], rank=1, world_size=2, **SMALL) as lower:
        assert_bitequal(lower.restore(1), _state(101))


def test_delete_waits_for_the_step_being_persisted() -> None:
    slow = GatedStore(f"memory://gated-{uuid.uuid4().hex}")
    with Store([slow], **SMALL) as s:
        h = s.save(_state(1), 1, blocking=False)
        deleted = threading.Event()
        t = threading.Thread(target=lambda: (s.delete(1), deleted.set()))
        t.start()
        time.sleep(0.3)
        assert not deleted.is_set()  # the slot is still being written: delete waits
        slow.gate.set()
        h.result(30)
        t.join(30)
        assert deleted.is_set() and s.steps() == []


def test_a_probe_deletes_only_its_own_files(tmp_path) -> None:
    """Ranks sharing a tier directory probe it at the same time: one probe's clean-up must not remove the
    files another is writing (a rank once failed with FileNotFoundError on its probe file)."""
    from asymstore.config import Config
    from asymstore.tiers import PersistentTier

    seen: list[bool] = []

    class Interleaved(LocalObjectStore):
        def put(self, key, data) -> None:  # type: ignore[no-untyped-def]
            super().put(key, data)
            if key.startswith("_probe/") and not seen:
                seen.append(True)
                PersistentTier(str(tmp_path), Config()).probe()  # the other rank probes now
                seen.append(os.path.exists(os.path.join(self.root, key)))

    PersistentTier(Interleaved(str(tmp_path)), Config()).probe()
    assert seen == [True, True], "the other probe removed this probe's file"
    assert not [f for _, _, fs in os.walk(tmp_path / "_probe") for f in fs]  # both cleaned up after themselves


@pytest.mark.parametrize("compression,delta_every", [("none", 0), ("auto", 0), ("none", 4)])
@pytest.mark.parametrize("url", ["dir", "memory://budget"])
def test_partitions_in_flight_fit_the_staging_budget(tmp_path, compression, delta_every, url) -> None:
    """The writer holds two partitions in flight (one encoded while the other is written), each at most a
    source range (promotions from the tier above) plus an encoded copy (when it may compress or delta-encode):
    that fits the staging budget. The first tier is written from the host slots only: no source ranges."""
    budget = 8 << 20
    targets = (
        [str(tmp_path / "a"), str(tmp_path / "b")]
        if url == "dir"
        else [f"{url}-{compression}-{delta_every}-{i}" for i in range(2)]
    )
    with Store(
        targets, staging_budget_bytes=budget, chunk_bytes=1 << 16, compression=compression, delta_every=delta_every
    ) as s:
        first, second = (t.partition_bytes(1 << 30) for t in s.tiers)
        assert s.tiers[0].writes_from_slots_only and not s.tiers[1].writes_from_slots_only
    encoded = 0 if compression == "none" and delta_every <= 0 else 1
    memory = url != "dir"  # no write latency to amortise: sized by the budget alone, conservatively
    for b, held in ((first, 2 if memory else encoded), (second, 2 if memory else 1 + encoded)):
        assert b > 0
        if held:
            assert 2 * held * b <= budget, (b, held)
