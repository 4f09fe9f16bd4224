"""The tier manager: moves committed checkpoints down the tier chain and applies retention.

New snapshots are written from the host slot to the first persistent tier by the store's
persistence thread (:meth:`TierManager.persist_primary`). Each lower tier has its own
promotion thread that copies committed steps from the tier above (or straight from the
host slot while it is still there), in batches of that tier's B* bytes — one object per
batch — retrying with backoff when the tier is unreachable. Training never waits on a
promotion: a dead HDFS only delays the steps it has not received yet.

Both paths share one tail (:meth:`TierManager._write`): plan, write, finalize (multi-rank), mark, record
history, apply retention. They differ only in their source. What to delete is decided by
:func:`.retention.plan_retention`; this module only gathers what it needs, and deletes in the order it gives
(every delta before its base), each step un-committed first.

When a write runs out of space (``ENOSPC``, a quota) its partial files are already gone (the writer removes
them); the manager then lets retention make room as if the new step were there (:meth:`TierManager.make_room`:
only what the tier's policies would delete once the step is written, never the newest committed step) and
retries once. A write that still does not fit raises :class:`~asymstore.errors.TierFullError` naming the tier,
the path, the step and the bytes needed.

Each tier's crash leftovers are cleaned once when the manager starts (the first tier at once, the others on
their promotion threads, so a slow tier never delays opening): :func:`.cleanup.clean_leftovers`.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .cleanup import CleanReport
from .errors import AsymstoreError, CorruptCheckpointError, TierFullError
from .hostpool import HostPool
from .interfaces import StreamSource
from .manifest import commit_delta_bases, step_dir
from .retention import DeltaState, bases_of, plan_deletions, plan_retention, promotion_wanted
from .retry import Backoff, poll
from .threads import PriorityBooster
from .tiers import PersistentTier
from .write_plan import CheckpointContent
from .writer import ReaderSource, WriteReport
from .zarrfmt import ChunkCrcs

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
    made_room: int = 0  # steps retention deleted to make room for a write that ran out of space
    cleaned: CleanReport | None = None  # the crash leftovers removed when the manager started


_NO_SPACE_WORDS = ("no space left", "quota", "diskoutofspace", "out of space", "not enough space")


def no_space(e: BaseException | None) -> bool:
    """Whether ``e`` (or what caused it) says the storage is full (``ENOSPC``, ``EDQUOT``, an HDFS quota)."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(e, TierFullError):
            return True
        msg = str(e).lower()
        if any(w in msg for w in _NO_SPACE_WORDS):
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False


