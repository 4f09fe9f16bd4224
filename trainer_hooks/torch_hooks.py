"""Asymmetric snapshotting for a plain PyTorch training loop.

The state after optimizer step t (parameters, buffers, optimizer state, scheduler, RNG
states, step, user extras) does not change during forward(t+1) and backward(t+1). It is
copied to a host slot during those passes, one copy range per window from module hooks:
small copy ranges in the short forward windows, large ones in the longer backward windows
(:func:`asymstore.snapshot_plan.plan_asymmetric`). An optimizer step pre-hook is the
barrier: it copies what is left and waits, so no tensor is modified before its snapshot
is complete; the result is bit-identical to a synchronous copy taken right after step t.

Tensors that *do* change before the next step (buffers updated in forward, RNG states,
extras) are laid out first in the stream and copied at once when the snapshot begins.

Strategies sharing the same storage: ``sync`` (blocking copy and persist), ``checkfreq``
(blocking snapshot at the step boundary, background persist), ``uniform`` (equal
copy ranges in forward/backward, DataStates-LLM-like) and ``asym`` (the default).
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from asymstore import dtypes
from asymstore.errors import CheckpointFailedError, ConfigError, StateMismatchError, StepNotFoundError
from asymstore.globalmeta import Piece, describe_dtensor, is_dtensor
from asymstore.snapshot import dest_view
from asymstore.snapshot_plan import (
    ReplanGate,
    SnapshotPlan,
    WindowProfile,
    plan_all_at_step,
    plan_asymmetric,
    plan_uniform,
)
from asymstore.state import FlatState, _child, flatten, unflatten
from asymstore.store import PendingSnapshot, SaveHandle, Store

from .executor import CopyExecutor, CopyRecord, CudaCopyExecutor, make_executor
from .telemetry import CheckpointStats, Timeline

log = logging.getLogger("asymstore.hooks")

Strategy = Literal["sync", "checkfreq", "uniform", "asym"]
STRATEGIES: tuple[str, ...] = ("sync", "checkfreq", "uniform", "asym")


def default_blocks(model: nn.Module) -> list[nn.Module]:
    """Hook granularity: the members of the model's largest ModuleList/Sequential (the layers),
    or its direct children when it has none."""
    best: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > len(best):
            best = list(m)
    if len(best) >= 2:
        return best
    kids = [c for c in model.children() if any(True for _ in c.parameters())]
    return kids or [model]


def rng_state() -> dict[str, Any]:
    """The RNG states of python, numpy, torch and (when initialised) CUDA."""
    st: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Mapping[str, Any]) -> None:
    """Restore RNG states taken by :func:`rng_state`."""
    random.setstate(_tupleize(st["python"]))
    np_state = st["numpy"]
    np.random.set_state(tuple(np_state))
    # clone: a restored state is a view into the restore buffer, and torch.set_rng_state ignores a
    # storage offset (it reads from the start of the storage: "Invalid mt19937 state", or a crash)
    torch.set_rng_state(st["torch"].to(torch.uint8).cpu().clone())
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.to(torch.uint8).cpu().clone() for t in st["cuda"]])


_OPT_STATE = re.compile(r"^optimizers/(\d+)/state/(\d+)/")


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard; any other tensor itself."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def _dtensors_by_name(state: Any) -> dict[str, Any]:
    """The DTensors of ``state`` by their tensor names (docs/format.md section 8.1)."""
    out: dict[str, Any] = {}

    def walk(v: Any, path: str) -> None:
        if is_dtensor(v):
            out.setdefault(path or "<root>", v)
        elif isinstance(v, Mapping):
            for k, x in v.items():
                walk(x, _child(path, str(k)))
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(x, f"{path}/{i}")

    walk(state, "")
    return out


def _tupleize(v: Any) -> Any:
    return tuple(_tupleize(x) for x in v) if isinstance(v, (list, tuple)) else v


@dataclass
class _Active:
    """The snapshot in flight: begun after step t, completed at the barrier of step t+1."""

    snap: PendingSnapshot
    plan: SnapshotPlan
    offset: int  # stream offset where the planned (stable) region starts
    stats: CheckpointStats
    issued: set[tuple[int, int]] = field(default_factory=set)  # (start, end) of submitted copy ranges


class AsymCheckpointer:
    """Attach asymmetric checkpointing to a model, its optimizer(s), a scheduler and a store.

    Use::

        ck = AsymCheckpointer(model, opt, store, every=1, scheduler=sched,
                              extras=lambda: {"batch": batch_idx})
        with ck:                        # attach ... detach
            for batch in data:
                loss = model(batch).sum(); loss.backward(); opt.step(); opt.zero_grad()
        state = ck.resume()             # after a restart: restore everything, returns extras

    ``min_range_bytes``: the smallest copy range issued in a window (``min_partition_bytes``: deprecated alias).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizers: torch.optim.Optimizer | Sequence[torch.optim.Optimizer],
        store: Store,
        *,
        every: int = 1,
        scheduler: Any = None,
        strategy: Strategy = "asym",
        warmup: int = 2,
        extras: Callable[[], dict[str, Any]] | None = None,
        blocks: Sequence[nn.Module] | None = None,
        trace: bool = False,
        start_step: int = 0,
        replan_tolerance: float = 0.25,
        replan_sustain: int = 3,
        min_range_bytes: int = 1 << 16,
        min_partition_bytes: int | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ConfigError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if every < 1:
            raise ConfigError(f"every must be >= 1, got {every}")
        self.model = model
        self.optimizers = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers)
        if not self.optimizers:
            raise ConfigError("at least one optimizer is needed")
        self.store = store
        self.every = every
        self.scheduler = scheduler
        self.strategy: Strategy = strategy
        self.warmup = warmup
        self.extras = extras
        self.blocks = list(blocks) if blocks is not None else default_blocks(model)
        self.timeline = Timeline(enabled=trace)
        self.step = start_step
        self.replan_tolerance = replan_tolerance
        #: re-plan on a sustained drift of the measured windows (``replan_sustain`` checks in a row), not on noise
        self._replan_gate = ReplanGate(sustain=replan_sustain, rel_tol=replan_tolerance)
        self.min_range_bytes = min_range_bytes if min_partition_bytes is None else min_partition_bytes
        self.history: list[CheckpointStats] = []
        self.handles: list[SaveHandle] = []
        self._handles_stats: list[tuple[SaveHandle, CheckpointStats]] = []
        self._hooks: list[Any] = []
        self._active: _Active | None = None
        self._executor: CopyExecutor | None = None
        self._profile = WindowProfile(max_iterations=8)
        self._iter_fwd: list[float] = []
        self._iter_bwd: list[float] = []
        self._last_mark: float | None = None
        self._bwd_seen: set[int] = set()
        self._planned_windows: tuple[float, ...] | None = None
        self._plan_cache: tuple[tuple[int, int, tuple[float, ...]], SnapshotPlan] | None = None
        self._copy_bw: float | None = None
        self._iterations = 0
        self.replans = 0
        self._reported: list[BaseException] = []  # background failures already raised to the user
        #: what the last :meth:`resume` of a DTensor state read (step, saved ranks, world size, bytes ...)
        self.last_resume: dict[str, Any] = {}

    # --- attach / detach ---------------------------------------------------------
    def attach(self) -> AsymCheckpointer:
        """Install the hooks (idempotent); returns ``self``."""
        if self._hooks:
            return self
        self._attach_block_hooks()
        self._attach_step_hooks()
        return self

    def _attach_block_hooks(self) -> None:
        """Forward pre-hooks on the blocks, and a gradient hook on each block's last parameter."""
        for i, blk in enumerate(self.blocks):
            self._hooks.append(blk.register_forward_pre_hook(self._make_fwd_hook(i)))
            first_param = next((p for p in reversed(list(blk.parameters())) if p.requires_grad), None)
            if first_param is not None and hasattr(first_param, "register_post_accumulate_grad_hook"):
                self._hooks.append(first_param.register_post_accumulate_grad_hook(self._make_bwd_hook(i)))  # type: ignore[no-untyped-call]

    def _attach_step_hooks(self) -> None:
        """The barrier before the first optimizer's step; the snapshot begins after the last one's."""
        self._hooks.append(self.optimizers[0].register_step_pre_hook(self._barrier_hook))
        self._hooks.append(self.optimizers[-1].register_step_post_hook(self._post_step_hook))

    def detach(self, *, finish: bool = True) -> None:
        """Remove the hooks; with ``finish``, complete the snapshot in flight and wait for persistence;
        without, abandon it (its host slot is released, nothing of it is stored)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if finish and self._active is not None:
            self._complete(time.perf_counter())
        if finish:
            self.wait()
        elif self._active is not None:
            a, self._active = self._active, None
            try:
                if self._executor is not None:
                    self._executor.drain()  # no copy may still write into the slot
            except BaseException as e:
                log.debug("abandoned snapshot of step %s: %s", a.stats.step, e)
            finally:
                self.store.abort_snapshot(a.snap)
        if self._executor is not None:
            self._executor.close()
            self._executor = None

    def __enter__(self) -> AsymCheckpointer:
        return self.attach()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.detach(finish=exc_type is None)

    # --- the checkpointed state ----------------------------------------------------
    def state(self) -> dict[str, Any]:
        """The full training state, volatile parts first."""
        st: dict[str, Any] = {"rng": rng_state(), "step": self.step, "extras": self.extras() if self.extras else {}}
        if self.scheduler is not None:
            st["scheduler"] = self.scheduler.state_dict()
        st["model"] = self.model.state_dict()
        st["optimizers"] = [o.state_dict() for o in self.optimizers]
        return st

    def _stable_ids(self) -> set[int]:
        """Storages that only an optimizer step modifies: parameters and optimizer state (of a DTensor: its
        local shard, the tensor the snapshot copies)."""
        ids = {_local(p).untyped_storage().data_ptr() for p in self.model.parameters()}
        for o in self.optimizers:
            for s in o.state.values():
                for v in s.values():
                    if isinstance(v, torch.Tensor) and v.numel() > 0 and v.dim() > 0:
                        ids.add(_local(v).untyped_storage().data_ptr())
        return ids

    # --- hooks -------------------------------------------------------------------
    def _make_fwd_hook(self, i: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any) -> None:
            if not torch.is_grad_enabled() or not self.model.training:
                return
            now = time.perf_counter()
            if i == 0:
                self._iter_fwd, self._iter_bwd, self._bwd_seen = [], [], set()
            elif self._last_mark is not None and len(self._iter_fwd) < len(self.blocks):
                self._iter_fwd.append(now - self._last_mark)
                self._window("forward", len(self._iter_fwd) - 1, self._last_mark, now)
            self._last_mark = now
            self._issue("forward", i)

        return hook

    def _make_bwd_hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def hook(_p: torch.Tensor) -> None:
            if i in self._bwd_seen:  # gradient accumulation within one backward: count once
                return
            self._bwd_seen.add(i)
            now = time.perf_counter()
            if self._last_mark is not None:
                fwd = not self._iter_bwd and len(self._iter_fwd) < len(self.blocks)
                windows = self._iter_fwd if fwd else self._iter_bwd
                windows.append(now - self._last_mark)
                self._window("forward" if fwd else "backward", len(windows) - 1, self._last_mark, now)
            self._last_mark = now
            self._issue("backward", len(self._bwd_seen) - 1)

        return hook

    def _window(self, kind: str, idx: int, t0: float, t1: float, iteration: int | None = None) -> None:
        """A measured compute window on the timeline's "compute" track (only when tracing)."""
        if self.timeline.enabled:
            it = self._iterations + 1 if iteration is None else iteration  # counted at the barrier
            self.timeline.add(f"{kind} {idx}", "compute", t0, t1, "compute", iteration=it)

    def _issue(self, where: str, idx: int) -> None:
        a = self._active
        if a is None or self._executor is None:
            return
        part = a.plan.forward_range(idx) if where == "forward" else a.plan.backward_range(idx)
        if part is not None and part.end > part.start and (part.start, part.end) not in a.issued:
            a.issued.add((part.start, part.end))
            self._executor.submit(a.offset + part.start, a.offset + part.end, where)
            a.stats.hidden_bytes += part.end - part.start

    def _barrier_hook(self, _opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        """Before the optimizer modifies anything: finish the snapshot of the previous step."""
        self._iterations += 1
        now = time.perf_counter()
        if self._last_mark is not None and self._iter_fwd:
            self._iter_bwd.append(now - self._last_mark)  # the last backward window ends here
            self._window("backward", len(self._iter_bwd) - 1, self._last_mark, now, self._iterations)
            if len(self._iter_fwd) == len(self.blocks):
                try:
                    self._profile.add(self._iter_fwd, self._iter_bwd)
                except ConfigError:  # the model's shape of hooks changed: start over
                    self._profile.reset()
        self._last_mark = None
        self._iter_fwd, self._iter_bwd = [], []
        if self._active is not None:
            self._complete(time.perf_counter())

    def _post_step_hook(self, _opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
        self.step += 1
        if self.step % self.every == 0:
            self._begin()

    # --- snapshot life -----------------------------------------------------------
    def _begin(self) -> None:
        t0 = time.perf_counter()
        flat = flatten(self.state())
        stable = self._stable_ids()
        # volatile tensors (not modified only by the optimizer step) go to the front and are copied at once
        volatile = {
            n for n, t in flat.tensors.items() if t.numel() == 0 or t.untyped_storage().data_ptr() not in stable
        }
        first = volatile.__contains__

        try:
            snap = self.store.begin_snapshot(
                flat, self.step, first=first, user={"strategy": self.strategy}, global_parts=self._global_parts(flat)
            )
        except CheckpointFailedError as e:  # an earlier checkpoint failed in the background
            if e.__cause__ is not None:
                self._reported.append(e.__cause__)
            raise
        stats = CheckpointStats(self.step, self.strategy)
        if snap is None:
            stats.skipped = True
            self.history.append(stats)
            return
        stats.bytes = snap.layout.total_bytes
        tensors = snap.flat.tensors
        if self._executor is None:
            self._executor = make_executor(
                tensors, nice=self.store.config.background_nice, idle=self.store.config.background_idle
            )
        ex = self._executor
        ex.bind(snap.buffer, snap.layout, tensors)
        offset = next((e.offset for e in snap.layout.tensors if not first(e.name)), snap.layout.total_bytes)
        if offset:
            ex.copy_now(0, offset, "begin")
        plan = self._plan(snap.layout.total_bytes - offset)
        self._active = _Active(snap, plan, offset, stats)
        stats.begin_s = time.perf_counter() - t0
        self.timeline.add(f"snapshot begin {self.step}", "snapshot", t0, t0 + stats.begin_s, "train")
        if self.strategy in ("sync", "checkfreq"):  # the whole copy now, at the step boundary
            ex.copy_now(offset, snap.layout.total_bytes, "step")
            stats.step_copy_bytes = snap.layout.total_bytes - offset
            stats.begin_s = time.perf_counter() - t0

    def _global_parts(self, flat: FlatState) -> dict[str, list[Piece]]:
        """The parts of global tensors the flattened state's tensors hold, beyond its DTensors (described
        automatically): local tensor name -> pieces (docs/format.md section 8.2). None here; a subclass whose
        state holds flat partitions of global tensors (ZeRO) describes them."""
        return {}

    def _plan(self, nbytes: int) -> SnapshotPlan:
        if (
            self.strategy in ("sync", "checkfreq")
            or self._iterations < self.warmup
            or self._copy_bw is None
            or self._profile.iterations == 0
        ):
            return plan_all_at_step(nbytes)
        fwd, bwd = self._profile.estimate()
        windows = tuple(fwd) + tuple(bwd)
        if self._plan_cache is not None:
            (n, nf, planned), plan = self._plan_cache
            if n == nbytes and nf == len(fwd) and not self._replan_gate.check(planned, windows):
                return plan
            self.replans += 1
            log.info(
                "re-planning the snapshot copy: %s",
                self._replan_gate.last_reason if n == nbytes else f"state size {n} -> {nbytes} bytes",
            )
        if self.strategy == "uniform":
            plan = plan_uniform(fwd, bwd, nbytes, copy_bandwidth=self._copy_bw)
        else:
            plan = plan_asymmetric(fwd, bwd, nbytes, self._copy_bw, min_range_bytes=self.min_range_bytes)
        self._plan_cache = ((nbytes, len(fwd), windows), plan)
        return plan

    def _refresh_after_step(self, a: _Active) -> None:
        """Take the parts that change *after* the optimizer step as they are when the snapshot completes.

        ``scheduler.step()`` runs after ``optimizer.step()`` (the post-step hook that began this snapshot):
        it changes the scheduler's state and the optimizers' ``param_groups`` (``lr``, momentum, ...). The
        state "right after step t" includes both, so both are taken again at the barrier of step t+1 (or
        at ``detach``). JSON values replace the skeleton's; tensor values (e.g. a tensor ``lr``) are copied
        again into their place in the slot.
        """
        sk = a.snap.flat.skeleton
        if not isinstance(sk, dict):
            return
        part: dict[str, Any] = {}
        if self.scheduler is not None and "scheduler" in sk:
            part["scheduler"] = self.scheduler.state_dict()
        if isinstance(sk.get("optimizers"), list) and len(sk["optimizers"]) == len(self.optimizers):
            part["optimizers"] = [{"param_groups": o.state_dict()["param_groups"]} for o in self.optimizers]
        fs = flatten(part)  # same key paths as in state(), so the same tensor names
        entries = a.snap.layout.by_name()
        for name, t in fs.tensors.items():
            e = entries.get(name)
            if e is None or e.shape != tuple(t.shape) or dtypes.info(t.dtype).torch_name != e.dtype:
                log.warning(
                    "cannot refresh %s at the end of the snapshot (its layout changed); the checkpoint "
                    "of step %s keeps its value from right after the optimizer step",
                    name,
                    a.stats.step,
                )
                return
        with torch.no_grad():
            for name, t in fs.tensors.items():
                if t.numel():
                    dest_view(a.snap.buffer, entries[name]).copy_(t)
        if "scheduler" in fs.skeleton:
            sk["scheduler"] = fs.skeleton["scheduler"]
        for i, o_sk in enumerate(fs.skeleton.get("optimizers", [])):
            sk["optimizers"][i]["param_groups"] = o_sk["param_groups"]

    def _complete(self, t_barrier: float) -> None:
        """The barrier: copy the remainder, wait for every copy, hand the slot to persistence."""
        a = self._active
        assert a is not None and self._executor is not None
        self._active = None
        ex = self._executor
        self._refresh_after_step(a)
        try:
            # the remainder, plus any planned copy range whose window did not come (a skipped block,
            # or training ended): everything not yet copied is copied now
            gpu = isinstance(ex, CudaCopyExecutor)
            for p in a.plan.copy_ranges:
                if p.end > p.start and (p.start, p.end) not in a.issued:
                    # GPU: queued on the copy stream; the compute stream waits for it on the device
                    (ex.submit if gpu else ex.copy_now)(a.offset + p.start, a.offset + p.end, "step")
                    a.stats.step_copy_bytes += p.end - p.start
            copies_done: Callable[[], None] | None = None
            records: list[CopyRecord] = []
            if isinstance(ex, CudaCopyExecutor):
                ex.barrier_on_device()  # the optimizer step runs after the copies, with no CPU wait
                fence = ex.fence()  # this snapshot's copies, awaited on the persistence thread
                copies_done = lambda: records.extend(fence())  # noqa: E731
            else:
                records = ex.drain()
        except BaseException:
            self.store.abort_snapshot(a.snap)
            raise
        t_done = time.perf_counter()
        a.stats.stall_s = t_done - t_barrier
        handle = self.store.commit_snapshot(a.snap, copies_done=copies_done)
        self._account(a.stats, records)
        self.timeline.add(f"barrier {a.stats.step}", "stall", t_barrier, t_done, "train", bytes=a.stats.step_copy_bytes)
        self.history.append(a.stats)
        self.handles.append(handle)
        self._handles_stats.append((handle, a.stats))
        if self.strategy == "sync":
            self._collect(handle, a.stats, wait=True)
            a.stats.stall_s = time.perf_counter() - t_barrier
        self._collect_done()

    def _account(self, stats: CheckpointStats, records: list[CopyRecord]) -> None:
        hidden = [r for r in records if r.where in ("forward", "backward")]
        if records:  # the records say where each byte was really copied (the barrier may take over queued ones)
            stats.hidden_bytes = sum(r.nbytes for r in hidden)
            stats.step_copy_bytes = sum(r.nbytes for r in records if r.where == "step")
        stats.hidden_copy_s = sum(r.t_end - r.t_begin for r in hidden)
        for r in records:
            self.timeline.add(
                f"copy {r.where} {r.nbytes >> 10} KiB", "snapshot", r.t_begin, r.t_end, "copy", start=r.start, end=r.end
            )
        big = [r for r in records if r.nbytes >= (1 << 20) and r.t_end > r.t_begin]
        if big:
            bw = sum(r.nbytes for r in big) / sum(r.t_end - r.t_begin for r in big)
            self._copy_bw = bw if self._copy_bw is None else 0.7 * self._copy_bw + 0.3 * bw

    def _collect(self, handle: SaveHandle, stats: CheckpointStats, *, wait: bool) -> None:
        if not wait and not handle.done():
            return
        try:
            res = handle.result()
        except Exception as e:
            stats.error = str(e)
            if self.store.config.non_fatal or any(e is r for r in self._reported):
                return  # counted by the store / already raised (by begin_snapshot) once
            # raised here, as CheckpointFailedError like every background failure, and only once:
            # the store's own copy of it is dropped
            self._reported.append(e)
            self.store.forget_background_error(e)
            raise CheckpointFailedError(f"the checkpoint of step {stats.step} failed: {e}") from e
        finally:
            self._handles_stats = [(h, s) for h, s in self._handles_stats if h is not handle]
        if res.reports:
            rep = next(iter(res.reports.values()))
            stats.durable = True
            log.info("checkpoint of step %s is durable on %s", stats.step, ", ".join(res.reports))
            stats.persist_s = sum(r.seconds for r in res.reports.values())
            stats.stored_bytes = rep.stored_bytes
            stats.codecs = dict(rep.codecs)
            if res.persist_finished > res.persist_started > 0:  # where it really ran, not when it was collected
                start, end = res.persist_started, res.persist_finished
            else:
                start = time.perf_counter() - stats.persist_s
                end = start + stats.persist_s
            self.timeline.add(f"persist {stats.step}", "persist", start, end, "persist")

    def _collect_done(self) -> None:
        for h, s in list(self._handles_stats):
            if h.done():
                self._collect(h, s, wait=False)

    def wait(self) -> None:
        """Wait for all background persistence; re-raises a failure (unless non-fatal)."""
        for h, s in list(self._handles_stats):
            self._collect(h, s, wait=True)
        self.store.wait()

    # --- resume ------------------------------------------------------------------
    def resume(self, step: int | None = None) -> dict[str, Any]:
        """Restore model, optimizers, scheduler, RNG states and the step; returns the extras.

        A model whose state holds DTensors (FSDP2, tensor parallelism) is restored on any world size: each rank
        reads only the parts of the global tensors its own DTensors hold (docs/elastic.md). On a changed world
        size the per-rank RNG states are not restored (each rank keeps its own); everything else is."""
        self.store.discard_uncommitted()  # a crashed attempt's partial shards go before anything is saved again
        if any(is_dtensor(t) for t in self.model.state_dict().values()):
            restored = self._restore_global(step, self.state())
        else:
            restored = self.store.restore(step)
        self.model.load_state_dict(restored["model"])
        for o, s in zip(self.optimizers, restored["optimizers"], strict=False):
            o.load_state_dict(s)
        if self.scheduler is not None and "scheduler" in restored:
            self.scheduler.load_state_dict(restored["scheduler"])
        if "rng" in restored:
            set_rng_state(restored["rng"])
        self.step = int(restored["step"])
        extras: dict[str, Any] = restored.get("extras", {})
        return extras

    def _restore_global(self, step: int | None, template: dict[str, Any]) -> dict[str, Any]:
        """The state of ``step`` (default: the newest) for this rank's DTensors, from the parts of every rank
        that saved it; without ``rng`` when the world size changed."""
        from asymstore import reshard

        t0 = time.perf_counter()
        s = self.store.agreed_latest_step() if step is None else step  # every rank the same step (a collective)
        if s is None:
            raise StepNotFoundError("no complete checkpoint on any tier")
        index = reshard.load_index(self.store, s)
        same = index.ranks == self.store.world_size
        home = self.store.rank if same else 0  # the skeleton and the plain tensors: ours, else rank 0's
        ck = self.store.open_checkpoint(s, rank=home)
        opened = {home: ck}
        dtensors = _dtensors_by_name(template)
        params = [[p for g in o.param_groups for p in g["params"]] for o in self.optimizers]
        targets: dict[str, tuple[Any, torch.Tensor]] = {}
        on_device: list[tuple[torch.Tensor, torch.Tensor]] = []  # (read on the CPU, the shard on the device)

        def like(name: str) -> Any:
            """The DTensor of this rank whose sharding the global tensor ``name`` takes."""
            t = dtensors.get(name)
            m = _OPT_STATE.match(name)
            if t is None and m is not None:
                i, pid = int(m.group(1)), int(m.group(2))
                if i < len(params) and pid < len(params[i]):
                    t = params[i][pid]
            g = index.tensors[name]
            if t is None or not is_dtensor(t) or tuple(t.shape) != g.shape:
                raise StateMismatchError(
                    f"step {s}: {name} is a part of a global {g.dtype} tensor {list(g.shape)}, and this model has "
                    "no DTensor of that shape to restore it into"
                )
            return t

        def tensor(name: str) -> torch.Tensor:
            if name not in index.tensors:
                return ck[name].read()
            t = like(name)
            local, piece = describe_dtensor(t.detach(), name)
            out = torch.empty(local.shape, dtype=dtypes.from_name(index.tensors[name].dtype))  # read on the CPU
            targets[name] = (piece.region, out)
            dev = out if local.device.type == "cpu" else torch.empty_like(out, device=local.device)
            if dev is not out:
                on_device.append((out, dev))
            return DTensor.from_local(
                dev, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
            )

        from torch.distributed.tensor import DTensor

        restored: dict[str, Any] = unflatten(ck.skeleton, tensor)
        stats = reshard.read_global(
            self.store, s, targets, index=index, prefer_rank=self.store.rank if same else None, checkpoints=opened
        )
        for cpu, dev in on_device:
            dev.copy_(cpu)
        log.info(
            "step %s saved by %s ranks restored on %s: %s runs, %s stored bytes read from ranks %s",
            s,
            index.ranks,
            self.store.world_size,
            stats.runs,
            stats.bytes,
            stats.ranks,
        )
        self.last_resume = {
            "step": s,
            "saved_ranks": index.ranks,
            "world_size": self.store.world_size,
            **vars(stats),
            "seconds": time.perf_counter() - t0,  # index, skeleton and the reads (not load_state_dict)
        }
        if not same:
            restored.pop("rng", None)  # per-rank states of other ranks: each rank keeps its own
        return restored

    # --- reporting ---------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Checkpoint counts, the newest checkpoint taken and the newest durable one, median stall, hidden
        fraction, re-plans and copy bandwidth of this run."""
        self._collect_done()
        done = [s for s in self.history if not s.skipped]
        stalls = sorted(s.stall_s + s.begin_s for s in done)  # both are time the training thread waited
        durable = [s.step for s in done if s.durable]
        return {
            "strategy": self.strategy,
            "checkpoints": len(done),
            #: the newest checkpoint taken (complete in host memory) and the newest durable on a persistent tier
            "latest_checkpoint": done[-1].step if done else None,
            "latest_durable": durable[-1] if durable else None,
            "skipped": sum(s.skipped for s in self.history),
            "bytes_per_checkpoint": done[-1].bytes if done else 0,
            "median_stall_s": stalls[len(stalls) // 2] if stalls else 0.0,
            "hidden_fraction": (sum(s.hidden_bytes for s in done) / max(sum(s.bytes for s in done), 1)),
            "replans": self.replans,
            "copy_bandwidth": self._copy_bw,
        }

    def write_trace(self, path: str) -> str:
        """Write the Chrome-trace timeline to ``path`` (see :class:`Timeline`)."""
        return self.timeline.write(path)
