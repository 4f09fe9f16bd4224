"""Kill trials for peer replication, run as ``python -m tests._replica_kill_worker TRIALS SEED OUTDIR``.

One process imports torch once and forks, per trial, the two ranks of a job (one per simulated node, each node
its own shared-memory directory). Each rank trains a small model of its own, checkpoints every step with peer
replicas on (its committed slot is pushed into the other rank's shared memory) and a local tier. One rank, the
victim, is SIGKILLed at the point the trial chooses: while sending its replica ("send", after a random fraction of
the bytes), while receiving its peer's ("receive", likewise), right after committing a received replica and before
acknowledging it ("committed"), or at a random time ("random"); the other rank is SIGKILLed as soon as the victim
is dead (a launcher takes the whole job down). In three trials of four the victim's node is lost: its
shared-memory directory is wiped.

Then both ranks restart and restore together. They must agree on one step, restore it bit-exact, and continue
training to the end of an uninterrupted run bit-identically. The step must be no older than the newest one both
ranks were sure to find: a rank whose node survived, its own newest committed slot; a rank whose node was lost,
its newest replica committed at the peer; either, a step complete on the tier. A lost rank's step that is not on
the tier (neither the step nor that rank's part) must come from the peer, a surviving rank's step still in its
shared memory from there; a torn replica is never used. Where no step is there for both ranks, both must start
afresh (their restore says no step is complete for every rank). One JSON line per trial on stdout.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from datetime import timedelta
from typing import Any

import torch

from tests._shm_worker import bitequal, build, log_seals, reference, state_of, train_step

N_STEPS = 6
KINDS = ("send", "receive", "committed", "random")


def _store(d: str, r: int) -> Any:
    import asymstore

    return asymstore.Store(
        [os.path.join(d, "ck")],
        rank=r,
        world_size=2,
        shm_dir=os.path.join(d, "shm", f"node{r}"),
        node_id=f"node{r}",
        peer_replicas=1,
        host_slots=2,
        background_idle=False,
    )


def _init_group(d: str, phase: str, r: int) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{d}/pg-{phase}", rank=r, world_size=2, timeout=timedelta(seconds=60)
    )


def save_rank(r: int, trial: dict[str, Any], d: str) -> None:
    """Train and checkpoint every step; the victim dies as the trial says (never returns)."""
    from asymstore import replica
    from asymstore.shm import SlotRecord

    log = open(os.path.join(d, f"r{r}.log"), "a", buffering=1)  # noqa: SIM115 - lives until the SIGKILL
    me = os.getpid()
    victim = r == trial["victim"]
    kind, kill_step, frac = trial["kind"], trial["kill_step"], trial["frac"]
    armed = threading.Event()

    def die() -> None:
        os.kill(me, signal.SIGKILL)

    log_seals(log)
    publish = replica.ReplicaService._publish

    def publishing(self: replica.ReplicaService, src: int) -> None:
        publish(self, src)  # after the replica's record was committed here
        held = self.held_steps(src)
        if held:
            log.write(f"replica {held[-1]}\n")
            if victim and kind == "committed" and held[-1] >= kill_step:
                die()  # committed, not yet acknowledged

    replica.ReplicaService._publish = publishing  # type: ignore[method-assign]
    if victim and kind == "send":
        push_now, send = replica.ReplicaService._push_now, replica._send_throttled

        def pushing(self: replica.ReplicaService, record: SlotRecord, stream: memoryview, done: Any) -> None:
            if record.step >= kill_step:
                armed.set()
            push_now(self, record, stream, done)

        def sending(sock: Any, view: memoryview, bandwidth: float) -> None:
            if armed.is_set():
                send(sock, view[: int(len(view) * frac)], bandwidth)
                time.sleep(0.05)  # the part is on the wire
                die()
            send(sock, view, bandwidth)

        replica.ReplicaService._push_now = pushing  # type: ignore[method-assign]
        replica._send_throttled = sending
    if victim and kind == "receive":
        receive, recv_into = replica.ReplicaService._receive, replica._recv_into

        def receiving(self: replica.ReplicaService, sock: Any, head: dict[str, Any]) -> None:
            if SlotRecord.from_bytes(head["record"].encode()).step >= kill_step:
                armed.set()
            receive(self, sock, head)

        def receiving_into(sock: Any, view: memoryview) -> None:
            if armed.is_set() and len(view) > 4096:  # the payload, not a header
                recv_into(sock, view[: int(len(view) * frac)])
                die()
            recv_into(sock, view)

        replica.ReplicaService._receive = receiving  # type: ignore[method-assign]
        replica._recv_into = receiving_into
    if victim and kind == "random":
        threading.Timer(0.05 + trial["delay"] * 0.5, die).start()
    _init_group(d, "save", r)
    store = _store(d, r)
    model, opt = build()
    for t in range(1, N_STEPS + 1):
        train_step(model, opt, t, r)
        log.write(f"start {t}\n")
        store.save(state_of(model, opt, t), t, blocking=t == 1)  # step 1 reaches the tier: there is a floor
        time.sleep(0.01)
    if store.replicas is not None:
        store.replicas.drain(30)
    log.write("done\n")
    threading.Event().wait(120)  # the parent kills this rank
    os._exit(4)


def restore_rank(r: int, d: str, ref: list[dict[str, Any]]) -> None:
    """Restart: restore with the other rank, continue training, write the findings (never returns)."""
    import torch.distributed as dist

    from asymstore.errors import StepNotFoundError

    res: dict[str, Any] = {"rank": r}
    try:
        _init_group(d, "restore", r)
        store = _store(d, r)
        res["adopted"], res["durable"] = sorted(store.adopted), store.durable_steps()
        model, opt = build()
        try:
            got = store.restore()
        except StepNotFoundError as e:  # nothing every rank holds: the job starts again (judged by the parent)
            s = 0
            res.update(step=0, tier=None, detail=str(e), exact=True)
        else:
            rep = store.last_restore
            assert rep is not None
            s = int(got["step"])
            res.update(step=s, tier=rep.tier, detail=rep.detail, exact=bitequal(got, ref[s]))
            model.load_state_dict(got["model"])
            opt.load_state_dict(got["optim"])
        for t in range(s + 1, N_STEPS + 1):
            train_step(model, opt, t, r)
        res["continued"] = bitequal(state_of(model, opt, N_STEPS), ref[N_STEPS])
        dist.barrier()
        store.close()
        dist.destroy_process_group()
    except BaseException as e:  # reported, judged by the parent
        res["error"] = f"{type(e).__name__}: {e}"
    with open(os.path.join(d, f"restore-r{r}.json"), "w") as f:
        json.dump(res, f)
    os._exit(0)


def _fork(fn: Any, *args: Any) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            fn(*args)
        finally:
            os._exit(3)
    return pid


def _read(path: str) -> str:
    """A file's text ("" while it does not exist)."""
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _logged(d: str, r: int) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {"sealed": [], "replica": [], "start": []}
    for line in _read(os.path.join(d, f"r{r}.log")).splitlines():
        word, _, value = line.partition(" ")
        if word in out:
            out[word].append(int(value))
    return out