class TierManager:
    """Persists snapshots to the first tier, promotes them down the chain, applies retention."""

    def __init__(
        self,
        tiers: Sequence[PersistentTier],
        host: HostPool,
        *,
        max_backoff_s: float = 30.0,
        booster: PriorityBooster | None = None,
    ) -> None:
        self.tiers = list(tiers)
        self.host = host
        #: the promotion threads run at background priority, raised while someone waits on them (flush)
        cfg = self.tiers[0].config if self.tiers else None
        self.booster = booster or PriorityBooster(
            cfg.background_nice if cfg else 0, cfg.background_idle if cfg else False
        )
        self.activity = {t.name: TierActivity() for t in self.tiers}
        self.max_backoff_s = max_backoff_s
        self._cv = threading.Condition()
        self._closed = False
        self._commit_cache: dict[tuple[str, int], dict[str, Any]] = {}
        # committed steps per tier as this manager knows them: listing a slow tier happens only on
        # its own promotion thread, never on the persistence path of the first tier
        self._known: dict[str, set[int]] = {}
        self._known_lock = threading.Lock()
        # on a rank > 0 of a multi-rank tier: steps whose rank directory this rank wrote, by the time after which
        # it stops waiting for rank 0's global marker. Rank 0 commits them, so this rank's known steps of that
        # tier go stale: the next tier's promotion thread lists the tier again while any is awaited
        self._awaiting: dict[str, dict[int, float]] = {t.name: {} for t in self.tiers}
        self._clean_done = {t.name: threading.Event() for t in self.tiers}
        if self.tiers:
            self._clean(0)
        self._threads = [
            threading.Thread(target=self._promoter, args=(k,), daemon=True, name=f"asymstore-promote-{t.name}")
            for k, t in enumerate(self.tiers)
            if k > 0
        ]
        for th in self._threads:
            th.start()

    # --- writing: one path for the first tier and for promotions ---------------------------------
    def persist_primary(
        self, step: int, stream: memoryview, content: CheckpointContent, crcs: ChunkCrcs | None = None
    ) -> WriteReport:
        """Write a snapshot from its host slot (``stream``; ``crcs``: its chunk checksums if sealed) to the first
        persistent tier."""
        return self._write(0, step, stream, content, crcs)

    def finalize(self, k: int, step: int) -> WriteReport:
        """Rank 0: this rank's part of ``step`` is committed on tier ``k``, only the step's marker is missing
        (an earlier process died waiting for the other ranks' parts): write it once theirs are there."""
        dst = self.tiers[k]
        act = self.activity[dst.name]
        act.in_flight = step
        try:
            dst.finalize(step)
            self._mark(dst, step, True)
        finally:
            act.in_flight = None
        self._housekeep(k)
        return WriteReport(step, 0, 0, 0)

    def promote(self, k: int, step: int) -> WriteReport:
        """Copy ``step`` from the fastest place that has it (its host slot, else tier ``k-1``) into tier ``k``."""
        dst = self.tiers[k]
        if dst.multi_rank and dst.rank_committed(step):  # only the global marker is missing (rank 0)
            return self.finalize(k, step)
        slot = self.host.lease(step)
        try:
            if slot is not None and slot.content is not None:
                return self._write(k, step, slot.memview(), slot.content, slot.stream_crcs())
            reader = self.tiers[k - 1].reader(step)
            content = CheckpointContent.of_manifest(reader.manifest)
            return self._write(k, step, lambda max_range: ReaderSource(reader, max_range), content)
        finally:
            if slot is not None:
                self.host.unlease(slot)

    def _write_once(
        self, tier: PersistentTier, step: int, source: Source, content: CheckpointContent, crcs: ChunkCrcs | None
    ) -> WriteReport:
        act = self.activity[tier.name]
        with tier.lock:
            whole = isinstance(source, memoryview)
            plan = tier.plan(step, content.layout, whole_stream=whole)
            act.last_partition_bytes = plan.partition_bytes
            stream = source if isinstance(source, memoryview) else source(plan.partition_bytes)
            rep = tier.writer().write(plan, stream, content, delta_base=tier.delta_base(plan), crcs=crcs)
            if isinstance(stream, memoryview):
                tier.after_write(plan, stream, content.layout.signature, rep)
        return rep

    def _write_with_room(
        self, k: int, step: int, source: Source, content: CheckpointContent, crcs: ChunkCrcs | None
    ) -> WriteReport:
        """One write; when it runs out of space, let retention make room and retry it once."""
        tier = self.tiers[k]
        try:
            return self._write_once(tier, step, source, content, crcs)
        except Exception as e:
            if not no_space(e):
                raise
            first = e
        try:
            freed = self.make_room(k, step, content.layout.total_bytes)
        except AsymstoreError as e:
            log.warning("retention could not make room on %s: %s", tier.name, e)
            freed = []
        if not freed:
            raise self._full_error(tier, step, content, first, freed) from first
        log.warning(
            "tier %s ran out of space writing step %s; retention deleted steps %s to make room, retrying",
            tier.name,
            step,
            freed,
        )
        try:
            return self._write_once(tier, step, source, content, crcs)
        except Exception as e:
            if no_space(e):
                raise self._full_error(tier, step, content, e, freed) from e
            raise

    @staticmethod
    def _full_error(
        tier: PersistentTier, step: int, content: CheckpointContent, err: BaseException, freed: Sequence[int]
    ) -> TierFullError:
        where = f"{tier.url.rstrip('/')}/{step_dir(step)}"
        root = getattr(tier.backend, "root", None)
        free = ""
        if isinstance(root, str) and os.path.isdir(root):
            free = f", {shutil.disk_usage(root).free} bytes free"
        need = content.layout.total_bytes
        made = (
            f"retention deleted steps {list(freed)} and the retry failed too"
            if freed
            else ("retention may delete no step (its keep= policies keep every one)")
        )
        code = err.errno if isinstance(err, OSError) and err.errno else errno.ENOSPC
        return TierFullError(
            f"tier {tier.name} is full: step {step} needs up to {need} bytes at {where}{free}; {made} "
            f"({type(err).__name__}: {err}). Free space there, keep fewer steps (keep=) or compress.",
            errno=code,
        )

    def make_room(self, k: int, step: int, nbytes: int) -> list[int]:
        """Delete the steps of tier ``k`` that its policies would delete once ``step`` (``nbytes``) is written;
        returns them. The newest committed step, the tier's delta base and what lower tiers still need stay."""
        tier = self.tiers[k]
        steps = self.steps_of(tier)
        if not steps:
            return []
        commits = {s: self._commit(tier, s) for s in steps}
        bases: dict[int, list[int]] = {s: commit_delta_bases(c) for s, c in commits.items()}
        sizes = {s: int(c.get("stored_bytes", 0)) for s, c in commits.items()}
        base = tier.delta_state.base_step
        bases[step] = [base] if base is not None else []
        sizes[step] = nbytes
        protected = {max(steps)} | ({base} if base is not None else set())
        doomed = plan_retention(
            sorted(set(steps) | {step}),
            sizes,
            tier.policies,
            delta_bases=bases,
            durable_elsewhere=self._durable_elsewhere(tier),
            pending=self.pending(k + 1) if k + 1 < len(self.tiers) else (),
            protected=protected,
        )
        out = []
        for s in doomed:
            if s == step:
                continue
            self.delete(tier, s)
            self.activity[tier.name].deleted += 1
            self.activity[tier.name].made_room += 1
            out.append(s)
        return out

    def _write(
        self, k: int, step: int, source: Source, content: CheckpointContent, crcs: ChunkCrcs | None = None
    ) -> WriteReport:
        """Plan, write (making room once if the tier is full), finalize (multi-rank), mark, record history,
        apply retention."""
        tier = self.tiers[k]
        act = self.activity[tier.name]
        act.in_flight = step
        try:
            rep = self._write_with_room(k, step, source, content, crcs)
            if tier.multi_rank and tier.config.rank == 0:
                tier.finalize(step)
            elif tier.multi_rank and k + 1 < len(self.tiers):
                with self._known_lock:
                    self._awaiting[tier.name][step] = time.monotonic() + 2 * tier.config.commit_timeout_s
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

    def known_steps(self, tier: PersistentTier) -> list[int] | None:
        """The committed steps of ``tier`` as this manager knows them, without asking the tier (``None``: never
        listed yet)."""
        with self._known_lock:
            known = self._known.get(tier.name)
            return None if known is None else sorted(known)

    def _mark(self, tier: PersistentTier, step: int, present: bool) -> None:
        with self._known_lock:
            known = self._known.get(tier.name)
            if known is not None:
                (known.add if present else known.discard)(step)

    def _confirm(self, k: int) -> None:
        """List tier ``k`` again while this rank (> 0) awaits rank 0's global marker of a step it wrote there."""
        tier = self.tiers[k]
        with self._known_lock:
            awaited = self._awaiting[tier.name]
            now = time.monotonic()
            for s in [s for s, until in awaited.items() if until < now]:
                del awaited[s]  # rank 0 never committed it (its step failed): stop listing for it
            if not awaited:
                return
        listed = set(self.steps_of(tier, refresh=True))
        with self._known_lock:
            for s in listed & set(awaited):
                del awaited[s]

    def notify(self) -> None:
        """Wake the promotion threads (a new step may be pending)."""
        with self._cv:
            self._cv.notify_all()

    def _pending_known(self, k: int) -> list[int]:
        """:meth:`pending` from what is known of the tiers, asking neither (a status report never waits on a
        frozen tier); ``[]`` until both were listed once."""
        if self.known_steps(self.tiers[k]) is None or self.known_steps(self.tiers[k - 1]) is None:
            return []
        return self.pending(k)

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
        # never a step the tier's retention would delete as soon as it arrived (it holds enough newer ones):
        # promoting it would loop, copying and deleting it again and again
        todo = [s for s in todo if s not in plan_deletions(sorted(have | {s}), {}, dst.policies)]
        if dst.multi_rank and dst.config.rank > 0:  # a rank > 0 is done once its own rank directory is committed
            todo = [s for s in todo if not dst.rank_committed(s)]
        return sorted(todo, reverse=True)

    # --- crash leftovers ---------------------------------------------------------
    def _clean(self, k: int) -> None:
        tier = self.tiers[k]
        try:
            self.activity[tier.name].cleaned = tier.clean_leftovers()
        except Exception as e:  # an unreachable tier: its leftovers wait for the next open
            log.warning("tier %s: crash leftovers not cleaned (%s)", tier.name, e)
        finally:
            self._clean_done[tier.name].set()

    def wait_cleaned(self, timeout: float | None = None) -> bool:
        """Wait until every tier's start-up clean-up of crash leftovers ran; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for ev in self._clean_done.values():
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if not ev.wait(left):
                return False
        return True

    def _promoter(self, k: int) -> None:
        dst = self.tiers[k]
        self.booster.enter()
        self._clean(k)
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
                self._confirm(k - 1)
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
            base = tier.delta_state.base_step  # later writes are encoded against it
            doomed = plan_retention(
                steps,
                {s: int(c.get("stored_bytes", 0)) for s, c in commits.items()},
                tier.policies,
                delta_bases=bases,
                durable_elsewhere=self._durable_elsewhere(tier),
                pending=self.pending(j + 1) if j + 1 < len(self.tiers) else (),
                protected=() if base is None else (base,),
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
        promotion copies it and a later step of the same number is read afresh.

        Refused (:class:`~asymstore.errors.AsymstoreError`) while a committed step of the tier is a delta of it;
        the check and the delete hold the tier's write lock, so no delta against it is being written either.
        A deleted delta base is no longer offered to later writes.
        """
        with tier.lock:
            with self._known_lock:
                known = set(self._known.get(tier.name, set()))
            deps = []
            for s in sorted(known - {step}):
                try:
                    if step in bases_of(commit_delta_bases(self._commit(tier, s))):
                        deps.append(s)
                except CorruptCheckpointError:
                    continue
            if deps:
                raise AsymstoreError(
                    f"step {step} is the delta base of steps {deps} on {tier.name}; delete those first"
                )
            if tier.delta_state.base_step == step:
                tier.delta_state = DeltaState()
                tier.delta = None
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
                    "pending": self._pending_known(k) if k else [],
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
                    "made_room": act.made_room,
                    "keep": [repr(p) for p in t.policies],
                }
            )
        return out

    def _idle(self) -> bool | None:
        with self._known_lock:  # a step awaiting rank 0's marker on tier k-1 may still be pending for tier k
            awaited = any(self._awaiting[t.name] for t in self.tiers[:-1])
        busy = awaited or any(
            self.pending(k) or self.activity[t.name].in_flight is not None for k, t in enumerate(self.tiers) if k
        )
        if not busy:
            return True
        self.notify()
        return None

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until no promotion is pending; False on timeout (see :meth:`status` for errors)."""
        wait_s = math.inf if timeout is None else timeout
        with self.booster.boosted():  # a waited-on promotion runs at the waiter's priority
            return poll(self._idle, timeout_s=wait_s, backoff=Backoff(initial_s=0.05, max_s=0.05)) is not None

    def close(self) -> None:
        """Stop the promotion threads (pending promotions stay pending)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for th in self._threads:
            th.join(timeout=60)
