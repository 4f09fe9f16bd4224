"""The conformance kit: the behaviour every :class:`~asymstore.interfaces.ObjectStore` backend must have.

A backend's tests subclass :class:`ObjectStoreConformance` and override its ``target`` fixture to return a
:class:`BackendUnderTest`: a fresh, empty backend plus a :class:`RawAccess` to the same storage that bypasses
the backend (the file system, a dict, a second client), so the kit can check what a backend really stored and
that it reads what other writers stored::

    class TestMyBackend(ObjectStoreConformance):
        @pytest.fixture
        def target(self, tmp_path):
            backend = MyObjectStore(f"my://{tmp_path}")
            yield BackendUnderTest(backend=backend, raw=MyRawAccess(tmp_path))
            backend.close()

The class name does not start with ``Test``, so pytest collects it only through subclasses. The kit needs
pytest and hypothesis (``pip install 'asymstore[test]'``). Tests that start a new interpreter are marked
``slow``; a slow backend lowers :attr:`ObjectStoreConformance.max_examples` and
:attr:`ObjectStoreConformance.atomic_rounds`.
"""

from __future__ import annotations

import random
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asymstore.backends import open_object_store
from asymstore.errors import ConfigError, InvalidKeyError
from asymstore.interfaces import Buffer, ByteRange, ObjectStore

MiB = 1 << 20

#: keys every backend must reject (with :class:`~asymstore.errors.InvalidKeyError`)
BAD_KEYS = ("", "/abs", "../x", "a/../b", "a//b", "a/./b", "a/", ".", "..", "a\\b", "a\0b")
#: listing prefixes every backend must reject: their complete components are not valid keys
BAD_PREFIXES = ("/x", "../", "a/../", "a//b", "./a", "a\\")


class RawAccess(Protocol):
    """The storage under a backend, reached without the backend (keys are the backend's keys)."""

    def read(self, key: str) -> bytes | None:
        """The stored bytes of ``key``, ``None`` if there is no such object."""
        ...

    def write(self, key: str, data: bytes) -> None:
        """Store ``data`` as ``key`` the way another writer of the same storage would."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key`` (its directories may stay behind, as after a backend's ``delete``)."""
        ...

    def keys(self) -> set[str]:
        """Every stored object, temporaries included (to catch leftovers a listing hides)."""
        ...


def _reopen_by_url(backend: ObjectStore) -> ObjectStore:
    return open_object_store(backend.url)


@dataclass
class BackendUnderTest:
    """What a conformance test runs against: an empty backend and raw access to its storage."""

    backend: ObjectStore
    raw: RawAccess
    #: opens a second backend on the same storage (default: ``open_object_store(backend.url)``)
    reopen: Callable[[ObjectStore], ObjectStore] = field(default=_reopen_by_url)


def payload(n: int, seed: int = 0) -> bytes:
    """Deterministic pseudo-random bytes of length ``n`` (no short period, so misplaced ranges show)."""
    return random.Random(seed).randbytes(n)


def model_list(keys: Iterable[str], prefix: str) -> set[str]:
    """What ``list(prefix)`` returns for a store holding ``keys``: a plain string prefix, recursive."""
    return {k for k in keys if k.startswith(prefix)}


def model_list_dirs(keys: Iterable[str], prefix: str) -> list[str]:
    """What ``list_dirs(prefix)`` returns for a store holding ``keys`` (see ``ObjectStore.list_dirs``)."""
    d = prefix.rstrip("/") + "/" if prefix else ""
    return sorted({k[len(d) :].split("/", 1)[0] for k in keys if k.startswith(d) and "/" in k[len(d) :]})


def _prefix_free(keys: Iterable[str]) -> set[str]:
    """Drop keys that are the directory of another key (a file system cannot hold both ``a`` and ``a/b``)."""
    ks = set(keys)
    return {k for k in ks if not any(o.startswith(k + "/") for o in ks)}


