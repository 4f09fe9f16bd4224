"""HdfsObjectStore against a real HDFS (MiniDFSCluster, block size 1 MiB so 5 MiB objects span blocks)."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from asymstore.backends.base import ByteRange
from asymstore.backends.hdfs import HdfsObjectStore
from asymstore.errors import BackendUnavailableError
from asymstore.testing.minidfs import MiniDFS

pytestmark = pytest.mark.hdfs
pytest.importorskip("hdfs_native", reason="hdfs-native is not installed (pip install 'asymstore[hdfs]')")

MiB = 1 << 20


@pytest.fixture
def store(hdfs_cluster: MiniDFS) -> Iterator[HdfsObjectStore]:
    s = HdfsObjectStore(f"{hdfs_cluster.url}/t/{uuid.uuid4().hex}")
    yield s
    s.delete_prefix("")
    s.close()


def _put_all(store: HdfsObjectStore, items: dict[str, bytes]) -> None:
    # In parallel: a close() on a one-DataNode cluster often waits ~0.5 s for the block report.
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda kv: store.put(*kv), items.items()))


def _free_closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("size", [0, 1, 4097, 5 * MiB + 3])
def test_round_trip_sizes(store: HdfsObjectStore, size: int) -> None:
    data = os.urandom(size)
    store.put("obj", data)
    assert store.size("obj") == size
    assert store.get("obj") == data


def test_multi_buffer_put_is_concatenated(store: HdfsObjectStore) -> None:
    import numpy as np

    parts = [os.urandom(3 * MiB + 1), b"", bytearray(b"xyz"), memoryview(np.arange(1000, dtype=np.float32))]
    expected = b"".join(bytes(p) for p in parts)
    store.write_chunk = 1 * MiB  # force the slicing path
    store.put("a/multi", parts)
    assert store.get("a/multi") == expected
    arr = np.arange(3 * MiB // 4 + 5, dtype=np.float32).reshape(-1, 1)  # one buffer, not a sequence
    store.put("a/array", arr)
    assert store.get("a/array") == arr.tobytes()


def test_ranged_reads_and_get_into(store: HdfsObjectStore) -> None:
    data = os.urandom(2 * MiB + 123)
    store.put("r", data)
    assert store.get("r", ByteRange(0, 10)) == data[:10]
    assert store.get("r", ByteRange(MiB - 5, 10)) == data[MiB - 5 : MiB + 5]  # across a block boundary
    assert store.get("r", ByteRange(-16, 16)) == data[-16:]
    assert store.get("r", ByteRange(-16, 4)) == data[-16:-12]
    assert store.get("r", ByteRange(len(data) - 3, 100)) == data[-3:]  # clipped at the end
    assert store.get("r", ByteRange(len(data) + 5, 10)) == b""
    assert store.get("r", ByteRange(5, 0)) == b""
    buf = bytearray(MiB + 7)
    assert store.get_into("r", memoryview(buf), offset=MiB - 3)
    assert bytes(buf) == data[MiB - 3 : 2 * MiB + 4]
    with pytest.raises(EOFError):
        store.get_into("r", memoryview(bytearray(10)), offset=len(data) - 5)
    assert store.get_into("missing", memoryview(bytearray(4))) is False


def test_missing_key(store: HdfsObjectStore) -> None:
    assert store.get("nope") is None
    assert store.get("nope", ByteRange(0, 4)) is None
    assert store.size("nope") is None
    assert not store.exists("nope")
    store.delete("nope")  # not an error
    store.put("d/x", b"1")
    assert store.get("d") is None  # a directory is not an object
    assert store.size("d") is None


def test_listing(store: HdfsObjectStore) -> None:
    keys = ["step_1/a", "step_1/sub/b", "step_2/c", "step_10/d", "top"]
    _put_all(store, {k: k.encode() for k in keys})
    assert sorted(store.list()) == sorted(keys)
    assert sorted(store.list("step_1/")) == ["step_1/a", "step_1/sub/b"]
    assert sorted(store.list("step_1")) == ["step_1/a", "step_1/sub/b", "step_10/d"]
    assert sorted(store.list("to")) == ["top"]
    assert list(store.list("absent/")) == []
    assert store.list_dirs() == ["step_1", "step_10", "step_2"]
    assert store.list_dirs("step_1/") == ["sub"]
    assert store.list_dirs("step_") == ["1", "10", "2"]  # same answer as the generic implementation


def test_delete_and_delete_prefix(store: HdfsObjectStore) -> None:
    _put_all(store, {k: b"v" for k in ["s1/a", "s1/b/c", "s10/a", "s2/a", "x"]})
    store.delete("x")
    assert store.get("x") is None
    assert store.delete_prefix("s1/") == 2
    assert sorted(store.list()) == ["s10/a", "s2/a"]
    assert store.list_dirs() == ["s10", "s2"]  # the directory itself is gone
    assert store.delete_prefix("s") == 2
    assert list(store.list()) == []
    assert store.delete_prefix("nothing/") == 0


def test_put_atomic_overwrites_and_leaves_no_temporaries(store: HdfsObjectStore) -> None:
    store.put_atomic("commit/MARKER", b"first")
    store.put_atomic("commit/MARKER", [b"sec", b"ond"])
    assert store.get("commit/MARKER") == b"second"
    assert list(store.list()) == ["commit/MARKER"]
    raw = [st.path for st in store._client.list_status(store._path("commit"), False)]
    assert len(raw) == 1, raw


def test_invalid_keys_rejected(store: HdfsObjectStore) -> None:
    for bad in ["../escape", "a//b", "a/./b"]:
        with pytest.raises(ValueError):
            store.put(bad, b"x")


def test_unreachable_namenode_fails_fast() -> None:
    url = f"hdfs://127.0.0.1:{_free_closed_port()}/root"
    s = HdfsObjectStore(url)
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailableError) as ei:
        s.put("k", b"v")
    elapsed = time.monotonic() - t0
    assert elapsed < 15, elapsed
    assert url in str(ei.value) and "NameNode" in str(ei.value)
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailableError):
        HdfsObjectStore(url, retries=0).get("k")
    assert time.monotonic() - t0 < 2


def test_namenode_down_then_restarted(hdfs_cluster: MiniDFS, store: HdfsObjectStore) -> None:
    store.put("before", b"kept")
    writer = store._client.create(store._path("open-while-down"), store._write_options())
    writer.write(b"y" * 1000)
    hdfs_cluster.stop_namenode()
    try:
        t0 = time.monotonic()
        # Default retry policy (3 retries, 0.5 s doubling backoff): a clear error in seconds.
        with pytest.raises(BackendUnavailableError, match="unreachable") as ei:
            store.put("during", b"x" * 1000)
        assert time.monotonic() - t0 < 15
        assert "NameNode" in str(ei.value) and store.url in str(ei.value)
        # A file already open for writing cannot be completed either, and says so without hanging.
        t0 = time.monotonic()
        with pytest.raises(OSError):
            writer.close()
        assert time.monotonic() - t0 < 15
        with pytest.raises(BackendUnavailableError):
            HdfsObjectStore(store.url, retries=0).get("before")
    finally:
        hdfs_cluster.start_namenode()
    store.put("during", b"x" * 1000)
    assert store.get("during") == b"x" * 1000
    assert store.get("before") == b"kept"


@pytest.mark.slow
def test_reads_see_whole_file_with_committed_close(hdfs_cluster: MiniDFS, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """With num-committed-allowed=1 a close can return before any DataNode reported the last block;
    hdfs-native then opens the file with a short length. Reads must still return every byte.
    Block reports are delayed by 300 ms so that every read right after a put hits that window."""
    with MiniDFS(datanodes=2, replication=2, close_committed=1, ibr_interval_ms=300) as dfs:
        s = HdfsObjectStore(f"{dfs.start(tmp_path)}/cc")
        for phase in ("steady", "after-restart"):
            if phase == "after-restart":
                dfs.stop_namenode()
                dfs.start_namenode()
            for i in range(5):
                data = os.urandom(1000 + i)
                s.put(f"{phase}/{i}", data)
                assert s.get(f"{phase}/{i}") == data
                buf = bytearray(len(data))
                assert s.get_into(f"{phase}/{i}", memoryview(buf)) and bytes(buf) == data
