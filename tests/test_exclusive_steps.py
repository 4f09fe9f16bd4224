"""Creating a step is exclusive on every tier: of two processes saving the same step into one root at the same
moment exactly one wins, the other gets ``StepExistsError``, and the winner's step is intact.

Two worker processes (new interpreters, as two jobs would be) open one root; the test sends both the same step
and a start time, they save it at that instant, and the test checks that exactly one reports success, that the
step verifies and restores the winner's values, and that the loser left nothing behind. Local tier here; HDFS
on the real MiniDFSCluster (slow). Also: the claim protocol in one process (a crashed save's claim, a live
writer's claim), and the global marker of a multi-rank step created no-replace.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from asymstore import Store, claims
from asymstore.backends import open_object_store
from asymstore.catalog import open_reader
from asymstore.config import Config
from asymstore.errors import StepExistsError
from asymstore.manifest import step_dir

REPO = Path(__file__).resolve().parents[1]
OPTS: dict[str, Any] = dict(chunk_bytes=1 << 16, partition_bytes=1 << 18, compression="none", background_idle=False)
if "host_memory" in {f.name for f in dataclasses.fields(Config)}:
    OPTS["host_memory"] = "private"

WORKER = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from asymstore import Store
    from asymstore.errors import StepExistsError

    url, who, opts = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    store = Store([url], **opts)
    print("ready", flush=True)
    for line in sys.stdin:
        step, at = int(line.split()[0]), float(line.split()[1])
        state = {"w": np.full(400_000, who * 100_000 + step, dtype=np.float32), "who": who}
        while time.time() < at:
            pass
        try:
            store.save(state, step)
            print(json.dumps(["won", step]), flush=True)
        except StepExistsError as e:
            print(json.dumps(["lost", step, str(e)]), flush=True)
        except Exception as e:
            print(json.dumps(["error", step, f"{type(e).__name__}: {e}"]), flush=True)
    store.close()
""")


