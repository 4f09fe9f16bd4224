"""Helpers for asymstore's background threads."""

from __future__ import annotations

import os
import threading


def lower_thread_priority(nice: int, idle: bool = False) -> None:
    """Lower the calling thread's priority (Linux: per thread), so training threads win the cores.

    ``idle``: the ``SCHED_IDLE`` policy: the thread runs only on a core that training leaves idle, and a
    training thread that wakes up takes its core back at once. On CPU training this matters more than the
    background work's own CPU time: a training thread preempted inside a parallel region keeps its sibling
    threads spinning at the region's end, so every millisecond taken from it costs several. ``nice``: raise
    the nice value by that much (a smaller share of a contended core, but it still preempts).

    Best effort: does nothing where per-thread policies are not available.
    """
    if idle and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: the calling thread (Linux)
        except (OSError, AttributeError):
            pass
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(os.getpriority(os.PRIO_PROCESS, tid) + nice, 19))
    except (OSError, AttributeError):
        pass
