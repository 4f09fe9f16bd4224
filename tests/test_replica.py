"""Peer replicas on real processes (gloo): a node is lost and the rank that replaces it restores its part
from its peer's shared memory, bit-exact; the ring placement is a pure function."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from asymstore.errors import StepNotFoundError
from asymstore.replica import replica_of, ring_peer
from tests._trials import run_trials
from tests.ranks import free_port

REPO = Path(__file__).resolve().parents[1]


def test_ring_by_node_places_every_replica_on_another_node() -> None:
    assert ring_peer(0, ["a"]) is None and ring_peer(1, ["a", "a"]) is None
    assert [ring_peer(r, ["a", "b"]) for r in range(2)] == [1, 0]
    nodes = ["a", "a", "b", "b"]
    assert [ring_peer(r, nodes) for r in range(4)] == [2, 3, 0, 1]
    nodes = ["a", "a", "b", "b", "c", "c"]
    peers = [ring_peer(r, nodes) for r in range(6)]
    assert peers == [2, 3, 4, 5, 0, 1]
    assert all(nodes[p] != nodes[r] for r, p in enumerate(peers) if p is not None)
    assert sorted(r for h in range(6) for r in replica_of(h, nodes)) == list(range(6))  # each held once
    uneven = ["a", "a", "a", "b"]
    assert [ring_peer(r, uneven) for r in range(4)] == [3, 3, 3, 0]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p))


def _phase(phase: str, world: int, per_node: int, ck: Path, shm: Path) -> list[dict[str, object]]:
    port = str(free_port())
    env = _env()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests._replica_worker",
                phase,
                str(r),
                str(world),
                port,
                str(ck),
                str(shm),
                str(per_node),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        for r in range(world)
    ]
    rows = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:  # a hung rank must not outlive the test
                q.kill()
                q.communicate()
            raise
        want = -signal.SIGKILL if phase.startswith("save") else 0
        assert p.returncode == want, (phase, p.returncode, err[-3000:])
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return sorted(rows, key=lambda row: int(row["rank"]))  # type: ignore[call-overload]


@pytest.mark.slow
@pytest.mark.parametrize(("world", "per_node"), [(2, 1), (4, 2)])
def test_a_lost_node_restores_from_its_peers_memory(tmp_path: Path, world: int, per_node: int) -> None:
    ck, shm = tmp_path / "ck", tmp_path / "shm"
    sent = _phase("save", world, per_node, ck, shm)
    assert [(row["pushed"], row["received"]) for row in sent] == [(3, 3)] * world
    lost = world // per_node - 1  # the last node is lost: its shared memory is gone
    shutil.rmtree(shm / f"node{lost}")
    rows = _phase("restore", world, per_node, ck, shm)
    assert [row["exact"] for row in rows] == [True] * world and {row["step"] for row in rows} == {3}
    for row in rows:
        on_lost = int(row["rank"]) // per_node == lost  # type: ignore[call-overload]
        assert row["tier"] == ("peer" if on_lost else "host"), rows
        if on_lost:
            assert str(row["detail"]).startswith("peer host shared memory of rank"), row


@pytest.mark.slow
def test_a_rank_killed_while_sending_its_replica_restores_the_previous_replica_from_the_peer(tmp_path: Path) -> None:
    """Process kill during peer replication: rank 0 dies half-way through sending step 4's replica (and before
    step 4 is on the tier), its node is lost; the torn transfer never becomes a replica, so rank 0 restores step
    3 from its peer and rank 1 from its own memory, both bit-exact."""
    ck, shm = tmp_path / "ck", tmp_path / "shm"
    sent = _phase("save-tear", 2, 1, ck, shm)
    assert [(row["pushed"], row["received"]) for row in sent] == [(3, 3)] * 2
    shutil.rmtree(shm / "node0")
    rows = _phase("restore", 2, 1, ck, shm)
    assert [(row["step"], row["tier"], row["exact"]) for row in rows] == [(3, "peer", True), (3, "host", True)], rows


def test_a_step_only_one_rank_committed_is_dropped_and_the_common_one_persisted(tmp_path: Path) -> None:
    """The ranks died at different points: both had committed step 3 in shared memory, rank 0 step 4 as well,
    neither on the tier. Restarted, they resume from step 3 (from their own memory); step 3 is persisted, rank
    0's step 4 (no rank set can complete it; the resumed run writes step 4 again) is dropped, and nothing waits
    for the part of step 4 rank 1 never had."""
    ck, shm = tmp_path / "ck", tmp_path / "shm"
    _phase("save-uneven", 2, 1, ck, shm)
    rows = _phase("restore-uneven", 2, 1, ck, shm)
    assert [row["adopted"] for row in rows] == [[3, 4], [2, 3]], rows
    for row in rows:
        assert (row["step"], row["tier"], row["exact"]) == (3, "host", True), rows
        assert row["steps"] == [1, 2, 3] and row["durable"] == [1, 2, 3], rows
        assert row["wait_s"] < 60, rows  # the persistence of a step a rank lacks would wait 300 s, then fail


@pytest.mark.slow
@pytest.mark.parametrize("restore_phase", ["restore-unmarked", "restore-unmarked-agreed"])
def test_a_step_rank_0_died_finalizing_is_restored_and_marked(tmp_path: Path, restore_phase: str) -> None:
    """Both ranks' parts of step 3 are committed on the tier, but rank 0 died waiting to write the step's marker,
    and its node is lost (its step 3 only in the peer's memory); rank 1 went on to steps 4-5 (parts rank 0 never
    marked) and holds no step 3 in memory. Restarted, the job resumes from step 3: rank 0 from the peer, rank 1
    from its committed part on the tier; rank 0 writes the step's marker, steps 4-5 are dropped. The ranks clean
    up their leftovers before they agree (``restore-unmarked``) or after (``-agreed``): the part stays."""
    ck, shm = tmp_path / "ck", tmp_path / "shm"
    _phase("save-unmarked", 2, 1, ck, shm)
    assert (ck / "step_000000000003" / "r00000" / "COMMIT").exists()
    assert not (ck / "step_000000000003" / "COMMIT").exists()
    shutil.rmtree(shm / "node0")
    rows = _phase(restore_phase, 2, 1, ck, shm)
    assert [row["adopted"] for row in rows] == [[], [4, 5]], rows
    assert [(row["step"], row["tier"], row["exact"]) for row in rows] == [(3, "peer", True), (3, "file", True)], rows
    assert "rank 1's part" in str(rows[1]["detail"]), rows
    for row in rows:
        assert row["durable"] == [1, 2, 3] and row["steps"] == [1, 2, 3], rows
        assert row["wait_s"] < 60, rows


@pytest.mark.slow
def test_sigkill_during_peer_replication_many_trials(tmp_path: Path) -> None:
    """Jobs of two real processes (one per simulated node) SIGKILLed while a replica is sent, received, just
    committed at the peer, or at a random time, the victim's node lost in most trials (``tests/_replica_kill_worker``
    says what each trial checks): both ranks restore the same step bit-exact, no older than what both were sure to
    find, from the peer where a lost rank's step is not on the tier, and training continues bit-identically."""
    n = int(os.environ.get("ASYMSTORE_REPLICA_TRIALS", "24"))
    seed, rows = run_trials("tests._replica_kill_worker", n, tmp_path, env=_env(), cwd=REPO)
    bad = [row for row in rows if not row["ok"]]
    assert not bad, f"seed {seed}: {bad}"
    assert {row["kind"] for row in rows} == {"send", "receive", "committed", "random"}
    killed = [row for row in rows if row["killed_at_its_point"]]
    assert len(killed) >= n // 2, f"seed {seed}: most victims die at their kill point ({len(killed)} of {n})"
    from_peer = [row for row in rows if any(g["tier"] == "peer" for g in row["ranks"])]
    assert from_peer, f"seed {seed}: no trial restored a lost rank from its peer: {rows}"


