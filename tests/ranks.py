"""Real multi-rank runs for the tests: ``n`` processes of a worker module on one machine (gloo over loopback).

Each rank runs ``<module>.main(["<module>", *argv])`` with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set.
A rank that has not ended within the deadline gets SIGUSR1 first, which makes it print every thread's stack to
its stderr (captured by pytest and shown with the failure), and is killed after that: a hang is reported with
where it hung, not only that it did.
"""

from __future__ import annotations

import faulthandler
import importlib
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _rank_entry(env: dict[str, str], module: str, argv: list[str]) -> None:
    os.environ.update(env)
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    importlib.import_module(module).main([module, *argv])


def _context() -> mp.context.BaseContext:
    """Ranks forked from a fork server: a fresh interpreter started once per test run, torch imported there once.

    Forking the test process itself is fast, but the child gets a copy of whatever the test process's other
    threads hold at that moment (a lock, a half-done import): in one CI run both FSDP2 training launches hung in
    every rank, after earlier tests had run in that process (never seen when run alone). Spawning each rank
    afresh costs an import of torch per rank (4x the time of these tests). The server has neither problem.
    """
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "asymstore", "tests.ranks"])
    return ctx


def launch_ranks(n: int, module: str, argv: Sequence[str], timeout_s: float = 180.0) -> None:
    """Run ``n`` ranks of ``module`` and wait for all of them; fail naming the ranks that hung or failed."""
    ctx = _context()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(n)}
    procs = [
        ctx.Process(target=_rank_entry, args=({**env, "RANK": str(r)}, module, list(argv)), name=f"rank{r}")
        for r in range(n)
    ]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        alive = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in alive:
            os.kill(procs[r].pid, signal.SIGUSR1)  # type: ignore[arg-type]
        time.sleep(2.0 if alive else 0.0)  # the stacks are written
    finally:
        # also on an exception here (pytest-timeout's, a KeyboardInterrupt): a rank left running would be joined
        # forever by multiprocessing's exit handler, and the test run would never end
        for p in procs:
            if p.pid is not None and p.is_alive():
                p.kill()
                p.join(10)
    assert not alive, f"ranks {alive} of {n} hung for {timeout_s:.0f} s (their stacks are in the captured stderr)"
    codes = [p.exitcode for p in procs]
    assert codes == [0] * n, f"ranks of {n} exited with {codes} (see the captured output)"


def main(argv: list[str]) -> None:
    """A rank that does nothing but what ``argv[1]`` says: ``hang`` (sleeps) or ``fail`` (exits with 3)."""
    if argv[1] == "hang":
        time.sleep(3600)
    sys.exit(3)
