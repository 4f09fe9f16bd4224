"""Damage to any stored object of a step is detected, named, and restore falls back (tier, then step)."""

from __future__ import annotations

import os
import shutil
import uuid

import pytest
import torch

from asymstore import CorruptCheckpointError, StepNotFoundError, Store
from asymstore.backends.memory import MemoryObjectStore, drop_namespace
from asymstore.zarrfmt import index_nbytes

from .helpers import assert_bitequal, flip_byte, step_files

SMALL = dict(chunk_bytes=4096, partition_bytes=16384)
CPS = 16384 // 4096


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(9000, generator=g), "b": torch.randint(0, 9, (300,), generator=g), "step": step}


@pytest.fixture(scope="module", params=["none", "zstd3"])
def pristine(request, tmp_path_factory) -> tuple[str, str]:
    root = str(tmp_path_factory.mktemp(f"pristine-{request.param}"))
    with Store([root], **SMALL, compression=request.param) as s:
        s.save(_state(1), 1)
        s.save(_state(2), 2)
    return root, request.param


def _copy(pristine_root: str, tmp_path) -> str:
    dst = str(tmp_path / "ck")
    shutil.copytree(pristine_root, dst)
    return dst


def _verify_failures(root: str, step: int) -> list[str]:
    """What `asymstore verify` does: open the committed step on the tier and check every object."""
    with Store([root], **SMALL) as s:
        tier = s.tiers[0]
        try:
            rep = tier.reader(step).verify()
        except CorruptCheckpointError as e:
            assert e.objects, f"CorruptCheckpointError without object names: {e}"
            return list(e.objects)
        assert rep.ok == (not rep.problems)
        assert rep.checked_objects >= 3
        return [k for k, _msg in rep.problems]


