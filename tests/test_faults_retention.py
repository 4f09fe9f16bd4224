"""Faults during retention, promotion and saving: every kill leaves only readable committed steps.

* :func:`deletion_order` unit tests: dependants before bases even when a base is newer than its delta (a lower
  tier receives promotions newest first).
* Every kill point of one retention pass, exhaustively: a backend that "dies" (stops the thread with a
  ``BaseException``) at its k-th mutating call, for every k; after each, a fresh store reads every committed step.
* The random-kill loop: a forked child saves steps in a loop into a two-tier chain (local + a second local
  directory) with ``xor-zstd`` deltas (``delta_every=3``), retention ``keep=2`` / ``keep=3`` and promotion, and is
  SIGKILLed at a random moment, ``ASYMSTORE_FAULT_KILLS`` times (default 200). After each kill a fresh store must
  find 0 unreadable committed steps, 0 durable-reported steps missing (other than those retention may drop),
  and no crash leftovers once it has opened.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from asymstore import Store, TierSpec
from asymstore.backends.local import LocalObjectStore
from asymstore.catalog import partial_steps
from asymstore.cleanup import PROBE_DIR
from asymstore.config import Config
from asymstore.errors import AsymstoreError
from asymstore.files import is_temp
from asymstore.retention import LatestN, deletion_order, plan_retention

#: the options of every store here: small partitions (several objects per step), no fsync (a SIGKILL keeps the
#: page cache: fsync matters for power loss, not for a killed process), training-priority threads
FAST: dict[str, Any] = dict(
    chunk_bytes=1 << 14,
    partition_bytes=1 << 16,
    compression="xor-zstd",
    delta_every=3,
    background_idle=False,
    backend_options={"file": {"fsync": False, "direct_io": False}},
)
if "host_memory" in {f.name for f in dataclasses.fields(Config)}:
    FAST["host_memory"] = "private"  # the host copies die with the process: only the tiers are checked


def content(step: int) -> dict[str, Any]:
    """A state derived from its step: deltas between neighbours are small but never empty."""
    rng = np.random.default_rng(1234)
    base = rng.standard_normal(40_000).astype(np.float32)  # 160 KB: 3 partitions
    base[step % 40_000] += step
    return {"w": base + np.float32(step) * 1e-3, "meta": {"step": step}}


def assert_content(state: dict[str, Any], step: int, what: str) -> None:
    want = content(step)
    got = state["w"]
    got = got.numpy() if hasattr(got, "numpy") else np.asarray(got)
    assert np.array_equal(got, want["w"]), f"{what}: wrong values"
    assert state["meta"] == want["meta"], f"{what}: wrong metadata"


# --- deletion order -----------------------------------------------------------------------------------------
def test_deletion_order_puts_dependants_first() -> None:
    bases = {0: None, 1: 0, 2: 0, 3: None, 4: 3}
    order = deletion_order([0, 1, 2, 3, 4], bases)
    for s, b in bases.items():
        if b is not None:
            assert order.index(s) < order.index(b), order
    # a base newer than its delta (promotions arrive newest first on a lower tier)
    bases = {10: None, 8: 10, 9: 10, 5: None}
    order = deletion_order([5, 8, 9, 10], bases)
    assert order.index(8) < order.index(10) and order.index(9) < order.index(10), order
    # a multi-rank step with two bases; a damaged cycle still yields every step once
    assert deletion_order([1, 2, 3], {3: [1, 2]}) == [3, 2, 1]
    assert sorted(deletion_order([2, 3], {2: 3, 3: 2})) == [2, 3]


def test_plan_retention_keeps_protected_and_orders_by_bases() -> None:
    steps = [5, 8, 9, 10, 11]
    bases = {5: None, 8: 10, 9: 10, 10: None, 11: None}
    doomed = plan_retention(steps, {}, [LatestN(1)], delta_bases=bases)
    assert set(doomed) == {5, 8, 9, 10}
    assert doomed.index(8) < doomed.index(10) and doomed.index(9) < doomed.index(10)
    assert 10 not in plan_retention(steps, {}, [LatestN(1)], delta_bases=bases, protected=[10])


# --- every kill point of one retention pass -------------------------------------------------------------------
class Killed(BaseException):
    """The simulated death of the process (not an Exception: nothing may catch it)."""


class DyingStore(LocalObjectStore):
    """A local tier whose process dies at its ``left``-th mutating call (``None``: never)."""

    left: int | None = None
    calls = 0

    def _tick(self) -> None:
        type(self).calls += 1
        if self.left is not None:
            if self.left <= 0:
                raise Killed()
            self.left -= 1

    def delete(self, key: str) -> None:
        self._tick()
        super().delete(key)

    def delete_prefix(self, prefix: str) -> int:
        self._tick()
        return super().delete_prefix(prefix)

    def put(self, key: str, data: Any) -> None:
        self._tick()
        super().put(key, data)


def _readable_steps(root: str) -> list[int]:
    """Open ``root`` afresh; check that every committed step verifies and restores its content."""
    with Store([root], **FAST) as fresh:
        steps = fresh.steps()
        for s in steps:
            rep = fresh.tiers[0].reader(s).verify()
            assert rep.ok, f"committed step {s} fails verify: {rep.problems}"
            assert_content(fresh.restore(s), s, f"step {s}")
    return steps


def test_a_kill_at_any_point_of_retention_leaves_readable_steps(tmp_path: Path) -> None:
    """Steps 0..6 (full: 0, 3, 6) with keep=1 delete 0..5 in one pass; kill it at each of its calls."""
    kill_points = 0
    for k in range(40):
        root = str(tmp_path / f"k{k}")
        with Store([root], **FAST) as s:
            for step in range(7):
                s.save(content(step), step)
        backend = DyingStore(root, fsync=False, direct_io=False)
        with Store([TierSpec(backend, keep=1)], **FAST) as store:
            assert store.manager is not None
            backend.left = k
            try:
                done = store.manager.apply_retention(0)
            except Killed:
                done = None
            backend.left = None
        steps = _readable_steps(root)
        assert 6 in steps, "the newest step was deleted"
        if done is not None:  # the pass finished before its k-th call: every kill point was tried
            assert steps == [6] and max(done.index(4), done.index(5)) < done.index(3), done
            assert max(done.index(1), done.index(2)) < done.index(0), done
            break
        kill_points += 1
    assert kill_points >= 5, "the retention pass made too few calls to kill it in between"


# --- the random-kill loop ------------------------------------------------------------------------------------
KILLS = int(os.environ.get("ASYMSTORE_FAULT_KILLS", "200"))


def _chain(a: str, b: str) -> list[TierSpec]:
    return [TierSpec(a, keep=2), TierSpec(b, keep=3, name="second")]


def _child(a: str, b: str, first: int, report_fd: int) -> None:
    import torch

    torch.set_num_threads(1)
    with Store(_chain(a, b), **FAST, host_slots=1) as store:
        step = first
        while True:
            store.save(content(step), step)  # durable on the first tier when it returns
            os.write(report_fd, f"{step}\n".encode())
            step += 1


def _run_and_kill(a: str, b: str, first: int, delay: float) -> list[int]:
    """Fork a saving child, SIGKILL it after ``delay`` s; the steps it reported durable."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(r)
        code = 0
        try:
            _child(a, b, first, w)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    assert os.WIFSIGNALED(status), f"the saving child exited on its own (status {status})"
    return [int(x) for x in data.split()]


