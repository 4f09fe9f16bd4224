"""Kill trials for shared-memory host slots, run as ``python -m tests._shm_worker TRIALS SEED OUTDIR``.

One process imports torch once and forks a training child per trial. The child trains a small model with a
checkpoint at every step (``save(..., blocking=False)``, two host slots in shared memory, a local tier) and is
SIGKILLed at a point chosen by the trial: during a snapshot copy, right after a slot was committed in shared
memory (the seal runs beside the tier write, so the write may have begun), during the tier write after that
commit, or at a random time. The parent then opens the store like a
restarted job: it must restore the newest committed snapshot bit-exact (from shared memory where it is there),
never a torn slot, lose no committed step, persist what had not reached the tier, and training continued from
the restored state must end bit-identical to an uninterrupted run. One JSON line per trial on stdout.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time
from typing import Any

import torch

N_STEPS = 8
KINDS = ("copy", "sealed", "persist", "random")


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 8))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, rank: int = 0) -> None:
    """One deterministic step on the batch of ``step`` (each rank its own batches)."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    x, y = torch.randn(32, 64, generator=g), torch.randn(32, 8, generator=g)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def state_of(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    return {"model": model.state_dict(), "optim": opt.state_dict(), "step": step}


def clone(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: clone(v) for k, v in x.items()}
    if isinstance(x, list):
        return [clone(v) for v in x]
    return x


