"""The catalog: listing (committed, partial, per rank), the reader factory, and the one read policy."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asymstore import Store, catalog
from asymstore.backends.local import LocalObjectStore
from asymstore.backends.memory import MemoryObjectStore, drop_namespace
from asymstore.errors import CorruptCheckpointError, StepNotFoundError
from asymstore.interfaces import ObjectStore, RangeSource
from asymstore.lazy import LazyCheckpoint
from asymstore.manifest import COMMIT_KEY, step_dir
from asymstore.reader import CheckpointReader

from .helpers import assert_bitequal, flip_byte, step_files

CHUNK, PART = 4096, 16384


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 128, generator=g), "b": torch.randn(300, generator=g)}


@pytest.fixture
def memory_url():
    name = f"memory://catalog-{uuid.uuid4().hex[:8]}"
    yield name
    drop_namespace(name.removeprefix("memory://"))


@pytest.fixture(params=["local", "memory"])
def backend(request, tmp_path, memory_url) -> ObjectStore:
    return LocalObjectStore(str(tmp_path / "tier")) if request.param == "local" else MemoryObjectStore(memory_url)


# --- listing ---------------------------------------------------------------------------------------------
def test_committed_and_partial_steps(backend: ObjectStore) -> None:
    with Store([backend], chunk_bytes=CHUNK, partition_bytes=PART) as s:
        s.save(_state(1), 3)
        s.save(_state(2), 1)
    backend.put(f"{step_dir(7)}/w/c/0", b"half a save")  # a crashed attempt: objects, no marker
    backend.put("_probe/x/0", b"not a step")
    backend.put("notes/README", b"not a step either")
    assert catalog.committed_steps(backend) == [1, 3]
    assert catalog.partial_steps(backend) == [7]
    assert catalog.is_committed(backend, 3) and not catalog.is_committed(backend, 7)
    assert catalog.commit_info(backend, 3)["step"] == 3 and catalog.commit_info(backend, 7) == {}


@settings(max_examples=40, deadline=None)
@given(
    st.dictionaries(st.integers(0, 10**6), st.booleans(), max_size=12),
    st.lists(st.sampled_from(["_probe", "tmp", "step_12", "step_x", "zarr.json"]), max_size=3),
)
def test_listing_matches_what_was_written(steps: dict[int, bool], junk: list[str]) -> None:
    """Property: whatever mix of committed, partial and foreign directories, the listings split them exactly."""
    name = f"catalog-prop-{uuid.uuid4().hex[:8]}"
    b = MemoryObjectStore(f"memory://{name}")
    try:
        for s, committed in steps.items():
            b.put(f"{step_dir(s)}/data/c/0", b"x")
            if committed:
                b.put(f"{step_dir(s)}/{COMMIT_KEY}", b"{}")
        for j in junk:
            b.put(f"{j}/obj", b"y")
        assert catalog.committed_steps(b) == sorted(s for s, c in steps.items() if c)
        assert catalog.partial_steps(b) == sorted(s for s, c in steps.items() if not c)
    finally:
        drop_namespace(name)


def test_per_rank_listing_and_cleanup(backend: ObjectStore) -> None:
    d = step_dir(5)
    backend.put(f"{d}/r00000/{COMMIT_KEY}", b"{}")
    backend.put(f"{d}/r00000/w/c/0", b"rank 0")
    backend.put(f"{d}/r00001/w/c/0", b"rank 1, no marker")
    backend.put(f"{d}/r00001/w/c/1", b"rank 1, no marker")
    backend.put(f"{step_dir(9)}/r00001/w/c/0", b"rank 1 of a newer attempt")
    assert catalog.committed_ranks(backend, 5) == [0]
    assert catalog.rank_committed(backend, 5, rank=0, world_size=2)
    assert not catalog.rank_committed(backend, 5, rank=1, world_size=2)
    assert catalog.rank_leftovers(backend, 5, rank=1, world_size=2) == 2
    assert catalog.rank_leftovers(backend, 5, rank=2, world_size=3) == 0
    # only steps newer than `after`, only this rank's directory
    assert catalog.discard_uncommitted(backend, rank=1, world_size=2, after=5) == [9]
    assert catalog.rank_leftovers(backend, 5, rank=1, world_size=2) == 2
    assert catalog.discard_uncommitted(backend, rank=1, world_size=2) == [5]
    assert catalog.rank_leftovers(backend, 5, rank=1, world_size=2) == 0
    assert catalog.rank_leftovers(backend, 5, rank=0, world_size=2) == 2  # rank 0's part is untouched
    assert catalog.partial_steps(backend) == [5]


def test_reader_factory_wires_the_delta_base(tmp_path) -> None:
    root = str(tmp_path / "t")
    with Store([root], chunk_bytes=CHUNK, partition_bytes=PART, compression="xor-zstd", delta_every=4) as s:
        base = _state(1)
        s.save(base, 1)
        nxt = {k: v + 1e-3 for k, v in base.items()}
        s.save(nxt, 2)
        assert catalog.commit_info(s.tiers[0].backend, 2).get("delta_base") == 1
    b = LocalObjectStore(root)
    r = catalog.open_reader(b, 2)
    assert isinstance(r, RangeSource)
    assert catalog.dependents(b, 1) == [2] and catalog.dependents(b, 2) == []
    assert_bitequal(LazyCheckpoint(r).load(), nxt)


# --- the read policy ---------------------------------------------------------------------------------------
def test_read_order_is_host_then_tiers_in_chain_order(tmp_path, memory_url) -> None:
    with Store([str(tmp_path / "a"), memory_url], chunk_bytes=CHUNK, partition_bytes=PART) as s:
        s.save(_state(1), 1)
        assert s.flush(30)
        assert s.where(1) == ["host", "file", "memory"]
        chain = [(t.name, t.backend) for t in s.tiers]
        assert [x.name for x in catalog.read_sources(1, host=True, tiers=chain)] == ["host", "file", "memory"]
        # host memory holds only this rank's part
        assert [x.name for x in catalog.read_sources(1, host=True, tiers=chain, rank=1)] == ["file", "memory"]
        ck = s.open_checkpoint(1)
        assert ck.reader is None  # read from the host slot: the fastest complete copy
        s.restore(1)
        assert s.last_restore is not None and s.last_restore.tier == "host"
    with Store([str(tmp_path / "a"), memory_url], chunk_bytes=CHUNK, partition_bytes=PART) as fresh:
        assert fresh.where(1) == ["file", "memory"]
        ck = fresh.open_checkpoint(1)
        assert ck.reader is not None and ck.reader.backend.url == fresh.tier_urls["file"]


def _damage_first_shard(root: str, step: int) -> str:
    shard = next(f for f in step_files(root, step) if "/c/" in f)
    flip_byte(os.path.join(root, shard), 10)
    return shard


def test_fallback_on_damage_in_chain_order(tmp_path, memory_url) -> None:
    root = str(tmp_path / "a")
    state = _state(3)
    with Store([root, memory_url], chunk_bytes=CHUNK, partition_bytes=PART) as s:
        s.save(state, 4)
        assert s.flush(30)
    shard = _damage_first_shard(root, 4)
    with Store([root, memory_url], chunk_bytes=CHUNK, partition_bytes=PART) as fresh:
        assert_bitequal(fresh.restore(4), state)
        rep = fresh.last_restore
        assert rep is not None and rep.tier == "memory"
        assert len(rep.events) == 1 and rep.events[0].startswith("step 4 on file") and shard in rep.events[0]
        # lazy reads: the damaged range is read from the next copy in the same order
        ck = fresh.open_checkpoint(4)
        assert isinstance(ck.source, catalog.FallbackSource)
        assert_bitequal(ck.load(), state)
        assert isinstance(ck.source.current, CheckpointReader) and ck.source.current.backend.url == memory_url


def test_no_readable_copy_names_the_damage(tmp_path) -> None:
    root = str(tmp_path / "a")
    with Store([root], chunk_bytes=CHUNK, partition_bytes=PART) as s:
        s.save(_state(1), 1)
    shard = _damage_first_shard(root, 1)
    b = LocalObjectStore(root)
    sources = catalog.read_sources(1, host=False, tiers=[("file", b)])

    def read_all(src: catalog.Source) -> bytes:
        assert src.backend is not None
        r = catalog.open_reader(src.backend, 1)
        out = bytearray(r.manifest.layout.total_bytes)
        r.read_all_into(memoryview(out))
        return bytes(out)

    with pytest.raises(CorruptCheckpointError) as e:
        catalog.read_first(sources, read_all, what="step 1")
    assert shard in e.value.objects
    with pytest.raises(StepNotFoundError):
        catalog.read_first([], read_all, what="step 1")
    with Store([root], chunk_bytes=CHUNK, partition_bytes=PART) as fresh, pytest.raises(CorruptCheckpointError):
        fresh.restore(1)


def test_lazy_host_copy_falls_back_when_the_slot_is_reused(tmp_path) -> None:
    first = _state(1)
    with Store([str(tmp_path / "a")], chunk_bytes=CHUNK, partition_bytes=PART, host_slots=1) as s:
        s.save(first, 1)
        ck = s.open_checkpoint(1)
        assert ck.reader is None  # from the host slot
        s.save(_state(2), 2)  # the only slot now holds step 2
        assert_bitequal(ck.load(), first)  # read from the tier instead
        assert isinstance(ck.source, catalog.FallbackSource) and isinstance(ck.source.current, CheckpointReader)


class _Bytes(RangeSource):
    """A range source over bytes that fails its first ``bad`` reads (a damaged copy)."""

    def __init__(self, data: bytes, *, bad: bool = False) -> None:
        self.data, self.bad, self._n = data, bad, 0

    @property
    def bytes_read(self) -> int:
        return self._n

    def read_range_into(self, start: int, end: int, out: memoryview) -> None:
        if self.bad:
            raise CorruptCheckpointError("damaged copy", ("obj",))
        out[:] = self.data[start:end]
        self._n += end - start


def test_fallback_source_moves_on_in_order_and_gives_up_last() -> None:
    data = bytes(range(256))
    opened: list[str] = []

    def opener(name: str, src: RangeSource) -> tuple[str, Callable[[], RangeSource]]:
        def open_it() -> RangeSource:
            opened.append(name)
            return src

        return name, open_it

    fs = catalog.FallbackSource(
        _Bytes(data, bad=True), [opener("b", _Bytes(data, bad=True)), opener("c", _Bytes(data))]
    )
    out = bytearray(16)
    fs.read_range_into(8, 24, memoryview(out))
    assert bytes(out) == data[8:24] and opened == ["b", "c"] and fs.bytes_read == 16
    bad = catalog.FallbackSource(_Bytes(data, bad=True), [opener("b", _Bytes(data, bad=True))])
    with pytest.raises(CorruptCheckpointError):
        bad.read_range_into(0, 4, memoryview(bytearray(4)))


def test_deprecated_alias_still_lists(tmp_path) -> None:
    from asymstore.reader import committed_steps

    with Store([str(tmp_path / "a")], chunk_bytes=CHUNK, partition_bytes=PART) as s:
        s.save(_state(1), 2)
    assert committed_steps(LocalObjectStore(str(tmp_path / "a"))) == [2]
