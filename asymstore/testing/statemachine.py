"""A Hypothesis state machine that drives a :class:`~asymstore.Store` against a model of what must be readable.

Rules: save (blocking, or non-blocking and waited later), save over a committed step (refused), delete,
retention (tiers with ``keep=``), flush, clean close and reopen, crash and reopen, restore (the newest step and a
given one, bit-exact), lazy reads (``open_checkpoint`` slices). The model holds the saved states and three sets
of steps: those that **must** be readable (committed and kept by the first tier's retention), those that **may**
be readable (a retention may have removed them, or they live on a lower tier only), and those **pending** (saved
without blocking, not yet waited).

Invariants after every rule: ``steps()`` is sorted and lists nothing the model does not know (nothing
uncommitted); every step that must be readable is listed, and on the first tier (its retention never keeps fewer
steps than its policy); after a flush, each lower tier holds at least as many steps as its policy keeps of the
tier above. Every restore and lazy read is compared bit for bit with the state that was saved.

A crash is simulated in-process: every backend of the store is wrapped in a :class:`CrashableBackend`, and a
crash lets the store make ``after_ops`` more writes or deletes to storage; everything after that lands only in
the dead process's private view (so its threads finish without errors, as if they had been killed) and never on
the tier. Tiers whose backend is not durable are wiped, then a fresh store opens the same URLs. A non-blocking
save not yet waited may be lost, but if its step is listed after the reopen it must restore bit-exact.

Use it with your own tiers (a backend author: your URL first, or below a local directory)::

    from asymstore.testing.statemachine import StoreMachine, TierUnderTest

    class MyTierMachine(StoreMachine):
        def make_tiers(self):  # fresh, empty tiers for each example
            return [TierUnderTest(f"myfs://bucket/{uuid.uuid4().hex}", keep=2)]

    TestMyTier = MyTierMachine.TestCase
    TestMyTier.settings = hypothesis.settings(max_examples=25, stateful_step_count=20, deadline=None)
"""

from __future__ import annotations

import builtins
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from asymstore.backends import open_object_store
from asymstore.errors import StepExistsError, StepNotFoundError
from asymstore.interfaces import Buffer, ByteRange, ObjectStore, as_buffers
from asymstore.retention import LatestN
from asymstore.state import flatten
from asymstore.store import SaveHandle, Store, TierSpec

#: the largest float32 weight tensor of a saved state (elements): 12 KB, two partitions of 8 KiB
MAX_ELEMENTS = 3000

__all__ = ["CrashPoint", "CrashableBackend", "StoreMachine", "StoreModel", "TierUnderTest", "crashable", "make_state"]


# --- a backend that a simulated crash cuts off from storage -------------------------------------------------------
class CrashPoint:
    """How many more writes and deletes one (simulated) process may make to storage: unlimited until :meth:`crash`.

    Shared by every backend of one store, so the crash cuts all its tiers at the same moment.
    """

    def __init__(self) -> None:
        self._left: int | None = None
        self._lock = threading.Lock()

    def crash(self, *, after_ops: int) -> None:
        """From now on, only ``after_ops`` more mutating operations reach storage."""
        with self._lock:
            self._left = max(after_ops, 0)

    @property
    def alive(self) -> bool:
        """Operations still reach storage."""
        with self._lock:
            return self._left is None or self._left > 0

    def admit(self) -> bool:
        """Count one mutating operation; False once the process is dead for storage."""
        with self._lock:
            if self._left is None:
                return True
            if self._left == 0:
                return False
            self._left -= 1
            return True


