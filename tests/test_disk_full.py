"""A full disk under retention: checkpointing resumes once retention has made room.

Each test mounts a small tmpfs of its own (``mount -t tmpfs -o size=...``; skipped, with the reason, where the
test may not mount) that holds about 3.8 checkpoints. With ``keep=3`` the fourth save runs out of space: its
partial files are removed, retention deletes what the policy lets go once the new step is there, and the save
is retried and succeeds. When the policy may delete nothing, the error is a ``TierFullError`` naming the tier,
the path, the step and the bytes needed, and the earlier steps stay intact.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from asymstore import Store, TierSpec
from asymstore.config import Config
from asymstore.errors import TierFullError

MiB = 1 << 20
STATE_BYTES = 2 * MiB
FS_BYTES = int(STATE_BYTES * 3.8)
OPTS: dict[str, Any] = dict(
    chunk_bytes=1 << 16, partition_bytes=1 << 19, compression="none", background_idle=False, host_slots=1
)
if "host_memory" in {f.name for f in dataclasses.fields(Config)}:
    OPTS["host_memory"] = "private"


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of ``FS_BYTES`` mounted for this test (skipped where mounting is not permitted)."""
    d = tmp_path / "small"
    d.mkdir()
    try:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={FS_BYTES}", "tmpfs", str(d)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a small tmpfs for the full-disk test: {e}")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs for the full-disk test (needs root/CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True, timeout=30)


def state(step: int) -> dict[str, Any]:
    return {"w": np.full(STATE_BYTES // 4, step, dtype=np.float32), "step": step}


def _step_dirs(root: Path) -> list[str]:
    return sorted(d for d in os.listdir(root) if d.startswith("step_"))


def test_checkpointing_resumes_once_retention_made_room(small_fs: Path) -> None:
    root = small_fs / "ckpt"
    with Store([TierSpec(str(root), keep=3)], **OPTS, non_fatal=True) as store:
        for step in range(10):
            store.save(state(step), step)
            assert store.failures == 0, f"step {step} did not become durable"
            assert store.tiers[0].has(step)
            committed = store.tiers[0].committed_steps()
            assert committed == list(range(max(0, step - 2), step + 1)), committed
            assert len(_step_dirs(root)) == len(committed), f"partial step directories: {_step_dirs(root)}"
        assert store.manager is not None
        assert store.manager.activity["file"].made_room >= 6, "retention never had to make room: disk too big?"
        assert float(store.restore()["w"][0]) == 9.0


def test_full_disk_the_policy_cannot_relieve_names_tier_path_step_bytes(small_fs: Path) -> None:
    root = small_fs / "ckpt"
    with Store([TierSpec(str(root), keep=4)], **OPTS) as store:
        for step in range(3):
            store.save(state(step), step)
        with pytest.raises(TierFullError) as ei:
            store.save(state(3), 3)
        msg = str(ei.value)
        assert ei.value.errno == errno.ENOSPC
        for part in ("tier file", str(root), "step 3", f"{STATE_BYTES}", "bytes free"):
            assert part in msg, f"{part!r} not in {msg!r}"
        # the failed save left nothing; the earlier steps are intact
        assert _step_dirs(root) == ["step_000000000000", "step_000000000001", "step_000000000002"]
        for s in range(3):
            assert store.tiers[0].reader(s).verify().ok
        # once room is made (here: by hand), checkpointing goes on
        store.delete(0)
        store.save(state(3), 3)
        assert store.steps() == [1, 2, 3]


def test_non_fatal_full_disk_keeps_training_and_leaves_no_partial_steps(small_fs: Path) -> None:
    root = small_fs / "ckpt"
    with Store([TierSpec(str(root), keep=5)], **OPTS, non_fatal=True) as store:
        for step in range(6):
            store.save(state(step), step)  # steps 3.. do not fit and keep=5 deletes nothing: logged, not raised
        assert store.failures == 3
        assert store.tiers[0].committed_steps() == [0, 1, 2]
        assert _step_dirs(root) == ["step_000000000000", "step_000000000001", "step_000000000002"]
