"""The tier manager: moves committed checkpoints down the tier chain and applies retention.

New snapshots are written from the host slot to the first persistent tier by the store's
persistence thread (:meth:`TierManager.persist_primary`). Each lower tier has its own
promotion thread that copies committed steps from the tier above (or straight from the
host slot while it is still there), in batches of that tier's B* bytes — one object per
batch — retrying with backoff when the tier is unreachable. Training never waits on a
promotion: a dead HDFS only delays the steps it has not received yet.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import CorruptCheckpointError
from .hostpool import HostPool
from .layout import Layout
from .retention import plan_deletions, promotion_wanted
from .threads import lower_thread_priority
from .tiers import PersistentTier
from .writer import ReaderSource, WriteReport

log = logging.getLogger("asymstore.tiers")


@dataclass
class TierActivity:
    in_flight: int | None = None
    promoted: int = 0
    deleted: int = 0
    errors: int = 0
    last_error: str | None = None
    last_partition_bytes: int | None = None
    retry_at: float = 0.0
    history: list[tuple[int, float, int]] = field(default_factory=list)  # (step, seconds, stored bytes)


class TierManager:
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

    # --- the first persistent tier -------------------------------------------------
    def persist_primary(
        self, step: int, stream: memoryview, layout: Layout, skeleton: Any, numpy_names: list[str], user: dict[str, Any]
    ) -> WriteReport:
        tier = self.tiers[0]
        act = self.activity[tier.name]
        act.in_flight = step
        try:
            with tier.lock:
                writer = tier.writer(layout.total_bytes)
                act.last_partition_bytes = writer.partition_bytes
                rep = writer.write(
                    step,
                    stream,
                    layout,
                    skeleton,
                    numpy_names=numpy_names,
                    user=user,
                    delta_base=tier.delta_for(layout.signature),
                    prefix=tier.shard_prefix(step),
                )
                tier.after_write(step, stream, layout.signature, rep.delta_base is not None)
            if tier.multi_rank and tier.config.rank == 0:
                tier.finalize(step)
            act.history.append((step, rep.seconds, rep.stored_bytes))
            del act.history[:-100]
        finally:
            act.in_flight = None
        self._mark(tier, step, True)
        try:
            self.apply_retention(0)
        except Exception as e:  # retention is housekeeping: it never fails a checkpoint
            log.warning("retention on %s failed: %s", tier.name, e)
        self.notify()
        return rep

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
        if dst.multi_rank and dst.config.rank > 0:  # a rank > 0 is done once its own shard is there
            todo = [s for s in todo if not dst.has_shard(s)]
        return sorted(todo, reverse=True)

    def _promoter(self, k: int) -> None:
        dst = self.tiers[k]
        lower_thread_priority(dst.config.background_nice, dst.config.background_idle)
        act = self.activity[dst.name]
        backoff = 0.5
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
                for step in todo[:1]:  # re-evaluate after each step: newer ones may have arrived
                    self.promote(k, step)
                    backoff = 0.5
                if todo:
                    self.apply_retention(k - 1)
                    self.apply_retention(k)
                    with self._cv:
                        self._cv.notify_all()  # more may be pending: loop without waiting
                    act.retry_at = 0.0
                    continue
            except Exception as e:  # unreachable tier, damaged source ...: retry later
                act.errors += 1
                act.last_error = f"{type(e).__name__}: {e}"
                act.retry_at = time.monotonic() + backoff
                log.warning("promotion to %s failed (%s); retrying in %.1f s", dst.name, act.last_error, backoff)
                backoff = min(backoff * 2, self.max_backoff_s)

    def promote(self, k: int, step: int) -> WriteReport:
        """Copy ``step`` from the fastest place that has it into tier ``k``."""
        dst = self.tiers[k]
        act = self.activity[dst.name]
        act.in_flight = step
        if dst.multi_rank and dst.has_shard(step):  # only the global marker is missing (rank 0)
            try:
                dst.finalize(step)
                self._mark(dst, step, True)
                return WriteReport(step, 0, 0, 0)
            finally:
                act.in_flight = None
        slot = self.host.lease(step)
        try:
            if slot is not None and slot.layout is not None:
                layout, skeleton, names, user = slot.layout, slot.skeleton, slot.numpy_names, slot.user
                source: Any = slot.memview()
            else:
                reader = self.tiers[k - 1].reader(step)
                m = reader.manifest
                layout, skeleton, names, user = m.layout, m.skeleton, m.numpy_names, m.user
                source = None
            with dst.lock:
                writer = dst.writer(layout.total_bytes)
                act.last_partition_bytes = writer.partition_bytes
                if source is None:
                    source = ReaderSource(reader, writer.partition_bytes)
                    delta = None
                else:
                    delta = dst.delta_for(layout.signature)
                rep = writer.write(
                    step,
                    source,
                    layout,
                    skeleton,
                    numpy_names=names,
                    user=user,
                    delta_base=delta,
                    prefix=dst.shard_prefix(step),
                )
                if isinstance(source, memoryview):
                    dst.after_write(step, source, layout.signature, rep.delta_base is not None)
            if dst.multi_rank and dst.config.rank == 0:
                dst.finalize(step)
            self._mark(dst, step, True)
            act.promoted += 1
            act.history.append((step, rep.seconds, rep.stored_bytes))
            del act.history[:-100]
            return rep
        finally:
            act.in_flight = None
            if slot is not None:
                self.host.unlease(slot)

    # --- retention ---------------------------------------------------------------
    def _commit(self, tier: PersistentTier, step: int) -> dict[str, Any]:
        key = (tier.name, step)
        if key not in self._commit_cache:
            self._commit_cache[key] = dict(tier.commit_info(step))
        return self._commit_cache[key]

    def apply_retention(self, j: int) -> list[int]:
        """Delete steps of tier ``j`` that its policies do not keep, unless deleting would lose data."""
        tier = self.tiers[j]
        steps = self.steps_of(tier)
        if not steps:
            return []
        try:
            sizes = {s: int(self._commit(tier, s).get("stored_bytes", 0)) for s in steps}
            protected: set[int] = set()
            durable_elsewhere = set()
            for t in self.tiers:
                if t is not tier and t.store.durable:
                    with self._known_lock:  # what is known; an unlisted tier protects everything
                        durable_elsewhere |= self._known.get(t.name, set())
            newest = max(steps)
            if newest not in durable_elsewhere:
                protected.add(newest)  # never delete the only complete copy of the newest step
            if j + 1 < len(self.tiers):
                protected |= set(self.pending(j + 1))  # still to be promoted from here
            keep_now = set(steps) - set(plan_deletions(steps, sizes, tier.policies, protected=protected))
            for s in list(keep_now):  # delta bases of kept steps stay
                base = self._commit(tier, s).get("delta_base")
                if isinstance(base, int):
                    protected.add(base)
            doomed = plan_deletions(steps, sizes, tier.policies, protected=protected)
        except CorruptCheckpointError as e:
            log.warning("retention on %s skipped: %s", tier.name, e)
            return []
        for s in doomed:
            self._mark(tier, s, False)
            tier.delete(s)
            self._commit_cache.pop((tier.name, s), None)
            self.activity[tier.name].deleted += 1
        return doomed

    # --- status and lifecycle ------------------------------------------------------
    def status(self) -> list[dict[str, Any]]:
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

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until no promotion is pending; False on timeout (see :meth:`status` for errors)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            busy = any(
                self.pending(k) or self.activity[t.name].in_flight is not None for k, t in enumerate(self.tiers) if k
            )
            if not busy:
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            self.notify()
            time.sleep(0.05)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for th in self._threads:
            th.join(timeout=60)