def run_trial(trial: dict[str, Any], d: str, refs: list[list[dict[str, Any]]]) -> dict[str, Any]:
    os.makedirs(os.path.join(d, "shm", "node0"))
    os.makedirs(os.path.join(d, "shm", "node1"))
    victim = trial["victim"]
    pids = [_fork(save_rank, r, trial, d) for r in (0, 1)]
    deadline, self_killed, live = time.monotonic() + 60, False, set(pids)
    while time.monotonic() < deadline:
        pid, status = os.waitpid(pids[victim], os.WNOHANG)
        if pid:
            self_killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            live.discard(pid)
            break
        if "done" in _read(os.path.join(d, f"r{victim}.log")):  # its kill point never came
            time.sleep(0.2)
            break
        time.sleep(0.005)
    for pid in live:  # the job goes down with its victim
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    logs = [_logged(d, r) for r in (0, 1)]
    lost = victim if trial["wipe"] else None
    if lost is not None:
        shutil.rmtree(os.path.join(d, "shm", f"node{lost}"))
        os.makedirs(os.path.join(d, "shm", f"node{lost}"))  # the replacement node's empty shared memory
    for pid in [_fork(restore_rank, r, d, refs[r]) for r in (0, 1)]:
        os.waitpid(pid, 0)
    got = []
    for r in (0, 1):
        path = os.path.join(d, f"restore-r{r}.json")
        got.append(json.loads(_read(path)) if os.path.exists(path) else {"rank": r, "error": "no result"})
    res: dict[str, Any] = {**trial, "killed_at_its_point": self_killed, "lost": lost, "ranks": got}
    problems = [f"rank {g['rank']}: {g['error']}" for g in got if "error" in g]
    if problems:
        res.update(ok=False, why="; ".join(problems))
        return res
    durable = set(got[0]["durable"]) & set(got[1]["durable"])
    sure = []  # the steps each rank was sure to find
    for r in (0, 1):
        mine = logs[1 - r]["replica"] if r == lost else logs[r]["sealed"]
        sure.append(durable | ({max(mine)} if mine else set()))
    floor = max(sure[0] & sure[1], default=0)  # 0: no step both were sure to find, a fresh start is right
    steps = {g["step"] for g in got}
    if len(steps) != 1:
        problems.append(f"the ranks restored different steps {sorted(steps)}")
    s = got[0]["step"]
    if s < floor:
        problems.append(f"restored step {s}, but step {floor} was there for both ranks")
    if any(s > max(log["start"], default=0) for log in logs):
        problems.append(f"restored step {s}, never started")
    for g in got:
        r = g["rank"]
        if not g["exact"]:
            problems.append(f"rank {r}: the restored state differs from the uninterrupted run")
        if not g["continued"]:
            problems.append(f"rank {r}: continued training differs from the uninterrupted run")
        own_part = g["tier"] == "file" and "marker pending" in g["detail"]  # its own part on the tier
        if r == lost and s and s not in durable and g["tier"] != "peer" and not own_part:
            problems.append(f"rank {r} lost its node but restored step {s} from {g['tier']}, not its peer")
        if r != lost and s in g["adopted"] and g["tier"] != "host":
            problems.append(f"rank {r}: step {s} was in its shared memory but came from {g['tier']}")
    res.update(step=s, floor=floor, ok=not problems, why="; ".join(problems))
    return res


def main() -> None:
    trials, seed, outdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)  # no intra-op pool in this process: it forks
    rng = random.Random(seed)
    refs = [reference(r, N_STEPS) for r in (0, 1)]
    for i in range(trials):
        trial = {
            "trial": i,
            "kind": KINDS[i % len(KINDS)],
            "victim": rng.randint(0, 1),
            "kill_step": rng.randint(2, N_STEPS - 1),
            "frac": rng.uniform(0.05, 0.95),
            "delay": rng.random(),
            "wipe": rng.random() < 0.75,
        }
        print(json.dumps(run_trial(trial, os.path.join(outdir, f"t{i}"), refs)), flush=True)


if __name__ == "__main__":
    main()
