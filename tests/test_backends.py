"""Backend-specific checks of the memory and local backends and of the backend registry.

The behaviour every backend shares is pinned by the conformance kit (tests/test_conformance_backends.py).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pytest

from asymstore.backends import open_object_store, register
from asymstore.backends.local import LocalObjectStore
from asymstore.backends.memory import MemoryObjectStore, drop_namespace
from asymstore.errors import BackendUnavailableError, ConfigError, InvalidKeyError

MiB = 1 << 20


def _aligned(n: int, seed: int) -> np.ndarray:
    """A page-aligned uint8 array of ``n`` random bytes (what a host snapshot slot looks like)."""
    raw = np.empty(n + 4096, dtype=np.uint8)
    off = -raw.ctypes.data % 4096
    arr = raw[off : off + n]
    arr[:] = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    return arr


# --- memory ---------------------------------------------------------------------------------------------
def test_memory_namespaces_are_shared_by_name() -> None:
    name = f"ns-{uuid.uuid4().hex}"
    try:
        a = open_object_store(f"memory://{name}")
        a.put("x", b"1")
        assert open_object_store(f"memory://{name}").get("x") == b"1"
        assert open_object_store(f"memory://other-{uuid.uuid4().hex}").get("x") is None
    finally:
        drop_namespace(name)
    assert open_object_store(f"memory://{name}").get("x") is None


def test_memory_corrupt_flips_one_byte() -> None:
    name = f"ns-{uuid.uuid4().hex}"
    b = open_object_store(f"memory://{name}")
    assert isinstance(b, MemoryObjectStore)
    try:
        b.put("k", b"\x00\x01\x02")
        b.corrupt("k", 1)
        assert b.get("k") == b"\x00\xfe\x02"
    finally:
        drop_namespace(name)


# --- local ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("atomic", [False, True])
def test_local_direct_io_head_and_buffered_tail(tmp_path: Path, atomic: bool) -> None:
    """A large page-aligned first buffer goes through the O_DIRECT head; the unaligned rest is appended."""
    b = LocalObjectStore(str(tmp_path / "root"))
    head, tail = _aligned(2 * MiB + 100, 1), b"tail" * 1000
    (b.put_atomic if atomic else b.put)("slot", [head, tail])
    want = head.tobytes() + tail
    assert (tmp_path / "root" / "slot").read_bytes() == want
    assert b.get("slot") == want
    assert os.listdir(tmp_path / "root") == ["slot"]


def test_local_direct_io_skipped_for_unaligned_buffers(tmp_path: Path) -> None:
    b = LocalObjectStore(str(tmp_path / "root"))
    arr = _aligned(2 * MiB + 1, 2)[1:]  # one byte off the page
    b.put("x", arr)
    assert b.get("x") == arr.tobytes()
    assert b.direct_io or not hasattr(os, "O_DIRECT")  # not switched off by an unaligned buffer


def _spy_direct_opens(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the flags of every ``os.open`` that asks for O_DIRECT."""
    import asymstore.backends.local as local

    seen: list[int] = []
    real = local.os.open

    def spy(path: str, flags: int, *a: int) -> int:
        if flags & getattr(os, "O_DIRECT", 0):
            seen.append(flags)
        return real(path, flags, *a)

    monkeypatch.setattr(local.os, "open", spy)
    return seen


@pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")
@pytest.mark.parametrize("offset", [0, 4096, 3 * MiB, 5, -(2 * MiB + 4096)])
@pytest.mark.parametrize("length", [2 * MiB, 2 * MiB + 123])
def test_local_get_into_reads_aligned_head_direct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offset: int, length: int
) -> None:
    """A large page-aligned ``out`` at a page-aligned offset is read with O_DIRECT (the rest normally), and the
    bytes are those written, also where the file was written through the page cache (unaligned buffer)."""
    b = LocalObjectStore(str(tmp_path / "root"))
    data = _aligned(6 * MiB + 77, 3)
    b.put("aligned", data)  # O_DIRECT head
    b.put("cached", data[1:])  # buffered: its pages are dirty in the page cache when read back
    seen = _spy_direct_opens(monkeypatch)
    for key, src in (("aligned", data), ("cached", data[1:])):
        seen.clear()
        out = _aligned(length, 9)
        assert b.get_into(key, memoryview(out), offset)
        start = offset if offset >= 0 else len(src) + offset
        assert out.tobytes() == src[start : start + length].tobytes()
        assert bool(seen) == (start % 4096 == 0)
    # an unaligned destination is read normally
    seen.clear()
    out = _aligned(length + 1, 4)[1:]
    assert b.get_into("aligned", memoryview(out), 0)
    assert out.tobytes() == data[:length].tobytes() and not seen


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")
def test_local_reads_fall_back_where_direct_io_is_refused(tmp_path: Path) -> None:
    """tmpfs refuses O_DIRECT: reads and writes of a store there fall back to the page cache, bytes intact."""
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as d:
        b = LocalObjectStore(d)
        data = _aligned(3 * MiB, 5)
        b.put("x", data)
        out = _aligned(3 * MiB, 6)
        assert b.get_into("x", memoryview(out), 0)
        assert out.tobytes() == data.tobytes()


def test_file_url(tmp_path: Path) -> None:
    s = open_object_store(f"file://{tmp_path}/u")
    s.put("a/b", b"1")
    assert (tmp_path / "u" / "a" / "b").read_bytes() == b"1"


def test_file_url_with_host_rejected() -> None:
    with pytest.raises(ConfigError):
        open_object_store("file://somehost/x")


def test_key_escape_rejected(tmp_path: Path) -> None:
    s = open_object_store(str(tmp_path / "root"))
    for bad in ("../x", "/etc/passwd", "a/../../b"):
        with pytest.raises(InvalidKeyError):
            s.put(bad, b"1")
    with pytest.raises(InvalidKeyError):
        list(s.list("../"))
    assert not (tmp_path / "x").exists()


def test_unwritable_dir(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(BackendUnavailableError):
            open_object_store(str(ro / "sub"))
        with pytest.raises(BackendUnavailableError):
            open_object_store(str(ro))
    finally:
        ro.chmod(0o700)


def test_path_under_a_file(tmp_path: Path) -> None:
    f = tmp_path / "afile"
    f.write_bytes(b"x")
    with pytest.raises(BackendUnavailableError):
        open_object_store(str(f / "sub"))


# --- registry -------------------------------------------------------------------------------------------
def test_unknown_scheme() -> None:
    with pytest.raises(ConfigError, match="nosuch"):
        open_object_store("nosuch://x")


def test_registered_backend_with_missing_package_names_the_hint() -> None:
    register("testmissing", "asymstore_no_such_module", "Store", "pip install asymstore-no-such")
    with pytest.raises(BackendUnavailableError, match="pip install asymstore-no-such"):
        open_object_store("testmissing://x")


def test_registered_class_must_be_an_object_store() -> None:
    register("testnotastore", "os", "path")
    with pytest.raises(ConfigError, match="not an ObjectStore"):
        open_object_store("testnotastore://x")


def test_registered_third_party_backend_opens() -> None:
    register("testmem", "asymstore.backends.memory", "MemoryObjectStore")
    b = open_object_store(f"TESTMEM://{uuid.uuid4().hex}")
    assert isinstance(b, MemoryObjectStore)


def test_local_listings_skip_temporaries(tmp_path: Path) -> None:
    b = LocalObjectStore(str(tmp_path / "root"))
    b.put("kept/x", b"1")
    (tmp_path / "root" / "tmp-only").mkdir()
    (tmp_path / "root" / "tmp-only" / "COMMIT.tmp-0123456789ab").write_bytes(b"partial")
    assert b.list_dirs() == ["kept"]
    assert sorted(b.list()) == ["kept/x"]
    assert b.delete_prefix("tmp-only/") == 0
    assert not (tmp_path / "root" / "tmp-only" / "COMMIT.tmp-0123456789ab").exists()


def test_local_delete_prefix_removes_the_directory(tmp_path: Path) -> None:
    b = LocalObjectStore(str(tmp_path / "root"))
    b.put("step_1/r00000/x", b"1")
    b.put("step_1/COMMIT", b"1")
    assert b.delete_prefix("step_1/") == 2
    assert os.listdir(tmp_path / "root") == []