def _targets(root: str, step: int) -> list[tuple[str, str, int]]:
    """(object key, what, byte offset to flip) for every stored object of the step."""
    out = []
    for key in step_files(root, step):
        size = os.path.getsize(os.path.join(root, key))
        if "/c/" in key:
            out.append((key, "chunk", 100))  # in the first chunk
            out.append((key, "last-chunk", size - index_nbytes(CPS) - 1))  # the last stored byte of the data
            out.append((key, "index", size - 10))  # inside the shard index
            out.append((key, "index-crc", size - 1))  # the index checksum itself
        else:
            out.append((key, "meta", size // 2))
    return out


def test_every_object_is_checked(pristine) -> None:
    root, _ = pristine
    keys = step_files(root, 2)
    shards = [k for k in keys if "/c/" in k]
    assert len(shards) >= 3, keys  # several partitions
    assert "step_000000000002/COMMIT" in keys and "step_000000000002/zarr.json" in keys
    assert _verify_failures(root, 2) == []


def test_flip_one_byte_anywhere(pristine, tmp_path) -> None:
    root0, _ = pristine
    targets = _targets(root0, 2)
    assert len(targets) >= 15
    for i, (key, what, off) in enumerate(targets):
        root = _copy(root0, tmp_path / str(i))
        flip_byte(os.path.join(root, key), off)
        failed = _verify_failures(root, 2)
        assert key in failed, f"flip in {what} of {key}: verify reported {failed}"
        with Store([root], **SMALL) as s:
            with pytest.raises(CorruptCheckpointError) as ei:
                s.restore(2)
            assert key in str(ei.value), f"{what} of {key}: {ei.value}"
            assert key in ei.value.objects, f"{what} of {key}: objects={ei.value.objects}"
            # the undamaged step is still fine, and step=None falls back to it
            got = s.restore()
            assert s.last_restore is not None and s.last_restore.step == 1
            assert any("step 2" in e and key in e for e in s.last_restore.events), s.last_restore.events
            assert_bitequal(got, _state(1))


@pytest.mark.parametrize("chunk", [0, 1, CPS - 1])
def test_damage_in_any_piece_of_a_raw_partition_fails_the_restore(
    pristine, tmp_path, monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """Raw partitions are read and checked piece by piece (here a piece per chunk): damage in the first, a middle
    or the last piece fails the restore, also when the pieces after it are intact."""
    import asymstore.reader

    root0, codec = pristine
    if codec != "none":
        pytest.skip("raw partitions only")
    monkeypatch.setattr(asymstore.reader, "_READ_PIECE", 4096)
    root = _copy(root0, tmp_path)
    key = next(k for k in step_files(root, 2) if "/c/" in k)
    flip_byte(os.path.join(root, key), chunk * 4096 + 7)
    with Store([root], **SMALL) as s:
        with pytest.raises(CorruptCheckpointError) as ei:
            s.restore(2)
        assert key in ei.value.objects and f"chunk {chunk} " in str(ei.value), ei.value
        assert_bitequal(s.restore(1), _state(1))


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_truncated_and_missing_objects(pristine, tmp_path, damage: str) -> None:
    root0, _ = pristine
    for i, key in enumerate(step_files(root0, 2)):
        root = _copy(root0, tmp_path / str(i))
        path = os.path.join(root, key)
        if damage == "truncate":
            os.truncate(path, os.path.getsize(path) - 1)
        else:
            os.unlink(path)
        with Store([root], **SMALL) as s:
            if key.endswith("COMMIT") and damage == "delete":
                # no marker: the step is simply not complete, and step=None restores step 1
                assert s.steps() == [1]
                with pytest.raises(StepNotFoundError):
                    s.restore(2)
                assert_bitequal(s.restore(), _state(1))
                continue
            assert key in _verify_failures(root, 2), f"{damage} {key}"
            with pytest.raises(CorruptCheckpointError, match=key.replace(".", r"\.")):
                s.restore(2)
            assert_bitequal(s.restore(), _state(1))
            assert s.last_restore is not None and s.last_restore.step == 1


def test_two_tiers_fall_back_to_the_intact_tier(tmp_path) -> None:
    name = f"integ-{uuid.uuid4().hex}"
    mem_url = f"memory://{name}"
    try:
        with Store([mem_url, str(tmp_path)], **SMALL, compression="zstd3") as s:
            s.save(_state(1), 1)
            s.save(_state(2), 2)
        mem = MemoryObjectStore(mem_url)
        shard = sorted(k for k in mem.list("step_000000000002/") if "/c/" in k)[1]
        mem.corrupt(shard, 50)
        with Store([mem_url, str(tmp_path)], **SMALL) as s:
            assert s.where(2) == ["memory", "file"]
            got = s.restore(2)
            rep = s.last_restore
            assert rep is not None and rep.step == 2 and rep.tier == "file"
            assert len(rep.events) == 1 and "memory" in rep.events[0] and shard in rep.events[0], rep.events
            assert_bitequal(got, _state(2))
            # step=None: the newest step, from the intact tier, not an older step
            s.restore()
            assert s.last_restore.step == 2 and s.last_restore.tier == "file"
            # damage the local copy too: step=None falls back to step 1 from memory
            flip_byte(os.path.join(str(tmp_path), shard), 50)
            got1 = s.restore()
            assert s.last_restore.step == 1 and s.last_restore.tier == "memory"
            assert [e.split(":")[0] for e in s.last_restore.events] == ["step 2 on memory", "step 2 on file"]
            assert_bitequal(got1, _state(1))
            with pytest.raises(CorruptCheckpointError) as ei:
                s.restore(2)
            assert "memory" in str(ei.value) and "file" in str(ei.value)
    finally:
        drop_namespace(name)


def test_host_copy_is_preferred_and_independent_of_disk_damage(tmp_path) -> None:
    with Store([str(tmp_path)], **SMALL) as s:
        s.save(_state(3), 3)
        key = next(k for k in step_files(str(tmp_path), 3) if "/c/" in k)
        flip_byte(os.path.join(str(tmp_path), key), 10)
        assert_bitequal(s.restore(3), _state(3))
        assert s.last_restore.tier == "host"
        assert key in _verify_failures(str(tmp_path), 3)


def test_lazy_reads_detect_damage(pristine, tmp_path) -> None:
    from asymstore import open_checkpoint

    root = _copy(pristine[0], tmp_path)
    key = sorted(k for k in step_files(root, 2) if "/c/" in k)[0]
    flip_byte(os.path.join(root, key), 5)
    ck = open_checkpoint(root, 2)
    with pytest.raises(CorruptCheckpointError, match=key):
        ck["w"][:10]
    assert ck["w"][-10:].shape == (10,)  # other partitions still readable