class CrashableBackend(ObjectStore):
    """Forwards to ``inner`` until its :class:`CrashPoint` runs out; later writes and deletes go to a private view.

    The dead process still sees its own writes (its threads finish normally, as if killed at that point), while
    storage keeps exactly the operations made before the crash. Build one with :func:`crashable`, which copies
    the inner backend's capabilities.
    """

    def __init__(self, inner: ObjectStore, point: CrashPoint) -> None:
        super().__init__(inner.url)
        self.inner = inner
        self.point = point
        self._written: dict[str, bytes] = {}  # after the crash: this process's writes, never stored
        self._deleted: set[str] = set()  # after the crash: this process's deletes, never applied
        self._lock = threading.Lock()

    def _diverged(self) -> bool:
        with self._lock:
            return bool(self._written or self._deleted)

    def _keep(self, key: str, data: Buffer | Sequence[Buffer] | None) -> None:
        blob = None if data is None else b"".join(as_buffers(data))
        with self._lock:
            if blob is None:
                self._written.pop(key, None)
                self._deleted.add(key)
            else:
                self._written[key] = blob
                self._deleted.discard(key)

    def put(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        """Write through while alive, else into the private view."""
        if self.point.admit():
            self.inner.put(key, data)
        else:
            self._keep(key, data)

    def put_atomic(self, key: str, data: Buffer | Sequence[Buffer]) -> None:
        """Atomic write through while alive, else into the private view."""
        if self.point.admit():
            self.inner.put_atomic(key, data)
        else:
            self._keep(key, data)

    def delete(self, key: str) -> None:
        """Delete through while alive, else only in the private view."""
        if self.point.admit():
            self.inner.delete(key)
        else:
            self._keep(key, None)

    def delete_prefix(self, prefix: str) -> int:
        """One operation while alive; after the crash every key under ``prefix`` is deleted in the private view."""
        if self.point.admit():
            return self.inner.delete_prefix(prefix)
        keys = list(self.list(prefix))
        for k in keys:
            self._keep(k, None)
        return len(keys)

    def barrier(self, prefix: str) -> None:
        """Forwarded while alive (it changes no object)."""
        if self.point.alive:
            self.inner.barrier(prefix)

    def get(self, key: str, byte_range: ByteRange | None = None) -> bytes | None:
        """The private view's object first, then storage's."""
        with self._lock:
            if key in self._deleted:
                return None
            blob = self._written.get(key)
        if blob is None:
            return self.inner.get(key, byte_range)
        if byte_range is None:
            return blob
        start, end = byte_range.resolve(len(blob))
        return blob[start:end]

    def get_into(self, key: str, out: memoryview, offset: int = 0) -> bool:
        """Storage's ranged read, unless the private view holds ``key``."""
        with self._lock:
            private = key in self._deleted or key in self._written
        return super().get_into(key, out, offset) if private else self.inner.get_into(key, out, offset)

    def size(self, key: str) -> int | None:
        """The size in the private view, else on storage."""
        with self._lock:
            if key in self._deleted:
                return None
            blob = self._written.get(key)
        return len(blob) if blob is not None else self.inner.size(key)

    def list(self, prefix: str = "") -> builtins.list[str]:
        """Storage's keys, with the private view's writes and deletes applied."""
        keys = set(self.inner.list(prefix))
        with self._lock:
            keys -= self._deleted
            keys |= {k for k in self._written if k.startswith(prefix)}
        return sorted(keys)

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        """Storage's listing while nothing diverged, else derived from :meth:`list`."""
        return super().list_dirs(prefix) if self._diverged() else self.inner.list_dirs(prefix)

    def close(self) -> None:
        """Close the inner backend."""
        self.inner.close()


def crashable(inner: ObjectStore, point: CrashPoint) -> CrashableBackend:
    """Wrap ``inner`` in a :class:`CrashableBackend` that declares the same capabilities."""
    cls = type(f"Crashable{type(inner).__name__}", (CrashableBackend,), {"capabilities": inner.capabilities})
    return cls(inner, point)  # type: ignore[no-any-return]


# --- states and their comparison ----------------------------------------------------------------------------------
def _bits(gen: torch.Generator, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Random bit patterns of ``dtype`` (NaNs and subnormals included); bool gets 0/1."""
    n = 1
    for d in shape:
        n *= d
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=gen, dtype=torch.uint8).view(torch.bool).reshape(shape)
    size = torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (n * size,), generator=gen, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def make_state(step: int, seed: int, n: int) -> dict[str, Any]:
    """A small training-like state: tensors of several dtypes (``n`` float32 weights, 0 allowed) and JSON values."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "w": _bits(gen, torch.float32, (n,)),
            "b": _bits(gen, torch.bfloat16, (n % 7 + 1, 3)),
            "mask": _bits(gen, torch.bool, (n % 5,)),
        },
        "opt": {"count": _bits(gen, torch.int64, (4,)), "lr": seed / 1024, "betas": [0.9, 0.999]},
        "step": step,
    }


