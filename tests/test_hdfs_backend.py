"""HDFS-specific checks of HdfsObjectStore on a real HDFS (MiniDFSCluster, block size 1 MiB so 5 MiB objects span
blocks): write slicing, reads across blocks, fail-fast retries, NameNode outages, late block reports.

The behaviour every backend shares is pinned by the conformance kit (tests/test_conformance_backends.py).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from asymstore.backends.base import ByteRange
from asymstore.backends.hdfs import TMP_PREFIX, HdfsObjectStore
from asymstore.errors import BackendUnavailableError
from asymstore.retry import Backoff

from .minidfs import MiniDFS

pytestmark = pytest.mark.hdfs
pytest.importorskip("hdfs_native", reason="hdfs-native is not installed (pip install 'asymstore[hdfs]')")

MiB = 1 << 20


@pytest.fixture
def backend(hdfs_cluster: MiniDFS) -> Iterator[HdfsObjectStore]:
    s = HdfsObjectStore(f"{hdfs_cluster.url}/t/{uuid.uuid4().hex}")
    yield s
    s.delete_prefix("")
    s.close()


def _free_closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("size", [0, 1, 4097, 5 * MiB + 3])
def test_round_trip_sizes(backend: HdfsObjectStore, size: int) -> None:
    data = os.urandom(size)
    backend.put("obj", data)
    assert backend.size("obj") == size
    assert backend.get("obj") == data


def test_multi_buffer_put_is_concatenated(backend: HdfsObjectStore) -> None:
    import numpy as np

    parts = [os.urandom(3 * MiB + 1), b"", bytearray(b"xyz"), memoryview(np.arange(1000, dtype=np.float32))]
    expected = b"".join(bytes(p) for p in parts)
    backend.write_chunk = 1 * MiB  # force the slicing path
    backend.put("a/multi", parts)
    assert backend.get("a/multi") == expected
    arr = np.arange(3 * MiB // 4 + 5, dtype=np.float32).reshape(-1, 1)  # one buffer, not a sequence
    backend.put("a/array", arr)
    assert backend.get("a/array") == arr.tobytes()


def test_ranged_reads_and_get_into(backend: HdfsObjectStore) -> None:
    data = os.urandom(2 * MiB + 123)
    backend.put("r", data)
    assert backend.get("r", ByteRange(0, 10)) == data[:10]
    assert backend.get("r", ByteRange(MiB - 5, 10)) == data[MiB - 5 : MiB + 5]  # across a block boundary
    assert backend.get("r", ByteRange(-16, 16)) == data[-16:]
    assert backend.get("r", ByteRange(-16, 4)) == data[-16:-12]
    assert backend.get("r", ByteRange(len(data) - 3, 100)) == data[-3:]  # clipped at the end
    assert backend.get("r", ByteRange(len(data) + 5, 10)) == b""
    assert backend.get("r", ByteRange(5, 0)) == b""
    buf = bytearray(MiB + 7)
    assert backend.get_into("r", memoryview(buf), offset=MiB - 3)
    assert bytes(buf) == data[MiB - 3 : 2 * MiB + 4]
    with pytest.raises(EOFError):
        backend.get_into("r", memoryview(bytearray(10)), offset=len(data) - 5)
    assert backend.get_into("missing", memoryview(bytearray(4))) is False


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


def test_namenode_down_then_restarted(hdfs_cluster: MiniDFS, backend: HdfsObjectStore) -> None:
    backend.put("before", b"kept")
    writer = backend._client.create(backend._path("open-while-down"), backend._write_options())
    writer.write(b"y" * 1000)
    hdfs_cluster.stop_namenode()
    try:
        t0 = time.monotonic()
        # Default retry policy (3 retries, 0.5 s doubling backoff): a clear error in seconds.
        with pytest.raises(BackendUnavailableError, match="unreachable") as ei:
            backend.put("during", b"x" * 1000)
        assert time.monotonic() - t0 < 15
        assert "NameNode" in str(ei.value) and backend.url in str(ei.value)
        # A file already open for writing cannot be completed either, and says so without hanging.
        t0 = time.monotonic()
        with pytest.raises(OSError):
            writer.close()
        assert time.monotonic() - t0 < 15
        with pytest.raises(BackendUnavailableError):
            HdfsObjectStore(backend.url, retries=0).get("before")
    finally:
        hdfs_cluster.start_namenode()
    backend.put("during", b"x" * 1000)
    assert backend.get("during") == b"x" * 1000
    assert backend.get("before") == b"kept"


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


def test_retries_transient_errors_with_the_backoff_schedule() -> None:
    """Transient errors are retried (``retries`` times, delays from ``asymstore.retry.Backoff``); others are not."""
    b = HdfsObjectStore(f"hdfs://127.0.0.1:{_free_closed_port()}/r", retries=2, backoff_s=0.01, max_backoff_s=0.02)
    calls: list[float] = []

    def flaky() -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionResetError("connection reset by peer")
        return "ok"

    assert b._call("flaky", flaky) == "ok"
    assert len(calls) == 3
    assert calls[2] - calls[0] >= 0.01 + 0.02 * 0.9  # 0.01 s, then doubled to the 0.02 s cap
    calls.clear()

    def missing() -> None:
        calls.append(0.0)
        raise FileNotFoundError("gone")

    with pytest.raises(FileNotFoundError):
        b._call("missing", missing)
    assert len(calls) == 1
    with pytest.raises(BackendUnavailableError, match=r"failed 3 times .* transient error"):
        b._call("always", lambda: (_ for _ in ()).throw(ConnectionResetError("connection reset")))
    assert Backoff(initial_s=0.01, max_s=0.02, floor_s=0.05).next() == 0.01


def test_list_dirs_skips_directories_holding_only_temporaries(backend: HdfsObjectStore) -> None:
    backend.put("kept/x", b"1")
    w = backend._client.create(backend._path(f"tmp-only/{TMP_PREFIX}x.0"), backend._write_options())
    w.write(b"partial")
    w.close()
    assert backend.list_dirs() == ["kept"]
    assert sorted(backend.list()) == ["kept/x"]
