"""The asymstore API: a host snapshot tier followed by persistent tiers.

``save`` copies the state into a host slot (the snapshot) and persists it to every
persistent tier in the background; ``restore`` reads the newest complete checkpoint from
the fastest tier that has it, verified, falling back tier by tier and step by step.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import torch

from asymstore.backends.base import ObjectStore

from . import catalog, dtypes, excp, validate
from .config import Config
from .errors import (
    AsymstoreError,
    CheckpointFailedError,
    ConfigError,
    CorruptCheckpointError,
    HostMemoryError,
    SnapshotSlotsBusyError,
    StateMismatchError,
    StepExistsError,
    StepNotFoundError,
)
from .hostpool import HostPool, Slot, cuda_available
from .interfaces import RangeSource, RetentionPolicy
from .layout import Layout, plan_layout
from .lazy import LazyCheckpoint
from .manifest import Manifest
from .reader import CheckpointReader, VerifyReport
from .replica import Rendezvous, ReplicaService, default_rendezvous
from .shm import VERIFY_CHUNK, ShmError, ShmRegion, ShmRegionBusyError, default_job, region_bytes
from .snapshot import copy_all, dest_view, host_copy, new_host_buffer
from .state import FlatState, flatten, unflatten
from .threads import PriorityBooster
from .tiermanager import TierManager
from .tiers import PersistentTier
from .write_plan import CheckpointContent
from .writer import WriteReport
from .zarrfmt import ChunkCrcs, StreamingCrcs

log = logging.getLogger("asymstore")

#: a step's stream, what describes it, and the function to call when done with it
#: (and the names of in-place targets already filled while an adopted host slot was verified)
_Stream = tuple[torch.Tensor, Manifest | Slot | CheckpointContent, Callable[[], None], frozenset[str]]
NameFilter = Iterable[str] | Callable[[str], bool] | None


@dataclass(frozen=True)
class TierSpec:
    """A persistent tier and its retention: ``keep`` is an int (latest N), a policy or a list of them.

    A policy is any object satisfying :class:`~asymstore.interfaces.RetentionPolicy` (``keep`` and ``wants``).
    """

    url: str | ObjectStore
    keep: int | RetentionPolicy | list[RetentionPolicy] | None = None
    name: str | None = None
    partition_bytes: int | None = None
    #: an opt-in lossy codec for an archive tier: ``"excp"`` or :class:`~asymstore.excp.ExcpOptions` (never on
    #: the first tier, nor on a tier in this process's memory; a lossy tier is the last of the chain)
    lossy: Any = None


@dataclass
class SaveResult:
    """What one save did: the snapshot's time and, per persistent tier written, its write report."""

    step: int
    skipped: bool = False
    snapshot_seconds: float = 0.0
    reports: dict[str, WriteReport] = field(default_factory=dict)  # tier name -> report
    persist_started: float = 0.0  # time.perf_counter() when persistence began and ended (0: none ran)
    persist_finished: float = 0.0

    @property
    def raw_bytes(self) -> int:
        """Bytes of the checkpoint's stream (0 when no tier was written)."""
        return next(iter(self.reports.values())).raw_bytes if self.reports else 0


class SaveHandle:
    """A checkpoint in progress. ``result()`` waits for persistence and re-raises its error."""

    def __init__(self, step: int, future: Future[SaveResult], booster: PriorityBooster | None = None) -> None:
        self.step = step
        self._future = future
        self._booster = booster

    @property
    def future(self) -> Future[SaveResult]:
        """The persistence of this checkpoint as a :class:`concurrent.futures.Future` (result: the
        :class:`SaveResult`); for integrations that chain work on it."""
        return self._future

    def add_done_callback(self, fn: Callable[[SaveHandle], object]) -> None:
        """Call ``fn(handle)`` once persistence finished or failed (at once if it already has), on the
        thread that finished it; ``fn`` calls :meth:`result` to learn how it went."""
        self._future.add_done_callback(lambda _f: fn(self))

    def done(self) -> bool:
        """Whether persistence finished (or failed)."""
        return self._future.done()

    def result(self, timeout: float | None = None) -> SaveResult:
        """Wait for persistence to the first persistent tier; re-raise its error. While it waits, the
        persistence thread runs at the caller's priority."""
        if self._booster is None or self._future.done():
            return self._future.result(timeout)
        with self._booster.boosted():
            return self._future.result(timeout)

    @property
    def skipped(self) -> bool:
        """Whether the slot policy skipped this checkpoint (every host slot was still persisting)."""
        return self._future.done() and not self._future.exception() and self._future.result().skipped


@dataclass
class RestoreReport:
    """What the last :meth:`Store.restore` did: the step, the source it read, its time, and the fallbacks."""

    step: int
    tier: str
    seconds: float
    events: list[str] = field(default_factory=list)  # fallbacks taken, in order
    #: where exactly the bytes came from, e.g. "host shared memory, left by pid 4242" or a tier's URL
    detail: str = ""
    #: the step was rebuilt from a lossy (ExCP) copy: not bit-exact; its recorded errors are in ``detail``
    lossy: bool = False


@dataclass
class PendingSnapshot:
    """A snapshot being filled (by :meth:`Store.save` or a trainer hook's partitioned copy)."""

    step: int
    slot: Slot
    layout: Layout
    flat: FlatState
    user: dict[str, Any]
    started: float

    @property
    def buffer(self) -> torch.Tensor:
        """The slot's buffer the snapshot is copied into."""
        assert self.slot.buffer is not None
        return self.slot.buffer


def _layout_of(flat: FlatState, first: Callable[[str], bool] | None = None) -> Layout:
    """Lay tensors out in state order; names for which ``first`` is true go to the front."""
    names = list(flat.tensors)
    if first is not None:
        names = [n for n in names if first(n)] + [n for n in names if not first(n)]
    return plan_layout(
        (
            n,
            dtypes.info(flat.tensors[n].dtype).torch_name,
            tuple(flat.tensors[n].shape),
            flat.tensors[n].numel() * flat.tensors[n].element_size(),
        )
        for n in names
    )


