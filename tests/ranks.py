"""Real multi-rank runs for the tests: ``n`` processes of a worker module on one machine (gloo over loopback).

Each rank runs ``<module>.main(["<module>", *argv])`` with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set,
its stdout and stderr going to a log file of its own. A rank that has not ended within the deadline gets SIGUSR1
first, which makes it write every thread's stack to that log, and is killed after that. A hung or failed launch
fails with the tail of every rank's log in its message: where it hung or why it failed, not only that it did.
"""

from __future__ import annotations

import faulthandler
import importlib
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

#: how much of the end of each rank's log a failure message carries
LOG_TAIL = 4000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _rank_entry(env: dict[str, str], module: str, argv: list[str], log: str) -> None:
    os.environ.update(env)
    # the fork server's own stdout/stderr are those of the test that started it, not of this one
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
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


def _logs(logs: list[Path]) -> str:
    parts = []
    for r, p in enumerate(logs):
        text = p.read_text(errors="replace") if p.exists() else ""
        parts.append(f"--- rank {r} (last {LOG_TAIL} characters of its output) ---\n{text[-LOG_TAIL:]}")
    return "\n".join(parts)


def launch_ranks(n: int, module: str, argv: Sequence[str], timeout_s: float = 180.0) -> None:
    """Run ``n`` ranks of ``module`` and wait for all of them; fail naming the ranks that hung or failed."""
    ctx = _context()
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(n)}
    tmp = Path(tempfile.mkdtemp(prefix="asymstore-ranks-"))
    logs = [tmp / f"rank{r}.log" for r in range(n)]
    procs = [
        ctx.Process(
            target=_rank_entry, args=({**env, "RANK": str(r)}, module, list(argv), str(logs[r])), name=f"rank{r}"
        )
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
        codes = [p.exitcode for p in procs]
        output = _logs(logs) if alive or codes != [0] * n else ""
    finally:
        # also on an exception here (pytest-timeout's, a KeyboardInterrupt): a rank left running would be joined
        # forever by multiprocessing's exit handler, and the test run would never end
        for p in procs:
            if p.pid is not None and p.is_alive():
                p.kill()
                p.join(10)
        shutil.rmtree(tmp, ignore_errors=True)
    if output:
        print(output, file=sys.stderr)  # whole in the test's captured output as well
    assert not alive, f"ranks {alive} of {n} hung for {timeout_s:.0f} s; their stacks:\n{output}"
    assert codes == [0] * n, f"ranks of {n} exited with {codes}; their output:\n{output}"


def main(argv: list[str]) -> None:
    """A rank that does nothing but what ``argv[1]`` says: ``hang`` (sleeps) or ``fail`` (exits with 3)."""
    if argv[1] == "hang":
        time.sleep(3600)
    print(f"rank {os.environ['RANK']} fails on purpose", file=sys.stderr)
    sys.exit(3)
