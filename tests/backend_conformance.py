"""A generic conformance suite for :class:`asymstore.backends.base.ObjectStore`.

Every backend's tests subclass :class:`ObjectStoreConformance` and override the ``store``
fixture (a fresh, empty store per test). The class name does not start with ``Test`` so
pytest only collects it through the subclasses.
"""

from __future__ import annotations

import pytest

from asymstore.backends.base import ByteRange, ObjectStore


def payload(n: int, seed: int = 0) -> bytes:
    """Deterministic, non-periodic-at-small-scale bytes of length ``n``."""
    import random

    return random.Random(seed).randbytes(n)


class ObjectStoreConformance:
    """Behaviour every tier backend must have. Override :meth:`store`."""

    @pytest.fixture
    def store(self) -> ObjectStore:  # pragma: no cover - overridden
        raise NotImplementedError("subclasses provide a fresh, empty store")

    # --- put / get --------------------------------------------------------------
    @pytest.mark.parametrize("n", [0, 1, 4095, 4096, 3 * (1 << 20) + 17])
    def test_put_get_sizes(self, store: ObjectStore, n: int) -> None:
        data = payload(n, n)
        store.put(f"a/obj-{n}", data)
        assert store.get(f"a/obj-{n}") == data
        assert store.size(f"a/obj-{n}") == n
        assert store.exists(f"a/obj-{n}")

    def test_put_accepts_bytearray_and_memoryview(self, store: ObjectStore) -> None:
        store.put("ba", bytearray(b"hello"))
        store.put("mv", memoryview(b"xhellox")[1:-1])
        import numpy as np

        arr = np.arange(4, dtype="<u4")
        store.put("np", memoryview(arr))  # a non-byte format must be written as its bytes
        assert store.get("ba") == b"hello"
        assert store.get("mv") == b"hello"
        assert store.get("np") == arr.tobytes()

    def test_multi_buffer_put(self, store: ObjectStore) -> None:
        parts = [payload(10, 1), b"", payload(1 << 20, 2), memoryview(payload(100, 3))[5:50], bytearray(b"z")]
        store.put("multi", parts)
        want = b"".join(bytes(p) for p in parts)
        assert store.get("multi") == want
        assert store.size("multi") == len(want)

    def test_many_buffers_put(self, store: ObjectStore) -> None:
        parts = [bytes([i % 256]) * (i % 7) for i in range(2000)]  # more buffers than IOV_MAX
        store.put("many", parts)
        assert store.get("many") == b"".join(parts)

    def test_overwrite_with_put(self, store: ObjectStore) -> None:
        store.put("k", payload(1000))
        store.put("k", b"short")
        assert store.get("k") == b"short"

    # --- ranged reads -----------------------------------------------------------
    def test_ranged_reads(self, store: ObjectStore) -> None:
        data = payload(10_000, 5)
        store.put("r/x", data)
        assert store.get("r/x", ByteRange(0, 10)) == data[:10]
        assert store.get("r/x", ByteRange(123, 4567)) == data[123 : 123 + 4567]
        assert store.get("r/x", ByteRange(9_990, 10)) == data[-10:]
        assert store.get("r/x", ByteRange(5, 0)) == b""
        # past the end: truncated, never padded
        assert store.get("r/x", ByteRange(9_995, 100)) == data[9_995:]
        assert store.get("r/x", ByteRange(20_000, 5)) == b""

    def test_negative_start(self, store: ObjectStore) -> None:
        data = payload(5000, 6)
        store.put("neg", data)
        assert store.get("neg", ByteRange(-16, 16)) == data[-16:]
        assert store.get("neg", ByteRange(-100, 10)) == data[-100:-90]
        # more than the object: clamps to the start
        assert store.get("neg", ByteRange(-6000, 6000)) == data

    def test_range_length_validated(self) -> None:
        with pytest.raises(ValueError):
            ByteRange(0, -1)

    def test_get_into(self, store: ObjectStore) -> None:
        data = payload(70_000, 7)
        store.put("gi", data)
        out = bytearray(1000)
        assert store.get_into("gi", memoryview(out), 60_000) is True
        assert bytes(out) == data[60_000:61_000]
        full = bytearray(len(data))
        assert store.get_into("gi", memoryview(full)) is True
        assert bytes(full) == data
        empty = bytearray(0)
        assert store.get_into("gi", memoryview(empty), 10) is True

    def test_get_into_short_object_raises(self, store: ObjectStore) -> None:
        store.put("short", b"abc")
        with pytest.raises(EOFError):
            store.get_into("short", memoryview(bytearray(10)), 0)

    # --- missing keys -------------------------------------------------------------
    def test_missing_key(self, store: ObjectStore) -> None:
        assert store.get("nope") is None
        assert store.get("no/such/key", ByteRange(0, 4)) is None
        assert store.get("nope", ByteRange(-4, 4)) is None
        assert store.size("nope") is None
        assert store.exists("nope") is False
        assert store.get_into("nope", memoryview(bytearray(4))) is False
        store.delete("nope")  # not an error

    def test_missing_key_below_a_file(self, store: ObjectStore) -> None:
        store.put("file", b"x")
        assert store.get("file/child") is None
        assert store.size("file/child") is None

    # --- listing ------------------------------------------------------------------
    def test_list_and_list_dirs(self, store: ObjectStore) -> None:
        keys = ["a/b/c", "a/b/d", "a/e", "f", "g/h/i/j"]
        for k in keys:
            store.put(k, k.encode())
        assert sorted(store.list()) == sorted(keys)
        assert sorted(store.list("a/")) == ["a/b/c", "a/b/d", "a/e"]
        assert sorted(store.list("a/b/")) == ["a/b/c", "a/b/d"]
        assert sorted(store.list("g/h/i/")) == ["g/h/i/j"]
        assert list(store.list("zzz/")) == []
        assert store.list_dirs("") == ["a", "g"]
        assert store.list_dirs("a/") == ["b"]
        assert store.list_dirs("g/h/") == ["i"]
        assert store.list_dirs("nothing/") == []

    def test_list_partial_name_prefix(self, store: ObjectStore) -> None:
        for k in ["step_1/x", "step_10/x", "stepx"]:
            store.put(k, b"1")
        assert sorted(store.list("step_1")) == ["step_1/x", "step_10/x"]

    # --- delete -------------------------------------------------------------------
    def test_delete(self, store: ObjectStore) -> None:
        store.put("d/1", b"1")
        store.put("d/2", b"2")
        store.delete("d/1")
        assert store.get("d/1") is None
        assert store.get("d/2") == b"2"
        assert sorted(store.list("d/")) == ["d/2"]

    def test_delete_prefix(self, store: ObjectStore) -> None:
        for k in ["p/a", "p/b/c", "p/b/d", "pq/x", "q"]:
            store.put(k, b"v")
        assert store.delete_prefix("p/") == 3
        assert sorted(store.list()) == ["pq/x", "q"]
        assert "p" not in store.list_dirs("")
        assert store.delete_prefix("p/") == 0
        assert store.delete_prefix("nothing/") == 0

    # --- atomic put -----------------------------------------------------------------
    def test_put_atomic_and_overwrite(self, store: ObjectStore) -> None:
        store.put_atomic("m/COMMIT", b"first")
        assert store.get("m/COMMIT") == b"first"
        store.put_atomic("m/COMMIT", [b"sec", b"ond"])
        assert store.get("m/COMMIT") == b"second"
        assert sorted(store.list("m/")) == ["m/COMMIT"]  # no temporary leftovers listed

    def test_barrier_is_harmless(self, store: ObjectStore) -> None:
        store.put("b/x/y", b"1")
        store.barrier("b/")
        store.barrier("missing/")
        store.barrier("")
        assert store.get("b/x/y") == b"1"

    def test_objects_are_independent_copies(self, store: ObjectStore) -> None:
        buf = bytearray(b"before")
        store.put("copy", buf)
        buf[:] = b"AFTER!"
        assert store.get("copy") == b"before"