class Store:
    """A tier chain: host memory (K slots), then persistent tiers, fastest first."""

    def __init__(
        self,
        tiers: Sequence[str | ObjectStore | TierSpec] = (),
        *,
        config: Config | None = None,
        replica_rendezvous: Rendezvous | None = None,
        **overrides: Any,
    ) -> None:
        """``replica_rendezvous``: where the ranks find each other's replica services with ``peer_replicas=1``
        (default: the ``torch.distributed`` default store)."""
        self.config = Config.from_env(config, **overrides)
        lossy = excp.check_lossy_chain(tiers)  # refused on the first tier, before any tier is opened
        self.tiers = [
            PersistentTier(
                t.url, self.config, name=t.name, keep=t.keep, partition_bytes=t.partition_bytes, lossy=lossy[i]
            )
            if isinstance(t, TierSpec)
            else PersistentTier(t, self.config)
            for i, t in enumerate(tiers)
        ]
        if self.tiers:
            self.tiers[0].writes_from_slots_only = True  # the persistence thread writes it from the slots
        names: dict[str, int] = {}
        for t in self.tiers:  # unique, readable tier names: file, file2, hdfs ...
            n = names.get(t.name, 0) + 1
            names[t.name] = n
            if n > 1:
                t.name = f"{t.name}{n}"
        pin = cuda_available() if self.config.pin_memory is None else self.config.pin_memory
        self.host = HostPool(self.config.host_slots, pin_memory=pin, region=self._open_region(pin))
        #: persistence and promotion threads run at background priority and are raised while waited on
        self.booster = PriorityBooster(self.config.background_nice, self.config.background_idle)
        self.host.waiting = self.booster.boosted
        self.manager = TierManager(self.tiers, self.host, booster=self.booster) if self.tiers else None
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="asymstore-persist", initializer=self.booster.enter
        )
        #: seals shared-memory slots (checksums + record) while the persistence thread already writes them
        self._sealer = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="asymstore-seal", initializer=self.booster.enter)
            if self.host.region is not None and self.manager is not None
            else None
        )
        self._lock = threading.Lock()
        self._bg_error: BaseException | None = None
        self.failures = 0
        self.last_restore: RestoreReport | None = None
        self._closed = False
        self._last_peer: int | None = None  # the rank the last restore from a peer replica read from
        #: listings of lower tiers run here, awaited at most ``tier_answer_s``; tiers that did not answer, when
        self._asking = ThreadPoolExecutor(max_workers=max(1, len(self.tiers)), thread_name_prefix="asymstore-ask")
        self._not_answering: dict[str, float] = {}
        self._watched: list[tuple[SaveHandle, float]] = []  # checkpoints not durable yet, and when taken
        self._watch_cv = threading.Condition()
        self._watchdog: threading.Thread | None = None
        #: checkpoints that were not durable within ``durable_within_s``
        self.late = 0
        self.replicas = self._start_replicas(replica_rendezvous)
        #: adopted snapshots not durable yet whose persistence waits for the ranks to agree (several ranks)
        self._unsettled: list[Slot] = []
        self._settling = False  # adopted steps wait for the ranks' agreement (set by _adopt)
        #: steps the job resumes from whose part this rank holds committed on the first tier, their marker
        #: missing (:meth:`_resume_part`): kept by discard_uncommitted, rank 0 writes the marker
        self._resumed_parts: set[int] = set()
        self.adopted = self._adopt()
        _OPEN_STORES.add(self)

    # --- host memory that outlives the process -----------------------------------
    @property
    def host_memory(self) -> str:
        """Where the host slots live: ``"shared"`` (a region that outlives the process) or ``"private"``."""
        return "shared" if self.host.region is not None else "private"

    def _open_region(self, pin: bool) -> ShmRegion | None:
        mode = self.config.host_memory
        if mode == "private" or (mode == "auto" and (not sys.platform.startswith("linux") or not self.tiers)):
            return None
        job = self.config.shm_job
        if job is None:
            if not self.tiers:
                raise AsymstoreError("host_memory='shared' without a persistent tier needs shm_job= (the job's name)")
            job = default_job(self.tiers[0].url)
        try:
            return ShmRegion(
                self.config.shm_dir,
                job,
                self.rank,
                world_size=self.world_size,
                url=self.tiers[0].url if self.tiers else "",
                pin=pin,
            )
        except ShmRegionBusyError as e:
            if mode == "auto":  # e.g. a second store of the same root in one process: it reads, or saves privately
                log.warning("%s; this store's host slots are private memory", e)
                return None
            for t in self.tiers:
                t.close()
            raise
        except ShmError:
            for t in self.tiers:
                t.close()
            raise

    def _start_replicas(self, rendezvous: Rendezvous | None) -> ReplicaService | None:
        if not self.config.peer_replicas:
            return None
        region = self.host.region
        if region is None:
            raise AsymstoreError("peer_replicas=1 needs host slots in shared memory (host_memory='shared')")
        return ReplicaService(
            job=region.job,
            rank=self.rank,
            world_size=self.world_size,
            shm_dir=self.config.shm_dir,
            node=self.config.node_id or socket.gethostname(),
            rendezvous=rendezvous or default_rendezvous(),
            bandwidth=self.config.replica_bandwidth,
        )

    def _replicate(self, slot: Slot) -> None:
        """Queue a copy of a sealed slot to the peer rank (the slot is leased until it is sent)."""
        if self.replicas is None or slot.record is None or slot.step is None:
            return
        leased = self.host.lease(slot.step)
        if leased is None:
            return
        self.replicas.push(slot.record, leased.memview(), lambda: self.host.unlease(leased))

    def _peer_steps(self) -> tuple[int | None, list[int]]:
        """Which rank holds this rank's replicas, and of which steps."""
        if self.replicas is None:
            return None, []
        try:
            return self.replicas.remote_steps()
        except AsymstoreError as e:
            log.warning("peer replicas cannot be asked: %s", e)
            return None, []

    def _adopt(self) -> list[int]:
        """Take over the committed slots an earlier process left; persist those not yet durable. In a job of
        several ranks that waits for :meth:`agreed_latest_step`: the ranks may have died at different points,
        and a step only some of them hold can never be completed on a tier."""
        settle = self._settling = self._job_group() is not None  # several ranks: adopted steps wait for them
        slots = self.host.adopt()
        if not slots:
            return []
        pids = sorted({s.origin_pid for s in slots if s.origin_pid is not None})
        steps = [s.step for s in slots if s.step is not None]
        log.info("host shared memory holds steps %s left by pid %s", steps, ", ".join(map(str, pids)))
        if not settle:
            self._replicate(slots[-1])  # the peer may have lost its copy with its node
        for slot in slots:
            if slot.step is None or not self.tiers:
                continue
            if self.tiers[0].has(slot.step):
                continue
            if self._part_committed_here(slot.step):
                if settle:  # this rank's part is on the tier, the step's marker is not: the job decides
                    self._unsettled.append(slot)
                else:  # rank 0 died waiting for the other ranks' parts
                    self._resume_part(slot.step)
                continue
            if slot.durable:  # it was on the tier and is not any more: retention or a user deleted it there
                log.info(
                    "step %s left in host shared memory was deleted from %s since: dropped",
                    slot.step,
                    self.tiers[0].name,
                )
                self.host.drop(slot.step)
                continue
            if settle:
                self._unsettled.append(slot)
                continue
            slot.persisting = True
            self._executor.submit(self._persist_adopted, slot)
        return [s.step for s in slots if s.state == "ready" and s.step is not None]

    def _settle_adopted(self, common: set[int], agreed: int | None) -> None:
        """The ranks agreed to resume from ``agreed``, ``common`` being the steps every rank holds: persist the
        adopted snapshots of those steps; drop the others (they belong to a run the job abandons, or no set of
        ranks can complete them), and the replicas held here of steps newer than ``agreed``; send the newest
        adopted step kept to the peer (it may have lost its copy with its node). Once per store."""
        if not self._settling:
            return
        self._settling = False
        if self.replicas is not None and agreed is not None:
            for src, newer in self.replicas.forget_newer(agreed):
                log.info("replica of rank %s step %s dropped: the job resumes from step %s", src, newer, agreed)
        pending, self._unsettled = self._unsettled, []
        for slot in pending:
            step = slot.step
            if step is None:
                continue
            if step in common and agreed is not None and step <= agreed:
                if self._durable_here(step):  # this rank's part is on the tier (rank 0 writes the marker)
                    continue
                if self.host.claim_for_persistence(slot, step):
                    self._executor.submit(self._persist_adopted, slot)
            elif self.host.find(step) is slot:
                log.info(
                    "step %s left in host shared memory is not held by every rank (the job resumes from %s): dropped",
                    step,
                    f"step {agreed}" if agreed is not None else "scratch",
                )
                self.host.drop(step)
        kept = [s for s in self.adopted if agreed is not None and s <= agreed]
        newest = self.host.find(max(kept)) if kept else None
        if newest is not None:
            self._replicate(newest)

    def _keep_fetched(self, step: int, raw: torch.Tensor, content: CheckpointContent) -> None:
        """A replica fetched from the peer holds ``step``, not durable here: copy it into an own slot before
        the restore hands out its bytes, commit it there and persist it (the other ranks' parts of the step
        wait for this one). Skipped, with a warning, when no slot is free."""
        if not self.tiers or self._durable_here(step) or self.host.find(step) is not None:
            return
        n = content.layout.total_bytes
        try:
            slot = self.host.acquire(n, step, policy="skip")
        except SnapshotSlotsBusyError as e:
            log.warning("step %s restored from the peer cannot be persisted by this rank: %s", step, e)
            return
        assert slot.buffer is not None
        host_copy(slot.buffer.data_ptr(), raw.data_ptr(), n)
        self.host.mark_ready(slot, content=content, persisting=True)

        def persist() -> None:
            try:
                self.host.seal(slot)
            except BaseException as e:
                self._record_failure(step, e)
                self.host.mark_persisted(slot)
                return
            self._persist_adopted(slot)

        self._executor.submit(persist)

    def _durable_here(self, step: int) -> bool:
        """Whether this rank's part of ``step`` is durable on the first persistent tier (rank 0's part of a
        multi-rank step may still wait for the step's marker: :meth:`_resume_part`)."""
        return self.tiers[0].has(step) or self._part_committed_here(step)

    def _part_committed_here(self, step: int) -> bool:
        """Whether this rank's part of ``step`` is committed on the first tier of a multi-rank job (its rank
        directory's marker), whether or not the step's own marker is there."""
        t = self.tiers[0]
        return t.multi_rank and t.rank_committed(step)

    def _committed_parts(self) -> list[int]:
        """Steps not committed as a whole on the first tier whose part of this rank is (a multi-rank job whose
        rank 0 died before it wrote their marker, or whose other ranks died before they wrote their parts)."""
        if not self.tiers or not self.tiers[0].multi_rank:
            return []
        try:
            return catalog.committed_parts(self.tiers[0].backend, rank=self.rank, world_size=self.world_size)
        except AsymstoreError as e:
            log.warning("tier %s cannot be listed for the parts of this rank: %s", self.tiers[0].name, e)
            return []

    def _resume_part(self, step: int) -> None:
        """The job resumes from ``step``, whose part of this rank is committed on the first tier and whose
        marker an earlier process of rank 0 died before writing: the part is kept (:meth:`discard_uncommitted`),
        and rank 0 writes the marker once every rank's part is there, on the persistence thread (as a save's own
        finalize does). Once per step and store."""
        if step in self._resumed_parts:
            return
        self._resumed_parts.add(step)
        if self.rank != 0 or self.manager is None:
            return
        manager = self.manager

        def finish() -> None:
            try:
                manager.finalize(0, step)
            except StepExistsError:
                return  # already marked
            except Exception as e:  # an earlier process's step, never reported as saved: this run goes on
                log.warning("step %s left by an earlier process cannot be committed: %s", step, e)
                return
            log.info("step %s is committed on %s: its marker was missing after a restart", step, self.tiers[0].name)

        self._executor.submit(finish)

    def _persist_adopted(self, slot: Slot) -> None:
        """Persist a snapshot an earlier process left in shared memory but did not make durable."""
        assert self.manager is not None and slot.step is not None
        step = slot.step
        try:
            self.host.verify(slot)
            # the dead process's partial write of this step goes first; committed parts of other steps stay (the
            # job may resume from one of them, their marker pending)
            others = [s for s in {*self.host.steps(), *self._committed_parts()} if s != step]
            catalog.discard_uncommitted(
                self.tiers[0].backend, rank=self.rank, world_size=self.world_size, after=step - 1, keep=others
            )
            assert slot.content is not None
            self.manager.persist_primary(step, slot.memview(), slot.content, slot.stream_crcs())
            self.host.mark_durable(slot)
            log.info("persisted step %s from host shared memory (left by pid %s)", step, slot.origin_pid)
        except BaseException as e:
            self._record_failure(step, e)
        finally:
            self.host.mark_persisted(slot)

    # --- errors from the background ---------------------------------------------
    def _raise_background(self) -> None:
        with self._lock:
            err, self._bg_error = self._bg_error, None
        if err is not None:
            raise CheckpointFailedError(f"a background checkpoint failed: {err}") from err

    def raise_if_failed(self) -> None:
        """Raise :class:`~asymstore.errors.CheckpointFailedError` (once) if a background checkpoint failed
        since the last call; every call of the API does this first."""
        self._raise_background()

    def forget_background_error(self, err: BaseException) -> None:
        """``err`` was reported to the user another way (e.g. by a :class:`SaveHandle`): the next call
        must not raise it a second time. A different pending failure is kept."""
        with self._lock:
            if self._bg_error is err:
                self._bg_error = None

    def _record_failure(self, step: int, err: BaseException) -> None:
        self.failures += 1
        if self.config.non_fatal:
            log.error("checkpoint of step %s failed (non-fatal, training goes on): %s", step, err)
        else:
            with self._lock:
                self._bg_error = err

    # --- saving ------------------------------------------------------------------
    def begin_snapshot(
        self,
        state: Any,
        step: int,
        *,
        user: dict[str, Any] | None = None,
        first: Callable[[str], bool] | None = None,
        global_parts: Mapping[str, Any] | None = None,
    ) -> PendingSnapshot | None:
        """Reserve a host slot for ``state`` at ``step``; ``None`` when the slot policy skips it.

        ``first(name)`` selects tensors laid out at the front of the stream (e.g. those that
        change before the next optimizer step and so must be copied at once). ``global_parts``: tensor name
        -> the :class:`~asymstore.globalmeta.Piece` (or pieces) of global tensors it holds (DTensors in the
        state are described without it); recorded in the manifest (docs/format.md section 8.2).
        """
        step, user = validate.save_request(step, user)  # before a byte is written: int step, JSON user metadata
        self._check_open()
        self._raise_background()
        self._check_new_step(step)
        flat = state if isinstance(state, FlatState) else flatten(state)
        layout = _layout_of(flat, first)
        if global_parts or flat.global_parts:
            from .globalmeta import merge_parts

            flat.global_parts = merge_parts(flat.global_parts, global_parts or {}, layout)
        try:
            slot = self.host.acquire(layout.total_bytes, step, policy=self.config.slot_policy)
        except SnapshotSlotsBusyError as e:
            log.warning("%s", e)
            return None
        return PendingSnapshot(step, slot, layout, flat, dict(user or {}), time.perf_counter())

    def _check_new_step(self, step: int) -> None:
        """Refuse a step that is already committed, before its host copy could be overwritten.

        A host copy whose persistence failed may be saved again (a retry); one still being
        persisted, or the only copy of a store without persistent tiers, may not.
        """
        where = [t.name for t in self.tiers[:1] if t.has(step)]  # slow lower tiers are never asked here
        slot = self.host.find(step)
        if slot is not None and (slot.persisting or not self.tiers):
            where.insert(0, "host")
        if where:
            raise StepExistsError(
                f"step {step} is already committed (on {', '.join(where)}); delete it first or save under another step"
            )

    def abort_snapshot(self, snap: PendingSnapshot) -> None:
        """Give the slot of a snapshot that will not be committed back (e.g. its copy failed)."""
        self.host.release(snap.slot)

    def commit_snapshot(self, snap: PendingSnapshot, *, copies_done: Callable[[], None] | None = None) -> SaveHandle:
        """The slot holds (or, once ``copies_done()`` returns, will hold) the whole state.

        Marks it ready in host memory and persists it in the background. ``copies_done`` is
        called on the persistence thread first (e.g. to wait for a GPU copy stream), so the
        training thread never blocks on it.
        """
        snap_s = time.perf_counter() - snap.started
        snap.flat.tensors.clear()  # drop references to live tensors
        if copies_done is None:
            self._mark_ready(snap)
        if not self.tiers and copies_done is None and self.host.region is None:
            fut: Future[SaveResult] = Future()
            fut.set_result(SaveResult(snap.step, snapshot_seconds=snap_s))
            return SaveHandle(snap.step, fut)
        handle = SaveHandle(snap.step, self._executor.submit(self._persist, snap, snap_s, copies_done), self.booster)
        self._watch(handle)
        return handle

    # --- durability within a bound ------------------------------------------------
    def _watch(self, handle: SaveHandle) -> None:
        """Track ``handle`` until it is durable; a late one is reported and persistence boosted."""
        with self._watch_cv:
            self._watched.append((handle, time.monotonic()))
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._watch_loop, name="asymstore-watchdog", daemon=True)
                self._watchdog.start()
            self._watch_cv.notify_all()

    def _watch_loop(self) -> None:
        bound = self.config.durable_within_s
        boost: contextlib.ExitStack | None = None
        reported: set[int] = set()
        while True:
            with self._watch_cv:
                self._watched = [(h, t) for h, t in self._watched if not h.done()]
                if self._closed and not self._watched:
                    break
                now = time.monotonic()
                late = [(h.step, now - t) for h, t in self._watched if now - t > bound]
                self._watch_cv.wait(min(0.5, bound / 4) if self._watched else None)
            if late and boost is None:
                boost = contextlib.ExitStack()
                boost.enter_context(self.booster.boosted())
            elif not late and boost is not None:
                boost.close()
                boost = None
            new = [(s, age) for s, age in late if s not in reported]
            if new:
                self.late += len(new)
                reported.update(s for s, _ in new)
                log.warning(
                    "checkpoint%s %s not durable on %s after %s s (durable_within_s=%s): persistence now runs at "
                    "normal priority until it has caught up",
                    "s" if len(new) > 1 else "",
                    ", ".join(f"{s} ({age:.0f} s)" for s, age in new),
                    self.tiers[0].name if self.tiers else "host",
                    f"{min(a for _, a in new):.0f}",
                    bound,
                )
        if boost is not None:
            boost.close()

    def _mark_ready(self, snap: PendingSnapshot) -> None:
        content = CheckpointContent(
            snap.layout,
            snap.flat.skeleton,
            tuple(snap.flat.numpy_names),
            snap.user,
            global_parts=snap.flat.global_parts,
        )
        self.host.mark_ready(snap.slot, content=content, persisting=bool(self.tiers) or self.host.region is not None)

    def _persist(self, snap: PendingSnapshot, snap_s: float, copies_done: Callable[[], None] | None) -> SaveResult:
        result = SaveResult(snap.step, snapshot_seconds=snap_s, persist_started=time.perf_counter())
        sealing: Future[None] | None = None
        try:
            if copies_done is not None:
                try:
                    copies_done()
                except BaseException:
                    self.host.release(snap.slot)
                    raise
                self._mark_ready(snap)
            sealing, crcs = self._begin_seal(snap.slot)
            if self.manager is None:
                return result
            assert snap.slot.content is not None
            rep = self.manager.persist_primary(snap.step, snap.slot.memview(), snap.slot.content, crcs)
            if sealing is not None:
                sealing.result()  # committed in shared memory (and queued for the peer) before it is durable
            self.host.mark_durable(snap.slot)
            result.reports[self.tiers[0].name] = rep
            result.persist_finished = time.perf_counter()
            return result
        except BaseException as e:
            self._record_failure(snap.step, e)
            raise
        finally:
            if sealing is not None:
                wait([sealing])  # the seal reads the slot: it may be reused only once that is over
            self.host.mark_persisted(snap.slot)

    def _begin_seal(self, slot: Slot) -> tuple[Future[None] | None, ChunkCrcs | None]:
        """Commit ``slot`` in shared memory (from then on a crash loses nothing) and queue it for the peer: on the
        seal thread while the persistence writes the same bytes, or here (no tier, private memory: no-op).
        Returns the seal's future (``None``: done) and the checksums the tier write may take."""
        if self._sealer is None or slot.record is not None:
            self.host.seal(slot)
            self._replicate(slot)
            return None, slot.stream_crcs()
        crcs = StreamingCrcs(VERIFY_CHUNK, len(slot.memview()))

        def seal() -> None:
            self.host.seal(slot, crcs.compute(slot.memview()))
            self._replicate(slot)

        return self._sealer.submit(seal), crcs

    def save(
        self,
        state: Any,
        step: int,
        *,
        blocking: bool = True,
        user: dict[str, Any] | None = None,
        global_parts: Mapping[str, Any] | None = None,
    ) -> SaveHandle:
        """Checkpoint ``state`` (nested dicts/lists of tensors and JSON-able values) as ``step``.

        The snapshot copy happens before this returns, so the caller may modify the tensors
        right after. ``blocking=False`` returns while persistence runs in the background.
        ``global_parts``: which parts of global tensors the state's tensors hold (tensor name -> a
        :class:`~asymstore.globalmeta.Piece` or a list of them; docs/elastic.md); DTensors are described
        automatically.
        """
        snap = self.begin_snapshot(state, step, user=user, global_parts=global_parts)
        if snap is None:
            fut: Future[SaveResult] = Future()
            fut.set_result(SaveResult(step, skipped=True))
            return SaveHandle(step, fut)
        try:
            cuda = any(t.is_cuda for t in snap.flat.tensors.values())
            copy_all(snap.buffer, snap.layout, snap.flat.tensors, non_blocking=cuda and snap.buffer.is_pinned())
            if cuda:
                torch.cuda.synchronize()
        except BaseException:
            self.abort_snapshot(snap)
            raise
        handle = self.commit_snapshot(snap)
        if blocking:
            try:
                handle.result()
            except BaseException as e:
                with self._lock:  # delivered here: do not raise it again on the next call
                    if self._bg_error is e:
                        self._bg_error = None
                if self.config.non_fatal:
                    return handle  # logged and counted by _record_failure; training goes on
                raise
        return handle

    def save_async(
        self,
        state: Any,
        step: int,
        *,
        user: dict[str, Any] | None = None,
        global_parts: Mapping[str, Any] | None = None,
    ) -> SaveHandle:
        """``save(..., blocking=False)``: returns once the snapshot is in host memory."""
        return self.save(state, step, blocking=False, user=user, global_parts=global_parts)

    def wait(self, timeout: float | None = None) -> None:
        """Wait until every snapshot is durable on the first persistent tier; re-raise a failure."""
        with self.booster.boosted():
            self._executor.submit(lambda: None).result(timeout)
        self._raise_background()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait for persistence and for every pending promotion down the tier chain.

        Returns False if promotions are still pending at ``timeout`` (an unreachable tier
        is retried in the background; :meth:`status` shows its last error).
        """
        self.wait(timeout)
        return self.manager.flush(timeout) if self.manager else True

    def status(self) -> dict[str, Any]:
        """Where each step is complete, what is in flight, bytes and throughput per tier."""
        host = [
            {"slot": s.index, "state": s.state, "step": s.step, "persisting": s.persisting, "bytes": s.capacity}
            for s in self.host.slots
        ]
        region = self.host.region
        return {
            "host": host,
            "host_memory": {
                "kind": self.host_memory,
                "region": region.path if region is not None else None,
                "adopted": list(self.adopted),
                "replicas": None
                if self.replicas is None
                else {
                    "peer": self.replicas.peer_rank,
                    "pushed": self.replicas.pushed,
                    "push_failures": self.replicas.push_failures,
                    "received": self.replicas.received,
                },
            },
            "tiers": [
                {**t, "not_answering_since": self._not_answering.get(t["name"])}
                for t in (self.manager.status() if self.manager else [])
            ],
            "memory": self.memory_report(),
            "failures": self.failures,
            "late": self.late,
            "boosts": self.booster.boosts,
            "boosts_ahead": self.host.ahead_boosts,
        }

    # --- catalogue ---------------------------------------------------------------
    def _listing(self, tier: PersistentTier) -> list[int]:
        """A tier's committed steps; an unreachable tier counts as empty (and says so)."""
        try:
            return catalog.committed_steps(tier.backend)
        except AsymstoreError as e:
            log.warning("tier %s cannot be listed: %s", tier.name, e)
            return []

    def _chain(self) -> list[tuple[str, ObjectStore]]:
        """``(name, backend)`` of the persistent tiers, in chain order."""
        return [(t.name, t.backend) for t in self.tiers]

    def steps(self) -> list[int]:
        """Steps complete on at least one tier, host memory included, oldest first (see :meth:`durable_steps`)."""
        return sorted(set(self.host.steps()) | set(self._peer_steps()[1]) | set(self.durable_steps()))

    def _lower_listing(self, tier: PersistentTier) -> list[int]:
        """A lower tier's committed steps, waiting at most ``tier_answer_s`` for it; then what the tier manager
        knows of it (a slow or frozen tier never blocks a listing the faster tiers can answer)."""
        fut = self._asking.submit(self._listing, tier)
        try:
            steps = fut.result(timeout=self.config.tier_answer_s)
        except FutureTimeout:
            known = self.manager.known_steps(tier) if self.manager is not None else None
            self._not_answering[tier.name] = time.time()
            log.warning(
                "tier %s did not list its steps within tier_answer_s=%s s; going on with %s",
                tier.name,
                self.config.tier_answer_s,
                f"the {len(known)} steps known of it" if known else "none of its steps",
            )
            return known or []
        self._not_answering.pop(tier.name, None)
        return steps

    def durable_steps(self) -> list[int]:
        """Steps committed on at least one persistent tier, oldest first: what survives the loss of this node."""
        s: set[int] = set()
        for k, t in enumerate(self.tiers):
            s.update(self._listing(t) if k == 0 else self._lower_listing(t))
        return sorted(s)

    @property
    def rank(self) -> int:
        """This process's rank (0 for a single-process store)."""
        return self.config.rank

    @property
    def world_size(self) -> int:
        """How many ranks write each checkpoint."""
        return self.config.world_size

    @property
    def tier_urls(self) -> dict[str, str]:
        """Root URL of each persistent tier by tier name, in chain order (fastest first)."""
        return {t.name: t.url for t in self.tiers}

    def where(self, step: int) -> list[str]:
        """Where ``step`` is complete, in the read order: ``"host"``, then tier names in chain order."""
        return [src.name for src in self._read_order(step, None)]

    def latest_durable_step(self) -> int | None:
        """The newest step committed on a persistent tier (``None`` when there is none)."""
        s = self.durable_steps()
        return s[-1] if s else None

    def latest_step(self) -> int | None:
        """The newest step complete on at least one tier (``None`` when there is none)."""
        s = self.steps()
        return s[-1] if s else None

    def _job_group(self) -> Any:
        """``torch.distributed`` when this store is one rank of an initialised job of its world size, else None."""
        if self.world_size <= 1:
            return None
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != self.world_size:
            return None
        return dist

    def agreed_latest_step(self) -> int | None:
        """The newest step that every rank of the job can restore: the newest in all ranks' :meth:`steps` (or
        whose part the rank holds committed on the first tier, rank 0 having died before it wrote the step's
        marker: docs/format.md section 13.3).

        Each rank's host memory (and its peer's) holds snapshots the others may not have, e.g. a step whose
        persistence a crash interrupted on one rank only, so the newest step one rank sees is not always one
        every rank can read. In a multi-rank store with ``torch.distributed`` initialised this is a collective
        (every rank must call it); otherwise it is :meth:`latest_step`. ``None``: no step every rank has.

        Snapshots an earlier process of the job left in this rank's shared memory and that are not durable yet
        are persisted from here on if every rank holds their step (and it is not newer than the agreed one),
        and dropped otherwise: they belong to the run the job abandons."""
        dist = self._job_group()
        if dist is None:
            mine = self.steps()
            return mine[-1] if mine else None
        return self._agree(dist, self.steps(), self._committed_parts())

    def _agree(self, dist: Any, steps: list[int], parts: list[int]) -> int | None:
        """:meth:`agreed_latest_step`'s collective, from this rank's :meth:`steps` and :meth:`_committed_parts`
        (readable by this rank although the step's marker is missing), listed by the caller."""
        mine = sorted({*steps, *parts})
        views: list[Any] = [None] * self.world_size
        dist.all_gather_object(views, mine)
        common = set(mine).intersection(*(set(v) for v in views))
        agreed = max(common) if common else None
        self._settle_adopted(common, agreed)
        for s in parts:
            if s in common and agreed is not None and s <= agreed:
                self._resume_part(s)
        return agreed

    def verify(self, step: int, *, tier: str | None = None) -> VerifyReport:
        """Read and check every stored object of ``step`` on ``tier`` (default: the first persistent tier that
        holds it); damage is reported, never raised. ``StepNotFoundError`` when no persistent tier holds it."""
        names = [tier] if tier is not None else [n for n in self.where(step) if n != catalog.HOST]
        if not names or (tier is not None and not self._tier(tier).has(step)):
            raise StepNotFoundError(f"step {step} is not committed on {tier or 'any persistent tier'}")
        t = self._tier(names[0])
        try:
            rank = self._read_rank(step, catalog.Source(t.name, t.backend), None)
            reader = catalog.open_reader(t.backend, step, rank=rank)
        except CorruptCheckpointError as e:
            rep = VerifyReport(step, ok=False)
            rep.problems.append((e.objects[0] if e.objects else f"step {step}", str(e)))
            return rep
        return reader.verify()

    # --- restoring ---------------------------------------------------------------
    def _read_order(self, step: int, rank: int | None) -> list[catalog.Source]:
        """The catalog's read policy for ``step``: host memory first, then the tiers in chain order."""
        return list(self._iter_read_order(step, rank))

    def _iter_read_order(self, step: int, rank: int | None, *, part: bool = False) -> Iterator[catalog.Source]:
        """:meth:`_read_order` lazily: a tier is asked whether it holds the step only when reached. ``part``: the
        first tier holds this rank's committed part of the step, its marker missing (:meth:`_committed_parts`):
        read last, when no complete copy could be."""
        sources = catalog.iter_sources(
            step, host=self.host.find(step) is not None, tiers=self._chain(), rank=rank, my_rank=self.rank
        )
        peer = self.replicas is not None and (rank is None or rank == self.rank) and step in self._peer_steps()[1]
        for src in sources:
            if peer and not src.is_host:  # after our own memory, before every tier
                peer = False
                yield catalog.Source(catalog.PEER)
            yield src
        if peer:
            yield catalog.Source(catalog.PEER)
        if part and (rank is None or rank == self.rank):
            yield catalog.Source(self.tiers[0].name, self.tiers[0].backend, part=True)

    def _tier_reader(self, step: int, source: catalog.Source, r: int) -> CheckpointReader:
        """A reader of rank ``r``'s part of ``step`` on a tier ``source``: the committed step, or, for a part
        source, the rank's committed directory of a step whose marker is missing."""
        assert source.backend is not None
        if source.part:
            return catalog.open_rank_part(source.backend, step, rank=r, world_size=self.world_size)
        return catalog.open_reader(source.backend, step, rank=r)

    def _read_rank(self, step: int, source: catalog.Source, rank: int | None) -> int:
        """Which rank's directory to read (:func:`asymstore.catalog.read_rank`; host memory and a part hold
        ours)."""
        if source.backend is None or source.part:
            return self.rank if rank is None else rank
        return catalog.read_rank(source.backend, step, rank=rank, my_rank=self.rank, world_size=self.world_size)

    def _read_stream(
        self,
        step: int,
        source: catalog.Source,
        rank: int | None = None,
        *,
        copy: bool = True,
        target: tuple[dict[str, torch.Tensor], bool] | None = None,
    ) -> _Stream:
        """The step's stream from ``source`` and a function to call when done with it.

        From host memory with ``copy=False`` the slot itself is returned, leased against
        reuse until the release function is called (an in-place restore copies straight
        out of it, with no intermediate buffer).
        """
        if source.name == catalog.PEER:
            holder, _ = self._peer_steps()
            if self.replicas is None or holder is None:
                raise StepNotFoundError(f"no peer holds a replica of step {step}")
            raw, rec = self.replicas.fetch(step, holder)  # verified
            self._last_peer = holder
            return raw, rec.content, lambda: None, frozenset()
        r = self._read_rank(step, source, rank)
        if source.backend is None:
            if r != self.rank:
                raise StepNotFoundError(f"host memory holds rank {self.rank}'s part, not rank {r}'s")
            slot = self.host.lease(step)
            if slot is None or slot.layout is None or slot.buffer is None:
                if slot is not None:
                    self.host.unlease(slot)
                raise StepNotFoundError(f"step {step} left host memory")
            view = slot.buffer[: max(slot.layout.total_bytes, 1)]
            try:
                if copy:
                    buf = new_host_buffer(view.numel())
                    if not self.host.verify(slot, into=buf):  # an adopted slot: checked while copied
                        buf.copy_(view)
                    self.host.unlease(slot)
                    return buf, slot, lambda: None, frozenset()
                filled: frozenset[str] = frozenset()
                if target is not None and slot.record is not None and not slot.verified:
                    tensors, strict = target
                    check_compatible(slot.layout, tensors, strict=strict)  # before a byte of the target changes
                    pieces = _scatter_pieces(slot.layout, tensors)
                    self.host.verify(slot, scatter=pieces)  # checked and copied into the target in one pass
                    filled = frozenset(n for n, _ in pieces)
                else:
                    self.host.verify(slot)
            except BaseException:
                self.host.unlease(slot)
                raise
            return view, slot, lambda: self.host.unlease(slot), filled
        reader = self._tier_reader(step, source, r)
        if excp.is_lossy(reader.manifest):  # an ExCP copy: rebuilt from its chain of residuals
            rebuilt, content = excp.rebuild(reader)
            buf = _stream_buffer(content.layout.total_bytes, step)
            if rebuilt:
                buf[: len(rebuilt)].copy_(torch.frombuffer(rebuilt, dtype=torch.uint8))
            return buf, content, lambda: None, frozenset()
        buf = _stream_buffer(reader.manifest.layout.total_bytes, step)
        reader.read_all_into(buf.numpy().data)
        return buf, reader.manifest, lambda: None, frozenset()

    def _stream_reader(
        self, step: int, rank: int | None, copy: bool, target: tuple[dict[str, torch.Tensor], bool] | None = None
    ) -> Callable[[catalog.Source], _Stream]:
        return lambda src: self._read_stream(step, src, rank, copy=copy, target=target)

    def _tier(self, name: str) -> PersistentTier:
        for t in self.tiers:
            if t.name == name:
                return t
        raise AsymstoreError(f"no tier named {name!r}")

    def restore(
        self, step: int | None = None, *, into: Any = None, strict: bool = True, rank: int | None = None
    ) -> Any:
        """Restore ``step`` (default: the newest complete one) as a new state, or in place ``into``.

        Reads in the catalog's order (host memory, then the tiers in chain order), falling back to the
        next source on damage, and (when ``step`` is None) to older steps. What happened is in
        :attr:`last_restore`. In a multi-rank store with ``torch.distributed`` initialised, ``step=None`` means
        :meth:`agreed_latest_step` (a collective: every rank calls ``restore`` together, as a restarted job does),
        and a step that cannot be read is an error rather than a fallback one rank would make alone.
        """
        self._check_open()
        self._raise_background()
        steps = self.steps()
        parts = self._committed_parts()  # this rank's parts of steps whose marker is missing (multi-rank)
        dist = self._job_group()
        if step is None and dist is not None:  # every rank must restore the same step
            agreed = self._agree(dist, steps, parts)
            if agreed is None:
                have = sorted({*steps, *parts})
                raise StepNotFoundError(f"no checkpoint is complete for every rank; this rank has {have}")
            step = agreed
        elif step is not None and self._settling:  # the job resumes from the step it asked for
            self._settle_adopted({*steps, *parts}, step)
        if step is not None and step in parts:  # rank 0 writes its missing marker once every part is there
            self._resume_part(step)
        if step is not None and step not in steps and step not in parts:
            raise StepNotFoundError(f"step {step} is not complete on any tier; complete steps: {steps}")
        candidates = [step] if step is not None else list(reversed(steps))
        if not candidates:
            raise StepNotFoundError("no complete checkpoint on any tier")
        failures: list[tuple[int, catalog.Failure]] = []
        t0 = time.perf_counter()
        target = None if into is None else (flatten(into).tensors, strict)
        for s in candidates:
            outcome, failed = catalog.try_in_order(
                self._iter_read_order(s, rank, part=s in parts), self._stream_reader(s, rank, into is None, target)
            )
            failures += [(s, f) for f in failed]
            if outcome is None:
                continue
            buf, meta, release, filled = outcome.value
            layout = meta.layout
            assert layout is not None
            if outcome.source.name == catalog.PEER and isinstance(meta, CheckpointContent):
                self._keep_fetched(s, buf, meta)
            events = [f"step {fs} on {f}" for fs, f in failures]
            detail = self._describe(outcome.source, meta)
            lossy = isinstance(meta, CheckpointContent) and meta.lossy is not None
            self.last_restore = RestoreReport(
                s, outcome.source.name, time.perf_counter() - t0, events, detail, lossy=lossy
            )
            if lossy:
                log.warning("restored step %s from a LOSSY copy, not bit-exact: %s", s, detail)
            if events:
                log.warning("restored step %s from %s after fallbacks: %s", s, outcome.source.name, "; ".join(events))
            try:
                return self._materialise(buf, layout, meta.skeleton, into, strict, filled)
            finally:
                release()
        what = f"step {step}" if step is not None else "any complete step"
        raise catalog.no_readable_copy(what, [f for _, f in failures])

    def _describe(self, source: catalog.Source, meta: Manifest | Slot | CheckpointContent) -> str:
        """Where a restore's bytes came from, in words."""
        if source.name == catalog.PEER and self.replicas is not None:
            holder = self._last_peer
            node = self.replicas.peers[holder].node if holder is not None else "?"
            return f"peer host shared memory of rank {holder} on node {node}"
        if source.backend is not None:
            if isinstance(meta, CheckpointContent) and meta.lossy is not None:
                return f"tier {source.name} ({source.backend.url}), lossy ExCP copy: {excp.summary(meta.lossy)}"
            if source.part:
                return f"tier {source.name} ({source.backend.url}), rank {self.rank}'s part (the step's marker pending)"
            return f"tier {source.name} ({source.backend.url})"
        if isinstance(meta, Slot) and meta.origin_pid is not None and meta.origin_pid != os.getpid():
            return f"host shared memory, left by pid {meta.origin_pid}"
        return "host shared memory" if self.host.region is not None else "host memory"

    def _materialise(
        self, buf: torch.Tensor, layout: Layout, skeleton: Any, into: Any, strict: bool, filled: frozenset[str]
    ) -> Any:
        entries = layout.by_name()
        if into is None:
            return unflatten(skeleton, lambda n: dest_view(buf, entries[n]))
        target = flatten(into).tensors
        check_compatible(layout, target, strict=strict)
        for name, t in target.items():
            if name in entries and name not in filled:
                with torch.no_grad():
                    t.copy_(dest_view(buf, entries[name]))
        # tensors the target does not hold are copied out: ``buf`` may be a host slot
        return unflatten(skeleton, lambda n: target[n] if n in target else dest_view(buf, entries[n]).clone())

    def restore_tensors(self, names: NameFilter, step: int | None = None) -> dict[str, torch.Tensor]:
        """Read only the named tensors (partial restore), touching only the chunks that hold them."""
        ck = self.open_checkpoint(step)
        pick = [n for n in ck if _selected(n, names)]
        return {n: ck[n].read() for n in pick}

    def _lazy_copy(self, step: int, source: catalog.Source, rank: int | None) -> Callable[[], RangeSource]:
        """An opener of ``source``'s copy of ``step`` as a range source (a fallback of a lazy checkpoint)."""
        if source.backend is None:
            return lambda: self._open_lazy(step, source, rank).source
        r = self._read_rank(step, source, rank)
        return lambda: excp.range_source(self._tier_reader(step, source, r))

    def _open_lazy(self, step: int, source: catalog.Source, rank: int | None) -> LazyCheckpoint:
        if source.backend is None:
            slot = self.host.find(step)
            if slot is None or slot.layout is None:
                raise StepNotFoundError(f"step {step} left host memory")
            self.host.verify(slot)
            return LazyCheckpoint.from_host(slot, pool=self.host)
        reader = self._tier_reader(step, source, self._read_rank(step, source, rank))
        if excp.is_lossy(reader.manifest):
            return excp.lazy_checkpoint(reader)
        return LazyCheckpoint(reader)

    def open_checkpoint(self, step: int | None = None, *, rank: int | None = None) -> LazyCheckpoint:
        """A lazy mapping name -> :class:`~asymstore.lazy.LazyTensor` of ``step`` (default: the newest).

        Reads in the catalog's order: the host memory slot, then the tiers in chain order; a copy that is
        damaged (when opened or when a range is read) is replaced by the next one. ``rank``: which rank's
        part of a multi-rank step (default: ours when the world size matches, else rank 0's). A step the job
        resumes from whose marker is missing (:meth:`agreed_latest_step`) is read from this rank's committed part
        when no complete copy can be.
        """
        s = self.latest_step() if step is None else step
        if s is None:
            raise StepNotFoundError("no complete checkpoint on any tier")
        sources = list(self._iter_read_order(s, rank, part=s in self._resumed_parts))
        outcome = catalog.read_first(sources, lambda src: self._open_lazy(s, src, rank), what=f"step {s}")
        later = sources[sources.index(outcome.source) + 1 :]
        return outcome.value.with_fallbacks([(src.name, self._lazy_copy(s, src, rank)) for src in later])

    def discard_uncommitted(self, *, after: int | None = None) -> dict[str, list[int]]:
        """Delete this rank's leftovers of checkpoints that never committed, on every reachable tier (only
        steps newer than ``after`` if given).

        Call it when a job starts or resumes (the trainer hooks' ``resume`` does), never while
        this process is saving. Until the ranks of a job agree on the step to resume from
        (:meth:`agreed_latest_step`), this rank's committed parts of steps whose marker is missing stay: the job
        may resume from one of them; after it, the part of the step it resumes from stays. Returns the steps cleaned per tier.
        """
        out: dict[str, list[int]] = {}
        held = [s.step for s in self.host.slots if s.persisting and s.step is not None]  # being persisted now
        held += self._committed_parts() if self._settling else sorted(self._resumed_parts)
        for t in self.tiers:
            try:
                cleaned = t.discard_uncommitted(after=after, keep=held)
            except AsymstoreError as e:
                log.warning("tier %s: leftovers not cleaned (%s)", t.name, e)
                continue
            if cleaned:
                out[t.name] = cleaned
        return out

    # --- deleting ----------------------------------------------------------------
    def delete(self, step: int) -> None:
        """Remove ``step`` from every tier (refused while a delta checkpoint depends on it)."""
        self._check_open()
        if step not in self.steps():
            raise StepNotFoundError(f"step {step} is not complete on any tier")
        self.host.wait_persisted(step)  # a slot being persisted is never freed under its writer
        for t in self.tiers:
            deps = catalog.dependents(t.backend, step)
            if deps:
                raise AsymstoreError(f"step {step} is the delta base of steps {deps} on {t.name}; delete those first")
        self.host.drop(step)
        for t in self.tiers:
            if catalog.is_committed(t.backend, step):
                assert self.manager is not None  # a store with tiers has a manager
                self.manager.delete(t, step)  # promotion threads must not copy a step the tier no longer has

    # --- accounting and lifecycle ------------------------------------------------
    def memory_report(self) -> dict[str, int]:
        """Host memory reserved for checkpointing, in bytes."""
        region = self.host.region
        return {
            "host_slots": self.host.reserved_bytes,
            #: bytes this store's shared-memory region holds of the tmpfs (its slots' files; 0: private slots)
            "shared_memory": region_bytes(region.path) if region is not None else 0,
            "delta_bases": sum(t.reserved_bytes for t in self.tiers),
            "staging_budget": self.config.staging_budget_bytes,
        }

    def _check_open(self) -> None:
        if self._closed:
            raise AsymstoreError("this store is closed")

    def close(self) -> None:
        """Finish background work and release the tiers; re-raises a background failure."""
        if self._closed:
            return
        _OPEN_STORES.discard(self)
        with self.booster.boosted():  # what close() waits for runs at the caller's priority
            self._executor.shutdown(wait=True)
            if self._sealer is not None:  # idle: every seal is awaited by its persistence
                self._sealer.shutdown(wait=True)
        self._closed = True
        with self._watch_cv:
            self._watch_cv.notify_all()
        if self.manager is not None:
            if not self.manager.flush(self.config.close_timeout_s):
                log.warning(
                    "closing with promotions still pending (%s)",
                    "; ".join(f"{t['name']}: {t['last_error']}" for t in self.manager.status() if t["pending"]),
                )
            self.manager.close()
        self._asking.shutdown(wait=False)  # a listing stuck on a frozen tier is not waited for
        if self.replicas is not None:
            self.replicas.drain(self.config.close_timeout_s)
            self.replicas.close(remove=not self.config.keep_shm)
        self._close_region()  # asks the first tier what is durable: before the tiers are released
        for t in self.tiers:
            t.close()
        self._raise_background()

    def _close_region(self) -> None:
        """Remove the shared region at a clean close, unless asked to keep it or it holds the only copy of a
        snapshot (a failed persistence): then it stays for the next process, which persists it."""
        region = self.host.region
        if region is None:
            return
        undurable = [
            s.step
            for s in self.host.slots
            if s.state == "ready"
            and s.step is not None
            and not s.durable
            and self.tiers
            and not self._durable_here(s.step)
        ]
        if undurable:
            log.warning(
                "keeping the shared-memory region %s: steps %s are not durable on %s yet; the next store of this "
                "job persists them (or remove it with `asymstore shm rm`)",
                region.path,
                undurable,
                self.tiers[0].name,
            )
        region.close(remove=not (self.config.keep_shm or undurable))
        self.host.forget_buffers()  # the mappings go now, not when this object is collected

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: stores not closed yet: closed (persistence finished, bounded) when the interpreter exits
_OPEN_STORES: weakref.WeakSet[Store] = weakref.WeakSet()


