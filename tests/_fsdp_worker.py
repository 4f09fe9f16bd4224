"""One rank of the FSDP2 / DTensor elastic-restore tests (RANK/WORLD_SIZE/MASTER_* in the environment).

tests/test_fsdp_elastic.py starts the ranks through tests/ranks.py (``main(argv)``). Modes (JSON argument):

``train``: an FSDP2 (``fully_shard``) MLP with odd sizes (uneven shards, an empty one on 4 ranks) trained data-parallel with AdamW and a
StepLR under :class:`AsymCheckpointer` (``every`` steps, asymmetric snapshots); after the checkpoint step it
writes the digests of the full state (parameters, AdamW ``exp_avg``/``exp_avg_sq``/``step``, scheduler) and the
loss of every step. ``resume``: the same model on this world size, ``ck.resume()``, the digests of the restored
state, then ``steps`` more steps and their losses. ``save``: a plain :meth:`Store.save` of DTensors (uneven
``Shard(0)``, a ``Shard(1)``, a replicated one) and a per-rank plain tensor.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import asymstore
from asymstore.globalmeta import chunk_box, describe_dtensor
from asymstore.trainer_hooks.torch_hooks import AsymCheckpointer

GLOBAL_BATCH = 12  # divisible by 1, 2, 3 and 4 ranks


def reference() -> dict[str, torch.Tensor]:
    """Deterministic full tensors for ``save``: odd sizes, several dtypes."""
    g = torch.Generator().manual_seed(7)
    return {
        "w": torch.randn(13, 7, generator=g),
        "v": torch.randn(5, 9, generator=g).to(torch.bfloat16),
        "r": torch.arange(6, dtype=torch.int64),
    }


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def build(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, 257), nn.Tanh(), nn.Linear(257, 129), nn.Tanh(), nn.Linear(129, 3))
    n = dist.get_world_size()
    mesh = init_device_mesh("cpu", (n,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of the global batch of ``step`` (the same samples on any world size)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 7, generator=g)
    y = torch.randn(GLOBAL_BATCH, 3, generator=g)
    n, r = dist.get_world_size(), dist.get_rank()
    per = GLOBAL_BATCH // n
    return x[r * per : (r + 1) * per], y[r * per : (r + 1) * per]


def train_step(model: nn.Module, opt: torch.optim.Optimizer, sched: Any, step: int) -> float:
    x, y = batch(step)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    total = loss.detach().clone()
    dist.all_reduce(total)
    return float(total) / dist.get_world_size()


def full(t: Any) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def state_digests(model: nn.Module, opt: torch.optim.Optimizer, sched: Any) -> dict[str, Any]:
    """Digests of the full (gathered) state: the same on every rank and on every world size."""
    out: dict[str, Any] = {f"param/{k}": digest(full(v)) for k, v in model.state_dict().items()}
    names = {id(p): k for k, p in model.named_parameters()}
    for p, st in opt.state.items():
        for k, v in st.items():
            out[f"opt/{names[id(p)]}/{k}"] = digest(full(v)) if isinstance(v, torch.Tensor) else v
    out["lr"] = [g["lr"] for g in opt.param_groups]
    out["sched"] = {k: v for k, v in sched.state_dict().items() if isinstance(v, (int, float))}
    return out


def open_store(url: str | list[str]) -> asymstore.Store:
    return asymstore.Store(
        [url] if isinstance(url, str) else url,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        commit_timeout_s=60.0,
        compression="none",
        host_memory="private",
        chunk_bytes=4096,  # small chunks: a rank reading part of a shard fetches only part of it
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv if argv is None else argv
    args = json.loads(argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    out: dict[str, Any] = {"rank": rank, "world": n}
    mode = args["mode"]
    if mode == "save":
        mesh = init_device_mesh("cpu", (n,))
        ref = reference()
        state = {
            "model": {
                "w": distribute_tensor(ref["w"], mesh, [Shard(0)]),
                "v": distribute_tensor(ref["v"], mesh, [Shard(1)]),
                "r": distribute_tensor(ref["r"], mesh, [Replicate()]),
            },
            "own": torch.full((3,), float(rank)),
            "meta": {"tag": "x"},
        }
        with open_store(args["store"]) as store:
            store.save(state, args["step"])
        # torch's chunking of each DTensor against the pure model of it (globalmeta.chunk_box)
        pl = {"w": [("shard", 0)], "v": [("shard", 1)], "r": [("replicate",)]}
        out["boxes_agree"] = all(
            describe_dtensor(t, k)[1].region == chunk_box(tuple(t.shape), (n,), (rank,), pl[k])
            for k, t in state["model"].items()
        )
    elif mode == "train":
        model, opt, sched = build()
        with open_store(args["store"]) as store:
            ck = AsymCheckpointer(
                model, opt, store, every=args["every"], scheduler=sched, extras=lambda: {"seen": ck.step * GLOBAL_BATCH}
            )
            losses = []
            with ck:
                for step in range(1, args["steps"] + 1):
                    losses.append(train_step(model, opt, sched, step))
                    if step == args["every"]:
                        out["digests"] = state_digests(model, opt, sched)
            out["losses"] = losses
            flushed = store.flush(timeout=120)
            assert flushed, f"the lower tiers did not receive the step: {store.status()['tiers']}"
            out["summary"] = {k: v for k, v in ck.summary().items() if isinstance(v, (int, float, str))}
    elif mode == "resume":
        model, opt, sched = build(seed=99)  # other initial values: everything must come from the checkpoint
        with open_store(args["store"]) as store:
            ck = AsymCheckpointer(model, opt, store, every=10**6, scheduler=sched, extras=lambda: {})
            try:
                extras = ck.resume()
            except asymstore.AsymstoreError as e:
                out["error"] = f"{type(e).__name__}: {e}"
                extras = None
            if extras is not None:
                out["extras"] = extras
                out["step"] = ck.step
                out["last_resume"] = ck.last_resume
                out["digests"] = state_digests(model, opt, sched)
                with ck:
                    out["losses"] = [train_step(model, opt, sched, ck.step + 1) for _ in range(args["steps"])]
    Path(f"{args['out']}.rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
