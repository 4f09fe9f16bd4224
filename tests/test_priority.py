"""Whatever training waits on runs at training's priority while it waits: the barrier copies every piece the
idle-priority copy thread has not started and waits for at most the piece in flight, with that thread raised;
a waited-on save, a slot wait and a flush raise the persistence and promotion threads; a checkpoint not durable
within ``durable_within_s`` is reported and persistence is raised until it has caught up."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest
import torch

import asymstore
from asymstore.layout import plan_layout
from asymstore.threads import PriorityBooster
from asymstore.trainer_hooks.executor import ThreadCopyExecutor

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="per-thread scheduling policies are Linux's")


def _policy(tid: int) -> int:
    return os.sched_getscheduler(tid)


def test_the_booster_raises_registered_threads_only_while_someone_waits() -> None:
    b = PriorityBooster(nice=5, idle=True)
    tids: list[int] = []
    stop = threading.Event()

    def run() -> None:
        b.enter()
        tids.append(threading.get_native_id())
        stop.wait()
        b.leave()

    t = threading.Thread(target=run)
    t.start()
    while not tids:
        time.sleep(0.01)
    try:
        assert _policy(tids[0]) == os.SCHED_IDLE and os.getpriority(os.PRIO_PROCESS, tids[0]) == 5
        with b.boosted(), b.boosted():  # nested: the last one out lowers again
            assert _policy(tids[0]) == os.SCHED_OTHER and os.getpriority(os.PRIO_PROCESS, tids[0]) == 0
        assert _policy(tids[0]) == os.SCHED_IDLE and b.boosts == 1
    finally:
        stop.set()
        t.join()


def test_the_barrier_copies_what_the_starved_copy_thread_has_not_and_boosts_it() -> None:
    """The copy thread is stuck in its first piece (as an idle-priority thread is on busy cores): the barrier
    copies every other piece itself, raises the thread while it waits for that one piece, and the slot holds
    every byte; the records cover the range exactly once."""
    n = 8 << 20
    src = torch.arange(n // 4, dtype=torch.float32)
    layout = plan_layout([("w", "float32", (n // 4,), n)])
    buf = torch.zeros(n, dtype=torch.uint8)
    stuck = threading.Event()
    release = threading.Event()
    seen_policy: list[int] = []

    class Starved(ThreadCopyExecutor):
        def _copy_bytes(self, start: int, end: int, *, background: bool) -> None:
            if background and not stuck.is_set():
                stuck.set()
                release.wait(10)
                seen_policy.append(_policy(threading.get_native_id()))
            super()._copy_bytes(start, end, background=background)

    ex = Starved(idle=True, piece_bytes=1 << 20)
    try:
        ex.bind(buf, layout, {"w": src})
        ex.submit(0, n, "backward")
        assert stuck.wait(10)
        threading.Timer(0.3, release.set).start()  # the stuck piece finishes once the barrier waits for it
        t0 = time.perf_counter()
        records = ex.drain()
        waited = time.perf_counter() - t0
        assert torch.equal(buf.view(torch.float32), src)
        spans = sorted((r.start, r.end, r.where) for r in records)
        assert spans == [(0, 1 << 20, "backward"), (1 << 20, n, "step")]
        assert seen_policy == [os.SCHED_OTHER]  # raised while the barrier waited for its piece
        assert ex.booster.boosts == 1 and waited < 5
    finally:
        ex.close()


def test_a_waited_on_save_runs_its_persistence_at_the_callers_priority(tmp_path: Path) -> None:
    store = asymstore.open_store(str(tmp_path / "ck"), background_idle=True, host_memory="private")
    seen: list[int] = []
    real = store.manager.persist_primary  # type: ignore[union-attr]

    def spy(*a: object, **k: object) -> object:
        time.sleep(0.2)  # still running when the caller starts waiting
        seen.append(_policy(threading.get_native_id()))
        return real(*a, **k)  # type: ignore[arg-type]

    store.manager.persist_primary = spy  # type: ignore[union-attr,method-assign]
    store.save({"w": torch.ones(10)}, 1, blocking=True)
    h = store.save({"w": torch.ones(10)}, 2, blocking=False)
    time.sleep(0.5)  # nobody waits: background priority
    h.result()
    assert seen == [os.SCHED_OTHER, os.SCHED_IDLE]
    store.close()


def test_a_late_checkpoint_is_reported_and_persistence_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = asymstore.open_store(str(tmp_path / "ck"), durable_within_s=0.2, host_memory="private")
    real = store.manager.persist_primary  # type: ignore[union-attr]
    seen: list[int] = []

    def slow(*a: object, **k: object) -> object:
        time.sleep(1.0)  # e.g. starved by busy cores
        seen.append(_policy(threading.get_native_id()))
        return real(*a, **k)  # type: ignore[arg-type]

    store.manager.persist_primary = slow  # type: ignore[union-attr,method-assign]
    with caplog.at_level(logging.WARNING, logger="asymstore"):
        h = store.save({"w": torch.ones(10)}, 3, blocking=False)
        while not h.done():
            time.sleep(0.05)  # nobody waits on it: only the watchdog can raise it
    assert "checkpoint 3" in caplog.text and "not durable" in caplog.text
    assert seen == [os.SCHED_OTHER] and store.late == 1 and store.status()["late"] == 1
    store.close()


def test_persistence_is_raised_ahead_while_no_slot_is_left_for_the_next_snapshot() -> None:
    """A snapshot that takes the last slot not persisting raises persistence at once (the next snapshot needs a
    slot a persistence frees); it is lowered again as soon as a slot is free for the next one."""
    from asymstore.hostpool import HostPool

    pool = HostPool(2, pin_memory=False)
    raised: list[str] = []

    class Boost:
        def __enter__(self) -> None:
            raised.append("enter")

        def __exit__(self, *exc: object) -> None:
            raised.append("exit")

    pool.waiting = Boost  # type: ignore[assignment]
    content = None
    a = pool.acquire(64, 1)
    assert raised == []  # the other slot is free
    pool.mark_ready(a, content=content, persisting=True)  # type: ignore[arg-type]
    b = pool.acquire(64, 2)  # slot 1 fills while step 1 persists: nothing left for step 3
    assert raised == ["enter"] and pool.ahead_boosts == 1
    pool.mark_ready(b, content=content, persisting=True)  # type: ignore[arg-type]
    assert raised == ["enter"]  # entered once, not per state change
    pool.mark_persisted(a)  # step 1's slot can take step 3
    assert raised == ["enter", "exit"]
    pool.mark_persisted(b)
    c = pool.acquire(64, 3)  # takes step 1's slot; step 2's is evictable
    assert raised == ["enter", "exit"]
    pool.release(c)
    one = HostPool(1, pin_memory=False)
    one.waiting = Boost  # type: ignore[assignment]
    raised.clear()
    s = one.acquire(64, 1)
    assert raised == []  # filling, nothing persisting yet
    one.mark_ready(s, content=content, persisting=True)  # type: ignore[arg-type]
    assert raised == ["enter"]  # the only slot persists: the next snapshot waits for it
    one.mark_persisted(s)
    assert raised == ["enter", "exit"]


def test_a_store_raises_persistence_ahead_of_the_snapshot_that_would_wait(tmp_path: Path) -> None:
    """With one slot, each persistence is the one the next snapshot needs: it runs at normal priority although
    nobody waits on it yet."""
    store = asymstore.open_store(str(tmp_path / "ck"), background_idle=True, host_memory="private", host_slots=1)
    seen: list[int] = []
    real = store.manager.persist_primary  # type: ignore[union-attr]

    def spy(*a: object, **k: object) -> object:
        seen.append(_policy(threading.get_native_id()))
        return real(*a, **k)  # type: ignore[arg-type]

    store.manager.persist_primary = spy  # type: ignore[union-attr,method-assign]
    h = store.save({"w": torch.ones(10)}, 1, blocking=False)
    while not h.done():
        time.sleep(0.01)  # polling, not waiting on it: no caller's boost
    assert seen == [os.SCHED_OTHER]
    assert store.status()["boosts_ahead"] == 1
    store.close()