def _same(got: Any, want: Any, path: str) -> None:
    """Raise AssertionError unless ``got`` equals ``want``: tensors by dtype, shape and bytes."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{path}: expected a tensor, got {type(got).__name__}"
        assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape), (
            f"{path}: {got.dtype}{tuple(got.shape)} != {want.dtype}{tuple(want.shape)}"
        )
        assert _raw(got) == _raw(want), f"{path}: tensor bytes differ"
    elif isinstance(want, Mapping):
        assert isinstance(got, Mapping) and list(got) == list(want), f"{path}: keys {list(got)} != {list(want)}"
        for k in want:
            _same(got[k], want[k], f"{path}/{k}")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), f"{path}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _same(g, w, f"{path}/{i}")
    else:
        assert type(got) is type(want) and got == want, f"{path}: {got!r} != {want!r}"


def _raw(t: torch.Tensor) -> bytes:
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


# --- the model ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TierUnderTest:
    """One persistent tier of the store under test: its URL, and its retention as ``LatestN(keep)``."""

    url: str
    #: retention: the latest ``keep`` steps (``None``: keep all)
    keep: int | None = None
    partition_bytes: int | None = None


@dataclass
class StoreModel:
    """What the store must and may hold: the saved states and three sets of steps (see the module docstring)."""

    #: the first tier's retention (``None``: keeps every step)
    keep_first: int | None
    states: dict[int, dict[str, Any]] = field(default_factory=dict)
    must: set[int] = field(default_factory=set)
    may: set[int] = field(default_factory=set)
    pending: dict[int, SaveHandle] = field(default_factory=dict)

    def known(self) -> set[int]:
        """Every step the store may list."""
        return self.must | self.may | set(self.pending)

    def commit(self, step: int) -> None:
        """``step`` is durable on the first tier."""
        self.pending.pop(step, None)
        self.must.add(step)
        self.trim()

    def forget(self, step: int) -> None:
        """``step`` is gone (deleted, or lost in a crash) and must never be listed again."""
        self.must.discard(step)
        self.may.discard(step)
        self.pending.pop(step, None)
        self.states.pop(step, None)

    def trim(self) -> None:
        """Steps the first tier's retention may delete move from *must* to *may*: only the latest ``keep``
        of everything saved there are sure to stay (a pending step takes a place when it lands)."""
        if self.keep_first is None:
            return
        newest = sorted(self.must | set(self.pending))[-self.keep_first :]
        for s in self.must - set(newest):
            self.must.discard(s)
            self.may.add(s)


# --- the machine ----------------------------------------------------------------------------------------------------
class StoreMachine(RuleBasedStateMachine):
    """Drives a :class:`~asymstore.Store` on the tiers of :meth:`make_tiers` against a :class:`StoreModel`.

    Subclass it and override :meth:`make_tiers` (fresh, empty tiers for every example) and, if the tiers need
    it, :meth:`cleanup_tiers`. ``store_options`` are the :class:`~asymstore.config.Config` options of every store
    the machine opens; small chunks and partitions keep each example fast.
    """

    store_options: ClassVar[dict[str, Any]] = {
        "chunk_bytes": 4096,
        "partition_bytes": 8192,
        "host_slots": 2,
        "background_idle": False,
        "close_timeout_s": 30.0,
    }

    def make_tiers(self) -> Sequence[TierUnderTest]:
        """Fresh, empty tiers for one example, fastest first (override)."""
        raise NotImplementedError("StoreMachine.make_tiers: return the tiers to test")

    def cleanup_tiers(self, tiers: Sequence[TierUnderTest]) -> None:
        """Remove what an example left on its tiers (default: nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.tiers = list(self.make_tiers())
        if not self.tiers:
            raise ValueError("StoreMachine needs at least one persistent tier")
        self.model = StoreModel(keep_first=self.tiers[0].keep)
        self.point = CrashPoint()
        self.store: Store | None = None
        self.next_step = 0
        self.flushed = False  # no rule ran since the last flush: lower tiers have received what they want

    # --- opening and closing ------------------------------------------------------------------------------------
    def _open(self) -> Store:
        self.point = CrashPoint()
        specs = [
            TierSpec(
                crashable(open_object_store(t.url), self.point),
                keep=None if t.keep is None else LatestN(t.keep),
                partition_bytes=t.partition_bytes,
            )
            for t in self.tiers
        ]
        return Store(specs, **self.store_options)

    @initialize()
    def open_store(self) -> None:
        """Open the store on the example's fresh tiers."""
        self.store = self._open()

    def _s(self) -> Store:
        assert self.store is not None, "the store is not open"
        self.flushed = False
        return self.store

    def teardown(self) -> None:
        """Close the store; a fresh store on the same tiers must still restore every step that must be readable."""
        try:
            if self.store is not None:
                self.store.close()
                for s in list(self.model.pending):
                    self.model.commit(s)
                with self._open() as fresh:
                    listed = fresh.steps()
                    for s in sorted(self.model.must):
                        assert s in listed, f"step {s} is not readable after a clean close (listed: {listed})"
                        _same(fresh.restore(s), self.model.states[s], f"step {s} after close")
        finally:
            self.store = None
            self.cleanup_tiers(self.tiers)

    # --- saving -------------------------------------------------------------------------------------------------
    def _new_state(self, gap: int, seed: int, n: int) -> tuple[int, dict[str, Any]]:
        self.next_step += gap
        state = make_state(self.next_step, seed, n)
        self.model.states[self.next_step] = state
        return self.next_step, state

    @rule(gap=st.integers(1, 3), seed=st.integers(0, 2**16), n=st.integers(0, MAX_ELEMENTS))
    def save(self, gap: int, seed: int, n: int) -> None:
        """A blocking save: durable on the first tier when it returns."""
        step, state = self._new_state(gap, seed, n)
        res = self._s().save(state, step).result()
        assert not res.skipped, f"step {step} was skipped"
        self.model.commit(step)

    @rule(gap=st.integers(1, 3), seed=st.integers(0, 2**16), n=st.integers(0, MAX_ELEMENTS))
    def save_nonblocking(self, gap: int, seed: int, n: int) -> None:
        """A non-blocking save: the state may change right after it returns (the snapshot is taken)."""
        step, state = self._new_state(gap, seed, n)
        live = {"model": {k: v.clone() for k, v in state["model"].items()}, "opt": state["opt"], "step": step}
        handle = self._s().save(live, step, blocking=False)
        for t in live["model"].values():  # training goes on: the saved copy must not see this
            if t.numel():
                t.view(torch.uint8).fill_(0xA5)
        self.model.pending[step] = handle
        self.model.trim()

    @precondition(lambda self: bool(self.model.pending))
    @rule(data=st.data())
    def wait_one(self, data: st.DataObject) -> None:
        """Wait for one non-blocking save."""
        step = data.draw(st.sampled_from(sorted(self.model.pending)), label="step")
        self._s()
        assert not self.model.pending[step].result(timeout=60).skipped
        self.model.commit(step)

    @precondition(lambda self: bool(self.model.pending))
    @rule()
    def wait_all(self) -> None:
        """``Store.wait``: every snapshot is durable on the first tier."""
        self._s().wait(timeout=60)
        for s in list(self.model.pending):
            self.model.commit(s)

    @precondition(lambda self: bool(self.model.must))
    @rule(data=st.data())
    def save_over_committed(self, data: st.DataObject) -> None:
        """Saving a committed step again is refused, and the step keeps its state."""
        step = data.draw(st.sampled_from(sorted(self.model.must)), label="step")
        try:
            self._s().save(make_state(step, 0, 1), step)
        except StepExistsError:
            return
        raise AssertionError(f"saving over committed step {step} was not refused")

    # --- deleting, flushing, reopening --------------------------------------------------------------------------
    @precondition(lambda self: bool(self.model.known()))
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        """Delete a listed step: it is never listed again."""
        store = self._s()
        listed = store.steps()
        if not listed:
            return
        step = data.draw(st.sampled_from(listed), label="step")
        try:
            store.delete(step)
        except StepNotFoundError:
            assert step not in self.model.must, f"committed step {step} vanished before its delete"
        self.model.forget(step)
        assert step not in store.steps(), f"deleted step {step} is still listed"

    @rule()
    def flush(self) -> None:
        """Wait for persistence and promotions; lower tiers then hold what their policies keep of the tier above."""
        store = self._s()
        assert store.flush(timeout=60), f"promotions still pending: {store.status()['tiers']}"
        for s in list(self.model.pending):
            self.model.commit(s)
        self.flushed = True

    @rule()
    def close_and_reopen(self) -> None:
        """A clean close waits for every save; a new store on the same tiers lists them all."""
        self._s().close()
        for s in list(self.model.pending):
            self.model.commit(s)
        self.store = self._open()

    @rule(after_ops=st.integers(0, 40))
    def crash_and_reopen(self, after_ops: int) -> None:
        """The process dies ``after_ops`` storage operations from now; a new one opens the same tiers."""
        old = self._s()
        self.point.crash(after_ops=after_ops)
        old.close()  # its threads run on in the dead process's view; storage keeps what came before the crash
        for t in self.tiers:  # what lived in the dead process's memory is gone
            raw = open_object_store(t.url)
            if not raw.durable:
                raw.delete_prefix("")
            raw.close()
        self.store = store = self._open()
        cleaned = store.discard_uncommitted()  # what a resuming job does first
        listed = store.steps()
        for tier, steps in cleaned.items():
            assert not set(steps) & self.model.must, f"discard_uncommitted removed committed steps {steps} on {tier}"
        for s in sorted(self.model.pending):
            if s in listed:  # it landed: it must be whole
                _same(store.restore(s), self.model.states[s], f"step {s} (saved without waiting, then a crash)")
                self.model.commit(s)
            else:
                self.model.forget(s)
        for s in self.model.may - set(listed):  # e.g. on a volatile lower tier only: lost with the process
            self.model.forget(s)

    # --- reading ------------------------------------------------------------------------------------------------
    def _draw_listed(self, data: st.DataObject) -> int | None:
        """One of the steps the store lists now (``None`` when it lists none)."""
        listed = self._s().steps()
        return data.draw(st.sampled_from(listed), label="step") if listed else None

    @precondition(lambda self: bool(self.model.known()))
    @rule()
    def restore_newest(self) -> None:
        """``restore()`` returns the newest listed step, bit-exact."""
        store = self._s()
        listed = store.steps()
        if not listed:
            assert not self.model.must
            return
        got = store.restore()
        assert store.last_restore is not None
        step = store.last_restore.step
        assert step == listed[-1], f"restore() read step {step}, the newest listed is {listed[-1]}"
        _same(got, self.model.states[step], f"restore() of step {step}")

    @precondition(lambda self: bool(self.model.known()))
    @rule(data=st.data())
    def restore_step(self, data: st.DataObject) -> None:
        """``restore(step)`` of a listed step, bit-exact (one that may be gone may have been removed meanwhile)."""
        store, step = self._s(), self._draw_listed(data)
        if step is None:
            return
        try:
            got = store.restore(step)
        except StepNotFoundError:
            assert step not in self.model.must, f"committed step {step} cannot be restored"
            return
        _same(got, self.model.states[step], f"restore({step})")

    @precondition(lambda self: bool(self.model.known()))
    @rule(data=st.data())
    def lazy_read(self, data: st.DataObject) -> None:
        """A slice of one tensor through ``open_checkpoint`` equals the same slice of the saved state."""
        store, step = self._s(), self._draw_listed(data)
        if step is None:
            return
        want = flatten(self.model.states[step]).tensors
        name = data.draw(st.sampled_from(sorted(want)), label="tensor")
        rows = want[name].shape[0] if want[name].dim() else 0
        a = data.draw(st.integers(0, rows), label="start")
        b = data.draw(st.integers(a, rows), label="stop")
        try:
            ck = store.open_checkpoint(step)
            got = ck[name][a:b] if want[name].dim() else ck[name].read()
        except StepNotFoundError:
            assert step not in self.model.must, f"committed step {step} cannot be opened"
            return
        _same(got, want[name][a:b] if want[name].dim() else want[name], f"step {step} {name}[{a}:{b}]")

    # --- invariants ---------------------------------------------------------------------------------------------
    @invariant()
    def listing_matches_the_model(self) -> None:
        """Sorted, nothing unknown, everything that must be readable (and, on the first tier, its retention)."""
        if self.store is None:
            return
        listed = self.store.steps()
        assert listed == sorted(set(listed)), f"steps() is not sorted and unique: {listed}"
        unknown = set(listed) - self.model.known()
        assert not unknown, f"steps {sorted(unknown)} are listed but were never committed (or were deleted)"
        missing = self.model.must - set(listed)
        assert not missing, f"committed steps {sorted(missing)} are not listed (listed: {listed})"
        first = self.store.tiers[0].name
        gone = [s for s in sorted(self.model.must) if first not in self.store.where(s)]
        assert not gone, f"retention left fewer steps than it keeps on {first}: {gone} are missing there"

    @invariant()
    def lower_tiers_keep_their_share(self) -> None:
        """After a flush, tier k holds at least min(keep_k, steps of tier k-1) steps (all of them without keep)."""
        if self.store is None or not self.flushed:
            return
        held = [self._tier_steps(t.name) for t in self.store.tiers]
        for k in range(1, len(held)):
            keep = self.tiers[k].keep
            want = len(held[k - 1]) if keep is None else min(keep, len(held[k - 1]))
            assert len(held[k]) >= want, (
                f"tier {self.store.tiers[k].name} holds {held[k]} after a flush; its policy keeps {want} of {held[k - 1]}"
            )

    def _tier_steps(self, name: str) -> list[int]:
        assert self.store is not None
        return [s for s in self.store.steps() if name in self.store.where(s)]
