"""One rank of the multi-process DeepSpeed tests (tests/test_deepspeed.py) and benchmark.

Run as ``python -m tests._ds_worker MODE JSON_ARGS`` with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT set. Modes:

* ``train``: train ``steps`` steps with asymmetric checkpoints at every step; after every step
  write a synchronous reference copy of the rank's state (torch.save, test side file) and the
  loss. With ``kill_step`` k, rank ``kill_rank`` SIGKILLs itself inside the persistence of step k
  (after the first object of its shard is written).
* ``resume``: fresh processes: restore the newest complete step, write the restored state (same
  extraction as the reference), continue training to ``steps`` with checkpoints.
* ``ckengine``: stage 2 round trip of engine.save_checkpoint / load_checkpoint through
  :class:`AsymstoreCheckpointEngine`, into a second, differently initialised engine.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

D = 32
BATCH = 8


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.norm(self.lin(x)))


class Net(nn.Module):
    def __init__(self, d: int = D, depth: int = 4) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Block(d) for _ in range(depth)])
        self.head = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.blocks(x))
        return out


def ds_config(stage: int) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 100  # biases/norms persistent, weights partitioned
    return {
        "train_micro_batch_size_per_gpu": BATCH,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "scheduler": {
            "type": "WarmupLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2, "warmup_num_steps": 4},
        },
    }


def make_engine(stage: int, seed: int = 0, d: int = D, depth: int = 4) -> Any:
    import deepspeed

    torch.manual_seed(seed)
    model = Net(d, depth)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(stage))
    return engine


def batch(step: int, rank: int, d: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(BATCH, d, generator=g)
    x = x + 0.01 * torch.randn(BATCH, d)  # draws from the global RNG: its restore is checked too
    return x, x.sum(dim=1, keepdim=True).tanh()


def train_step(engine: Any, step: int, rank: int) -> float:
    x, y = batch(step, rank)
    loss = ((engine(x) - y) ** 2).mean()
    engine.backward(loss)
    engine.step()
    return float(loss.item())


def reference_state(engine: Any) -> dict[str, Any]:
    """A synchronous copy of this rank's state through DeepSpeed's and torch's own accessors
    (independent of what the asymstore hooks collect)."""
    stage = int(engine.zero_optimization_stage())
    eo = engine.optimizer
    ref: dict[str, Any] = {
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
        "rng": torch.get_rng_state().clone(),
        "scheduler": copy.deepcopy(engine.lr_scheduler.state_dict()),
    }
    if stage == 0:
        ref["module"] = {k: v.clone() for k, v in engine.module.state_dict().items()}
        ref["optim"] = copy.deepcopy(eo.state_dict())
    elif stage in (1, 2):
        sd = eo.state_dict()
        ref["module"] = {k: v.clone() for k, v in engine.module.state_dict().items()}
        ref["fp32"] = [t.clone() for t in sd["single_partition_of_fp32_groups"]]
        ref["optim"] = copy.deepcopy(sd["base_optimizer_state"])
    else:
        sd = eo.state_dict()
        ref["ds_tensor"] = [p.ds_tensor.clone() for p in engine.module.parameters()]
        ref["fp32"] = [t.clone() for t in sd["fp32_flat_groups"]]
        ref["optim"] = copy.deepcopy(sd["optimizer_state_dict"])
        ref["persistent"] = {n: p.data.clone() for n, p in engine.module.named_parameters() if p.numel()}
    return ref


def batch_e(step: int, rank: int, d: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch that depends on (step, rank) only (no global RNG: it is not carried across world sizes)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(BATCH, d, generator=g)
    return x, x.sum(dim=1, keepdim=True).tanh()


def train_step_e(engine: Any, step: int, rank: int) -> float:
    x, y = batch_e(step, rank)
    loss = ((engine(x) - y) ** 2).mean()
    engine.backward(loss)
    engine.step()
    return float(loss.item())


MOMENTS = ("exp_avg", "exp_avg_sq")


def full_reference(engine: Any) -> dict[str, Any]:
    """The world-size independent state through DeepSpeed's own accessors (collective): per parameter the
    full low-precision value, fp32 master and Adam moments, plus counters, scheduler, optimizer step.

    Stage 1/2: each rank's fragments (DeepSpeed's ``_hp_mapping``: the parameter range and the views of
    the fp32 partition and its optimizer state) are gathered as they are, so the assembly is bit-exact;
    stage 3: DeepSpeed's ``safe_get_full_*`` (an all-gather of the partitions)."""
    import deepspeed

    stage = int(engine.zero_optimization_stage())
    named = list(engine.module.named_parameters())
    eo = engine.optimizer
    inner = eo.optimizer
    masters = list(eo.single_partition_of_fp32_groups if stage in (1, 2) else eo.fp32_partitioned_groups_flat)
    opt_step = [inner.state[m]["step"].clone() if "step" in inner.state.get(m, {}) else None for m in masters]
    ref: dict[str, Any] = {
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
        "skipped_steps": engine.skipped_steps,
        "scheduler": copy.deepcopy(engine.lr_scheduler.state_dict()),
        "lr": [g["lr"] for g in inner.param_groups],
        "opt_step": opt_step[0],
        "lp": {},
        "fp32": {},
        **{k: {} for k in MOMENTS},
    }
    if stage in (1, 2):
        mine: dict[str, Any] = {}
        for n, p in named:
            hm = p._hp_mapping
            if hm is None:
                continue
            a = hm.lp_fragment_address
            mine[n] = (
                int(a.start),
                int(a.numel),
                {k: hm.get_hp_fragment(None if k == "fp32" else k).detach().clone() for k in ("fp32", *MOMENTS)},
            )
        parts: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        for n, p in named:
            ref["lp"][n] = p.data.detach().clone()
            for k in ("fp32", *MOMENTS):
                full = torch.zeros(p.numel(), dtype=torch.float32)
                covered = 0
                for part in parts:
                    if n in part:
                        start, numel, frags = part[n]
                        full[start : start + numel] = frags[k]
                        covered += numel
                assert covered == p.numel(), (n, covered, p.numel())
                ref[k][n] = full.view(p.shape)
    else:
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        for n, p in named:
            ref["fp32"][n] = safe_get_full_fp32_param(p).detach().clone()
            for k in MOMENTS:
                ref[k][n] = safe_get_full_optimizer_state(p, k).detach().clone()
        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            for n, p in named:
                ref["lp"][n] = p.data.detach().clone()
    return ref


