"""Crash consistency of the trainer hooks: a training process with asymmetric checkpointing at every step is
SIGKILLed at a random point; a second process resumes from the newest complete checkpoint with
``AsymCheckpointer.resume()`` and trains to the end. Its final state (weights, optimizer, scheduler, RNG,
data position) must be bit-identical to that of a run that was never interrupted."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_bitequal

N_STEPS = 12
REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys, time
    import torch
    import asymstore
    from asymstore.trainer_hooks import AsymCheckpointer
    from tests._hooktest_util import build, full_state, iteration

    ckdir, n, out, pause = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    # one thread: the CPU kernels used here (linear, batch norm, dropout, AdamW) are then deterministic.
    # (torch.use_deterministic_algorithms would import torch._dynamo: ~10 s per child on a slow disk)
    torch.set_num_threads(1)
    model, opt, sched = build(0)
    pos = {"batch": 0}
    store = asymstore.open_store(ckdir)
    ck = AsymCheckpointer(model, opt, store, every=1, scheduler=sched, strategy="asym", warmup=2,
                          extras=lambda: dict(pos))
    start = 1
    if store.steps():
        extras = ck.resume()
        assert extras["batch"] == ck.step, (extras, ck.step)
        pos.update(extras)
        start = ck.step + 1
        print(f"resumed {ck.step}", flush=True)
    with ck:
        for t in range(start, n + 1):
            pos["batch"] = t  # the data position: batches are drawn from the (checkpointed) RNGs
            iteration(model, opt, sched, 256)
            print(f"step {t}", flush=True)
            time.sleep(pause)  # e.g. data loading; persistence runs in the background meanwhile
    store.close()
    torch.save(full_state(model, opt, sched, ck.step, dict(pos)), out)
    print("done", flush=True)
""")


def _env() -> dict[str, str]:
    # the child imports the installed asymstore and ``tests`` (a package) from the repository root
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))


def _start(script: Path, ckdir: Path, out: Path, pause: float = 0.03) -> subprocess.Popen[str]:
    cmd = [sys.executable, str(script), str(ckdir), str(N_STEPS), str(out), str(pause)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=REPO)


def _finish(p: subprocess.Popen[str], *, kill_at: int | None = None, delay: float = 0.0) -> tuple[int, list[str]]:
    """Read the child's lines; SIGKILL it ``delay`` s after it printed ``step kill_at``."""
    lines: list[str] = []
    assert p.stdout is not None and p.stderr is not None
    try:
        for line in p.stdout:
            lines.append(line.strip())
            if kill_at is not None and line.strip() == f"step {kill_at}":
                if delay:
                    time.sleep(delay)
                os.kill(p.pid, signal.SIGKILL)
                break
        p.wait(timeout=180)
        err = p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
        p.stderr.close()
    if kill_at is None and p.returncode != 0:
        raise AssertionError(f"child failed (rc {p.returncode}) after {lines[-3:]}:\n{err}")
    return p.returncode, lines


@pytest.mark.slow
def test_sigkill_at_random_steps_then_resume_is_bit_identical(tmp_path: Path) -> None:
    """Three SIGKILLs at random points of one training run, each followed by a resume (so a resumed
    run is itself killed and resumed); the final state equals an uninterrupted run's, bit for bit."""
    seed = int(os.environ.get("ASYMSTORE_TEST_SEED", time.time_ns() % 100_000))
    rng = random.Random(seed)
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    baseline = _start(script, tmp_path / "full", tmp_path / "full.pt")  # runs alongside the chain

    ckdir = tmp_path / "ck"
    resumed_from = 0
    history = []
    for attempt in range(3):
        lo = 3 if attempt == 0 else resumed_from + 1
        kill_at = min(rng.randint(lo, lo + 1), N_STEPS - 1)
        if kill_at <= resumed_from:  # (only if every kill so far landed a step late)
            break
        delay = rng.uniform(0.0, 0.05)
        rc, lines = _finish(_start(script, ckdir, tmp_path / f"killed{attempt}.pt"), kill_at=kill_at, delay=delay)
        what = f"seed {seed}, kills so far {history}, this kill at step {kill_at} +{delay:.3f}s"
        assert rc == -signal.SIGKILL, f"the child was not killed (rc {rc}, {what}): {lines[-3:]}"
        assert lines[0] == (f"resumed {resumed_from}" if resumed_from else "step 1"), (lines, what)
        # the newest complete checkpoint after this kill: not older than before, never after the kill
        # (the child may get a step further while the parent reacts)
        steps = asymstore_steps(ckdir)
        newest = steps[-1] if steps else 0
        assert resumed_from <= newest <= kill_at + 2, (steps, what)
        history.append((kill_at, round(delay, 3), newest))
        resumed_from = newest
    assert len(history) >= 2 and resumed_from > 0, history

    rc, lines = _finish(_start(script, ckdir, tmp_path / "resumed.pt"))
    assert lines[0] == f"resumed {resumed_from}" and lines[-1] == "done", (lines, history)
    if resumed_from < N_STEPS:
        assert lines[1] == f"step {resumed_from + 1}"
    rc, lines = _finish(baseline)
    assert lines[-1] == "done" and "resumed" not in lines[0]

    final = torch.load(tmp_path / "resumed.pt", weights_only=False)
    want = torch.load(tmp_path / "full.pt", weights_only=False)
    try:
        assert_bitequal(final, want)
    except AssertionError as e:
        raise AssertionError(f"seed {seed}, kills (step, delay, resumed from) {history}: {e}") from None


def asymstore_steps(path: Path) -> list[int]:
    import asymstore

    with asymstore.open_store(str(path)) as store:
        return store.steps()
