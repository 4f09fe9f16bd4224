"""The host tier: K reusable snapshot slots (pinned when CUDA is present).

A slot holds one checkpoint's byte stream. Its life: ``free`` -> ``filling`` (snapshot
copy in progress) -> ``ready`` (complete in host memory; persistence may still run).
A ready slot is reused for a newer snapshot only once its persistence has finished;
then the oldest persisted slot is evicted. Memory is K x the largest state, allocated
once and reused, so it stays flat across any number of checkpoints.

With a :class:`~asymstore.shm.ShmRegion` the buffers are shared-memory files that outlive the process: a slot
is un-committed before it is reused and committed (:meth:`HostPool.seal`) once its bytes and checksums are in
place, and a new process adopts the committed slots an earlier one left (:meth:`HostPool.adopt`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .errors import SnapshotSlotsBusyError
from .layout import Layout
from .shm import ShmRegion, SlotRecord, verify_into
from .snapshot import new_host_buffer
from .write_plan import CheckpointContent
from .zarrfmt import StreamCrcs

_PAGE = 4096


def cuda_available() -> bool:
    """Whether CUDA is present (host slots are then pinned by default)."""
    return torch.cuda.is_available()


@dataclass
class Slot:
    """One host snapshot slot: a reusable buffer, and the checkpoint it holds once ready."""

    index: int
    buffer: torch.Tensor | None = None  # uint8, 1-D
    state: Literal["free", "filling", "ready"] = "free"
    step: int | None = None
    #: what the checkpoint in the buffer holds besides its bytes (set when the slot becomes ready)
    content: CheckpointContent | None = None
    persisting: bool = False
    ready_time: float = 0.0
    leases: int = 0  # readers (promotions, restores) that must not see the slot reused
    #: the slot's commit record in shared memory (``None``: private memory, or not committed there yet)
    record: SlotRecord | None = None
    #: the pid of the process that filled the slot, when an earlier process left it in shared memory
    origin_pid: int | None = None
    #: whether the bytes of an adopted slot were checked against its record's checksums
    verified: bool = False
    #: the slot's step reached the first persistent tier (so its host copy is never the only one it had)
    durable: bool = False

    def stream_crcs(self) -> StreamCrcs | None:
        """The chunk checksums of the slot's stream, when it is committed in shared memory (they were computed
        from these bytes, which do not change while the slot holds the step)."""
        rec = self.record
        return StreamCrcs(rec.chunk_bytes, rec.crcs) if rec is not None and rec.step == self.step else None

    @property
    def layout(self) -> Layout | None:
        """The layout of the stream in the buffer (``None`` before the slot was first ready)."""
        return self.content.layout if self.content is not None else None

    @property
    def skeleton(self) -> Any:
        """The state's skeleton (``None`` before the slot was first ready)."""
        return self.content.skeleton if self.content is not None else None

    @property
    def numpy_names(self) -> list[str]:
        """Names of tensors that were numpy arrays, sorted."""
        return list(self.content.numpy_names) if self.content is not None else []

    @property
    def user(self) -> dict[str, Any]:
        """The user's metadata saved with the checkpoint."""
        return dict(self.content.user) if self.content is not None else {}

    @property
    def capacity(self) -> int:
        """Bytes of the buffer (0 before the first allocation)."""
        return 0 if self.buffer is None else self.buffer.numel()

    def memview(self) -> memoryview:
        """The checkpoint's stream in the buffer, as flat bytes (no copy)."""
        assert self.buffer is not None and self.content is not None
        return self.buffer.numpy().data.cast("B")[: self.content.layout.total_bytes]


def _evictable(s: Slot) -> bool:
    """A ready slot a new snapshot may overwrite: persisted (or never to be) and read by nobody."""
    return s.state == "ready" and not s.persisting and not s.leases


