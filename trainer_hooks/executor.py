"""Copy executors: where the copy ranges of a snapshot are copied into the host slot.

* :class:`ThreadCopyExecutor` (CPU-only machines): one copy thread; ``Tensor.copy_``
  releases the GIL, so training continues while it runs.
* :class:`CudaCopyExecutor` (GPU): a dedicated copy stream into pinned host buffers,
  ordered after the optimizer step that produced the state, one event per copy range.

Both implement :class:`asymstore.interfaces.CopyExecutor` (re-exported here with :class:`CopyRecord`) and
record per-range timings for telemetry and bandwidth measurement.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from asymstore.interfaces import CopyExecutor, CopyRecord
from asymstore.layout import Layout
from asymstore.snapshot import copy_range
from asymstore.threads import lower_thread_priority


class ThreadCopyExecutor(CopyExecutor):
    """One background copy thread (at a lower priority: ``nice``, ``SCHED_IDLE``); the barrier copies what it has
    not started."""

    def __init__(self, nice: int = 0, idle: bool = False) -> None:
        self._nice = nice
        self._idle = idle
        self._q: queue.Queue[CopyRecord | None] = queue.Queue()
        self._done = threading.Condition()
        self._pending = 0
        self._records: list[CopyRecord] = []
        self._error: BaseException | None = None
        self._buffer: torch.Tensor | None = None
        self._layout: Layout | None = None
        self._tensors: Mapping[str, torch.Tensor] = {}
        self._cursor = 0
        self._thread = threading.Thread(target=self._run, name="asymstore-copy", daemon=True)
        self._thread.start()

    def bind(self, buffer: torch.Tensor, layout: Layout, tensors: Mapping[str, torch.Tensor]) -> None:
        """Start a snapshot: copies go from ``tensors`` into ``buffer`` (waits for the previous one)."""
        self.drain()
        self._buffer, self._layout, self._tensors = buffer, layout, tensors
        self._records = []
        self._cursor = 0

    def _copy(self, rec: CopyRecord) -> None:
        assert self._buffer is not None and self._layout is not None
        rec.t_begin = time.perf_counter()
        # on the copy thread, beside training: one core; at the barrier training waits anyway: all cores
        background = threading.current_thread() is self._thread
        with torch.no_grad():
            copy_range(self._buffer, self._layout, self._tensors, rec.start, rec.end, single_threaded=background)
        rec.t_end = time.perf_counter()

    def _run(self) -> None:
        lower_thread_priority(self._nice, self._idle)
        while True:
            rec = self._q.get()
            if rec is None:
                return
            try:
                self._copy(rec)
            except BaseException as e:  # re-raised at the barrier
                self._error = e
            with self._done:
                self._pending -= 1
                self._done.notify_all()

    def submit(self, start: int, end: int, where: str) -> None:
        """Queue stream bytes ``[start, end)`` for the copy thread."""
        rec = CopyRecord(start, end, time.perf_counter(), where=where)
        self._records.append(rec)
        with self._done:
            self._pending += 1
        self._q.put(rec)

    def copy_now(self, start: int, end: int, where: str) -> None:
        """Copy stream bytes ``[start, end)`` now, in the caller."""
        rec = CopyRecord(start, end, time.perf_counter(), where=where)
        self._records.append(rec)
        self._copy(rec)

    def drain(self) -> list[CopyRecord]:
        # copy ranges the copy thread has not started yet are copied here, at full priority: a low-priority
        # copy thread must never make the barrier wait for the scheduler
        """Copy what the thread has not started, wait for the rest; returns the records (re-raises a copy error)."""
        while True:
            try:
                rec = self._q.get_nowait()
            except queue.Empty:
                break
            if rec is None:  # close() raced with drain(): keep the sentinel for the thread
                self._q.put(None)
                break
            rec.where = "step"
            try:
                self._copy(rec)
            except BaseException as e:
                self._error = e
            with self._done:
                self._pending -= 1
        with self._done:
            self._done.wait_for(lambda: self._pending == 0)
        if self._error is not None:
            err, self._error = self._error, None
            raise err
        return list(self._records)

    def close(self) -> None:
        """Stop the copy thread."""
        self._q.put(None)
        self._thread.join(timeout=5)


class CudaCopyExecutor(CopyExecutor):
    """Device-to-host copies on a dedicated stream; the compute stream never waits on the CPU."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device or torch.device("cuda", torch.cuda.current_device())
        self.stream = torch.cuda.Stream(device=self.device)  # type: ignore[no-untyped-call]
        self._records: list[tuple[CopyRecord, Any, Any]] = []
        self._buffer: torch.Tensor | None = None
        self._layout: Layout | None = None
        self._tensors: Mapping[str, torch.Tensor] = {}

    def bind(self, buffer: torch.Tensor, layout: Layout, tensors: Mapping[str, torch.Tensor]) -> None:
        # no drain: the previous snapshot's copies are ordered on the stream and awaited by its fence
        """Start a snapshot, ordered after the compute stream's work so far."""
        self._buffer, self._layout, self._tensors = buffer, layout, tensors
        self._records = []
        # copies must not start before the optimizer step that produced this state has run
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        for t in tensors.values():  # read by the copy stream: keep the caching allocator honest
            if t.is_cuda:
                t.record_stream(self.stream)

    def _issue(self, start: int, end: int, where: str, sync: bool) -> None:
        assert self._buffer is not None and self._layout is not None
        rec = CopyRecord(start, end, time.perf_counter(), where=where)
        begin = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        done = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
        with torch.cuda.stream(self.stream), torch.no_grad():
            begin.record(self.stream)
            copy_range(self._buffer, self._layout, self._tensors, start, end, non_blocking=True)
            done.record(self.stream)
        self._records.append((rec, begin, done))
        if sync:
            done.synchronize()

    def submit(self, start: int, end: int, where: str) -> None:
        """Queue the copy of stream bytes ``[start, end)`` on the copy stream."""
        self._issue(start, end, where, sync=False)

    def copy_now(self, start: int, end: int, where: str) -> None:
        """Copy stream bytes ``[start, end)`` on the copy stream and wait for it."""
        self._issue(start, end, where, sync=True)

    def barrier_on_device(self) -> None:
        """Make the compute stream wait for all copies (a GPU-side wait: no CPU stall)."""
        torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def fence(self) -> Callable[[], list[CopyRecord]]:
        """Close this snapshot's copies: the returned function (safe to call from another thread,
        after the executor has been bound to the next snapshot) waits for them and returns their records."""
        end = torch.cuda.Event()  # type: ignore[no-untyped-call]
        end.record(self.stream)
        records = list(self._records)

        def wait() -> list[CopyRecord]:
            end.synchronize()
            return _timed(records)

        return wait

    def drain(self) -> list[CopyRecord]:
        """Wait for every copy on the stream; returns the records with device times."""
        self.stream.synchronize()
        return _timed(self._records)


def _timed(records: list[tuple[CopyRecord, Any, Any]]) -> list[CopyRecord]:
    """Fill in device-measured copy times (the events have completed)."""
    out = []
    for rec, begin, done in records:
        ms = begin.elapsed_time(done)
        rec.t_begin = rec.t_submit
        rec.t_end = rec.t_submit + ms / 1000.0
        out.append(rec)
    return out


def make_executor(tensors: Mapping[str, torch.Tensor], *, nice: int = 0, idle: bool = False) -> CopyExecutor:
    """The executor for ``tensors``: CUDA when any is on a GPU, else a copy thread."""
    if any(t.is_cuda for t in tensors.values()):
        return CudaCopyExecutor()
    return ThreadCopyExecutor(nice=nice, idle=idle)


__all__ = ["CopyExecutor", "CopyRecord", "CudaCopyExecutor", "ThreadCopyExecutor", "make_executor"]
