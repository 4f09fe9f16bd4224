"""The peer of the Gemini emulation: ``python -m benchmarks._variants_peer PORT SHM_DIR JOB``.

Rank 1 of two, on its own "node" (its own shared-memory directory): a host-memory asymstore store with peer
replicas on, so rank 0's checkpoints are replicated into this process's host memory. It prints ``ready``, holds
the replicas until its standard input closes, then prints what it received and exits.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    port, shm_dir, job = sys.argv[1:4]
    os.environ.setdefault("ASYMSTORE_REPLICA_HOST", "127.0.0.1")
    from torch.distributed import TCPStore  # type: ignore[attr-defined]

    from asymstore.store import Store

    kv = TCPStore("127.0.0.1", int(port), 2, False)
    store = Store(
        [],
        host_memory="shared",
        shm_job=job,
        shm_dir=shm_dir,
        rank=1,
        world_size=2,
        node_id="node1",
        peer_replicas=1,
        replica_rendezvous=kv,
    )
    print("ready", flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
    received = store.replicas.received if store.replicas is not None else 0
    store.close()
    print(f"received {received}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
