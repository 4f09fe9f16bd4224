"""The host tier: K reusable snapshot slots (pinned when CUDA is present).

A slot holds one checkpoint's byte stream. Its life: ``free`` -> ``filling`` (snapshot
copy in progress) -> ``ready`` (complete in host memory; persistence may still run).
A ready slot is reused for a newer snapshot only once its persistence has finished;
then the oldest persisted slot is evicted. Memory is K x the largest state, allocated
once and reused, so it stays flat across any number of checkpoints.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .errors import SnapshotSlotsBusyError
from .layout import Layout
from .write_plan import CheckpointContent

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


class HostPool:
    """K snapshot slots with the wait/skip policy for slots still persisting."""

    def __init__(self, slots: int, *, pin_memory: bool | None = None) -> None:
        self.slots = [Slot(i) for i in range(slots)]
        self.pin = cuda_available() if pin_memory is None else pin_memory
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
        # page-aligned, so partitions can be written with direct I/O straight from the slot
        raw = torch.empty(size + _PAGE, dtype=torch.uint8, pin_memory=self.pin)
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
                same = [
                    s for s in self.slots if s.step == step and s.state == "ready" and not s.persisting and not s.leases
                ]
                free = [s for s in self.slots if s.state == "free"]
                evictable = sorted(
                    (s for s in self.slots if s.state == "ready" and not s.persisting and not s.leases),
                    key=lambda s: s.ready_time,
                )
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
                self._cv.wait(remaining)
            pick.state = "filling"
            pick.step = step
            pick.persisting = False
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
            self._cv.notify_all()

    def mark_persisted(self, slot: Slot) -> None:
        """The slot's persistence finished (or failed): it may be reused."""
        with self._cv:
            slot.persisting = False
            self._cv.notify_all()

    def release(self, slot: Slot) -> None:
        """Return a slot whose snapshot was abandoned (failed copy)."""
        with self._cv:
            slot.state, slot.step, slot.persisting = "free", None, False
            self._cv.notify_all()

    def drop(self, step: int) -> None:
        """Forget the host copy of ``step`` (its slot becomes free)."""
        with self._cv:
            for s in self.slots:
                if s.step == step and s.state == "ready":
                    s.state, s.step = "free", None
            self._cv.notify_all()

    def lease(self, step: int) -> Slot | None:
        """Pin the ready slot of ``step`` against reuse until :meth:`unlease`; ``None`` if absent."""
        with self._cv:
            for s in self.slots:
                if s.step == step and s.state == "ready":
                    s.leases += 1
                    return s
        return None

    def unlease(self, slot: Slot) -> None:
        """End a :meth:`lease`."""
        with self._cv:
            slot.leases -= 1
            self._cv.notify_all()

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
        with self._cv:
            return self._cv.wait_for(lambda: not any(s.step == step and s.persisting for s in self.slots), timeout)
