"""Per-checkpoint telemetry and a Chrome-trace / Perfetto timeline."""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class CheckpointStats:
    """What one checkpoint cost the training: bytes, stall, hidden copy, persistence."""

    step: int
    strategy: str
    bytes: int = 0
    stall_s: float = 0.0  # time the optimizer step waited at the barrier
    begin_s: float = 0.0  # synchronous work when the snapshot began (state walk, volatile tensors)
    hidden_copy_s: float = 0.0  # copy time that ran inside forward/backward windows
    hidden_bytes: int = 0
    step_copy_bytes: int = 0  # bytes copied at the barrier (the remainder)
    persist_s: float | None = None
    stored_bytes: int | None = None
    codecs: dict[str, int] = field(default_factory=dict)
    skipped: bool = False
    error: str | None = None
    #: persisted on the first persistent tier (False: only in host memory so far, or failed)
    durable: bool = False

    def to_json(self) -> dict[str, Any]:
        """The statistics as a JSON object."""
        return asdict(self)


class Timeline:
    """Collects complete events ("X") in Chrome trace format; thread-safe."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self._events: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def add(self, name: str, cat: str, t_begin: float, t_end: float, track: str, /, **args: Any) -> None:
        """One event from ``t_begin`` to ``t_end`` (``time.perf_counter`` seconds) on ``track``."""
        if not self.enabled:
            return
        ev = {
            "name": name,
            "cat": cat,
            "ph": "X",
            "ts": (t_begin - self.t0) * 1e6,
            "dur": max(t_end - t_begin, 0.0) * 1e6,
            "pid": os.getpid(),
            "tid": track,
            "args": args,
        }
        with self._lock:
            self._events.append(ev)

    def events(self) -> list[dict[str, Any]]:
        """The events collected so far."""
        with self._lock:
            return list(self._events)

    def write(self, path: str) -> str:
        """Write a JSON file that chrome://tracing and ui.perfetto.dev open."""
        tracks = sorted({e["tid"] for e in self.events()})
        tid = {t: i for i, t in enumerate(tracks)}
        evs = [dict(e, tid=tid[e["tid"]]) for e in self.events()]
        meta = [
            {"name": "thread_name", "ph": "M", "pid": os.getpid(), "tid": i, "args": {"name": t}}
            for t, i in tid.items()
        ]
        with open(path, "w") as f:
            json.dump({"traceEvents": meta + evs, "displayTimeUnit": "ms"}, f)
        return path
