"""Crash consistency on the real local tier: SIGKILL a saving process at random moments.

A forked child saves steps in a loop (content derived from the step number, a few MiB,
several partitions, retention deleting old steps); the parent kills it at a random moment,
then checks with a fresh store that every step listed as complete verifies and restores
bit-exactly. The child is forked (not spawned) so the trials stay short.
"""

from __future__ import annotations

import os
import random
import signal
import time

import numpy as np
import pytest

from asymstore import Store
from asymstore.errors import AsymstoreError
from asymstore.manifest import COMMIT_KEY

from .helpers import assert_bitequal

pytestmark = pytest.mark.slow

CFG = dict(chunk_bytes=1 << 18, partition_bytes=1 << 20)
CONFIGS = [dict(compression="none"), dict(compression="zstd3"), dict(compression="xor-zstd", delta_every=3)]
TRIALS = 24


def content(step: int) -> dict:
    rng = np.random.default_rng(step)
    w = rng.standard_normal(600_000, dtype=np.float32)  # 2.4 MB: 3 partitions of 1 MiB
    return {"w": w, "m": (w[:200_000] * 0.5).astype(np.float16), "meta": {"step": step, "tag": f"s{step}"}}


def _child(root: str, cfg: dict, first_step: int) -> None:
    import torch

    torch.set_num_threads(1)  # the intra-op pool does not survive fork
    with Store([root], **CFG, **cfg, host_slots=1) as store:
        step = first_step
        while True:
            store.save(content(step), step)
            try:
                if step - 3 in store.steps():
                    store.delete(step - 3)  # retention: a second crash surface (marker first, then data)
            except AsymstoreError:
                pass  # a delta depends on it; keep it
            step += 1


def _uncommitted(root: str) -> set[str]:
    """Step directories without their COMMIT marker: a save (or a delete) in progress."""
    out = set()
    for d in os.listdir(root) if os.path.isdir(root) else []:
        if d.startswith("step_") and not os.path.exists(os.path.join(root, d, COMMIT_KEY)):
            out.add(d)
    return out


def _run_child_and_kill(root: str, cfg: dict, first_step: int, delay: float, mid_save: bool) -> None:
    """Fork a saving child and SIGKILL it after ``delay`` seconds or, with ``mid_save``, as soon as a step
    directory is seen without its marker (a save in progress; at most ``delay`` + 5 s)."""
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            _child(root, cfg, first_step)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    time.sleep(delay)  # with mid_save: past a few saves, so retention deletes run too
    deadline = time.monotonic() + 5.0
    while mid_save and not _uncommitted(root) and time.monotonic() < deadline:
        time.sleep(0.0005)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
        f"the saving child died on its own (status {status}) instead of being killed"
    )


def test_sigkill_during_saves_leaves_consistent_steps(tmp_path) -> None:
    rnd = random.Random(20240601)
    roots = [str(tmp_path / f"cfg{i}") for i in range(len(CONFIGS))]
    incomplete_seen = 0
    restored = 0
    for trial in range(TRIALS):
        i = trial % len(CONFIGS)
        root, cfg = roots[i], CONFIGS[i]
        with Store([root], **CFG) as probe:
            before = probe.steps()
        first = (before[-1] + 1) if before else 0
        stale = _uncommitted(root)  # left by an earlier trial (counted then)
        # every other trial at a random moment, the others as soon as a save is seen in progress
        _run_child_and_kill(root, cfg, first, rnd.uniform(0.05, 1.2), mid_save=trial % 2 == 1)
        # step directories without a marker: the kill landed mid-save (or mid-delete)
        incomplete_seen += len(_uncommitted(root) - stale)
        with Store([root], **CFG) as fresh:
            # a snapshot committed in host shared memory but not yet on the tier is persisted on open
            fresh.wait()
            steps = fresh.steps()
            assert steps == fresh.durable_steps(), f"trial {trial}: listed {steps}, durable {fresh.durable_steps()}"
            for s in steps:
                rep = fresh.tiers[0].reader(s).verify()
                assert rep.ok, f"trial {trial}: committed step {s} fails verify: {rep.problems}"
            # the newest and the previous complete steps restore to their known content
            for s in steps[-2:]:
                assert_bitequal(fresh.restore(s), content(s), f"trial {trial} step {s}")
                restored += 1
            if steps:
                fresh.restore()
                assert fresh.last_restore is not None and fresh.last_restore.step == steps[-1]
                assert fresh.last_restore.events == []
    print(f"crash trials: {TRIALS}, restores checked: {restored}, incomplete step dirs seen: {incomplete_seen}")
    assert restored >= 20, "the children hardly ever committed a step"
    assert incomplete_seen >= 1, "no kill ever landed inside a save: the test did not test anything"
