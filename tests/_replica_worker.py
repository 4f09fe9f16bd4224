"""One rank of the peer-replica tests: ``python -m tests._replica_worker PHASE RANK WORLD PORT CKDIR SHM PER_NODE``.

Each simulated node is its own shared-memory directory (``SHM/node<n>``) and node name. ``save``: checkpoint
steps 1-3 of a rank-specific state with peer replicas on, wait until the replicas are sent, then die by
SIGKILL (a crash: nothing is cleaned). ``save-tear``: the same, then step 4, whose replica rank 0 is killed in
the middle of sending (its tier write never finishes either, so step 4 is never committed); rank 1 dies a moment
later. ``restore``: open the store like the restarted job and restore the
newest step; print one JSON line: the step, where it came from, and whether it is bit-exact. ``save-uneven``:
steps 1-2 durable, step 3 committed in shared memory on both ranks and step 4 on rank 0 only, neither on the
tier, then death; ``restore-uneven``: restore together, wait for what is left to persist, print the findings.
``save-unmarked``: steps 1-2 durable; both ranks commit their parts of step 3 on the tier, rank 0 dies while
finalizing it (before the step's marker; its replica of step 3 is at the peer), rank 1 goes on to steps 4-5 (its
parts committed, never marked) and dies; ``restore-unmarked``: like ``restore-uneven`` for step 3, leftovers
cleaned first (as the trainer hooks' resume does); ``restore-unmarked-agreed``: the ranks agree on the step,
clean up, then restore it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

import asymstore


def state(rank: int, step: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return {"w": torch.randn(20_000, generator=g), "h": torch.randn(16, 8, generator=g).half(), "step": step}


def wait_for(cond: Callable[[], bool], what: str, deadline: float) -> None:
    """Poll ``cond`` until it holds; ``what`` fails the rank once ``time.monotonic()`` passes ``deadline``."""
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def tear(store: asymstore.Store, r: int) -> None:
    """Save step 4; rank 0 dies half-way through sending its replica, before its tier write ends."""
    import threading

    import asymstore.replica as replica
    from asymstore.tiermanager import TierManager

    if r == 0:
        real_send = replica._send_throttled

        def send_half_then_die(sock: object, view: memoryview, bandwidth: float) -> None:
            real_send(sock, view[: len(view) // 2], bandwidth)  # type: ignore[arg-type]
            time.sleep(0.2)  # the half is on the wire
            os.kill(os.getpid(), signal.SIGKILL)

        real_persist = TierManager.persist_primary

        def never(self: TierManager, step: int, *args: object) -> object:
            if step == 4:
                threading.Event().wait()  # the process dies first
            return real_persist(self, step, *args)  # type: ignore[arg-type]

        replica._send_throttled = send_half_then_die
        TierManager.persist_primary = never  # type: ignore[method-assign,assignment]
        store.save(state(r, 4), 4, blocking=False)
        threading.Event().wait(60)  # killed by the send above
        raise SystemExit("rank 0 was not killed during its replica transfer")
    store.save(state(r, 4), 4, blocking=False)
    time.sleep(3)  # rank 0 is dead by now: the job is lost, this rank goes down with it


def save_uneven(store: asymstore.Store, r: int) -> None:
    """Steps 3 (both ranks) and 4 (rank 0 only) committed in shared memory but never on the tier: rank 0's global
    commit of them fails (an injected tier error); then death."""
    from asymstore.errors import CheckpointFailedError
    from asymstore.tiers import PersistentTier

    real_finalize = PersistentTier.finalize

    def failing(self: PersistentTier, step: int, **kw: object) -> None:
        if step >= 3:
            raise CheckpointFailedError(f"injected: step {step} not committed")
        real_finalize(self, step, **kw)  # type: ignore[arg-type]

    PersistentTier.finalize = failing  # type: ignore[method-assign]
    for s in (3, 4) if r == 0 else (3,):
        try:
            store.save(state(r, s), s, blocking=False)
        except CheckpointFailedError:  # step 3's failure, reported once by the next call
            store.save(state(r, s), s, blocking=False)
        t_end = time.monotonic() + 60
        while (slot := store.host.find(s)) is None or slot.record is None:  # committed in shared memory
            if time.monotonic() > t_end:
                print(f"step {s} was not committed in shared memory", file=sys.stderr, flush=True)
                os._exit(1)
            time.sleep(0.01)
    dist.barrier()


def save_unmarked(store: asymstore.Store, r: int, flag: str) -> None:
    """Rank 0 dies in its finalize of step 3 once both parts are on the tier and its replica is at the peer;
    rank 1 saves steps 4 and 5 (its parts only: rank 0 never marks them), then dies once rank 0 did (``flag``
    is written just before that)."""
    from asymstore.tiers import PersistentTier

    if r == 0:
        real_finalize = PersistentTier.finalize

        def die_in_finalize(self: PersistentTier, step: int, **kw: object) -> None:
            if step == 3:
                t_end = time.monotonic() + 60
                wait_for(
                    lambda: self.rank_committed(3) and self.backend.exists("step_000000000003/r00001/COMMIT"),
                    "rank 1 never committed its part of step 3",
                    t_end,
                )
                replicas = store.replicas
                assert replicas is not None
                wait_for(lambda: replicas.pushed >= 3, "step 3's replica was never sent", t_end)  # sealed, sent first
                open(flag, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            real_finalize(self, step, **kw)  # type: ignore[arg-type]

        PersistentTier.finalize = die_in_finalize  # type: ignore[method-assign]
        store.save(state(r, 3), 3)
        raise SystemExit("rank 0 was not killed in its finalize of step 3")
    for s in (3, 4, 5):
        store.save(state(r, s), s)  # a rank > 0 is done once its part is committed
    # this rank receives rank 0's replica of step 3 until rank 0 dies
    wait_for(lambda: os.path.exists(flag), "rank 0 never died", time.monotonic() + 60)
    time.sleep(0.2)


def hold_marker_until(flag: str) -> None:
    """Rank 0 writes the marker of step 3 only once ``flag`` exists: the marker it writes once the ranks agree
    would otherwise race the other ranks' reads, which then find the step committed instead of reading their
    parts of it (both right, but only one is the path under test)."""
    from asymstore.tiers import PersistentTier

    real_finalize = PersistentTier.finalize

    def finalize_after_flag(self: PersistentTier, step: int, **kw: object) -> None:
        if step == 3:
            wait_for(lambda: os.path.exists(flag), "rank 1 never restored step 3", time.monotonic() + 60)
        real_finalize(self, step, **kw)  # type: ignore[arg-type]

    PersistentTier.finalize = finalize_after_flag  # type: ignore[method-assign]


def restore_together(
    store: asymstore.Store, r: int, *, agree_first: bool = False, restored_flag: str | None = None
) -> None:
    """Restore together: step 3, the newest every rank can read; wait for what is left to persist.
    ``agree_first``: the ranks agree on the step, clean up their leftovers, then restore that step (the Hugging
    Face hook's order), instead of ``restore()`` choosing it. ``restored_flag``: a file rank 1 writes once it
    has restored (:func:`hold_marker_until`)."""
    adopted = list(store.adopted)
    if agree_first:
        step = store.agreed_latest_step()
        store.discard_uncommitted()
        out = store.restore(step)
    else:
        out = store.restore()
    rep = store.last_restore
    assert rep is not None
    if restored_flag is not None and r == 1:
        open(restored_flag, "w").close()
    exact = out["step"] == 3 and all(torch.equal(out[key], state(r, 3)[key]) for key in ("w", "h"))  # type: ignore[arg-type]
    t0 = time.monotonic()
    store.wait()  # what is left to persist
    waited = time.monotonic() - t0
    dist.barrier()
    row = {"rank": r, "adopted": adopted, "step": rep.step, "tier": rep.tier, "detail": rep.detail, "exact": exact}
    row.update(steps=store.steps(), durable=store.durable_steps(), wait_s=waited)
    print(json.dumps(row), flush=True)


def main() -> None:
    phase, rank, world, port, ckdir, shm, per_node = sys.argv[1:8]
    r, n, k = int(rank), int(world), int(per_node)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=n, timeout=timedelta(seconds=120)
    )
    node = r // k
    shm_dir = os.path.join(shm, f"node{node}")
    os.makedirs(shm_dir, exist_ok=True)
    os.environ["ASYMSTORE_REPLICA_HOST"] = "127.0.0.1"
    store = asymstore.Store(
        [ckdir], rank=r, world_size=n, shm_dir=shm_dir, node_id=f"node{node}", peer_replicas=1, host_slots=2
    )
    if phase in ("save", "save-tear"):
        for s in (1, 2, 3):
            store.save(state(r, s), s)
        assert store.replicas is not None and store.replicas.drain(60)
        dist.barrier()  # every rank's replica has arrived before anyone dies
        print(json.dumps({"rank": r, "pushed": store.replicas.pushed, "received": store.replicas.received}), flush=True)
        dist.barrier()
        if phase == "save-tear":
            tear(store, r)
        os.kill(os.getpid(), signal.SIGKILL)
    if phase == "save-uneven":
        for s in (1, 2):
            store.save(state(r, s), s)
        save_uneven(store, r)
        os.kill(os.getpid(), signal.SIGKILL)
    if phase == "save-unmarked":
        for s in (1, 2):
            store.save(state(r, s), s)
        save_unmarked(store, r, os.path.join(shm, "rank0-died"))
        os.kill(os.getpid(), signal.SIGKILL)
    if phase in ("restore-uneven", "restore-unmarked", "restore-unmarked-agreed"):
        flag = None
        if phase != "restore-uneven":
            flag = os.path.join(shm, "rank1-restored")
            if r == 0:
                hold_marker_until(flag)
        if phase == "restore-unmarked":
            store.discard_uncommitted()  # as the trainer hooks' resume does: the parts stay until the ranks agree
        restore_together(store, r, agree_first=phase == "restore-unmarked-agreed", restored_flag=flag)
        dist.barrier()
        store.close()
        dist.destroy_process_group()
        return
    out = store.restore()
    rep = store.last_restore
    assert rep is not None
    want = state(r, 3)
    exact = out["step"] == 3 and all(torch.equal(out[key], want[key]) for key in ("w", "h"))  # type: ignore[arg-type]
    print(json.dumps({"rank": r, "step": rep.step, "tier": rep.tier, "detail": rep.detail, "exact": exact}), flush=True)
    dist.barrier()
    store.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