def _close_at_exit() -> None:
    """A script that exits without ``close()`` still gets its pending checkpoints persisted (each store waits
    at most its ``close_timeout_s``); what could not finish is named in a warning, and stays in shared memory
    for the next process where the host slots are shared."""
    for store in list(_OPEN_STORES):
        pending = [s.step for s in store.host.slots if s.persisting]
        if pending:
            log.warning(
                "asymstore: the interpreter exits with steps %s not yet persisted: persisting them now", pending
            )
        t = threading.Thread(target=_close_quietly, args=(store,), name="asymstore-exit", daemon=True)
        t.start()
        t.join(store.config.close_timeout_s)
        if t.is_alive():
            log.error(
                "asymstore: steps %s were not persisted within close_timeout_s=%s at exit%s",
                pending,
                store.config.close_timeout_s,
                "; they stay in host shared memory for the next process" if store.host.region is not None else "",
            )


# Run before concurrent.futures joins its worker threads at interpreter shutdown (after that, persistence can
# no longer start its I/O pools): threading's exit hooks run newest first, before ``atexit``'s.
_register_exit = getattr(threading, "_register_atexit", atexit.register)
_register_exit(_close_at_exit)


def _close_quietly(store: Store) -> None:
    try:
        store.close()
    except BaseException as e:
        log.error("asymstore: closing a store at exit failed: %s", e)


