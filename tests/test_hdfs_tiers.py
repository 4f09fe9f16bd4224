"""The tier chain on a real HDFS (MiniDFSCluster): promotion, retention, node loss, NameNode outage."""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Iterator

import pytest
import torch

from asymstore import EveryN, LatestN, Store, TierSpec, open_checkpoint
from asymstore.backends.hdfs import HdfsObjectStore
from tests.minidfs import MiniDFS

from .helpers import assert_bitequal

pytestmark = pytest.mark.hdfs
pytest.importorskip("hdfs_native", reason="hdfs-native is not installed (pip install 'asymstore[hdfs]')")

MiB = 1 << 20


def _state(step: int, n: int = 300_000) -> dict:
    g = torch.Generator().manual_seed(step)
    return {
        "model": {f"w{i}": torch.randn(n // 10, generator=g) for i in range(10)},
        "opt": {"lr": 1e-3 * step},
        "step": step,
    }


@pytest.fixture
def hdfs_url(hdfs_cluster: MiniDFS) -> Iterator[str]:
    url = f"{hdfs_cluster.url}/ckpt/{uuid.uuid4().hex}"
    yield url
    s = HdfsObjectStore(url)
    s.delete_prefix("")
    s.close()


def test_round_trip_promotion_retention(tmp_path, hdfs_url) -> None:
    with Store(
        [TierSpec(str(tmp_path), keep=2), TierSpec(hdfs_url, keep=[EveryN(3), LatestN(1)])], chunk_bytes=1 << 16
    ) as s:
        for step in range(1, 8):
            s.save(_state(step), step)
        assert s.flush(120)
        st = {t["name"]: t for t in s.status()["tiers"]}
    assert st["file"]["steps"] == [6, 7]
    assert st["hdfs"]["steps"] == [3, 6, 7]
    assert st["hdfs"]["errors"] == 0 and st["hdfs"]["throughput"] > 0
    with Store([hdfs_url]) as far:
        for step in (3, 6, 7):
            assert_bitequal(far.restore(step), _state(step))
            assert far.tiers[0].reader(step).verify().ok


def test_node_loss_restores_from_hdfs(tmp_path, hdfs_url) -> None:
    local = str(tmp_path / "nvme")
    with Store([TierSpec(local, keep=2), TierSpec(hdfs_url, keep=2)], chunk_bytes=1 << 16) as s:
        for step in range(1, 4):
            s.save(_state(step), step)
    shutil.rmtree(local)  # a new node: nothing local
    with Store([local, hdfs_url]) as s2:
        got = s2.restore()
        assert s2.last_restore.step == 3 and s2.last_restore.tier == "hdfs"
        assert_bitequal(got, _state(3))


def test_lazy_reads_and_verify_on_hdfs(hdfs_url) -> None:
    with Store([hdfs_url], chunk_bytes=1 << 16) as s:
        s.save(_state(5), 5)
    ck = open_checkpoint(hdfs_url)
    t = ck["model/w3"]
    assert t.shape == (30_000,)
    before = ck.bytes_read
    got = t[100:200]
    assert torch.equal(got, _state(5)["model"]["w3"][100:200])
    assert ck.bytes_read - before <= 2 * ((1 << 16) + 16 * 64 + 4)  # one chunk (or two) + the shard index
    with Store([hdfs_url]) as s:
        assert s.tiers[0].reader(5).verify().ok


def test_objects_per_checkpoint_on_hdfs(hdfs_url) -> None:
    with Store([TierSpec(hdfs_url, partition_bytes=1 * MiB)], chunk_bytes=1 << 16, compression="none") as s:
        state = {f"t{i}": torch.randn(2000 + i) for i in range(400)}  # 400 small tensors, ~3.2 MB
        rep = s.save(state, 1).result().reports["hdfs"]
    store = HdfsObjectStore(hdfs_url)
    files = list(store.list("step_000000000001/"))
    store.close()
    b_star = 1 * MiB
    assert len(files) <= -(-rep.raw_bytes // b_star) + 4, files


def test_namenode_outage_during_promotion(tmp_path, hdfs_cluster: MiniDFS, hdfs_url) -> None:
    """The NameNode goes down mid-promotion: training is not blocked, no partial step is listed as
    complete on HDFS, and promotion completes once the NameNode is back."""
    big = {"w": torch.randn(6 * MiB // 4)}  # several partitions, so the outage can land inside one step
    with Store(
        [TierSpec(str(tmp_path), keep=3), TierSpec(hdfs_url, keep=None, partition_bytes=1 * MiB)],
        chunk_bytes=1 << 16,
        backend_options={"hdfs": {"retries": 0}},
    ) as s:
        s.save(big, 1)
        s.manager.notify()
        deadline = time.monotonic() + 30  # wait until the promotion of step 1 is under way
        while s.manager.activity["hdfs"].in_flight != 1 and not s.tiers[1].committed_steps():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        hdfs_cluster.stop_namenode()
        try:
            t0 = time.perf_counter()
            for step in range(2, 6):
                s.save({"w": big["w"] + step}, step)  # durable locally; never waits on HDFS
            training_s = time.perf_counter() - t0
            time.sleep(1.0)
            assert s.status()["tiers"][1]["errors"] >= 1 or s.manager.activity["hdfs"].in_flight is not None
        finally:
            hdfs_cluster.start_namenode()
        # nothing partial is listed as complete: every step HDFS lists restores bit-exactly
        assert s.flush(180), s.status()["tiers"][1]
        assert training_s < 60
    with Store([hdfs_url]) as far:
        assert far.steps() == [1, 2, 3, 4, 5]
        assert_bitequal(far.restore(1), big)
        for step in range(2, 6):
            assert_bitequal(far.restore(step), {"w": big["w"] + step})
