"""The tier manager: moves committed checkpoints down the tier chain and applies retention.

New snapshots are written from the host slot to the first persistent tier by the store's
persistence thread (:meth:`TierManager.persist_primary`). Each lower tier has its own
promotion thread that copies committed steps from the tier above (or straight from the
host slot while it is still there), in batches of that tier's B* bytes — one object per
batch — retrying with backoff when the tier is unreachable. Training never waits on a
promotion: a dead HDFS only delays the steps it has not received yet.

Both paths share one tail (:meth:`TierManager._write`): plan, write, finalize (multi-rank), mark, record
history, apply retention. They differ only in their source. What to delete is decided by
:func:`.retention.plan_retention`; this module only gathers what it needs.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import CorruptCheckpointError
from .hostpool import HostPool
from .interfaces import StreamSource
from .manifest import commit_delta_bases
from .retention import plan_retention, promotion_wanted
from .retry import Backoff, poll
from .threads import lower_thread_priority
from .tiers import PersistentTier
from .write_plan import CheckpointContent
from .writer import ReaderSource, WriteReport

log = logging.getLogger("asymstore.tiers")

#: a write's source: the whole stream (a host slot), or a factory of a range source given the range size
Source = memoryview | Callable[[int], StreamSource]


@dataclass
class TierActivity:
    """What a tier's writers did: the step in flight, counts, the last error and recent write history."""

    in_flight: int | None = None
    promoted: int = 0
    deleted: int = 0
    errors: int = 0
    last_error: str | None = None
    last_partition_bytes: int | None = None
    retry_at: float = 0.0
    history: list[tuple[int, float, int]] = field(default_factory=list)  # (step, seconds, stored bytes)


