"""Background threads give way to training: SCHED_IDLE (Linux) for the copy, persistence and promotion threads."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from asymstore import Store
from asymstore.threads import lower_thread_priority
from trainer_hooks.executor import ThreadCopyExecutor

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="per-thread SCHED_IDLE is Linux-only")


def _in_thread(fn):  # type: ignore[no-untyped-def]
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("v", fn()))
    t.start()
    t.join()
    return out["v"]


def test_lower_thread_priority_affects_only_the_calling_thread() -> None:
    def body() -> tuple[int, int]:
        lower_thread_priority(3, idle=True)
        return os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    policy, nice = _in_thread(body)
    assert policy == os.SCHED_IDLE and nice == min(before + 3, 19)
    assert os.sched_getscheduler(0) != os.SCHED_IDLE  # this (training) thread is untouched
    assert _in_thread(
        lambda: (lower_thread_priority(0, idle=False), os.sched_getscheduler(0))[1]
    ) == os.sched_getscheduler(0)


@pytest.mark.parametrize("idle", [True, False])
def test_store_persistence_thread_policy_follows_config(tmp_path, idle) -> None:
    with Store([str(tmp_path)], background_idle=idle) as s:
        # the persistence pool's thread runs the save; ask it for its own policy the same way
        policy = s._executor.submit(os.sched_getscheduler, 0).result()
        s.save({"w": torch.ones(4)}, 1).result()
    assert (policy == os.SCHED_IDLE) == idle


def test_copy_thread_runs_idle() -> None:
    ex = ThreadCopyExecutor(idle=True)
    try:
        tid = ex._thread.native_id
        assert tid is not None
        deadline = time.monotonic() + 5  # the thread sets its policy first thing; give it the time to start
        while os.sched_getscheduler(tid) != os.SCHED_IDLE and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.sched_getscheduler(tid) == os.SCHED_IDLE
    finally:
        ex.close()
