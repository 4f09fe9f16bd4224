"""Helpers for asymstore's background threads."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator


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


class PriorityBooster:
    """Background threads that run at a low priority (``nice``, ``SCHED_IDLE``) and are raised to normal
    priority while the training thread waits on them, so that a waiter is never held up by the scheduler
    giving an idle-priority thread no core (priority inversion on busy nodes).

    Each background thread calls :meth:`enter` first (it lowers itself and registers); a waiter wraps its wait
    in ``with booster.boosted():``. Nested and concurrent boosts are counted; the last one out lowers the
    threads again. Best effort: on systems without per-thread scheduling this only counts.
    """

    def __init__(self, nice: int = 0, idle: bool = False) -> None:
        self.nice, self.idle = nice, idle
        self._tids: set[int] = set()
        self._depth = 0
        self._lock = threading.Lock()
        #: how often a wait had to raise the threads (for status and tests)
        self.boosts = 0

    def enter(self) -> None:
        """Called on a background thread: lower it and register it for boosts."""
        lower_thread_priority(self.nice, self.idle)
        with self._lock:
            self._tids.add(threading.get_native_id())
            if self._depth:
                _set_normal(threading.get_native_id())

    def leave(self) -> None:
        """Called on a background thread before it ends."""
        with self._lock:
            self._tids.discard(threading.get_native_id())

    @contextlib.contextmanager
    def boosted(self) -> Iterator[None]:
        """Run the registered threads at normal priority for the duration of the block."""
        with self._lock:
            self._depth += 1
            if self._depth == 1:
                self.boosts += 1
                for tid in self._tids:
                    _set_normal(tid)
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    for tid in self._tids:
                        _set_low(tid, self.nice, self.idle)


def _set_normal(tid: int) -> None:
    try:
        if hasattr(os, "SCHED_OTHER"):
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
        if hasattr(os, "setpriority"):
            os.setpriority(os.PRIO_PROCESS, tid, 0)
    except (OSError, AttributeError):
        pass


def _set_low(tid: int, nice: int, idle: bool) -> None:
    try:
        if idle and hasattr(os, "SCHED_IDLE"):
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        if nice > 0 and hasattr(os, "setpriority"):
            os.setpriority(os.PRIO_PROCESS, tid, min(nice, 19))
    except (OSError, AttributeError):
        pass