class TierManager:
    """Persists snapshots to the first tier, promotes them down the chain, applies retention."""

    def __init__(self, tiers: Sequence[PersistentTier], host: HostPool, *, max_backoff_s: float = 30.0) -> None:
        self.tiers = list(tiers)
        self.host = host
        self.activity = {t.name: TierActivity() for t in self.tiers}
        self.max_backoff_s = max_backoff_s
        self._cv = threading.Condition()
        self._closed = False
        self._commit_cache: dict[tuple[str, int], dict[str, Any]] = {}
        # committed steps per tier as this manager knows them: listing a slow tier happens only on
        # its own promotion thread, never on the persistence path of the first tier
        self._known: dict[str, set[int]] = {}
        self._known_lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._promoter, args=(k,), daemon=True, name=f"asymstore-promote-{t.name}")
            for k, t in enumerate(self.tiers)
            if k > 0
        ]
        for th in self._threads:
            th.start()

    # --- writing: one path for the first tier and for promotions ---------------------------------
    def persist_primary(self, step: int, stream: memoryview, content: CheckpointContent) -> WriteReport:
        """Write a snapshot from its host slot (``stream``) to the first persistent tier."""
        return self._write(0, step, stream, content)

    def promote(self, k: int, step: int) -> WriteReport:
        """Copy ``step`` from the fastest place that has it (its host slot, else tier ``k-1``) into tier ``k``."""
        dst = self.tiers[k]
        if dst.multi_rank and dst.rank_committed(step):  # only the global marker is missing (rank 0)
            act = self.activity[dst.name]
            act.in_flight = step
            try:
                dst.finalize(step)
                self._mark(dst, step, True)
            finally:
                act.in_flight = None
            self._housekeep(k)
            return WriteReport(step, 0, 0, 0)
        slot = self.host.lease(step)
        try:
            if slot is not None and slot.content is not None:
                return self._write(k, step, slot.memview(), slot.content)
            reader = self.tiers[k - 1].reader(step)
            content = CheckpointContent.of_manifest(reader.manifest)
            return self._write(k, step, lambda max_range: ReaderSource(reader, max_range), content)
        finally:
            if slot is not None:
                self.host.unlease(slot)

    def _write(self, k: int, step: int, source: Source, content: CheckpointContent) -> WriteReport:
        """Plan, write, finalize (multi-rank), mark, record history, apply retention."""
        tier = self.tiers[k]
        act = self.activity[tier.name]
        act.in_flight = step
        try:
            with tier.lock:
                whole = isinstance(source, memoryview)
                plan = tier.plan(step, content.layout, whole_stream=whole)
                act.last_partition_bytes = plan.partition_bytes
                stream = source if isinstance(source, memoryview) else source(plan.partition_bytes)
                rep = tier.writer().write(plan, stream, content, delta_base=tier.delta_base(plan))
                if isinstance(stream, memoryview):
                    tier.after_write(plan, stream, content.layout.signature, rep)
            if tier.multi_rank and tier.config.rank == 0:
                tier.finalize(step)
            self._mark(tier, step, True)
            if k:
                act.promoted += 1
            act.history.append((step, rep.seconds, rep.stored_bytes))
            del act.history[:-100]
        finally:
            act.in_flight = None
        self._housekeep(k)
        return rep

    def _housekeep(self, k: int) -> None:
        """Retention on tier ``k`` and on its source tier (which may now let go of what ``k`` received)."""
        for j in (k - 1, k) if k else (0,):
            try:
                self.apply_retention(j)
            except Exception as e:  # retention is housekeeping: it never fails a checkpoint
                log.warning("retention on %s failed: %s", self.tiers[j].name, e)
        self.notify()

    # --- what each tier holds ------------------------------------------------------
    def steps_of(self, tier: PersistentTier, *, refresh: bool = False) -> list[int]:
        """Committed steps of ``tier``: listed once (or on ``refresh``), then kept current."""
        with self._known_lock:
            known = self._known.get(tier.name)
        if known is None or refresh:
            listed = set(tier.committed_steps())
            with self._known_lock:
                self._known[tier.name] = known = listed
        return sorted(known)

    def _mark(self, tier: PersistentTier, step: int, present: bool) -> None:
        with self._known_lock:
            known = self._known.get(tier.name)
            if known is not None:
                (known.add if present else known.discard)(step)

    def notify(self) -> None:
        """Wake the promotion threads (a new step may be pending)."""
        with self._cv:
            self._cv.notify_all()

    # --- promotion ---------------------------------------------------------------
    def pending(self, k: int) -> list[int]:
        """Steps complete on tier k-1 that tier k should receive, newest first."""
        src, dst = self.tiers[k - 1], self.tiers[k]
        have = set(self.steps_of(dst))
        steps = self.steps_of(src)
        if not steps:
            return []
        n = len(steps)
        todo = [s for i, s in enumerate(steps) if s not in have and promotion_wanted(dst.policies, s, age=n - 1 - i)]
        if dst.multi_rank and dst.config.rank > 0:  # a rank > 0 is done once its own rank directory is committed
            todo = [s for s in todo if not dst.rank_committed(s)]
        return sorted(todo, reverse=True)

    def _promoter(self, k: int) -> None:
        dst = self.tiers[k]
        lower_thread_priority(dst.config.background_nice, dst.config.background_idle)
        act = self.activity[dst.name]
        backoff = Backoff(initial_s=0.5, max_s=self.max_backoff_s)
        while True:
            with self._cv:
                if self._closed:
                    return
                delay = act.retry_at - time.monotonic()
                self._cv.wait(timeout=max(delay, 0.0) if delay > 0 else 1.0)
                if self._closed:
                    return
                if time.monotonic() < act.retry_at:
                    continue
            try:
                self.steps_of(dst, refresh=True)  # this thread owns the (possibly slow) listing
                todo = self.pending(k)
                if todo:  # one at a time, then re-evaluate: newer ones may have arrived
                    self.promote(k, todo[0])
                    backoff.reset()
                    act.retry_at = 0.0
                    self.notify()  # more may be pending: loop without waiting
            except Exception as e:  # unreachable tier, damaged source ...: retry later
                wait_s = backoff.next()
                act.errors += 1
                act.last_error = f"{type(e).__name__}: {e}"
                act.retry_at = time.monotonic() + wait_s
                log.warning("promotion to %s failed (%s); retrying in %.1f s", dst.name, act.last_error, wait_s)

    # --- retention ---------------------------------------------------------------
    def _commit(self, tier: PersistentTier, step: int) -> dict[str, Any]:
        key = (tier.name, step)
        if key not in self._commit_cache:
            self._commit_cache[key] = dict(tier.commit_info(step))
        return self._commit_cache[key]

    def _durable_elsewhere(self, tier: PersistentTier) -> set[int]:
        out: set[int] = set()
        for t in self.tiers:
            if t is not tier and t.backend.durable:
                with self._known_lock:  # what is known; an unlisted tier protects everything
                    out |= self._known.get(t.name, set())
        return out

    def apply_retention(self, j: int) -> list[int]:
        """Delete the steps of tier ``j`` that :func:`.retention.plan_retention` lets go; returns them."""
        tier = self.tiers[j]
        steps = self.steps_of(tier)
        if not steps:
            return []
        try:
            commits = {s: self._commit(tier, s) for s in steps}
            bases = {s: commit_delta_bases(c) for s, c in commits.items()}
            doomed = plan_retention(
                steps,
                {s: int(c.get("stored_bytes", 0)) for s, c in commits.items()},
                tier.policies,
                delta_bases=bases,
                durable_elsewhere=self._durable_elsewhere(tier),
                pending=self.pending(j + 1) if j + 1 < len(self.tiers) else (),
            )
        except CorruptCheckpointError as e:
            log.warning("retention on %s skipped: %s", tier.name, e)
            return []
        for s in doomed:
            self.delete(tier, s)
            self.activity[tier.name].deleted += 1
        return doomed

    def delete(self, tier: PersistentTier, step: int) -> None:
        """Delete ``step`` from ``tier`` and forget it (the known steps and the cached commit marker), so no
        promotion copies it and a later step of the same number is read afresh."""
        self._mark(tier, step, False)
        tier.delete(step)
        self._commit_cache.pop((tier.name, step), None)

    # --- status and lifecycle ------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
        """Per tier: known steps, pending and in-flight promotions, write measurements, counts, last error."""
        out = []
        for k, t in enumerate(self.tiers):
            act = self.activity[t.name]
            st = t.stats
            with self._known_lock:
                known = sorted(self._known.get(t.name, set()))
            out.append(
                {
                    "name": t.name,
                    "url": t.url,
                    "steps": known,
                    "pending": self.pending(k) if k else [],
                    "in_flight": act.in_flight,
                    "bytes_written": st.bytes_written,
                    "writes": st.writes,
                    "throughput": st.throughput,
                    "latency_s": st.latency_s,
                    "bandwidth": st.bandwidth,
                    "partition_bytes": act.last_partition_bytes,
                    "promoted": act.promoted,
                    "deleted": act.deleted,
                    "errors": act.errors,
                    "last_error": act.last_error,
                    "keep": [repr(p) for p in t.policies],
                }
            )
        return out

    def _idle(self) -> bool | None:
        busy = any(
            self.pending(k) or self.activity[t.name].in_flight is not None for k, t in enumerate(self.tiers) if k
        )
        if not busy:
            return True
        self.notify()
        return None

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until no promotion is pending; False on timeout (see :meth:`status` for errors)."""
        wait_s = math.inf if timeout is None else timeout
        return poll(self._idle, timeout_s=wait_s, backoff=Backoff(initial_s=0.05, max_s=0.05)) is not None

    def close(self) -> None:
        """Stop the promotion threads (pending promotions stay pending)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for th in self._threads:
            th.join(timeout=60)