def _stream_buffer(nbytes: int, step: int) -> torch.Tensor:
    """A host buffer for a whole checkpoint stream, or :class:`HostMemoryError` saying what to do instead."""
    advice = (
        f"restoring step {step} needs {nbytes} bytes of host memory for its stream; read it lazily "
        "(store.open_checkpoint(step), restore_tensors) or on a machine with more memory"
    )
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:]}
        if nbytes > info.get("MemAvailable", nbytes) + info.get("SwapFree", 0):
            raise HostMemoryError(f"{advice} ({info['MemAvailable']} bytes are available)")
    except (OSError, ValueError, IndexError):
        pass
    try:
        return new_host_buffer(nbytes)
    except (RuntimeError, MemoryError) as e:
        raise HostMemoryError(f"{advice} ({e})") from e


def _scatter_pieces(layout: Layout, target: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, int, int]]]:
    """``(name, (stream offset, nbytes, address))`` of every in-place target a host slot can be copied into
    byte for byte (a contiguous CPU tensor of the entry's dtype and shape), in stream order."""
    entries = layout.by_name()
    out = []
    for name, t in target.items():
        e = entries.get(name)
        if (
            e is not None
            and t.device.type == "cpu"
            and t.is_contiguous()
            and t.dtype == dtypes.from_name(e.dtype)
            and tuple(t.shape) == e.shape
            and not t.is_conj()
            and not t.is_neg()
        ):
            out.append((name, (e.offset, e.nbytes, t.data_ptr())))
    return sorted(out, key=lambda p: p[1][0])