class _DictRendezvous:
    """A rendezvous for services in one process (the real one is the torch.distributed store)."""

    def __init__(self) -> None:
        self.d: dict[str, bytes] = {}

    def set(self, key: str, value: str) -> None:
        self.d[key] = value.encode()

    def get(self, key: str) -> bytes:
        return self.d[key]

    def check(self, keys: list[str]) -> bool:
        return all(k in self.d for k in keys)


def _services(tmp_path: Path) -> tuple[object, object]:
    from asymstore.replica import ReplicaService

    rv = _DictRendezvous()
    # rank 1's service must exist before rank 0 reads the peer table: start them in order of the keys they need
    rv.set("asymstore/job/peer/1", json.dumps({"host": "127.0.0.1", "port": 1, "node": "b"}))
    a = ReplicaService(
        job="job", rank=0, world_size=2, shm_dir=str(tmp_path / "a"), node="a", rendezvous=rv, host="127.0.0.1"
    )
    b = ReplicaService(
        job="job", rank=1, world_size=2, shm_dir=str(tmp_path / "b"), node="b", rendezvous=rv, host="127.0.0.1"
    )
    a.peers = [a._peer(0), a._peer(1)]  # rank 1's real address, now that it listens
    return a, b


def test_a_torn_transfer_never_becomes_a_replica_and_a_good_one_is_fetched_verified(tmp_path: Path) -> None:
    import torch

    from asymstore.layout import plan_layout
    from asymstore.replica import _LEN
    from asymstore.shm import SlotRecord, chunk_crcs
    from asymstore.write_plan import CheckpointContent

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a, b = _services(tmp_path)
    try:
        data = torch.arange(300_000, dtype=torch.float32).view(torch.uint8)
        layout = plan_layout([("w", "float32", (300_000,), data.numel())])
        view = data.numpy().data.cast("B")
        rec = SlotRecord(0, "x", 7, os.getpid(), 0.0, 1 << 20, chunk_crcs(view), CheckpointContent(layout, {"w": "w"}))
        done = []
        a.push(rec, view, lambda: done.append(1))
        assert a.drain(30) and done == [1] and a.pushed == 1
        assert b.held_steps(0) == [7]
        # a sender that dies half-way: the holder keeps the complete replica it had, never the torn one
        torn = SlotRecord(0, "x", 8, os.getpid(), 0.0, 1 << 20, chunk_crcs(view), CheckpointContent(layout, {"w": "w"}))
        peer = a.peers[1]
        with socket.create_connection((peer.host, peer.port)) as s:
            head = json.dumps({"op": "push", "src": 0, "record": torn.to_bytes().decode()}).encode()
            s.sendall(_LEN.pack(len(head)) + head + bytes(view[: len(view) // 2]))
        import time

        time.sleep(0.5)
        assert b.held_steps(0) == [7]
        raw, got = a.fetch(7, 1)
        assert got.step == 7 and torch.equal(raw[: data.numel()], data)
        with pytest.raises(StepNotFoundError):
            a.fetch(8, 1)
    finally:
        a.close(remove=True)
        b.close(remove=True)