def open_store(root: str, rank: int, world: int, kill_step: int | None = None) -> Any:
    from asymstore.backends.local import LocalObjectStore
    from asymstore.manifest import rank_dir
    from asymstore.store import Store

    tier: Any = root
    if kill_step is not None:
        prefix = rank_dir(kill_step, rank, world) + "/"

        class KillMidSave(LocalObjectStore):
            puts = 0

            def put(self, key: str, data: Any) -> None:
                super().put(key, data)
                if key.startswith(prefix):
                    KillMidSave.puts += 1
                    if KillMidSave.puts == 1:  # one object of the shard is durable, the rest never comes
                        os.kill(os.getpid(), signal.SIGKILL)

        tier = KillMidSave(root)
    return Store([tier], rank=rank, world_size=world, commit_timeout_s=60.0, compression="none")


def main() -> None:
    mode, args = sys.argv[1], json.loads(sys.argv[2])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    os.environ.setdefault("LOCAL_RANK", str(rank))
    out = Path(args["out"])
    from asymstore.trainer_hooks.deepspeed_hooks import AsymstoreCheckpointEngine, DeepSpeedAsymCheckpointer

    stage = int(args.get("stage", 2))
    if mode == "train":
        engine = make_engine(stage)
        kill = args.get("kill_step") if rank == args.get("kill_rank", 1) else None
        store = open_store(args["store"], rank, world, kill)
        ck = DeepSpeedAsymCheckpointer(engine, store, every=1, warmup=1)
        losses = {}
        with ck:
            for s in range(1, args["steps"] + 1):
                losses[s] = train_step(engine, s, rank)
                torch.save(reference_state(engine), out / f"ref_r{rank}_s{s}.pt")
                tmp = out / f".losses_train_r{rank}.json"
                tmp.write_text(json.dumps(losses))
                os.replace(tmp, out / f"losses_train_r{rank}.json")  # atomic: the test kills this process
        store.close()
        (out / f"summary_train_r{rank}.json").write_text(json.dumps(ck.summary()))
    elif mode == "resume":
        engine = make_engine(stage, seed=123)  # a different initial state: everything must come from the store
        store = open_store(args["store"], rank, world)
        ck = DeepSpeedAsymCheckpointer(engine, store, every=1, warmup=1)
        ck.resume()
        step = ck.step
        torch.save(reference_state(engine), out / f"got_r{rank}.pt")
        losses = {}
        with ck:
            for s in range(step + 1, args["steps"] + 1):
                losses[s] = train_step(engine, s, rank)
        steps = store.steps()
        store.close()
        (out / f"resume_r{rank}.json").write_text(json.dumps({"step": step, "losses": losses, "steps": steps}))
    elif mode == "ckengine":
        engine = make_engine(2)
        for s in range(1, 4):
            train_step(engine, s, rank)
        store = open_store(args["store"], rank, world)
        engine.checkpoint_engine = AsymstoreCheckpointEngine(store)
        engine.save_checkpoint(args["save_dir"])
        ref = reference_state(engine)
        next_loss = train_step(engine, 4, rank)
        engine2 = make_engine(2, seed=99)
        engine2.checkpoint_engine = AsymstoreCheckpointEngine(store)
        path, _client = engine2.load_checkpoint(args["save_dir"])
        torch.set_rng_state(ref["rng"])  # the default engine does not checkpoint RNG states either
        got = reference_state(engine2)
        loss2 = train_step(engine2, 4, rank)
        torch.save(
            {"ref": ref, "got": got, "path": path, "loss": next_loss, "loss2": loss2}, out / f"ckengine_r{rank}.pt"
        )
        store.close()
    elif mode == "etrain":  # train `steps` steps at this world size; the reference state after step `steps`
        engine = make_engine(stage)
        store = open_store(args["store"], rank, world)
        ck = DeepSpeedAsymCheckpointer(engine, store, every=1, warmup=1)
        losses = {}
        with ck:  # checkpoints of steps 1..steps (the last one completes when the checkpointer detaches)
            for s in range(1, args["steps"] + 1):
                losses[s] = train_step_e(engine, s, rank)
        ref = full_reference(engine)
        if rank == 0:
            torch.save(ref, out / "eref_save.pt")
        s = args["steps"] + 1  # the next step's loss: a forward pass on the saved parameters
        losses[s] = train_step_e(engine, s, rank)
        store.close()
        (out / f"etrain_r{rank}.json").write_text(json.dumps(losses))
    elif mode == "eresume":  # restore step `step` on this world size; reference state; train `more` steps
        import time

        engine = make_engine(stage, seed=123)  # a different initial state: everything must come from the store
        store = open_store(args["store"], rank, world)
        ck = DeepSpeedAsymCheckpointer(engine, store, every=1, warmup=1)
        t0 = time.perf_counter()
        ck.resume()  # the newest step complete on every saved rank
        assert ck.step == args["step"], (ck.step, args["step"])
        resume_s = time.perf_counter() - t0
        ref = full_reference(engine)
        if rank == 0:
            torch.save(ref, out / f"eref_resume_w{world}.pt")
        losses = {}
        with ck:
            for s in range(args["step"] + 1, args["step"] + 1 + args["more"]):
                losses[s] = train_step_e(engine, s, rank)
        store.close()
        rep = dict(ck.resume_report, resume_s=resume_s)
        (out / f"eresume_w{world}_r{rank}.json").write_text(json.dumps({"losses": losses, "report": rep}))
    else:
        raise SystemExit(f"unknown mode {mode}")
    if dist.is_initialized():  # a gloo process exiting with its group alive can abort in its worker threads
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
