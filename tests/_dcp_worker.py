"""One rank of the multi-process DCP tests (RANK/WORLD_SIZE/MASTER_* in the environment).

tests/test_dcp.py starts the ranks through tests/ranks.py (``main(argv)``, forked from a fork server); it also
runs as a script: ``RANK=r WORLD_SIZE=n MASTER_ADDR=.. MASTER_PORT=.. python -m tests._dcp_worker ...`` (from the repository root).

``save <url> <step>``: every rank holds DTensor shards of the reference state and saves them.
``load <url> <step> <out>``: every rank loads into DTensor shards of its world size and
writes the bytes it got for its local shards to ``<out>.rank<r>.json`` (hex digests).
``store-save <url> <step>``: every rank saves its DTensor shards with ``Store.save`` (no DCP), the model tied
(``model.tied`` is ``model.w``) and with a plain replicated buffer.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from asymstore.trainer_hooks.dcp import AsymStorageReader, AsymStorageWriter


def reference() -> dict[str, torch.Tensor]:
    """Deterministic full tensors (same on every rank); odd sizes so shards are uneven."""
    g = torch.Generator().manual_seed(1234)
    return {
        "w": torch.randn(13, 7, generator=g),
        "b": torch.randn(11, generator=g).to(torch.bfloat16),
        "emb": torch.randint(-(2**31), 2**31 - 1, (9, 3, 2), generator=g, dtype=torch.int64),
    }


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv if argv is None else argv
    mode, url, step = argv[1], argv[2], int(argv[3])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (n,))
    ref = reference()
    if mode == "store-save":
        import asymstore

        model: dict[str, torch.Tensor] = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in ref.items()}
        model["tied"] = model["w"]
        model["buf"] = torch.arange(5)
        with asymstore.Store([url], rank=rank, world_size=n, host_memory="private") as s:
            s.save({"model": model, "step": step}, step)
    elif mode == "save":
        state = {
            "model": {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in ref.items()},
            "meta": {"step": step, "tag": "run-a"},
            f"rank_local_{rank}": torch.full((4,), float(rank)),
        }  # per-rank distinct FQN
        w = AsymStorageWriter(url)
        dcp.save(state, storage_writer=w, checkpoint_id=f"{url}/step_{step}")
        w.close()
    else:
        out = argv[4]
        state = {
            "model": {k: distribute_tensor(torch.zeros_like(v), mesh, [Shard(0)]) for k, v in ref.items()},
            "meta": {"step": -1, "tag": ""},
        }
        dcp.load(state, storage_reader=AsymStorageReader(url), checkpoint_id=f"{url}/step_{step}")
        got = {}
        for k, v in state["model"].items():
            local = v.to_local()
            want = distribute_tensor(ref[k], mesh, [Shard(0)]).to_local()
            got[k] = {"got": digest(local), "want": digest(want), "shape": list(local.shape)}
        got["meta"] = state["meta"]
        Path(f"{out}.rank{rank}.json").write_text(json.dumps(got))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
