"""Ranks of a real torch.distributed (gloo) job saving one step, for tests/test_cli.py (run as a script).

``python -m tests._cli_worker ROOT WORLD STEP``: spawns WORLD processes; each joins a gloo process group, builds a
DTensor sharded over the ranks (``w``, rows) and one replicated (``b``), and saves ``{"model": ..., "rank"}``
as its part of STEP through its own ``Store`` (rank, world_size), as a training job's ranks do.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank(rank: int, world: int, root: str, step: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Replicate, Shard, distribute_tensor

        import asymstore

        mesh = init_device_mesh("cpu", (world,))
        full = torch.arange(8 * world * 16, dtype=torch.float32).reshape(8 * world, 16)
        w = distribute_tensor(full, mesh, [Shard(0)])
        b = distribute_tensor(torch.ones(5), mesh, [Replicate()])
        with asymstore.Store([root], rank=rank, world_size=world, commit_timeout_s=60.0) as s:
            s.save({"model": {"w": w, "b": b}, "rank": rank}, step)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    root, world, step = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    import socket

    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        port = so.getsockname()[1]
    mp.spawn(_rank, args=(world, root, step, port), nprocs=world, join=True)


if __name__ == "__main__":
    main()