def _leftovers(root: str) -> list[str]:
    """Crash leftovers under a tier root: probe directories, uncommitted step directories holding objects,
    temporaries in step directories."""
    out = []
    probe = os.path.join(root, PROBE_DIR)
    if os.path.isdir(probe) and os.listdir(probe):
        out.append(f"{PROBE_DIR}/: {os.listdir(probe)}")
    for d in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        p = os.path.join(root, d)
        if not d.startswith("step_") or not os.path.isdir(p):
            continue
        files = [f for _, _, fs in os.walk(p) for f in fs]
        if not files:
            continue  # an empty directory (a kill between mkdir and the claim, or inside rmtree): holds no object
        if not os.path.exists(os.path.join(p, "COMMIT")):
            out.append(f"{d} (uncommitted: {sorted(os.listdir(p))})")
        out += [f"{d}/{f}" for _, _, fs in os.walk(p) for f in fs if is_temp(f)]
    return out


def _dirs(root: str) -> int:
    return sum(1 for d in os.listdir(root) if d.startswith("step_")) if os.path.isdir(root) else 0


@pytest.mark.slow
def test_random_kills_over_save_retention_and_promotion(tmp_path: Path) -> None:
    a, b = str(tmp_path / "nvme"), str(tmp_path / "second")
    rnd = random.Random(20261202)
    reported: set[int] = set()
    next_step = 0
    mid_operation = 0  # kills that left an uncommitted step directory (a save, delete or promotion cut short)
    checked = 0
    t0 = time.monotonic()
    for trial in range(KILLS):
        reported |= set(_run_and_kill(a, b, next_step, rnd.uniform(0.0, 0.2)))
        mid_operation += _leftovers(a) != [] or _leftovers(b) != []
        with Store(_chain(a, b), **FAST) as fresh:
            assert fresh.manager is not None and fresh.manager.wait_cleaned(30)
            per_tier = {t.name: t.committed_steps() for t in fresh.tiers}
            for t in fresh.tiers:
                for s in per_tier[t.name]:
                    try:
                        rep = t.reader(s).verify()
                    except AsymstoreError as e:
                        pytest.fail(f"kill {trial}: committed step {s} on {t.name} cannot be opened: {e}")
                    assert rep.ok, f"kill {trial}: committed step {s} on {t.name} fails verify: {rep.problems}"
                    checked += 1
            everywhere = set().union(*per_tier.values())
            first = sorted(per_tier["file"])
            for s in sorted(reported):
                # retention (keep=2 on the first tier) may drop a step only once two newer ones are committed
                may_drop = len(first) >= 2 and s < first[-2]
                assert s in everywhere or may_drop, (
                    f"kill {trial}: step {s} was reported durable and is gone (tiers: {per_tier})"
                )
            if everywhere:
                newest = max(everywhere)
                assert_content(fresh.restore(newest), newest, f"kill {trial}: newest step {newest}")
            left = _leftovers(a) + _leftovers(b)
            assert left == [], f"kill {trial}: leftovers after opening: {left}"
            next_step = max(everywhere | reported | {-1}) + 1
    seconds = time.monotonic() - t0
    print(
        f"{KILLS} kills in {seconds:.1f} s: {len(reported)} steps reported durable, {checked} committed copies "
        f"verified, {mid_operation} kills cut an operation short"
    )
    assert len(reported) >= KILLS // 4, "the child hardly ever finished a save: kills came too early"
    assert mid_operation >= KILLS // 20, "hardly any kill landed inside an operation: the test tests little"