def flat(x: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(x, dict):
        out: dict[str, Any] = {}
        for k, v in x.items():
            out.update(flat(v, f"{prefix}{k}/"))
        return out
    if isinstance(x, list):
        return flat(dict(enumerate(x)), prefix)
    return {prefix: x}


def bitequal(a: Any, b: Any) -> bool:
    fa, fb = flat(a), flat(b)
    if fa.keys() != fb.keys():
        return False
    for k, va in fa.items():
        vb = fb[k]
        if isinstance(va, torch.Tensor):
            if not isinstance(vb, torch.Tensor) or va.dtype != vb.dtype or va.shape != vb.shape:
                return False
            if not torch.equal(va.reshape(-1).view(torch.uint8), vb.reshape(-1).view(torch.uint8)):
                return False
        elif va != vb:
            return False
    return True


def reference(rank: int = 0, steps: int = N_STEPS) -> list[dict[str, Any]]:
    """The state after every step of an uninterrupted run of ``rank`` (index 0: before training)."""
    model, opt = build()
    out = [clone(state_of(model, opt, 0))]
    for t in range(1, steps + 1):
        train_step(model, opt, t, rank)
        out.append(clone(state_of(model, opt, t)))
    return out


def log_seals(log: Any, then: Any = None) -> None:
    """Write ``sealed <step>`` to ``log`` each time a host slot is committed in shared memory, then call
    ``then(step)`` (a kill point)."""
    from asymstore import hostpool

    seal = hostpool.HostPool.seal

    def sealing(self: hostpool.HostPool, slot: hostpool.Slot, *args: Any) -> None:
        seal(self, slot, *args)
        log.write(f"sealed {slot.step}\n")
        if then is not None:
            then(slot.step)

    hostpool.HostPool.seal = sealing  # type: ignore[method-assign]


def child(kind: str, kill_step: int, delay: float, ckdir: str, shm: str, log_path: str) -> None:
    """Train, checkpoint every step, and die as the trial says (never returns)."""
    import asymstore
    from asymstore import store

    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives until the SIGKILL
    me = os.getpid()

    def die() -> None:
        os.kill(me, signal.SIGKILL)

    def sealed(step: int | None) -> None:
        if kind == "sealed" and step == kill_step:
            die()
        if kind == "persist" and step == kill_step:  # sealed while the tier write runs: die inside it
            threading.Timer(delay * 0.01, die).start()

    log_seals(log, sealed)
    copy_all = store.copy_all

    def copying(buf: torch.Tensor, layout: Any, tensors: Any, **kw: Any) -> None:
        if kind == "copy" and buf is not None and current["step"] == kill_step:
            buf[: buf.numel() // 2].fill_(0x5A)  # half a copy, then death
            die()
        copy_all(buf, layout, tensors, **kw)

    store.copy_all = copying  # type: ignore[assignment]
    current = {"step": 0}
    st = asymstore.open_store(ckdir, shm_dir=shm, host_slots=2, background_idle=False)
    if kind == "random":
        threading.Timer(0.05 + delay * 0.5, die).start()
    model, opt = build()
    for t in range(1, N_STEPS + 1):
        train_step(model, opt, t)
        current["step"] = t
        log.write(f"start {t}\n")
        st.save(state_of(model, opt, t), t, blocking=False)
        time.sleep(0.005)
    st.close()
    log.write("closed\n")
    die()


def check(kind: str, kill_step: int, ckdir: str, shm: str, log_path: str, ref: list[dict[str, Any]]) -> dict[str, Any]:
    import asymstore

    with open(log_path) as f:
        lines = f.read().split()
    sealed = [int(v) for k, v in zip(lines[::2], lines[1::2], strict=False) if k == "sealed"]
    started = [int(v) for k, v in zip(lines[::2], lines[1::2], strict=False) if k == "start"]
    res: dict[str, Any] = {"kind": kind, "kill_step": kill_step, "sealed": sealed, "started": started[-1:]}
    st = asymstore.open_store(ckdir, shm_dir=shm, host_slots=2, background_idle=False)
    try:
        res["adopted"] = st.adopted
        steps = st.steps()
        if not steps:
            res["ok"] = not sealed
            res["why"] = "nothing committed" if not sealed else "committed steps lost"
            return res
        model, opt = build()
        got = st.restore()
        s = int(got["step"])
        rep = st.last_restore
        assert rep is not None
        res.update(step=s, tier=rep.tier, detail=rep.detail)
        problems = []
        if sealed and s < max(sealed):
            problems.append(f"restored {s} but step {max(sealed)} was committed in shared memory")
        if started and s > started[-1]:
            problems.append(f"restored {s}, never started")
        if kind == "sealed" and s != kill_step:  # killed right after step k was committed in shared memory
            problems.append(f"expected step {kill_step}")
        if kind == "persist" and s < kill_step:  # killed while step k was persisted (a later one may be sealed)
            problems.append(f"expected step {kill_step} or later")
        if kind == "copy" and s >= kill_step:
            problems.append("a torn slot was used")
        if not bitequal(got, ref[s]):
            problems.append("restored state differs from the uninterrupted run")
        if s in st.adopted and rep.tier != "host":
            problems.append(f"step {s} was in shared memory but came from {rep.tier}")
        if rep.tier == "host" and "left by pid" not in rep.detail:
            problems.append(f"detail {rep.detail!r}")
        st.wait()  # adopted snapshots not yet on the tier are persisted now
        if s not in st.durable_steps():
            problems.append(f"step {s} was not made durable after the restart")
        # training goes on from the restored state and ends where the uninterrupted run ends
        model.load_state_dict(got["model"])
        opt.load_state_dict(got["optim"])
        for t in range(s + 1, N_STEPS + 1):
            train_step(model, opt, t)
        if not bitequal(state_of(model, opt, N_STEPS), ref[N_STEPS]):
            problems.append("continued training differs from the uninterrupted run")
        res["ok"] = not problems
        res["why"] = "; ".join(problems)
        return res
    finally:
        st.close()


def main() -> None:
    trials, seed, outdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    rng = random.Random(seed)
    ref = reference()
    for i in range(trials):
        kind = KINDS[i % len(KINDS)]
        kill_step = rng.randint(2, N_STEPS - 1)
        delay = rng.random()
        base = os.path.join(outdir, f"t{i}")
        ckdir, shm, log_path = base + "-ck", base + "-shm", base + ".log"
        os.makedirs(shm)
        pid = os.fork()
        if pid == 0:
            try:
                child(kind, kill_step, delay, ckdir, shm, log_path)
            finally:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        res = check(kind, kill_step, ckdir, shm, log_path, ref)
        res["trial"] = i
        res["signal"] = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