_COMPONENTS = st.sampled_from(["a", "b", "ab", "step_1", "step_10", "step_2", "x.y", "r00000"])
#: random sets of valid keys, none the directory of another
KEY_SETS = st.sets(st.lists(_COMPONENTS, min_size=1, max_size=3).map("/".join), max_size=8).map(_prefix_free)


def _put_all(write: Callable[[str, bytes], None], items: dict[str, bytes]) -> None:
    """Write objects in parallel (a remote backend's per-file latency dominates otherwise)."""
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda kv: write(*kv), items.items()))


class ObjectStoreConformance:
    """Behaviour every tier backend must have. Override :meth:`target`."""

    #: hypothesis examples per property test (lower it for backends with slow writes)
    max_examples: ClassVar[int] = 25
    #: put_atomic rounds while a reader polls, in the no-partial-object test
    atomic_rounds: ClassVar[int] = 12

    @pytest.fixture
    def target(self) -> Iterator[BackendUnderTest]:  # pragma: no cover - overridden
        """A fresh, empty backend and raw access to its storage (subclasses override this)."""
        raise NotImplementedError("subclasses provide a fresh, empty backend and its raw access")
        yield

    def _settings(self) -> Callable[[Callable[..., None]], Callable[..., None]]:
        return settings(
            max_examples=self.max_examples,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )

    # --- put / get ---------------------------------------------------------------------------------------
    @pytest.mark.parametrize("n", [0, 1, 4095, 4096, 3 * MiB + 17])
    def test_put_get_sizes(self, target: BackendUnderTest, n: int) -> None:
        """Objects of every size read back whole, with their size, and land in the storage as written."""
        b, data = target.backend, payload(n, n)
        b.put(f"a/obj-{n}", data)
        assert b.get(f"a/obj-{n}") == data
        assert b.size(f"a/obj-{n}") == n
        assert b.exists(f"a/obj-{n}")
        assert target.raw.read(f"a/obj-{n}") == data
        assert target.raw.keys() == {f"a/obj-{n}"}

    def test_reads_objects_other_writers_stored(self, target: BackendUnderTest) -> None:
        """An object put there by another writer is read, sized and listed like one of the backend's own."""
        target.raw.write("ext/x", b"external")
        b = target.backend
        assert b.get("ext/x") == b"external"
        assert b.get("ext/x", ByteRange(-4, 4)) == b"rnal"
        assert b.size("ext/x") == 8
        assert sorted(b.list()) == ["ext/x"]
        assert b.list_dirs("") == ["ext"]

    def test_put_accepts_buffer_types(self, target: BackendUnderTest) -> None:
        """bytes-like objects of any format are written as their bytes; an array is one buffer."""
        import numpy as np

        b = target.backend
        b.put("ba", bytearray(b"hello"))
        b.put("mv", memoryview(b"xhellox")[1:-1])
        arr = np.arange(4, dtype="<u4")
        b.put("np", arr.data)
        arr2 = np.arange(1000, dtype=np.float32).reshape(-1, 4)
        b.put("np2", arr2)  # type: ignore[arg-type]  # any object with the buffer protocol is one buffer
        assert b.get("ba") == b"hello"
        assert b.get("mv") == b"hello"
        assert b.get("np") == arr.tobytes()
        assert b.get("np2") == arr2.tobytes()

    def test_multi_buffer_put(self, target: BackendUnderTest) -> None:
        """A sequence of buffers is written back to back, empty ones included."""
        parts: list[Buffer] = [
            payload(10, 1),
            b"",
            payload(MiB + 5, 2),
            memoryview(payload(100, 3))[5:50],
            bytearray(b"z"),
        ]
        want = b"".join(bytes(p) for p in parts)
        target.backend.put("multi", parts)
        target.backend.put_atomic("multi-atomic", parts)
        assert target.backend.get("multi") == want
        assert target.backend.get("multi-atomic") == want
        assert target.raw.read("multi") == want

    def test_many_buffers_put(self, target: BackendUnderTest) -> None:
        """More buffers than one system call takes (IOV_MAX) are all written."""
        parts = [bytes([i % 256]) * (i % 7) for i in range(2000)]
        target.backend.put("many", parts)
        assert target.backend.get("many") == b"".join(parts)

    def test_overwrite(self, target: BackendUnderTest) -> None:
        """``put`` replaces an object, also by a shorter one."""
        target.backend.put("k", payload(1000))
        target.backend.put("k", b"short")
        assert target.backend.get("k") == b"short"
        assert target.raw.read("k") == b"short"

    def test_objects_are_independent_copies(self, target: BackendUnderTest) -> None:
        """Changing a buffer after ``put`` returns does not change the object."""
        buf = bytearray(b"before")
        target.backend.put("copy", buf)
        buf[:] = b"AFTER!"
        assert target.backend.get("copy") == b"before"

    # --- ranged reads ------------------------------------------------------------------------------------
    def test_ranged_reads(self, target: BackendUnderTest) -> None:
        """Ranges inside, at the end of, across and past the end of an object (truncated, never padded)."""
        b, data = target.backend, payload(10_000, 5)
        b.put("r/x", data)
        assert b.get("r/x", ByteRange(0, 10)) == data[:10]
        assert b.get("r/x", ByteRange(123, 4567)) == data[123 : 123 + 4567]
        assert b.get("r/x", ByteRange(9_990, 10)) == data[-10:]
        assert b.get("r/x", ByteRange(5, 0)) == b""
        assert b.get("r/x", ByteRange(9_995, 100)) == data[9_995:]
        assert b.get("r/x", ByteRange(10_000, 5)) == b""
        assert b.get("r/x", ByteRange(20_000, 5)) == b""

    def test_negative_start(self, target: BackendUnderTest) -> None:
        """A negative start counts from the end; one before the start clamps to it."""
        b, data = target.backend, payload(5000, 6)
        b.put("neg", data)
        assert b.get("neg", ByteRange(-16, 16)) == data[-16:]
        assert b.get("neg", ByteRange(-100, 10)) == data[-100:-90]
        assert b.get("neg", ByteRange(-16, 100)) == data[-16:]
        assert b.get("neg", ByteRange(-6000, 6000)) == data
        assert b.get("neg", ByteRange(-6000, 10)) == data[:10]

    def test_ranges_match_the_model(self, target: BackendUnderTest) -> None:
        """``get`` and ``get_into`` of random ranges agree with :meth:`ByteRange.resolve` on the bytes."""
        b, data = target.backend, payload(3000, 8)
        b.put("hyp", data)
        n = len(data)

        @self._settings()
        @given(start=st.integers(-2 * n, 2 * n), length=st.integers(0, 2 * n))
        def check(start: int, length: int) -> None:
            s, e = ByteRange(start, length).resolve(n)
            expected = data[max(n + start, 0) if start < 0 else start :][:length]
            assert data[s:e] == expected
            assert b.get("hyp", ByteRange(start, length)) == expected
            out = bytearray(length)
            if len(expected) == length:
                assert b.get_into("hyp", memoryview(out), start) is True
                assert bytes(out) == expected
            else:
                with pytest.raises(EOFError):
                    b.get_into("hyp", memoryview(out), start)

        check()

    def test_get_into(self, target: BackendUnderTest) -> None:
        """``get_into`` fills the whole buffer from ``offset`` (negative: from the end)."""
        b, data = target.backend, payload(70_000, 7)
        b.put("gi", data)
        out = bytearray(1000)
        assert b.get_into("gi", memoryview(out), 60_000) is True
        assert bytes(out) == data[60_000:61_000]
        assert b.get_into("gi", memoryview(out), -1000) is True
        assert bytes(out) == data[-1000:]
        full = bytearray(len(data))
        assert b.get_into("gi", memoryview(full)) is True
        assert bytes(full) == data
        assert b.get_into("gi", memoryview(bytearray(0)), 10) is True

    def test_get_into_past_the_end_raises(self, target: BackendUnderTest) -> None:
        """An object shorter than the buffer is ``EOFError``, not a partial fill."""
        target.backend.put("short", b"abc")
        with pytest.raises(EOFError):
            target.backend.get_into("short", memoryview(bytearray(10)), 0)
        with pytest.raises(EOFError):
            target.backend.get_into("short", memoryview(bytearray(2)), 2)

    # --- missing keys and errors ---------------------------------------------------------------------------
    def test_missing_key(self, target: BackendUnderTest) -> None:
        """A missing key reads as ``None`` / ``False``; deleting it is not an error."""
        b = target.backend
        assert b.get("nope") is None
        assert b.get("no/such/key", ByteRange(0, 4)) is None
        assert b.get("nope", ByteRange(-4, 4)) is None
        assert b.size("nope") is None
        assert b.exists("nope") is False
        assert b.get_into("nope", memoryview(bytearray(4))) is False
        b.delete("nope")
        b.delete("no/such/key")
        assert b.delete_prefix("nope/") == 0

    def test_below_a_file_and_directories_are_missing(self, target: BackendUnderTest) -> None:
        """A key below an object, and a directory, are not objects."""
        b = target.backend
        b.put("file", b"x")
        b.put("d/x", b"1")
        for missing in ("file/child", "d"):
            assert b.get(missing) is None
            assert b.size(missing) is None
            assert b.exists(missing) is False
            assert b.get_into(missing, memoryview(bytearray(1))) is False

    @pytest.mark.parametrize("key", BAD_KEYS)
    def test_invalid_keys_rejected(self, target: BackendUnderTest, key: str) -> None:
        """Every operation on a bad key raises InvalidKeyError (a ConfigError) before touching the storage."""
        b = target.backend
        calls: list[Callable[[], object]] = [
            lambda: b.put(key, b"1"),
            lambda: b.put_atomic(key, b"1"),
            lambda: b.get(key),
            lambda: b.get(key, ByteRange(0, 1)),
            lambda: b.get_into(key, memoryview(bytearray(1))),
            lambda: b.size(key),
            lambda: b.exists(key),
            lambda: b.delete(key),
        ]
        for call in calls:
            with pytest.raises(InvalidKeyError):
                call()
        assert issubclass(InvalidKeyError, ConfigError)
        assert target.raw.keys() == set()

    @pytest.mark.parametrize("prefix", BAD_PREFIXES)
    def test_invalid_prefixes_rejected(self, target: BackendUnderTest, prefix: str) -> None:
        """Listing or deleting with a prefix that leaves the root raises InvalidKeyError."""
        b = target.backend
        b.put("a/b", b"1")
        for call in (lambda: list(b.list(prefix)), lambda: b.list_dirs(prefix), lambda: b.delete_prefix(prefix)):
            with pytest.raises(InvalidKeyError):
                call()
        assert target.raw.keys() == {"a/b"}

    # --- listing -------------------------------------------------------------------------------------------
    def test_list_and_list_dirs(self, target: BackendUnderTest) -> None:
        """Recursive listing by directory prefix; child directories of a directory, sorted."""
        b = target.backend
        keys = ["a/b/c", "a/b/d", "a/e", "f", "g/h/i/j"]
        _put_all(b.put, {k: k.encode() for k in keys})
        assert sorted(b.list()) == sorted(keys)
        assert sorted(b.list("a/")) == ["a/b/c", "a/b/d", "a/e"]
        assert sorted(b.list("a/b/")) == ["a/b/c", "a/b/d"]
        assert sorted(b.list("g/h/i/")) == ["g/h/i/j"]
        assert list(b.list("zzz/")) == []
        assert b.list_dirs("") == ["a", "g"]
        assert b.list_dirs("a/") == ["b"]
        assert b.list_dirs("g/h/") == ["i"]
        assert b.list_dirs("nothing/") == []
        assert b.list_dirs("f") == []  # an object is not a directory
        assert list(b.list("f/")) == []
        assert b.delete_prefix("f/") == 0
        assert b.get("f") == b"f"

    def test_list_is_a_string_prefix(self, target: BackendUnderTest) -> None:
        """``list('step_1')`` matches ``step_1/...``, ``step_10/...`` and ``step_1x``, not ``step_2``."""
        b = target.backend
        _put_all(b.put, {k: b"1" for k in ["step_1/x", "step_1/s/y", "step_10/x", "step_1x", "step_2/x"]})
        assert sorted(b.list("step_1")) == ["step_1/s/y", "step_1/x", "step_10/x", "step_1x"]
        assert sorted(b.list("step_1/")) == ["step_1/s/y", "step_1/x"]
        assert sorted(b.list("step_1/s")) == ["step_1/s/y"]
        assert sorted(b.list("step_1x")) == ["step_1x"]

    def test_list_dirs_prefix_forms(self, target: BackendUnderTest) -> None:
        """``'step_1'`` and ``'step_1/'`` name the same directory; a partial name names no directory."""
        b = target.backend
        _put_all(b.put, {k: b"1" for k in ["step_1/0/a", "step_1/1/b", "step_1/top", "step_10/0/a", "step_2/c"]})
        assert b.list_dirs("step_1") == ["0", "1"]
        assert b.list_dirs("step_1/") == ["0", "1"]
        assert b.list_dirs("step_1//") == ["0", "1"]
        assert b.list_dirs("step_") == []
        assert b.list_dirs("step_2") == []
        assert b.list_dirs() == ["step_1", "step_10", "step_2"]

    def test_list_dirs_only_directories_holding_objects(self, target: BackendUnderTest) -> None:
        """A directory whose objects were all deleted is no longer listed."""
        b = target.backend
        _put_all(b.put, {"a/b/c": b"1", "a/d/e": b"2", "k/deep/er/x": b"3"})
        b.delete("a/b/c")
        target.raw.delete("k/deep/er/x")
        assert b.list_dirs("") == ["a"]
        assert b.list_dirs("a") == ["d"]
        assert b.list_dirs("k") == []
        assert sorted(b.list()) == ["a/d/e"]

    def test_listing_matches_the_model(self, target: BackendUnderTest) -> None:
        """For random key sets, ``list`` and ``list_dirs`` of every relevant prefix agree with a dict model."""
        b, raw = target.backend, target.raw

        @self._settings()
        @given(keys=KEY_SETS)
        def check(keys: set[str]) -> None:
            b.delete_prefix("")  # also removes directories a file of the next key set may need
            assert raw.keys() == set()
            _put_all(raw.write, {k: k.encode() for k in keys})
            prefixes = {"", "s", "step_", "step_1", "step_1/", "zz", "zz/"}
            prefixes |= {k[:i] for k in keys for i in range(len(k) + 1)}
            for p in sorted(prefixes):
                if "//" in p:
                    continue
                assert set(b.list(p)) == model_list(keys, p), p
            dirs = {"", "step_", "zz"} | {k.rsplit("/", 1)[0] for k in keys if "/" in k}
            dirs |= {k.split("/", 1)[0] for k in keys if "/" in k}
            for d in sorted(dirs):
                assert b.list_dirs(d) == model_list_dirs(keys, d), d
                if d:
                    assert b.list_dirs(d + "/") == model_list_dirs(keys, d), d

        check()

    # --- deletes -------------------------------------------------------------------------------------------
    def test_delete(self, target: BackendUnderTest) -> None:
        """``delete`` removes one object and nothing else."""
        b = target.backend
        b.put("d/1", b"1")
        b.put("d/2", b"2")
        b.delete("d/1")
        assert b.get("d/1") is None
        assert b.get("d/2") == b"2"
        assert sorted(b.list("d/")) == ["d/2"]
        assert target.raw.keys() == {"d/2"}

    def test_delete_prefix(self, target: BackendUnderTest) -> None:
        """``delete_prefix`` removes what ``list`` of the same prefix lists and returns how many."""
        b = target.backend
        _put_all(b.put, {k: b"v" for k in ["p/a", "p/b/c", "p/b/d", "pq/x", "q", "s1/a", "s10/b/c", "s1x", "s2/a"]})
        assert b.delete_prefix("p/") == 3
        assert sorted(b.list()) == ["pq/x", "q", "s1/a", "s10/b/c", "s1x", "s2/a"]
        assert "p" not in b.list_dirs("")
        assert b.delete_prefix("p/") == 0
        assert b.delete_prefix("s1") == 3
        assert sorted(b.list()) == ["pq/x", "q", "s2/a"]
        assert b.delete_prefix("s2/a") == 1
        assert b.delete_prefix("nothing/") == 0
        assert b.delete_prefix("") == 2
        assert list(b.list()) == []
        assert b.list_dirs() == []
        assert target.raw.keys() == set()

    # --- atomic puts ---------------------------------------------------------------------------------------
    def test_put_atomic_and_overwrite(self, target: BackendUnderTest) -> None:
        """``put_atomic`` writes and replaces, and leaves no temporary behind (not even unlisted)."""
        b = target.backend
        b.put_atomic("m/COMMIT", b"first")
        assert b.get("m/COMMIT") == b"first"
        b.put_atomic("m/COMMIT", [b"sec", b"ond"])
        assert b.get("m/COMMIT") == b"second"
        b.put("m/other", b"x")
        b.put_atomic("m/other", b"replaced")
        assert b.get("m/other") == b"replaced"
        assert sorted(b.list("m/")) == ["m/COMMIT", "m/other"]
        assert target.raw.keys() == {"m/COMMIT", "m/other"}

    def test_reader_never_sees_a_partial_object(self, target: BackendUnderTest) -> None:
        """While ``put_atomic`` replaces an object, concurrent readers see the old or the new one, whole."""
        b = target.backend
        versions = [payload(MiB + 1, 10), payload(2 * MiB + 3, 11)]
        b.put_atomic("atom", versions[0])
        stop = threading.Event()
        seen: list[bytes | None] = []

        def reader() -> None:
            while not stop.is_set():
                seen.append(b.get("atom"))
                listed = set(b.list("at"))
                assert listed == {"atom"}, listed

        errors: list[BaseException] = []

        def guarded() -> None:
            try:
                reader()
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=guarded)
        t.start()
        try:
            for i in range(self.atomic_rounds):
                b.put_atomic("atom", versions[(i + 1) % 2])
        finally:
            stop.set()
            t.join()
        assert not errors, errors
        assert seen
        assert all(s in versions for s in seen), "a reader saw a partial or missing object"
        assert target.raw.keys() == {"atom"}

    # --- exclusive creation -------------------------------------------------------------------------------
    #: writers racing for one key in :meth:`test_create_exclusive_race` (and rounds of that race)
    exclusive_writers: ClassVar[int] = 8
    exclusive_rounds: ClassVar[int] = 5

    def test_create_exclusive(self, target: BackendUnderTest) -> None:
        """``create_exclusive`` creates a missing key (True), never touches an existing one (False), and leaves
        no temporary behind."""
        b = target.backend
        assert b.create_exclusive("x/CLAIM", [b"fir", b"st"]) is True
        assert b.get("x/CLAIM") == b"first"
        assert b.create_exclusive("x/CLAIM", b"second") is False
        assert b.get("x/CLAIM") == b"first"
        b.put("x/other", b"written by put")
        assert b.create_exclusive("x/other", b"no") is False
        assert b.get("x/other") == b"written by put"
        target.raw.write("y/raw", b"another writer's")
        assert b.create_exclusive("y/raw", b"no") is False
        assert target.raw.read("y/raw") == b"another writer's"
        big = payload(MiB + 5, 3)
        assert b.create_exclusive("z", big) is True
        assert b.get("z") == big
        assert target.raw.keys() == {"x/CLAIM", "x/other", "y/raw", "z"}
        assert b.remove_temporaries("") == 0 and b.remove_temporaries("x/") == 0
        assert target.raw.keys() == {"x/CLAIM", "x/other", "y/raw", "z"}

    def test_create_exclusive_race(self, target: BackendUnderTest) -> None:
        """Of writers racing to create one key exactly one wins, and the object holds the winner's bytes whole
        (each writer on its own backend instance, as separate processes would be)."""
        writers = [target.backend] + [target.reopen(target.backend) for _ in range(self.exclusive_writers - 1)]
        try:
            for r in range(self.exclusive_rounds):
                key = f"race{r}/COMMIT"
                datas = [payload(4096 + i, 100 * r + i) for i in range(len(writers))]
                start = threading.Barrier(len(writers))

                def go(i: int, key: str = key, datas: list[bytes] = datas, start: threading.Barrier = start) -> bool:
                    start.wait()
                    return writers[i].create_exclusive(key, datas[i])

                with ThreadPoolExecutor(len(writers)) as ex:
                    won = list(ex.map(go, range(len(writers))))
                assert won.count(True) == 1, f"round {r}: {won.count(True)} writers created {key}"
                assert target.raw.read(key) == datas[won.index(True)]
            assert target.raw.keys() == {f"race{r}/COMMIT" for r in range(self.exclusive_rounds)}
        finally:
            for w in writers[1:]:
                w.close()

    # --- barrier and capabilities ----------------------------------------------------------------------
    def test_barrier(self, target: BackendUnderTest) -> None:
        """``barrier`` on written, missing and root prefixes succeeds and changes no object."""
        b = target.backend
        b.put("b/x/y", b"1")
        b.barrier("b/")
        b.barrier("b")
        b.barrier("missing/")
        b.barrier("")
        assert b.get("b/x/y") == b"1"
        assert target.raw.keys() == {"b/x/y"}

    def test_capabilities_are_consistent(self, target: BackendUnderTest) -> None:
        """A volatile backend is never durable; a durable one has stored the bytes when ``put`` returns."""
        b = target.backend
        caps = b.capabilities
        assert b.durable == caps.durable
        assert not (caps.volatile and caps.durable)
        b.put("cap", b"data")
        assert target.raw.read("cap") == b"data"

    def test_second_instance_sees_objects(self, target: BackendUnderTest) -> None:
        """Another backend on the same storage sees what this one wrote (within this process)."""
        target.backend.put("shared/x", b"1")
        other = target.reopen(target.backend)
        try:
            assert other.get("shared/x") == b"1"
            assert sorted(other.list()) == ["shared/x"]
        finally:
            other.close()

    @pytest.mark.slow
    def test_new_process_sees_objects_unless_volatile(self, target: BackendUnderTest) -> None:
        """A new interpreter opening the URL sees the objects, or (volatile backend) sees none."""
        b = target.backend
        b.put("proc/x", b"1")
        code = (
            "import sys; from asymstore.backends import open_object_store; "
            "print(sorted(open_object_store(sys.argv[1]).list()))"
        )
        r = subprocess.run([sys.executable, "-c", code, b.url], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        listed = r.stdout.strip().splitlines()[-1]
        assert listed == ("[]" if b.capabilities.volatile else "['proc/x']")


__all__ = [
    "BAD_KEYS",
    "BAD_PREFIXES",
    "KEY_SETS",
    "BackendUnderTest",
    "ObjectStoreConformance",
    "RawAccess",
    "model_list",
    "model_list_dirs",
    "payload",
]
