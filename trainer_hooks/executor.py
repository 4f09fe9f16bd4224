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
from asymstore.threads import PriorityBooster

#: the copy thread copies a range in pieces of this size, claimed from the range's cursor: the barrier takes over
#: every piece not started and waits for at most one piece in flight
PIECE_BYTES = 1 << 20


class _Range:
    """A submitted copy range and its cursor: ``[rec.start, next)`` claimed, ``inflight`` pieces being copied."""

    def __init__(self, rec: CopyRecord) -> None:
        self.rec = rec
        self.next = rec.start
        self.inflight = 0
        self.started = False


class ThreadCopyExecutor(CopyExecutor):
    """One background copy thread (at a lower priority: ``nice``, ``SCHED_IDLE``).

    The thread copies each range piece by piece from a shared cursor. The barrier (``drain``) copies at
    training's priority every piece no one has started, and while it waits for the pieces in flight the copy
    thread runs at normal priority: a starved idle-priority thread can delay the barrier by one piece at most.
    """

    def __init__(self, nice: int = 0, idle: bool = False, *, piece_bytes: int = PIECE_BYTES) -> None:
        self.piece_bytes = piece_bytes
        self.booster = PriorityBooster(nice, idle)
        self._q: queue.Queue[_Range | None] = queue.Queue()
        self._lock = threading.Condition()
        self._open: list[_Range] = []  # submitted and not finished, in order
        self._records: list[CopyRecord] = []
        self._error: BaseException | None = None
        self._buffer: torch.Tensor | None = None
        self._layout: Layout | None = None
        self._tensors: Mapping[str, torch.Tensor] = {}
        self._thread = threading.Thread(target=self._run, name="asymstore-copy", daemon=True)
        self._thread.start()

    def bind(self, buffer: torch.Tensor, layout: Layout, tensors: Mapping[str, torch.Tensor]) -> None:
        """Start a snapshot: copies go from ``tensors`` into ``buffer`` (waits for the previous one)."""
        self.drain()
        self._buffer, self._layout, self._tensors = buffer, layout, tensors
        self._records = []

    @property
    def pending(self) -> int:
        """Ranges submitted and not completely copied yet."""
        with self._lock:
            return len(self._open)

    def _copy_bytes(self, start: int, end: int, *, background: bool) -> None:
        assert self._buffer is not None and self._layout is not None
        # on the copy thread, beside training: one core; at the barrier training waits anyway: all cores
        with torch.no_grad():
            copy_range(self._buffer, self._layout, self._tensors, start, end, single_threaded=background)

    def _copy(self, rec: CopyRecord) -> None:
        rec.t_begin = time.perf_counter()
        self._copy_bytes(rec.start, rec.end, background=False)
        rec.t_end = time.perf_counter()

    def _claim(self, r: _Range) -> tuple[int, int] | None:
        """The next piece of ``r`` for the copy thread (under the lock), or None when all are claimed."""
        if r.next >= r.rec.end:
            return None
        a, b = r.next, min(r.next + self.piece_bytes, r.rec.end)
        r.next = b
        r.inflight += 1
        if not r.started:
            r.started, r.rec.t_begin = True, time.perf_counter()
        return a, b

    def _finish_if_done(self, r: _Range) -> None:
        if r.next >= r.rec.end and r.inflight == 0 and r in self._open:
            r.rec.t_end = r.rec.t_end or time.perf_counter()
            self._open.remove(r)
            self._lock.notify_all()

    def _run(self) -> None:
        self.booster.enter()
        try:
            while True:
                r = self._q.get()
                if r is None:
                    return
                while True:
                    with self._lock:
                        piece = self._claim(r)
                        if piece is None:
                            self._finish_if_done(r)
                            break
                    try:
                        self._copy_bytes(*piece, background=True)
                    except BaseException as e:  # re-raised at the barrier
                        self._error = e
                    with self._lock:
                        r.inflight -= 1
                        if r.next >= r.rec.end and r.inflight == 0:
                            r.rec.t_end = time.perf_counter()
                        self._finish_if_done(r)
        finally:
            self.booster.leave()

    def submit(self, start: int, end: int, where: str) -> None:
        """Queue stream bytes ``[start, end)`` for the copy thread."""
        rec = CopyRecord(start, end, time.perf_counter(), where=where)
        r = _Range(rec)
        with self._lock:
            self._records.append(rec)
            self._open.append(r)
        self._q.put(r)

    def copy_now(self, start: int, end: int, where: str) -> None:
        """Copy stream bytes ``[start, end)`` now, in the caller."""
        rec = CopyRecord(start, end, time.perf_counter(), where=where)
        self._records.append(rec)
        self._copy(rec)

    def drain(self) -> list[CopyRecord]:
        """Copy every piece not started yet here, at training's priority (a range the copy thread had begun
        is split: its record ends where the barrier took over, and a ``"step"`` record covers the rest); wait
        for the pieces in flight with the copy thread boosted. Returns the records (re-raises a copy error)."""
        with self._lock:
            todo = []
            for r in list(self._open):
                if r.next >= r.rec.end:
                    continue
                a, b = r.next, r.rec.end
                r.next = b
                if r.started:
                    r.rec.end = a  # what the thread copied (or is copying) of it
                    rec = CopyRecord(a, b, time.perf_counter(), where="step")
                    self._records.append(rec)
                else:
                    r.started, rec = True, r.rec
                    rec.where = "step"
                todo.append((r, rec))
        for r, rec in todo:
            try:
                self._copy(rec)
            except BaseException as e:
                self._error = e
            with self._lock:
                if rec is r.rec or r.inflight == 0:
                    r.rec.t_end = r.rec.t_end or time.perf_counter()
                self._finish_if_done(r)
        with self._lock:
            if self._open:
                with self.booster.boosted():
                    self._lock.wait_for(lambda: not self._open)
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