def _start(url: str, who: int) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen(
        [sys.executable, "-c", WORKER, url, str(who), json.dumps(OPTS)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line.strip() == "ready", f"worker {who} did not start: {line!r} {p.stderr.read() if p.stderr else ''}"
    return p


def _race(url: str, rounds: int) -> list[int]:
    """Race two workers for steps ``0..rounds-1``; check each round; the winner of each."""
    workers = [_start(url, 1), _start(url, 2)]
    winners = []
    try:
        for step in range(rounds):
            at = time.time() + 0.3
            for w in workers:
                assert w.stdin is not None
                w.stdin.write(f"{step} {at}\n")
                w.stdin.flush()
            outcomes = []
            for w in workers:
                assert w.stdout is not None
                outcomes.append(json.loads(w.stdout.readline()))
            kinds = [o[0] for o in outcomes]
            assert "error" not in kinds, f"step {step}: {outcomes}"
            assert sorted(kinds) == ["lost", "won"], f"step {step}: not exactly one winner: {outcomes}"
            who = kinds.index("won") + 1
            loser = outcomes[kinds.index("lost")]
            assert f"step {step}" in loser[2], loser
            winners.append(who)
            _check_step(url, step, who)
    finally:
        for w in workers:
            if w.stdin is not None:
                w.stdin.close()
        for w in workers:
            w.wait(60)
    return winners


def _check_step(url: str, step: int, who: int) -> None:
    """The step verifies and holds exactly the winner's values."""
    backend = open_object_store(url)
    try:
        reader = open_reader(backend, step)
        rep = reader.verify()
        assert rep.ok, f"step {step} is damaged: {rep.problems}"
        buf = np.empty(reader.manifest.layout.total_bytes, dtype=np.uint8)
        reader.read_all_into(memoryview(buf))
        entry = reader.manifest.layout.by_name()["w"]
        w = buf[entry.offset : entry.end].view(np.float32)
        assert np.all(w == who * 100_000 + step), f"step {step} holds values of both writers"
        # the step holds exactly the objects its marker counts (the winner's claim went with the commit)
        assert backend.get(f"{step_dir(step)}/{claims.CLAIM_KEY}") is None
        assert len(list(backend.list(step_dir(step) + "/"))) == reader.commit["objects"]
    finally:
        backend.close()


def test_two_processes_saving_one_step_locally(tmp_path: Path) -> None:
    winners = _race(str(tmp_path / "root"), rounds=8)
    print(f"local race winners: {winners}")


@pytest.mark.slow
def test_two_processes_saving_one_step_on_hdfs(hdfs_cluster: Any) -> None:
    pytest.importorskip("hdfs_native")
    url = f"{hdfs_cluster.url}/race/{uuid.uuid4().hex}"
    winners = _race(url, rounds=4)
    print(f"hdfs race winners: {winners}")


# --- the claim protocol in one process -------------------------------------------------------------------------
def _state(v: float) -> dict[str, Any]:
    return {"w": np.full(100_000, v, dtype=np.float32)}


def test_a_live_claim_refuses_and_a_crashed_one_is_cleaned(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    with Store([root], **OPTS) as s:
        s.save(_state(1), 1)
    key = f"{step_dir(2)}/{claims.CLAIM_KEY}"
    # a writer of another live process holds step 2 (this test's parent process stands for it)
    other = dict(json.loads(claims.new_claim("step 2")[1]), pid=os.getppid(), token="other")
    other["start"] = claims._start_time(os.getppid())
    backend = open_object_store(root)
    assert backend.create_exclusive(key, json.dumps(other).encode())
    backend.put(f"{step_dir(2)}/raw/c/0", b"the other writer's partial data")
    with Store([root], **OPTS) as s:
        with pytest.raises(StepExistsError, match="being saved by process"):
            s.save(_state(2), 2)
        assert backend.get(f"{step_dir(2)}/raw/c/0") == b"the other writer's partial data"  # untouched
        assert s.discard_uncommitted() == {}  # a live writer's step is never discarded
    # that process is gone now (a pid that cannot exist): the next open removes its leftovers
    dead = dict(other, pid=2**22 + 17, start="1")
    backend.delete(key)
    backend.put(key, json.dumps(dead).encode())
    with Store([root], **OPTS) as s:
        assert not os.path.exists(os.path.join(root, step_dir(2), "raw"))
        s.save(_state(2), 2)
        assert s.steps() == [1, 2]
        assert float(s.restore(2)["w"][0]) == 2.0


def test_a_failed_save_leaves_nothing_and_can_be_retried(tmp_path: Path) -> None:
    root = str(tmp_path / "root")

    class Fails(Exception):
        pass

    from asymstore.backends.local import LocalObjectStore

    class FailOnce(LocalObjectStore):
        fail = True

        def put(self, key: str, data: Any) -> None:
            if self.fail and "/c/" in key and not key.endswith("/0"):
                type(self).fail = False
                raise Fails("disk went away")
            super().put(key, data)

    with Store([FailOnce(root)], **OPTS) as s:
        with pytest.raises(Fails):
            s.save({"w": np.zeros(200_000, np.float32)}, 5)
        assert not os.path.exists(os.path.join(root, step_dir(5))), "the failed save left files behind"
        s.save({"w": np.ones(200_000, np.float32)}, 5)
        assert s.steps() == [5]


def test_global_marker_of_a_multi_rank_step_is_no_replace(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    s0 = Store([root], rank=0, world_size=2, commit_timeout_s=20, **OPTS)
    s1 = Store([root], rank=1, world_size=2, commit_timeout_s=20, **OPTS)
    try:
        h = s0.save(_state(0), 3, blocking=False)
        s1.save(_state(1), 3)
        h.result(30)
        marker = os.path.join(root, step_dir(3), "COMMIT")
        before = Path(marker).read_bytes()
        with pytest.raises(StepExistsError):
            s0.tiers[0].finalize(3)
        assert Path(marker).read_bytes() == before
        # a second job's rank 1 cannot claim the committed step's rank directory either
        with pytest.raises(StepExistsError):
            s1.save(_state(9), 3)
    finally:
        s0.close()
        s1.close()


# --- a store is created only where asked ---------------------------------------------------------------------
def test_an_empty_url_is_refused_and_nothing_is_written_into_the_cwd(tmp_path: Path, monkeypatch: Any) -> None:
    from asymstore import open_store
    from asymstore.errors import ConfigError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="empty checkpoint directory"):
        open_store("")
    assert os.listdir(tmp_path) == []


def test_a_non_empty_directory_that_is_no_store_is_refused(tmp_path: Path) -> None:
    from asymstore.errors import ConfigError

    other = tmp_path / "project"
    other.mkdir()
    (other / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="not empty and holds no asymstore checkpoints"):
        Store([str(other)], **OPTS)
    assert os.listdir(other) == ["notes.txt"]
    (tmp_path / "zarr").mkdir()
    (tmp_path / "zarr" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    with pytest.raises(ConfigError, match="not an asymstore root"):
        Store([str(tmp_path / "zarr")], **OPTS)
    # create=False opens existing stores only; the default creates one in a new or empty directory
    with pytest.raises(ConfigError, match="create=False"):
        Store([str(tmp_path / "new")], create=False, **OPTS)
    (tmp_path / "empty").mkdir()
    with Store([str(tmp_path / "empty")], **OPTS) as s:
        s.save(_state(1), 1)
    with Store([str(tmp_path / "empty")], create=False, **OPTS) as s:
        assert s.steps() == [1]
