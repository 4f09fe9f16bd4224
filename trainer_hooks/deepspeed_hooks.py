"""DeepSpeed integration: asymmetric snapshots of each rank's part, and an asymstore checkpoint engine.

:class:`DeepSpeedAsymCheckpointer` (ZeRO stages 0-3, plain fp32/bf16 engines without offload)
copies what *this rank owns* to a host slot during its forward and backward passes, with the
barrier right before the engine's inner (torch) optimizer modifies anything; every rank writes
its part under ``step_X/rNNNNN/`` (its rank directory) of a multi-rank :class:`~asymstore.store.Store` and rank 0
commits the step once every rank directory is durable. What a rank owns, per stage:

=========  ==================================================================================
stage 0    the whole (replicated) module state_dict and the torch optimizer's state_dict
stage 1/2  its low-precision parameter partition (a slice of DeepSpeed's flat bit16 group),
           its fp32 master partition(s) ``single_partition_of_fp32_groups`` and the inner
           optimizer state of those partitions; module buffers (replicated)
stage 3    its parameter partitions (the flat buffers that every ``param.ds_tensor`` is a view
           of, ``fp16_partitioned_groups_flat``), its fp32 partitions
           ``fp32_partitioned_groups_flat`` and their optimizer state; never gathered params
all        engine counters (global_steps/samples, skipped_steps, micro_steps), the lr scheduler,
           the inner optimizer's hyper-parameters, the loss scaler's numbers, RNG states, extras
=========  ==================================================================================

Hook placement: the snapshot begins after ``engine._take_model_step`` (optimizer step, zero_grad,
lr scheduler step, ``global_steps += 1``: the whole state "after step t"); the barrier is a step
pre-hook on the inner ``torch.optim.Optimizer``, which every stage calls only after its gradient
reduction, norm and overflow checks (stage 1/2: ``_optimizer_step`` per group, stage 3: per
sub-group, before the fp32 -> parameter partition copy and the all-gather). Resume restores each
rank's part into the engine (stage 1/2 then all-gathers the parameter partitions, stage 3 re-gathers
persistent parameters); on another world size each rank reads only the ranges of the saved partitions
its own partitions need, through the partition layouts saved with every part
(:mod:`asymstore.trainer_hooks.deepspeed_elastic`; what is carried over: :meth:`DeepSpeedAsymCheckpointer.resume`).
Full fp32 weights without DeepSpeed processes: :func:`asymstore.trainer_hooks.deepspeed_tools.fp32_state_dict`.

:class:`AsymstoreCheckpointEngine` plugs asymstore under ``engine.save_checkpoint`` /
``engine.load_checkpoint`` (``engine.checkpoint_engine = AsymstoreCheckpointEngine(store)``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from asymstore.chunkcache import cached_source
from asymstore.errors import AsymstoreError, ConfigError, StateMismatchError, StepNotFoundError, UnsupportedValueError
from asymstore.files import atomic_file
from asymstore.globalmeta import Piece
from asymstore.lazy import LazyTensor
from asymstore.state import FlatState, flatten, unflatten
from asymstore.store import Store

from .deepspeed_elastic import check_layout, fill_partition, layout_global_parts, plan_reads, zero_layout
from .torch_hooks import AsymCheckpointer, Strategy, rng_state, set_rng_state

log = logging.getLogger("asymstore.hooks.deepspeed")

__all__ = ["AsymstoreCheckpointEngine", "DeepSpeedAsymCheckpointer", "decode_deepspeed", "encode_deepspeed"]


class _Undo:
    """A removable handle for a patched attribute (same interface as torch's hook handles)."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self._fn: Callable[[], None] | None = fn

    def remove(self) -> None:
        if self._fn is not None:
            self._fn()
            self._fn = None


def _dist() -> Any:
    import torch.distributed as td

    return td if td.is_available() and td.is_initialized() else None


def _read_lazy(v: Any) -> Any:
    """``v`` with every lazy tensor in it read."""
    if isinstance(v, LazyTensor):
        return v.read()
    if isinstance(v, dict):
        return {k: _read_lazy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_read_lazy(x) for x in v]
    if isinstance(v, tuple):
        return tuple(_read_lazy(x) for x in v)
    return v


def _lazy_fetch(ck: Any, source: Any) -> Callable[[str], Any]:
    """A tensor fetcher for :func:`asymstore.state.unflatten` that returns lazy tensors of ``ck`` (read on
    demand from ``source``)."""
    entries = ck.layout.by_name()
    return lambda name: LazyTensor(entries[name], source)


def base_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch optimizer that modifies the rank's state: the engine's own (stage 0) or the one
    inside DeepSpeed's ZeRO optimizer."""
    opt = engine.optimizer
    if isinstance(opt, torch.optim.Optimizer):
        return opt
    inner = getattr(opt, "optimizer", None)
    if isinstance(inner, torch.optim.Optimizer):
        return inner
    raise ConfigError(f"unsupported DeepSpeed optimizer {type(opt).__name__}: no inner torch.optim.Optimizer")


class DeepSpeedAsymCheckpointer(AsymCheckpointer):
    """Asymmetric checkpointing of a DeepSpeed engine; each rank snapshots its own part.

    Use (on every rank)::

        store = Store([url], rank=dist.get_rank(), world_size=dist.get_world_size())
        ck = DeepSpeedAsymCheckpointer(engine, store, every=1)
        with ck:
            for batch in data:
                loss = engine(batch); engine.backward(loss); engine.step()
        # after a restart, on any world size (same ZeRO stage):
        ck.resume()            # the newest step complete on every rank

    ``min_range_bytes``: the smallest copy range issued in a window (``min_partition_bytes``: deprecated alias).
    """

    def __init__(
        self,
        engine: Any,
        store: Store,
        *,
        every: int = 1,
        strategy: Strategy = "asym",
        warmup: int = 2,
        extras: Callable[[], dict[str, Any]] | None = None,
        blocks: Sequence[torch.nn.Module] | None = None,
        trace: bool = False,
        replan_tolerance: float = 0.25,
        min_range_bytes: int = 1 << 16,
        min_partition_bytes: int | None = None,
    ) -> None:
        self.engine = engine
        self.stage = int(engine.zero_optimization_stage())
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError(f"unsupported ZeRO stage {self.stage}")
        offload = (
            getattr(engine, "zero_cpu_offload", lambda: False)()
            or getattr(engine, "zero_offload_param", lambda: None)() is not None
        )
        if offload:
            raise ConfigError(
                "ZeRO offload (optimizer/parameters on CPU or NVMe) is not supported by the "
                "asymmetric DeepSpeed hooks; use AsymstoreCheckpointEngine with save_checkpoint"
            )
        if self.stage == 0 and not isinstance(engine.optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"ZeRO stage 0 with a wrapped optimizer ({type(engine.optimizer).__name__}, e.g. "
                "fp16/bf16) is not supported; use ZeRO stage >= 1 or fp32"
            )
        d = _dist()
        rank, world = (d.get_rank(), d.get_world_size()) if d else (0, 1)
        if (store.rank, store.world_size) != (rank, world):
            raise ConfigError(
                f"the store is rank {store.rank} of {store.world_size}, the process group rank {rank} "
                f"of {world}: open it as Store([...], rank={rank}, world_size={world})"
            )
        self.inner = base_optimizer(engine)
        self._in_step = False
        self._layout: dict[str, Any] | None = None
        self.resume_report: dict[str, Any] = {}
        super().__init__(
            engine.module,
            self.inner,
            store,
            every=every,
            scheduler=engine.lr_scheduler,
            strategy=strategy,
            warmup=warmup,
            extras=extras,
            blocks=blocks,
            trace=trace,
            start_step=int(engine.global_steps),
            replan_tolerance=replan_tolerance,
            min_range_bytes=min_range_bytes if min_partition_bytes is None else min_partition_bytes,
        )

    # --- what this rank owns ------------------------------------------------------
    def _partition_ids(self) -> list[int]:
        eo = self.engine.optimizer
        d = _dist()
        return [d.get_rank(group=g) if d else 0 for g in eo.real_dp_process_group]

    def lp_partitions(self) -> list[torch.Tensor]:
        """This rank's parameter partitions (stage 1/2: slices of the flat bit16 groups; stage 3: the
        flat buffers behind every ``ds_tensor``)."""
        eo = self.engine.optimizer
        if self.stage in (1, 2):
            return [g[pid] for g, pid in zip(eo.parallel_partitioned_bit16_groups, self._partition_ids(), strict=True)]
        if self.stage == 3:
            return list(eo.fp16_partitioned_groups_flat)
        return []

    def master_partitions(self) -> list[torch.Tensor]:
        """This rank's fp32 master partitions: the tensors the inner optimizer steps on."""
        eo = self.engine.optimizer
        if self.stage in (1, 2):
            return list(eo.single_partition_of_fp32_groups)
        if self.stage == 3:
            return list(eo.fp32_partitioned_groups_flat)
        return []

    def _loss_scaler(self) -> dict[str, Any]:
        sc = getattr(self.engine.optimizer, "loss_scaler", None)
        if sc is None:
            return {}
        return {k: v for k, v in vars(sc).items() if isinstance(v, (bool, int, float))}

    def state(self) -> dict[str, Any]:
        """The rank's state to snapshot: what it owns at its ZeRO stage (see the module table), counters, RNG."""
        e = self.engine
        st: dict[str, Any] = {
            "rng": rng_state(),
            "step": int(e.global_steps),
            "extras": self.extras() if self.extras else {},
            "engine": {
                "global_steps": int(e.global_steps),
                "global_samples": int(e.global_samples),
                "skipped_steps": int(e.skipped_steps),
                "micro_steps": int(e.micro_steps),
            },
            "deepspeed": {"zero_stage": self.stage, "world_size": self.store.world_size, "rank": self.store.rank},
        }
        if self.scheduler is not None:
            st["scheduler"] = self.scheduler.state_dict()
        if self.stage == 0:
            st["model"] = self.model.state_dict()
            st["optimizers"] = [self.inner.state_dict()]
            return st
        masters = self.master_partitions()
        st["buffers"] = dict(self.model.named_buffers())
        if self._layout is None:  # static for the engine's life: which parameter ranges each partition holds
            self._layout = zero_layout(e)
        st["zero"] = {
            "lp": self.lp_partitions(),
            "fp32": masters,
            "optimizer_state": [dict(self.inner.state.get(p, {})) for p in masters],
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.inner.param_groups],
            "loss_scaler": self._loss_scaler(),
            "layout": self._layout,
        }
        return st

    def _global_parts(self, flat: FlatState) -> dict[str, list[Piece]]:
        """The step's global tensor metadata (docs/format.md section 8.2): every partition-shaped tensor
        (``zero/lp/<i>``, ``zero/fp32/<i>``, ``zero/optimizer_state/<i>/<key>``) as the flat ranges of the
        parameters it holds, under ``zero/lp/<param>``, ``zero/fp32/<param>`` and
        ``zero/optimizer_state/<key>/<param>`` (:func:`~.deepspeed_elastic.layout_global_parts`); rank 0
        merges them into the step's ``INDEX``. Stage 0 (replicated state): none."""
        if self.stage == 0 or self._layout is None:
            return {}
        return layout_global_parts(self._layout, flat.tensors)

    def _stable_ids(self) -> set[int]:
        ids = super()._stable_ids()
        for t in self.lp_partitions() + self.master_partitions():
            ids.add(t.untyped_storage().data_ptr())
            for v in self.inner.state.get(t, {}).values():
                if isinstance(v, torch.Tensor) and v.numel() > 0 and v.dim() > 0:
                    ids.add(v.untyped_storage().data_ptr())
        return ids

    # --- hooks -------------------------------------------------------------------
    def _attach_step_hooks(self) -> None:
        self._hooks.append(self.inner.register_step_pre_hook(self._ds_barrier))
        engine = self.engine
        orig = engine._take_model_step
        patched = "_take_model_step" in vars(engine)

        def take_model_step(*args: Any, **kwargs: Any) -> Any:
            out = orig(*args, **kwargs)
            self._ds_post_step()
            return out

        engine._take_model_step = take_model_step

        def undo() -> None:
            if patched:
                engine._take_model_step = orig
            else:
                vars(engine).pop("_take_model_step", None)

        self._hooks.append(_Undo(undo))

    def _ds_barrier(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._in_step:  # stage 1/2 steps once per group, stage 3 once per sub-group: the first one counts
            return
        self._in_step = True
        self._barrier_hook(opt, args, kwargs)

    def _ds_post_step(self) -> None:
        self._in_step = False
        if self._active is not None:  # the inner optimizer never ran (overflow): the state did not change
            self._complete(time.perf_counter())
        self.step = int(self.engine.global_steps)
        if self.step % self.every == 0:
            self._begin()

    # --- resume ------------------------------------------------------------------
    def agreed_latest_step(self) -> int:
        """The newest step every rank can restore (:meth:`asymstore.Store.agreed_latest_step`, a collective)."""
        s = self.store.agreed_latest_step()
        if s is None:
            raise StepNotFoundError("no checkpoint is complete for every rank")
        return s

    def resume(self, step: int | None = None) -> dict[str, Any]:
        """Restore ``step`` (default: the newest complete one) into the engine, on any world size.

        Collective: every rank calls it. Parts of newer, uncommitted steps left by the crashed run are
        removed (each rank its own), so that saving those steps again starts clean.

        On the world size the step was saved with, each rank reads its own part (one stream). On another
        world size (ZeRO 1-3; the ZeRO stage must be the same), each rank computes from its engine which
        flat ranges of which parameters its partitions hold and reads only those byte ranges of the saved
        ranks' partitions (lazily, from the fastest copy of each part), filling bit-exactly:

        * the low-precision parameter partitions (then all-gathered as DeepSpeed does after a load),
        * the fp32 master partitions and every partition-shaped optimizer state tensor (``exp_avg``,
          ``exp_avg_sq``, ...; padding elements are zero),

        and from rank 0's part: the optimizer's scalar state (``step``) and hyper-parameters, the lr
        scheduler, the engine counters (``global_steps``, ``global_samples``, ``skipped_steps``,
        ``micro_steps``), the loss scaler's numbers, module buffers and ``extras`` (returned). Not
        carried over to another world size, as with DeepSpeed's universal checkpoint: the per-rank RNG
        states (each rank keeps its own; they are restored on the same world size only) and the per-rank
        ``extras`` of ranks other than 0. ZeRO stage 0 (replicated state) restores rank 0's part on any
        world size. What was read is in :attr:`resume_report`.
        """
        e = self.engine
        t0 = time.perf_counter()
        if step is None:
            step = self.agreed_latest_step()
        head, head_rank = self._open_head(step)
        saved = head.skeleton.get("deepspeed", {}) if isinstance(head.skeleton, dict) else {}
        if not isinstance(saved, dict) or "zero_stage" not in saved or "world_size" not in saved:
            raise StateMismatchError(f"step {step} was not saved by DeepSpeedAsymCheckpointer")
        if int(saved["zero_stage"]) != self.stage:
            raise StateMismatchError(
                f"step {step} was saved at ZeRO stage {saved['zero_stage']}, this engine is stage {self.stage}: "
                "restore on the same ZeRO stage"
            )
        saved_world = int(saved["world_size"])
        same_world = saved_world == self.store.world_size
        if self.stage == 3 and hasattr(e.optimizer, "checkpoint_event_prologue"):
            e.optimizer.checkpoint_event_prologue()  # all parameters partitioned, as load_checkpoint does
        bytes_read = 0
        with torch.no_grad():
            if same_world or self.stage == 0:
                restored = self.store.restore(step, rank=None if same_world else 0)
                ds = restored.get("deepspeed", {})
                want = {"zero_stage": self.stage, "world_size": saved_world, "rank": self.store.rank}
                if same_world and ds != want:
                    raise StateMismatchError(f"step {step}: this rank's part was saved as {ds}, expected {want}")
                if self.stage == 0:
                    self.model.load_state_dict(restored["model"])
                    self.inner.load_state_dict(restored["optimizers"][0])
                else:
                    self._load_zero(restored, step)
                rep = self.store.last_restore
                source = rep.tier if rep is not None else "?"
            else:
                if head_rank != 0:  # the reshard reads rank 0's part for what is not partitioned
                    head = self.store.open_checkpoint(step, rank=0)
                restored, bytes_read, source = self._load_elastic(step, head, saved_world)
        if self.scheduler is not None and "scheduler" in restored:
            self.scheduler.load_state_dict(restored["scheduler"])
        for k, v in restored["engine"].items():
            setattr(e, k, int(v))
        if same_world:
            set_rng_state(restored["rng"])
        self.step = int(restored["step"])
        self._discard_uncommitted_after(step)
        d = _dist()
        if d is not None:
            d.barrier()
        self.resume_report = {
            "step": step,
            "saved_world_size": saved_world,
            "world_size": self.store.world_size,
            "resharded": not same_world and self.stage > 0,
            "bytes_read": bytes_read,
            "source": source,
            "seconds": time.perf_counter() - t0,
        }
        extras: dict[str, Any] = restored.get("extras", {})
        return extras

    def _load_elastic(self, step: int, head: Any, saved_world: int) -> tuple[dict[str, Any], int, str]:
        """Fill this rank's partitions from ranged reads of the ``saved_world`` saved ranks' partitions;
        returns rank 0's non-partition state, the stored bytes read and where they came from."""
        cks = [head] + [self.store.open_checkpoint(step, rank=r) for r in range(1, saved_world)]
        sources: list[Any] = [cached_source(ck) for ck in cks]
        trees: list[Any] = [unflatten(ck.skeleton, _lazy_fetch(ck, src)) for ck, src in zip(cks, sources, strict=True)]
        layouts = [check_layout(t["zero"].get("layout"), f"step {step} rank {r}") for r, t in enumerate(trees)]
        mine = zero_layout(self.engine)
        plans = plan_reads(mine, layouts, what=f"step {step}")
        lp, masters = self.lp_partitions(), self.master_partitions()
        if len(plans) != len(masters):
            raise StateMismatchError(f"step {step}: {len(plans)} partition layouts, the engine has {len(masters)}")

        def part(key: str) -> Callable[[int, int], Any]:
            return lambda r, g: trees[r]["zero"][key][g]

        chunk = max((ck.reader.manifest.chunk_bytes for ck in cks if ck.reader is not None), default=0)

        def gap(t: torch.Tensor) -> int:  # neighbouring ranges this close share a chunk: read them as one span
            return 2 * chunk // t.element_size()

        for i, copies in enumerate(plans):
            fill_partition(lp[i], copies, part("lp"), what=f"step {step} lp partition {i}", gap=gap(lp[i]))
            fill_partition(
                masters[i], copies, part("fp32"), what=f"step {step} fp32 partition {i}", gap=gap(masters[i])
            )
            r0, g0 = (copies[0].rank, copies[0].group) if copies else (0, min(i, len(layouts[0]["groups"]) - 1))
            ref = trees[r0]["zero"]["optimizer_state"][g0]
            ref_numel = int(layouts[r0]["groups"][g0]["numel"])
            new_state: dict[str, Any] = {}
            for key, v in ref.items():
                if isinstance(v, LazyTensor) and v.ndim == 1 and len(v) == ref_numel:
                    t = torch.empty(masters[i].numel(), dtype=v.dtype)

                    def moment(r: int, g: int, key: str = key) -> Any:
                        return trees[r]["zero"]["optimizer_state"][g][key]

                    fill_partition(
                        t, copies, moment, what=f"step {step} optimizer state {key!r} of partition {i}", gap=gap(t)
                    )
                    new_state[key] = t
                else:
                    new_state[key] = _read_lazy(v)
            self.inner.state[masters[i]] = new_state
        z0 = trees[0]["zero"]
        for g, saved in zip(self.inner.param_groups, _read_lazy(z0["param_groups"]), strict=False):
            g.update(saved)
        bufs = dict(self.model.named_buffers())
        for name, b in trees[0].get("buffers", {}).items():
            if name in bufs:
                bufs[name].copy_(b.read())
        sc = getattr(self.engine.optimizer, "loss_scaler", None)
        for k, v in z0.get("loss_scaler", {}).items():
            setattr(sc, k, v)
        self._gather_after_load()
        rest = {k: _read_lazy(trees[0][k]) for k in ("engine", "step", "extras", "scheduler") if k in trees[0]}
        names = sorted({type(ck.source).__name__ for ck in cks})
        return rest, sum(ck.bytes_read for ck in cks), ",".join(names)

    def _gather_after_load(self) -> None:
        """Every rank restored its partitions: rebuild the full parameters as DeepSpeed's load does."""
        eo = self.engine.optimizer
        if hasattr(eo, "_hp_optimizer_states_linked"):
            eo._hp_optimizer_states_linked = False  # the optimizer state tensors were replaced: link again
            if hasattr(eo, "_lazy_init_hp_params_optimizer_state"):
                eo._lazy_init_hp_params_optimizer_state()
        if self.stage in (1, 2):
            from deepspeed.runtime.utils import all_gather_dp_groups

            all_gather_dp_groups(
                groups_flat=eo.bit16_groups_flat,
                partitioned_param_groups=eo.parallel_partitioned_bit16_groups,
                dp_process_group=eo.real_dp_process_group,
                start_alignment_factor=eo.nccl_start_alignment_factor,
                allgather_bucket_size=eo.allgather_bucket_size,
            )
        elif hasattr(eo, "checkpoint_event_epilogue"):
            eo.checkpoint_event_epilogue()  # persistent (never partitioned) parameters are gathered again

    def _open_head(self, step: int) -> tuple[Any, int]:
        """A part of ``step`` to learn how it was saved (every part records the stage and world size): this
        rank's own first (after a crash it may be only in this rank's host memory, which no other rank can read),
        else rank 0's (a rank the saved job did not have, or whose part is unreadable)."""
        try:
            return self.store.open_checkpoint(step, rank=self.store.rank), self.store.rank
        except AsymstoreError:
            if self.store.rank == 0:
                raise
            return self.store.open_checkpoint(step, rank=0), 0

    def _load_zero(self, restored: Mapping[str, Any], step: int) -> None:
        z = restored["zero"]
        lp, masters = self.lp_partitions(), self.master_partitions()
        if len(z["lp"]) != len(lp) or len(z["fp32"]) != len(masters):
            raise StateMismatchError(f"step {step}: {len(z['fp32'])} partitions saved, the engine has {len(masters)}")
        for dst, src in list(zip(lp, z["lp"], strict=True)) + list(zip(masters, z["fp32"], strict=True)):
            if dst.shape != src.shape or dst.dtype != src.dtype:
                raise StateMismatchError(
                    f"step {step}: partition {tuple(src.shape)} {src.dtype} saved, the engine "
                    f"has {tuple(dst.shape)} {dst.dtype}"
                )
            dst.data.copy_(src)
        for p, s in zip(masters, z["optimizer_state"], strict=False):
            self.inner.state[p] = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
        for g, saved in zip(self.inner.param_groups, z["param_groups"], strict=False):
            g.update(saved)
        bufs = dict(self.model.named_buffers())
        for name, b in restored.get("buffers", {}).items():
            if name in bufs:
                bufs[name].copy_(b)
        sc = getattr(self.engine.optimizer, "loss_scaler", None)
        for k, v in z.get("loss_scaler", {}).items():
            setattr(sc, k, v)
        self._gather_after_load()

    def _discard_uncommitted_after(self, step: int) -> None:
        """Remove this rank's objects of uncommitted steps newer than ``step`` (the crashed run's attempts)."""
        cleaned = self.store.discard_uncommitted(after=step)
        for tier, steps in cleaned.items():
            log.info("removed rank %d's objects of the uncommitted steps %s on %s", self.store.rank, steps, tier)


# --- the checkpoint engine ---------------------------------------------------------

_TAG = "__asymstore_ds__"


def _known_classes() -> dict[str, type]:
    out: dict[str, type] = {}
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler

        out["LossScaler"], out["DynamicLossScaler"] = LossScaler, DynamicLossScaler
    except ImportError:  # pragma: no cover - depends on the DeepSpeed version
        pass
    try:
        from deepspeed.utils.tensor_fragment import fragment_address

        out["fragment_address"] = fragment_address
    except ImportError:  # pragma: no cover
        pass
    try:
        from deepspeed.runtime.zero.config import ZeroStageEnum

        out["ZeroStageEnum"] = ZeroStageEnum
    except ImportError:  # pragma: no cover
        pass
    return out


def encode_deepspeed(obj: Any, path: str = "") -> Any:
    """Replace the DeepSpeed objects found in its checkpoint state dicts by tagged JSON-able dicts.

    Converted explicitly (nothing else): ``LossScaler`` / ``DynamicLossScaler`` (their numeric
    attributes), ``fragment_address`` (numel, start), ``ZeroStageEnum`` (its value). ``OrderedDict``
    becomes a dict. Any other object is left for :func:`asymstore.state.flatten`, which refuses it
    with its path (asymstore never pickles).
    """
    known = _known_classes()
    if isinstance(obj, torch.Tensor) or obj is None or isinstance(obj, (str, bytes, float, bool)):
        return obj
    cls = type(obj)
    if cls is known.get("ZeroStageEnum"):
        return {_TAG: "ZeroStageEnum", "value": int(obj)}
    if cls is known.get("fragment_address"):
        return {_TAG: "fragment_address", "numel": int(obj.numel), "start": int(obj.start)}
    if cls in (known.get("LossScaler"), known.get("DynamicLossScaler")) and cls is not None:
        attrs = {}
        for k, v in vars(obj).items():
            if isinstance(v, (bool, int, float, str, torch.dtype)) or v is None:
                attrs[k] = v
            else:
                raise UnsupportedValueError(
                    f"{path}/{k}: {cls.__name__} attribute of type {type(v).__name__} cannot be stored"
                )
        return {_TAG: cls.__name__, "attrs": attrs}
    if isinstance(obj, Mapping):
        return {k: encode_deepspeed(v, f"{path}/{k}") for k, v in obj.items()}
    if isinstance(obj, list):
        return [encode_deepspeed(v, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(encode_deepspeed(v, f"{path}/{i}") for i, v in enumerate(obj))
    return obj


def decode_deepspeed(obj: Any) -> Any:
    """The inverse of :func:`encode_deepspeed` (only the classes it names are rebuilt)."""
    if isinstance(obj, dict):
        tag = obj.get(_TAG)
        if isinstance(tag, str):
            known = _known_classes()
            if tag == "ZeroStageEnum" and tag in known:
                return known[tag](obj["value"])
            if tag == "fragment_address" and tag in known:
                return known[tag](numel=obj["numel"], start=obj["start"])
            if tag in ("LossScaler", "DynamicLossScaler") and tag in known:
                cls: Any = known[tag]
                inst = cls.__new__(cls)
                inst.__dict__.update(obj["attrs"])
                return inst
        return {k: decode_deepspeed(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_deepspeed(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(decode_deepspeed(v) for v in obj)
    return obj


def default_tag_to_step(tag: str) -> int:
    """``"global_step12"`` -> 12, ``"7"`` -> 7: the trailing integer of the tag."""
    m = re.search(r"(\d+)$", tag)
    if m is None:
        raise ConfigError(
            f"cannot map the checkpoint tag {tag!r} to an asymstore step: give tags that end in the "
            "step number (DeepSpeed's default 'global_stepN' does) or pass tag_to_step="
        )
    return int(m.group(1))


try:
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine as _DSCheckpointEngine
except ImportError:  # pragma: no cover - deepspeed is optional
    _DSCheckpointEngine = object


class AsymstoreCheckpointEngine(_DSCheckpointEngine):  # type: ignore[misc]  # deepspeed ships no type information
    """A DeepSpeed checkpoint engine that stores through asymstore tiers.

    Mapping: a tag is one asymstore step (``tag_to_step``, default: its trailing integer; the tag
    is recorded and checked on load); every file DeepSpeed writes under ``save_dir/tag/`` becomes a
    top-level key (its path relative to the tag directory) of this rank's part of that step. Each
    rank stores the files it was asked to save; ``commit(info)`` saves them as one asymstore
    checkpoint (rank 0 commits globally once every rank's part is durable). With ``blocking``
    (default) rank 0's commit returns only after the global commit, so DeepSpeed's ``latest`` file,
    written right after, never names a step that is not durable. After the commit each rank writes
    a small JSON *pointer file* at each DeepSpeed path (DeepSpeed globs for and checks those paths
    when loading); :meth:`load` reads the pointer and restores the state from asymstore.

    State dict contents: tensors and JSON values through :func:`asymstore.state.flatten`; DeepSpeed
    objects are converted by :func:`encode_deepspeed`; anything else raises
    :class:`~asymstore.errors.UnsupportedValueError` at ``save`` naming the file and the key.
    """

    POINTER_FORMAT = "asymstore-deepspeed-pointer/1"

    def __init__(
        self,
        store: Store,
        *,
        blocking: bool = True,
        tag_to_step: Callable[[str], int] | None = None,
        config_params: Any = None,
    ) -> None:
        if _DSCheckpointEngine is object:
            raise ConfigError("deepspeed is not installed (pip install asymstore[deepspeed])")
        super().__init__(config_params)
        self.name = "AsymstoreCheckpointEngine"
        self.store = store
        self.blocking = blocking
        self.tag_to_step = tag_to_step or default_tag_to_step
        self._files: dict[str, Any] = {}
        self._paths: dict[str, str] = {}
        self._tag: str | None = None
        self._cache: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self.handles: list[Any] = []
        self.last_commit_s = 0.0

    def create(self, info: Any) -> None:
        """Start collecting the files of checkpoint ``info.tag``."""
        self._tag = str(info.tag)
        self._files, self._paths = {}, {}

    def _key(self, path: str) -> tuple[str, str]:
        path = os.path.normpath(str(path))
        parts = path.split(os.sep)
        if self._tag is not None and self._tag in parts:
            i = len(parts) - 1 - parts[::-1].index(self._tag)
            return self._tag, "/".join(parts[i + 1 :])
        return parts[-2] if len(parts) > 1 else "", parts[-1]

    def save(self, state_dict: Any, path: str) -> None:
        """Take one file DeepSpeed writes (converted, checked for storable values at once)."""
        tag, key = self._key(path)
        if self._tag is None:
            self._tag = tag
        enc = encode_deepspeed(state_dict, key)
        try:
            flatten(enc)  # fail here, naming the file, rather than at commit
        except UnsupportedValueError as e:
            raise UnsupportedValueError(f"{path}: {e}") from e
        self._files[key] = enc
        self._paths[key] = str(path)

    def commit(self, info: Any) -> bool:
        """Save the collected files as the tag's step, then write a pointer file at each DeepSpeed path."""
        t0 = time.perf_counter()
        tag = str(info.tag)
        step = self.tag_to_step(tag)
        state = {"deepspeed_tag": tag, "files": self._files}
        handle = self.store.save(state, step, blocking=False, user={"deepspeed_tag": tag})
        self.handles.append(handle)
        if self.blocking:
            handle.result()
        for key, path in self._paths.items():
            ptr = {
                "format": self.POINTER_FORMAT,
                "step": step,
                "tag": tag,
                "rank": self.store.rank,
                "world_size": self.store.world_size,
                "key": key,
            }
            with atomic_file(path) as f:
                f.write(json.dumps(ptr).encode())
        self._files, self._paths, self._tag = {}, {}, None
        self.last_commit_s = time.perf_counter() - t0
        return True

    def wait(self) -> None:
        """Wait for every non-blocking commit; re-raise a failure."""
        for h in self.handles:
            h.result()
        self.handles = []

    def load(self, path: str, map_location: Any = None) -> Any:
        """Read the pointer file at ``path`` and return the file it names from asymstore."""
        try:
            with open(path) as f:
                ptr = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StepNotFoundError(
                f"{path} is not an asymstore checkpoint pointer ({e}); was it saved with AsymstoreCheckpointEngine?"
            ) from e
        if not isinstance(ptr, dict) or ptr.get("format") != self.POINTER_FORMAT:
            raise StepNotFoundError(f"{path} is not an asymstore checkpoint pointer")
        step, rank = int(ptr["step"]), int(ptr["rank"])
        if (step, rank) not in self._cache:
            part = self.store.restore(step, rank=rank)
            self._cache[(step, rank)] = part
            while len(self._cache) > 2:
                self._cache.popitem(last=False)
        part = self._cache[(step, rank)]
        if part.get("deepspeed_tag") != ptr["tag"]:
            raise StateMismatchError(
                f"step {step} holds DeepSpeed tag {part.get('deepspeed_tag')!r}, the pointer "
                f"{path} names {ptr['tag']!r}"
            )
        out = decode_deepspeed(part["files"][ptr["key"]])
        if isinstance(map_location, (str, torch.device)) and str(map_location) != "cpu":
            out = _map_tensors(out, lambda t: t.to(map_location))
        return out

    def preserves_storage_sharing(self) -> bool:
        """No: the state is copied into a host slot anyway, so DeepSpeed need not clone it."""
        return False  # the state is copied into a host slot anyway: no need for DeepSpeed's clone


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_map_tensors(v, fn) for v in obj)
    return obj