class HostPool:
    """K snapshot slots with the wait/skip policy for slots still persisting."""

    def __init__(self, slots: int, *, pin_memory: bool | None = None, region: ShmRegion | None = None) -> None:
        self.slots = [Slot(i) for i in range(slots)]
        self.pin = cuda_available() if pin_memory is None else pin_memory
        #: the shared-memory region the slots live in (``None``: private memory of this process)
        self.region = region
        #: entered while a caller waits for a slot to be persisted (the store raises its persistence thread's
        #: priority meanwhile: a wait must never depend on an idle-priority thread getting a core)
        self.waiting: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext
        #: held while every slot is filling or persisting: the next snapshot will wait for a persistence, so it
        #: runs at normal priority now rather than once a caller waits (entered from ``waiting``)
        self._ahead: AbstractContextManager[object] | None = None
        #: how often a snapshot took the last slot not persisting (persistence was raised ahead of a wait)
        self.ahead_boosts = 0
        self._cv = threading.Condition()
        self.waits = 0
        self.wait_seconds = 0.0
        self.skips = 0

    # --- memory accounting -------------------------------------------------------
    @property
    def reserved_bytes(self) -> int:
        """Host memory held by the slots' buffers (bytes)."""
        return sum(s.capacity for s in self.slots)

    def _alloc(self, slot: Slot, nbytes: int) -> None:
        if slot.buffer is not None and nbytes <= slot.capacity <= max(2 * nbytes, 1 << 20):
            return  # reuse (a state without tensors still needs a buffer: capacity 0 is no buffer)
        slot.buffer = None
        size = max(nbytes, 64)
        if self.region is not None:  # a tmpfs file: page-aligned, reserved, shared
            slot.buffer = self.region.allocate(slot.index, size)
            return
        # page-aligned, so partitions can be written with direct I/O straight from the slot; unpinned and large:
        # in huge pages, physically contiguous 2 MiB pieces (a fragmented machine's scattered 4 KiB pages cap each
        # device request at its segment limit: 254 x 4 KiB on virtio)
        if not self.pin:
            slot.buffer = new_host_buffer(size, page_aligned=True)
            return
        raw = torch.empty(size + _PAGE, dtype=torch.uint8, pin_memory=True)
        skip = -raw.data_ptr() % _PAGE
        slot.buffer = raw[skip : skip + size]

    # --- slot life ---------------------------------------------------------------
    def acquire(
        self, nbytes: int, step: int, *, policy: Literal["wait", "skip"] = "wait", timeout: float | None = None
    ) -> Slot:
        """A slot for a new snapshot of ``nbytes``; evicts the oldest persisted one if needed."""
        t0 = time.perf_counter()
        waited = False
        with self._cv:
            while True:
                same = [s for s in self.slots if s.step == step and _evictable(s)]
                free = [s for s in self.slots if s.state == "free"]
                evictable = sorted(filter(_evictable, self.slots), key=lambda s: s.ready_time)
                candidates = same or free or evictable
                if candidates:
                    pick = candidates[0]
                    break
                if policy == "skip":
                    self.skips += 1
                    raise SnapshotSlotsBusyError(
                        f"all {len(self.slots)} host snapshot slots are still persisting; checkpoint of step "
                        f"{step} skipped (raise host_slots, or use slot_policy='wait')"
                    )
                waited = True
                remaining = None if timeout is None else timeout - (time.perf_counter() - t0)
                if remaining is not None and remaining <= 0:
                    raise SnapshotSlotsBusyError(f"no host snapshot slot became free within {timeout} s")
                with self.waiting():
                    self._cv.wait(remaining)
            pick.state = "filling"
            pick.step = step
            pick.persisting = False
            self._uncommit(pick)
            self._boost_ahead()
        if waited:
            self.waits += 1
            self.wait_seconds += time.perf_counter() - t0
        self._alloc(pick, nbytes)
        return pick

    def mark_ready(self, slot: Slot, *, content: CheckpointContent, persisting: bool) -> None:
        """The slot's buffer holds the whole checkpoint ``content`` describes; ``persisting``: its persistence
        starts now (the slot is not reused before :meth:`mark_persisted`)."""
        with self._cv:
            slot.content = content
            slot.state = "ready"
            slot.persisting = persisting
            slot.ready_time = time.monotonic()
            self._changed()

    def claim_for_persistence(self, slot: Slot, step: int) -> bool:
        """Mark the ready slot holding ``step`` as being persisted (not to be reused until
        :meth:`mark_persisted`); False when it was reused or dropped meanwhile."""
        with self._cv:
            if slot.state != "ready" or slot.step != step:
                return False
            slot.persisting = True
            self._changed()
            return True

    def mark_persisted(self, slot: Slot) -> None:
        """The slot's persistence finished (or failed): it may be reused."""
        with self._cv:
            slot.persisting = False
            self._changed()

    def _changed(self) -> None:
        """Under the lock, after a slot changed state: re-evaluate the raise ahead of a wait, wake the waiters."""
        self._boost_ahead()
        self._cv.notify_all()

    def _boost_ahead(self) -> None:
        """Under the lock: raise persistence while no slot is free for the next snapshot and one is persisting
        (the next snapshot's slot depends on it: with overlapped strategies a slot fills during a whole
        iteration, so a persistence has one iteration to free its slot), and lower it again once one is."""
        full = not any(s.state == "free" or _evictable(s) for s in self.slots)
        if full and any(s.persisting for s in self.slots):
            if self._ahead is None:
                self._ahead = self.waiting()
                self._ahead.__enter__()
                self.ahead_boosts += 1
        elif self._ahead is not None:
            ahead, self._ahead = self._ahead, None
            ahead.__exit__(None, None, None)

    def release(self, slot: Slot) -> None:
        """Return a slot whose snapshot was abandoned (failed copy)."""
        with self._cv:
            self._uncommit(slot)
            slot.state, slot.step, slot.persisting = "free", None, False
            self._changed()

    def drop(self, step: int) -> None:
        """Forget the host copy of ``step`` (its slot becomes free)."""
        with self._cv:
            for s in self.slots:
                if s.step == step and s.state == "ready":
                    self._uncommit(s)
                    s.state, s.step = "free", None
            self._changed()

    # --- shared memory -----------------------------------------------------------
    def _uncommit(self, slot: Slot) -> None:
        """The slot's bytes are about to change or be forgotten: its shared-memory record goes first."""
        if self.region is not None:
            self.region.invalidate(slot.index)
        slot.record, slot.origin_pid, slot.verified, slot.durable = None, None, False, False

    def seal(self, slot: Slot, crcs: tuple[int, ...] | None = None) -> None:
        """Commit a ready slot in shared memory (checksums + record): from now on it survives this process.
        No-op for private memory. Runs on a background thread: the checksums read the whole stream (``crcs``:
        already computed from the slot's bytes, ``shm.VERIFY_CHUNK`` apiece)."""
        if self.region is None or slot.record is not None:
            return
        assert slot.content is not None and slot.step is not None
        rec = self.region.commit(slot.index, slot.step, slot.content, slot.memview(), crcs)
        with self._cv:
            if slot.state == "ready" and slot.step == rec.step:
                slot.record = rec
            else:  # reused or dropped meanwhile (cannot happen while persisting; kept safe)
                self.region.invalidate(slot.index)

    def mark_durable(self, slot: Slot) -> None:
        """The slot's step is on the first persistent tier: say so in its record too (a restarted store must
        not persist it again once retention has deleted it there)."""
        slot.durable = True
        rec = slot.record
        if self.region is not None and rec is not None and not rec.durable:
            slot.record = self.region.commit_record(dataclasses.replace(rec, durable=True))

    def adopt(self) -> list[Slot]:
        """Take over the committed slots an earlier process left in the region; they are ready, not yet
        verified (:meth:`verify`). Returns them, oldest step first."""
        if self.region is None:
            return []
        out = []
        with self._cv:
            for rec, buf in self.region.adopt():
                while rec.slot >= len(self.slots):  # the earlier process had more slots: keep its snapshots
                    self.slots.append(Slot(len(self.slots)))
                s = self.slots[rec.slot]
                s.buffer, s.state, s.step, s.content = buf, "ready", rec.step, rec.content
                s.record, s.origin_pid, s.verified = rec, rec.pid, rec.pid == os.getpid()
                s.durable = rec.durable
                s.persisting, s.ready_time = False, time.monotonic()
                out.append(s)
        return out

    def forget_buffers(self) -> None:
        """Drop every slot's buffer (the store is closed): its memory or mapping is released once no reader
        holds a view of it."""
        with self._cv:
            for s in self.slots:
                s.buffer, s.state, s.step, s.content, s.record = None, "free", None, None, None
            self._changed()

    def verify(
        self,
        slot: Slot,
        into: torch.Tensor | None = None,
        *,
        scatter: Sequence[tuple[str, tuple[int, int, int]]] = (),
    ) -> bool:
        """Check an adopted slot against its record's checksums, once; with ``into`` (a uint8 CPU buffer) the
        stream is copied there in the same pass, with ``scatter`` (``(name, (offset, nbytes, address))``, in
        stream order) those stream ranges are copied to those addresses. Returns whether anything was copied
        (False when the slot needed no check). ``CorruptCheckpointError`` on damage; the slot is then dropped."""
        if slot.verified or slot.record is None:
            return False
        assert slot.buffer is not None
        try:
            verify_into(
                slot.buffer,
                slot.record,
                into,
                scatter=[p for _, p in scatter],
                where=f"host shared memory slot {slot.index}",
            )
        except BaseException:
            if slot.step is not None:
                self.drop(slot.step)
            raise
        slot.verified = True
        return into is not None or bool(scatter)

    def lease(self, step: int) -> Slot | None:
        """Pin the ready slot of ``step`` against reuse until :meth:`unlease`; ``None`` if absent."""
        with self._cv:
            for s in self.slots:
                if s.step == step and s.state == "ready":
                    s.leases += 1
                    self._boost_ahead()  # a leased slot cannot take the next snapshot
                    return s
        return None

    def unlease(self, slot: Slot) -> None:
        """End a :meth:`lease`."""
        with self._cv:
            slot.leases -= 1
            self._changed()

    def find(self, step: int) -> Slot | None:
        """The ready slot holding ``step``, if any (not leased: it may be reused at any time)."""
        with self._cv:
            for s in self.slots:
                if s.step == step and s.state == "ready":
                    return s
        return None

    def steps(self) -> list[int]:
        """Steps complete in host memory, oldest first."""
        with self._cv:
            return sorted(s.step for s in self.slots if s.state == "ready" and s.step is not None)

    def wait_persisted(self, step: int, timeout: float | None = None) -> bool:
        """Wait until no slot holding ``step`` is still being persisted."""
        with self._cv, self.waiting():
            return self._cv.wait_for(lambda: not any(s.step == step and s.persisting for s in self.slots), timeout)
