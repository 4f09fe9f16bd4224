"""Bounded HDFS calls: a NameNode that accepts connections but never answers gives a clear error within the
configured timeout; with the real MiniDFSCluster frozen, ``steps()`` and ``restore()`` answer from the local
tier within a stated bound and ``status()`` names the tier that does not answer."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import asymstore
from asymstore.errors import BackendUnavailableError

pytest.importorskip("hdfs_native")


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A port whose listener completes the TCP handshake and then never reads or answers."""
    srv = socket.create_server(("127.0.0.1", 0), backlog=16)
    try:
        yield int(srv.getsockname()[1])
    finally:
        srv.close()


def test_a_namenode_that_never_answers_fails_within_the_timeout(black_hole: int) -> None:
    from asymstore.backends.hdfs import HdfsObjectStore

    backend = HdfsObjectStore(f"hdfs://127.0.0.1:{black_hole}/ck", timeout_s=2.0, retries=0)
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailableError, match=r"did not answer within 2 s.*timeout_s"):
        backend.size("x")
    assert time.monotonic() - t0 < 10
    backend.close()


@pytest.mark.hdfs
def test_a_frozen_namenode_never_blocks_listing_or_restore_from_the_local_tier(tmp_path: Path, hdfs_cluster) -> None:
    url = f"{hdfs_cluster.url}/frozen-{time.time_ns()}"
    opts = {
        "tier_answer_s": 1.0,
        "host_memory": "private",
        "backend_options": {"hdfs": {"timeout_s": 5.0, "retries": 0}},
    }
    with asymstore.Store([str(tmp_path / "ck"), url], **opts) as store:
        for s in (1, 2):
            store.save({"w": torch.full((1000,), float(s))}, s)
        assert store.flush(120)
    store = asymstore.Store([str(tmp_path / "ck"), url], **opts)  # a restarted job: nothing in host memory
    try:
        hdfs_cluster.freeze()
        try:
            t0 = time.monotonic()
            assert store.steps() == [1, 2]
            listed = time.monotonic() - t0
            t0 = time.monotonic()
            out = store.restore()
            restored = time.monotonic() - t0
            assert store.last_restore is not None and store.last_restore.tier == "file" and out["w"][0] == 2.0
            hd = next(t for t in store.status()["tiers"] if t["name"] == "hdfs")
            assert hd["not_answering_since"] is not None
            assert listed < 3.0 and restored < 3.0, (listed, restored)  # bound: tier_answer_s + slack
        finally:
            hdfs_cluster.thaw()
    finally:
        store.close()