# --- the same over a local tier and HDFS (slow: every child is a new interpreter) ---------------------------------
HDFS_CHILD = """
import sys
sys.path.insert(0, sys.argv[3])
from tests.test_faults_retention import FAST, _chain, content
from asymstore import Store

a, b, first = sys.argv[1], sys.argv[2], int(sys.argv[4])
with Store(_chain(a, b), **FAST, host_slots=1) as store:
    print("ready", flush=True)
    step = first
    while True:
        store.save(content(step), step)
        print(step, flush=True)
        step += 1
"""


@pytest.mark.slow
def test_random_kills_with_an_hdfs_tier(tmp_path: Path, hdfs_cluster: Any) -> None:
    import subprocess
    import sys
    import threading
    import uuid

    pytest.importorskip("hdfs_native")
    a, b = str(tmp_path / "nvme"), f"{hdfs_cluster.url}/kills/{uuid.uuid4().hex}"
    rnd = random.Random(7)
    reported: set[int] = set()
    next_step = 0
    kills = int(os.environ.get("ASYMSTORE_FAULT_HDFS_KILLS", "6"))
    repo = str(Path(__file__).resolve().parents[1])
    for trial in range(kills):
        p = subprocess.Popen(
            [sys.executable, "-c", HDFS_CHILD, a, b, repo, str(next_step)], stdout=subprocess.PIPE, text=True
        )
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ready"
        lines: list[str] = []
        reader = threading.Thread(target=lines.extend, args=(p.stdout,), daemon=True)
        reader.start()
        time.sleep(rnd.uniform(0.2, 2.0))
        p.kill()
        p.wait(30)
        reader.join(10)
        reported |= {int(x) for x in lines if x.strip().isdigit()}
        with Store(_chain(a, b), **FAST) as fresh:
            assert fresh.manager is not None and fresh.manager.wait_cleaned(60)
            per_tier = {t.name: t.committed_steps() for t in fresh.tiers}
            for t in fresh.tiers:
                for s in per_tier[t.name]:
                    rep = t.reader(s).verify()
                    assert rep.ok, f"kill {trial}: committed step {s} on {t.name} fails verify: {rep.problems}"
            everywhere = set().union(*per_tier.values())
            first = sorted(per_tier["file"])
            for s in sorted(reported):
                assert s in everywhere or (len(first) >= 2 and s < first[-2]), f"kill {trial}: step {s} is gone"
            assert _leftovers(a) == []
            uncommitted = [s for s in partial_steps(fresh.tiers[1].backend) if s <= max(everywhere)]
            assert uncommitted == [], f"kill {trial}: uncommitted steps left on HDFS: {uncommitted}"
            next_step = max(everywhere | reported | {-1}) + 1
    assert reported, "the child never finished a save"