def _selected(name: str, names: NameFilter) -> bool:
    if names is None:
        return True
    if callable(names):
        return bool(names(name))
    return name in set(names)


def check_compatible(layout: Layout, target: dict[str, torch.Tensor], *, strict: bool) -> None:
    """Raise :class:`StateMismatchError` listing every name, shape and dtype difference."""
    entries = layout.by_name()
    problems = []
    for name, t in target.items():
        e = entries.get(name)
        if e is None:
            if strict:
                problems.append(f"{name}: not in the checkpoint")
            continue
        want = dtypes.from_name(e.dtype)
        if tuple(t.shape) != e.shape or t.dtype != want:
            problems.append(f"{name}: target {t.dtype} {tuple(t.shape)}, checkpoint {want} {e.shape}")
    if strict:
        missing = [n for n in entries if n not in target]
        problems += [f"{n}: in the checkpoint but not in the target" for n in missing]
    if problems:
        raise StateMismatchError(
            "cannot restore in place:\n  "
            + "\n  ".join(problems[:50])
            + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else "")
            + (
                "\n(pass strict=False to restore only the matching tensors)"
                if strict
                else "\n(strict=False skips names the checkpoint or the target lacks, not a tensor whose shape or "
                "dtype differs: change that tensor in the target to match, or leave it out of the target)"
            )
        )


def open_store(tiers: str | ObjectStore | TierSpec | Sequence[str | ObjectStore | TierSpec], **options: Any) -> Store:
    """Open a store: host memory first, then the given tier URL(s), e.g. ``open_store("/ckpt")``.

    ``keep=`` (retention) and ``name=`` apply to the first tier, e.g. ``open_store("/ckpt", keep=2)``; give
    each tier its own with :class:`TierSpec`. Other options are :class:`~asymstore.config.Config` fields.
    """
    chain = [tiers] if isinstance(tiers, (str, ObjectStore, TierSpec)) else list(tiers)
    spec = {k: options.pop(k) for k in ("keep", "name") if k in options}
    if spec:
        if not chain:
            raise ConfigError(f"{', '.join(spec)}= applies to the first tier, but no tier is given")
        first = chain[0]
        if isinstance(first, TierSpec):
            raise ConfigError(f"the first tier is a TierSpec: give {', '.join(spec)}= in it, not to open_store")
        chain[0] = TierSpec(first, **spec)
    return Store(chain, **options)
