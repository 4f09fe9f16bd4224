"""Trainer hooks: the timeline, background failures, detach, the slot policy and resume."""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import torch

import asymstore
from asymstore import CheckpointFailedError
from asymstore.backends.base import Buffer
from asymstore.backends.memory import MemoryObjectStore, drop_namespace
from asymstore.trainer_hooks import AsymCheckpointer
from tests._hooktest_util import build, deterministic_cpu, full_state, iteration
from tests.helpers import assert_bitequal


@pytest.fixture(autouse=True)
def _deterministic() -> Iterator[None]:
    with deterministic_cpu(threads=1):
        yield


@pytest.fixture
def memname() -> Iterator[str]:
    name = f"hooks-{uuid.uuid4().hex}"
    yield f"memory://{name}"
    drop_namespace(name)


def train(
    ck: AsymCheckpointer,
    model: Any,
    opt: Any,
    sched: Any,
    steps: int,
    batch: int = 128,
    pos: dict[str, Any] | None = None,
    first: int = 1,
) -> None:
    for t in range(first, first + steps):
        if pos is not None:
            pos["batch"] = t
        iteration(model, opt, sched, batch)


# --- the timeline ----------------------------------------------------------------------------------------


def test_write_trace_is_chrome_trace_json_with_all_event_kinds(tmp_path: Any) -> None:
    model, opt, sched = build(0, d=256)
    store = asymstore.open_store(str(tmp_path / "ck"))
    ck = AsymCheckpointer(model, opt, store, scheduler=sched, strategy="asym", warmup=2, trace=True)
    with ck:
        train(ck, model, opt, sched, 6, batch=512)
    store.close()
    path = ck.write_trace(str(tmp_path / "trace.json"))
    with open(path) as f:
        doc = json.load(f)
    events = doc["traceEvents"]
    meta = [e for e in events if e["ph"] == "M"]
    spans = [e for e in events if e["ph"] == "X"]
    assert len(meta) + len(spans) == len(events)
    tracks = {e["tid"]: e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    for e in spans:
        assert isinstance(e["name"], str) and isinstance(e["cat"], str)
        assert isinstance(e["ts"], (int, float)) and e["ts"] >= 0
        assert isinstance(e["dur"], (int, float)) and e["dur"] >= 0
        assert isinstance(e["pid"], int) and e["tid"] in tracks
    cats = {e["cat"] for e in spans}
    assert {"compute", "snapshot", "stall", "persist"} <= cats, cats
    by_track: dict[str, list[dict[str, Any]]] = {}
    for e in spans:
        by_track.setdefault(tracks[e["tid"]], []).append(e)
    assert {"compute", "copy", "train", "persist"} <= set(by_track), set(by_track)
    # forward and backward windows of every iteration; copies issued inside them after warm-up
    compute = by_track["compute"]
    assert any(e["name"].startswith("forward") for e in compute)
    assert any(e["name"].startswith("backward") for e in compute)
    copies = by_track["copy"]
    assert any(e["name"].startswith(("copy forward", "copy backward")) for e in copies), [e["name"] for e in copies]
    assert all({"start", "end"} <= set(e["args"]) for e in copies)
    stalls = [e for e in spans if e["cat"] == "stall"]
    persists = [e for e in spans if e["cat"] == "persist"]
    assert len(stalls) == 6 and len(persists) == 6  # one barrier and one persist per checkpoint


# --- background failures ---------------------------------------------------------------------------------


class FailAfterFirstCheckpoint(MemoryObjectStore):
    """A tier whose writes fail once the first checkpoint is committed (a disk that filled up)."""

    def __init__(self, url: str, only: int | None = None) -> None:
        super().__init__(url)
        self.commits = 0
        self.only = only  # fail only this step's writes

    def put(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        failing = key.startswith(f"step_{self.only:012d}/") if self.only is not None else key.startswith("step_")
        if self.commits >= 1 and failing:
            raise OSError(28, "injected: no space left on device")
        super().put(key, data)
        if key.endswith("/COMMIT"):
            self.commits += 1


def test_background_failure_is_raised_on_a_later_step(memname: str) -> None:
    tier = FailAfterFirstCheckpoint(memname)
    store = asymstore.open_store(tier)
    model, opt, sched = build(0)
    ck = AsymCheckpointer(model, opt, store, scheduler=sched, strategy="asym", warmup=2).attach()
    done = []
    with pytest.raises(CheckpointFailedError) as info:
        for t in range(1, 13):
            iteration(model, opt, sched, 128)
            done.append(t)
            time.sleep(0.02)  # let the background persistence fail meanwhile
    # checkpoint 2 is committed to persistence at the barrier of step 3: it cannot fail before that
    assert len(done) >= 2, done
    assert len(done) < 12, "the failure was swallowed"
    assert isinstance(info.value.__cause__, OSError) and "no space left" in str(info.value)
    assert tier.commits == 1 and store.tiers[0].committed_steps() == [1]
    assert store.failures >= 1
    ck.detach(finish=False)
    with contextlib.suppress(CheckpointFailedError):
        store.close()


@pytest.mark.parametrize("strategy", ["sync", "checkfreq", "asym"])
def test_background_failure_is_reported_once(memname: str, strategy: str) -> None:
    """Raised as CheckpointFailedError by the hooks, and then not again by the next call on the store."""
    tier = FailAfterFirstCheckpoint(memname, only=4)
    store = asymstore.open_store(tier)
    model, opt, sched = build(0)
    ck = AsymCheckpointer(model, opt, store, scheduler=sched, strategy=strategy, every=2, warmup=1).attach()
    for _ in range(4):  # checkpoint 2 (succeeds), begins 4
        iteration(model, opt, sched, 128)
    with pytest.raises(CheckpointFailedError) as info:
        for _ in range(4):  # completes 4: its persistence fails in the background
            iteration(model, opt, sched, 128)
            time.sleep(0.02)
        ck.wait()
    assert isinstance(info.value.__cause__, OSError)
    assert store.failures == 1
    ck.detach(finish=False)
    ck.wait()  # reported already: not raised again
    assert [s.step for s in ck.history if s.error] == [4]
    store.wait()
    assert tier.commits >= 1 and 4 not in store.tiers[0].committed_steps()
    store.close()  # does not raise the already reported failure again


def test_non_fatal_failures_are_counted_and_training_goes_on(memname: str) -> None:
    tier = FailAfterFirstCheckpoint(memname)
    store = asymstore.open_store(tier, non_fatal=True)
    model, opt, sched = build(0)
    ck = AsymCheckpointer(model, opt, store, scheduler=sched, strategy="asym", warmup=2)
    with ck:
        train(ck, model, opt, sched, 8)
    store.close()
    assert store.failures == 7  # every checkpoint after the first
    assert [s.step for s in ck.history] == list(range(1, 9))
    assert ck.history[0].error is None and all(s.error for s in ck.history[1:]), [s.error for s in ck.history]
    assert tier.commits == 1


# --- detach ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["context", "detach"])
def test_detach_completes_the_snapshot_in_flight(tmp_path: Any, how: str) -> None:
    model, opt, sched = build(0)
    pos: dict[str, Any] = {"batch": 0}
    store = asymstore.open_store(str(tmp_path / "ck"))
    ck = AsymCheckpointer(model, opt, store, scheduler=sched, strategy="asym", warmup=2, extras=lambda: dict(pos))
    if how == "context":
        with ck:
            train(ck, model, opt, sched, 5, pos=pos)
    else:
        ck.attach()
        train(ck, model, opt, sched, 5, pos=pos)
        ck.detach()
    want = full_state(model, opt, sched, 5, dict(pos))
    train(ck, model, opt, sched, 2, pos=pos, first=6)  # detached: no more checkpoints
    assert ck.step == 5 and len(ck.history) == 5
    store.close()
    with asymstore.open_store(str(tmp_path / "ck")) as fresh:
        assert fresh.steps() == [1, 2, 3, 4, 5]
        assert_bitequal(fresh.restore(5), want)


# --- the slot policy -------------------------------------------------------------------------------------


class SlowTier(MemoryObjectStore):
    def __init__(self, url: str, delay_s: float) -> None:
        super().__init__(url)
        self.delay_s = delay_s

    def put(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        if key.endswith("/COMMIT"):
            time.sleep(self.delay_s)
        super().put(key, data)


def test_skip_policy_skips_checkpoints_and_says_so(memname: str, caplog: Any) -> None:
    tier = SlowTier(memname, delay_s=0.3)
    store = asymstore.open_store(tier, host_slots=1, slot_policy="skip")
    model, opt, sched = build(0)
    ck = AsymCheckpointer(model, opt, store, scheduler=sched, strategy="asym", warmup=2)
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="asymstore"), ck:
        train(ck, model, opt, sched, 8)
        training_s = time.perf_counter() - t0
    store.close()
    skipped = [s.step for s in ck.history if s.skipped]
    kept = [s.step for s in ck.history if not s.skipped]
    assert [s.step for s in ck.history] == list(range(1, 9))
    assert skipped and kept[0] == 1, (skipped, kept)
    assert ck.summary()["skipped"] == len(skipped) == store.host.skips
    assert ck.summary()["checkpoints"] == len(kept)
    assert tier_steps(store) == kept  # exactly the checkpoints not skipped were persisted
    assert any("skipped" in r.getMessage() for r in caplog.records)
    # skipping means not waiting for the slow tier: 8 steps in far less than 8 x 0.3 s
    assert training_s < 0.3 * len(kept) + 2.0, training_s


def tier_steps(store: asymstore.Store) -> list[int]:
    return store.tiers[0].committed_steps()


def test_wait_policy_waits_and_skips_nothing(memname: str) -> None:
    tier = SlowTier(memname, delay_s=0.05)
    store = asymstore.open_store(tier, host_slots=1, slot_policy="wait")
    model, opt, sched = build(0)
    ck = AsymCheckpointer(model, opt, store, scheduler=sched, strategy="asym", warmup=2)
    with ck:
        train(ck, model, opt, sched, 5)
    store.close()
    assert ck.summary()["skipped"] == 0 and tier_steps(store) == [1, 2, 3, 4, 5]
    assert store.host.waits >= 1


# --- resume ----------------------------------------------------------------------------------------------


def test_resume_restores_step_rng_extras_and_state(tmp_path: Any) -> None:
    model, opt, sched = build(0)
    pos: dict[str, Any] = {"batch": 0, "epoch": 3, "order": np.arange(5, dtype=np.int64), "note": "x"}
    store = asymstore.open_store(str(tmp_path / "ck"))
    ck = AsymCheckpointer(model, opt, store, scheduler=sched, strategy="asym", warmup=1, extras=lambda: dict(pos))
    with ck:
        train(ck, model, opt, sched, 4, pos=pos)
    want = full_state(model, opt, sched, 4, dict(pos))
    store.close()

    # another process, in effect: other weights, other RNG states
    model2, opt2, sched2 = build(123)
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    store2 = asymstore.open_store(str(tmp_path / "ck"))
    ck2 = AsymCheckpointer(model2, opt2, store2, scheduler=sched2, strategy="asym")
    extras = ck2.resume()
    assert ck2.step == 4
    assert_bitequal(extras, want["extras"])
    assert random.getstate() == want["rng"]["python"]
    assert_bitequal(np.random.get_state(), want["rng"]["numpy"])
    assert torch.equal(torch.get_rng_state(), want["rng"]["torch"])
    assert_bitequal(full_state(model2, opt2, sched2, ck2.step, extras), want)
    # the restored RNG draws what the original would have drawn next
    assert torch.equal(torch.randn(3), (torch.set_rng_state(want["rng"]["torch"]), torch.randn(3))[1])

    extras2 = ck2.resume(step=2)
    assert ck2.step == 2 and extras2["batch"] == 2
    store2.close()


def test_resume_then_train_matches_uninterrupted(tmp_path: Any) -> None:
    """In-process version of the kill test: resume from step 3 of 6 and train on."""
    model, opt, sched = build(0)
    pos: dict[str, Any] = {"batch": 0}
    store = asymstore.open_store(str(tmp_path / "ck"))
    ck = AsymCheckpointer(model, opt, store, scheduler=sched, warmup=1, extras=lambda: dict(pos))
    with ck:
        train(ck, model, opt, sched, 6, pos=pos)
    want = full_state(model, opt, sched, 6, dict(pos))
    store.close()

    model2, opt2, sched2 = build(1)
    store2 = asymstore.open_store(str(tmp_path / "ck"))
    for s in (6, 5, 4):  # as if the run had died right after checkpoint 3
        store2.delete(s)
    pos2: dict[str, Any] = {}
    ck2 = AsymCheckpointer(model2, opt2, store2, scheduler=sched2, warmup=1, extras=lambda: dict(pos2))
    pos2.update(ck2.resume())
    assert ck2.step == 3
    with ck2:
        train(ck2, model2, opt2, sched2, 3, pos=pos2, first=4)
    store2.close()
    assert_bitequal(full_state(model2, opt2, sched2, ck2.step, dict(pos2)), want)


def test_copy_thread_errors_reach_the_barrier(tmp_path: Any) -> None:
    """A failing partition copy (on the copy thread) is raised at the barrier and the slot is released."""
    model, opt, sched = build(0, d=256)
    store = asymstore.open_store(str(tmp_path / "ck"))
    ck = AsymCheckpointer(model, opt, store, scheduler=sched, strategy="asym", warmup=2).attach()
    train(ck, model, opt, sched, 3, batch=512)
    assert ck._executor is not None
    ex = ck._executor
    real = ex._copy_bytes  # type: ignore[attr-defined]

    def broken(start: int, end: int, *, background: bool) -> None:
        if background:  # a piece the copy thread copies during forward or backward
            raise RuntimeError("injected copy failure")
        real(start, end, background=background)

    ex._copy_bytes = broken  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="injected copy failure"):
        train(ck, model, opt, sched, 1, batch=512)
    ex._copy_bytes = real  # type: ignore[attr-defined]
    ck.detach(finish=False)
    store.close()
    assert 4 not in store.steps()
    assert all(s.state != "filling" for s in store.host.slots)


def test_exception_in_training_abandons_the_snapshot_in_flight(tmp_path: Any) -> None:
    """Leaving ``with ck:`` by an exception drops the snapshot in flight and frees its host slot."""
    model, opt, sched = build(0)
    store = asymstore.open_store(str(tmp_path / "ck"), host_slots=1)
    ck = AsymCheckpointer(model, opt, store, scheduler=sched, strategy="asym", warmup=1)
    with pytest.raises(KeyboardInterrupt), ck:
        train(ck, model, opt, sched, 3)
        raise KeyboardInterrupt
    assert ck._active is None
    assert [s.state for s in store.host.slots] != ["filling"]
    store.wait()
    assert store.steps() == [1, 2]  # 3 was in flight: abandoned, not stored
    store.save({"w": torch.ones(3)}, 10)  # the slot is usable again (no wait for a stuck slot)
    store.close()


def test_the_summary_says_which_checkpoint_is_durable(tmp_path: Any) -> None:
    """The newest checkpoint taken (host memory) and the newest durable one are reported apart."""
    model, opt, sched = build(0)
    store = asymstore.open_store(str(tmp_path / "ck"))
    ck = AsymCheckpointer(model, opt, store, scheduler=sched, strategy="asym", warmup=2)
    with ck:
        train(ck, model, opt, sched, 4)
    ck.wait()
    s = ck.summary()
    assert s["latest_checkpoint"] == 4 and s["latest_durable"] == 4
    assert store.durable_steps() == [1, 2, 3, 4] and store.latest_durable_step() == 4
    assert all(st.durable for st in ck.history)
    store.close()
