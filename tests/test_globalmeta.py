"""Global tensor metadata: boxes and flat ranges, the merged index and its coverage check, and the planner.

The planner is checked end to end with numpy: a random global tensor is cut into random parts (boxes of a
random DTensor-like sharding with replicas, or ZeRO-like flat partitions of several tensors), every part is
stored as a local 1-D array, and any random target region read through :func:`plan_reads` equals the
global tensor's elements exactly.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asymstore import globalmeta as gm
from asymstore.errors import ConfigError, CorruptCheckpointError


def _target_values(full: np.ndarray, region: gm.Region) -> np.ndarray:
    if isinstance(region, gm.Box):
        sl = tuple(slice(o, o + n) for o, n in zip(region.offsets, region.lengths, strict=True))
        return full[sl].reshape(-1)
    return full.reshape(-1)[region.start : region.start + region.length]


def _assemble(g: gm.GlobalTensor, target: gm.Region, stored: dict[tuple[int, str], np.ndarray], prefer=None):
    out = np.full(target.numel, -1, dtype=np.int64)
    written = np.zeros(target.numel, dtype=np.int32)
    for r in gm.plan_reads(g, target, prefer_rank=prefer):
        src = stored[(r.rank, r.local_name)]
        out[r.dst_start : r.dst_start + r.numel] = src[r.src_start : r.src_stop]
        written[r.dst_start : r.dst_start + r.numel] += 1
    assert (written == 1).all(), "every target element is written exactly once"
    return out


shapes = st.lists(st.integers(0, 7), min_size=0, max_size=4).map(tuple)


@st.composite
def sharded(draw):
    """A global shape, a device mesh, placements and the boxes of every rank (DTensor chunking)."""
    shape = draw(shapes)
    mesh = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    choices = [("replicate",)] + [("shard", d) for d in range(len(shape))]
    placements = [draw(st.sampled_from(choices)) for _ in mesh]
    coords = list(np.ndindex(*mesh))
    boxes = [gm.chunk_box(shape, mesh, c, placements) for c in coords]
    return shape, boxes


@st.composite
def targets(draw, shape):
    if draw(st.booleans()) or not shape:
        offs, lens = [], []
        for s in shape:
            a = draw(st.integers(0, s))
            b = draw(st.integers(a, s))
            offs.append(a)
            lens.append(b - a)
        return gm.box(offs, lens)
    n = math.prod(shape)
    a = draw(st.integers(0, n))
    return gm.FlatRange(a, draw(st.integers(0, n - a)))


@settings(max_examples=150, deadline=None)
@given(sharded(), st.data())
def test_random_boxes_reassemble_exactly(case, data):
    shape, boxes = case
    full = np.arange(math.prod(shape), dtype=np.int64).reshape(shape) * 7 + 3
    described, stored = {}, {}
    for rank, b in enumerate(boxes):
        local = _target_values(full, b)
        stored[(rank, "w")] = local
        described[rank] = {"w": [gm.Piece("w", "int64", shape, b)]}
    idx = gm.build_index(5, len(boxes), described)
    back = gm.GlobalIndex.from_json(idx.to_json(), "INDEX", step=5)
    g = back.tensors["w"]
    assert (g.dtype, g.shape, len(g.parts)) == ("int64", shape, len(boxes))
    for _ in range(3):
        t = data.draw(targets(shape))
        prefer = data.draw(st.integers(0, len(boxes)))
        assert np.array_equal(_assemble(g, t, stored, prefer), _target_values(full, t))


@st.composite
def flat_partitions(draw):
    """ZeRO-like: several tensors flattened back to back, padded, cut into equal partitions per rank."""
    tshapes = draw(st.lists(shapes, min_size=1, max_size=4))
    world = draw(st.integers(1, 5))
    sizes = [math.prod(s) for s in tshapes]
    total = sum(sizes)
    pad = -(-total // world) * world - total
    per = (total + pad) // world
    return tshapes, world, per


@settings(max_examples=150, deadline=None)
@given(flat_partitions(), st.data())
def test_random_flat_partitions_reassemble_exactly(case, data):
    tshapes, world, per = case
    fulls = {f"p{i}": np.arange(math.prod(s), dtype=np.int64).reshape(s) + 1000 * i for i, s in enumerate(tshapes)}
    flat = np.concatenate([f.reshape(-1) for f in fulls.values()] + [np.zeros(world * per, dtype=np.int64)])
    described, stored = {r: {"flat": []} for r in range(world)}, {}
    for r in range(world):
        stored[(r, "flat")] = flat[r * per : (r + 1) * per]
    pos = 0
    for name, f in fulls.items():  # the flat ranges of each parameter in each rank's partition
        n = f.size
        for r in range(world):
            lo, hi = max(pos, r * per), min(pos + n, (r + 1) * per)
            if hi > lo:
                piece = gm.Piece(name, "int64", f.shape, gm.FlatRange(lo - pos, hi - lo), lo - r * per)
                described[r]["flat"].append(piece)
        if n == 0:  # an empty tensor is described by an empty range
            described[0]["flat"].append(gm.Piece(name, "int64", f.shape, gm.FlatRange(0, 0)))
        pos += n
    for r in range(world):
        gm.check_parts(described[r], {"flat": ("int64", (per,))}, f"rank {r}")
    idx = gm.build_index(1, world, described)
    for name, f in fulls.items():
        g = idx.tensors[name]
        t = data.draw(targets(f.shape))
        assert np.array_equal(_assemble(g, t, stored), _target_values(f, t))
        assert np.array_equal(_assemble(g, gm.whole(f.shape), stored), f.reshape(-1))


def test_flat_boxes_are_contiguous_and_in_order():
    shape = (3, 4, 5)
    for a in range(0, 60, 7):
        for b in range(a, 61, 5):
            pos = a
            for off, bx in gm.flat_boxes(a, b - a, shape):
                assert off == pos - a
                idx = np.arange(60).reshape(shape)
                sl = tuple(slice(o, o + n) for o, n in zip(bx.offsets, bx.lengths, strict=True))
                vals = idx[sl].reshape(-1)
                assert np.array_equal(vals, np.arange(pos, pos + vals.size))
                pos += vals.size
            assert pos == b
            assert len(gm.flat_boxes(a, b - a, shape)) <= 5


def test_replicas_read_from_the_preferred_rank():
    p = gm.Piece("b", "float32", (4,), gm.whole((4,)))
    idx = gm.build_index(0, 3, {0: {"b": [p]}, 1: {"b": [p]}, 2: {"b": [p]}})
    assert [r.rank for r in gm.plan_reads(idx.tensors["b"], gm.whole((4,)), prefer_rank=2)] == [2]
    assert [r.rank for r in gm.plan_reads(idx.tensors["b"], gm.whole((4,)))] == [0]


def test_gaps_overlaps_and_disagreements_are_refused():
    a = gm.Piece("w", "float32", (4, 2), gm.box([0, 0], [2, 2]))
    with pytest.raises(CorruptCheckpointError, match=r"'w'.*hold 4 elements.*has 8"):
        gm.build_index(3, 2, {0: {"w": [a]}})
    over = gm.Piece("w", "float32", (4, 2), gm.box([1, 0], [2, 2]))  # 8 elements in all, row 1 twice, row 3 never
    with pytest.raises(CorruptCheckpointError, match="overlap without being identical"):
        gm.build_index(3, 2, {0: {"w": [a]}, 1: {"w": [over]}})
    other = gm.Piece("w", "float32", (4, 3), gm.box([2, 0], [2, 3]))
    with pytest.raises(CorruptCheckpointError, match=r"rank 1 says float32 \[4, 3\]"):
        gm.build_index(3, 2, {0: {"w": [a]}, 1: {"w": [other]}})
    outside = gm.Piece("w", "float32", (4, 2), gm.box([3, 0], [2, 2]))
    with pytest.raises(CorruptCheckpointError, match=r"box dimension 0: \[3, 3\+2\) is not inside \[0, 4\)"):
        gm.check_piece(outside, "r00000/zarr.json")
    with pytest.raises(ConfigError, match="not inside"):
        gm.plan_reads(
            gm.build_index(0, 1, {0: {"w": [gm.Piece("w", "float32", (4, 2), gm.whole((4, 2)))]}}).tensors["w"],
            outside.region,
        )


def test_check_parts_against_the_local_tensors():
    p = gm.Piece("w", "float32", (4,), gm.FlatRange(0, 3), local_offset=2)
    gm.check_parts({"x": [p]}, {"x": ("float32", (5,))}, "m")
    with pytest.raises(CorruptCheckpointError, match=r"needs elements \[2, 5\), it has 4"):
        gm.check_parts({"x": [p]}, {"x": ("float32", (4,))}, "m")
    with pytest.raises(CorruptCheckpointError, match="piece 0 is float32, the stored tensor bfloat16"):
        gm.check_parts({"x": [p]}, {"x": ("bfloat16", (5,))}, "m")
    with pytest.raises(CorruptCheckpointError, match="no tensor of that name"):
        gm.check_parts({"y": [p]}, {"x": ("float32", (5,))}, "m")
    q = gm.Piece("v", "float32", (4,), gm.FlatRange(0, 2), local_offset=3)
    with pytest.raises(ConfigError, match="two pieces overlap at local element 3"):
        gm.check_parts({"x": [p, q]}, {"x": ("float32", (9,))}, "m", error=ConfigError)


def test_json_round_trip_and_hostile_json():
    parts = {
        "opt/0": [gm.Piece("a", "bfloat16", (3, 2), gm.box([1, 0], [2, 2])), gm.Piece("b", "int8", (), gm.whole(()), 4)]
    }
    j = gm.parts_to_json(parts)
    assert j == {"opt/0": [["a", "bfloat16", [3, 2], 0, "box", [1, 0], [2, 2]], ["b", "int8", [], 4, "box", [], []]]}
    assert gm.parts_from_json(j, "m") == {k: tuple(v) for k, v in parts.items()}
    for bad, member in [
        ({"x": [["a", "float32", [3], 0, "cube", 0, 1]]}, "kind"),
        ({"x": [["a", "float32", [3], -1, "flat", 0, 1]]}, "local_offset"),
        ({"x": [["a", "float32", [3], 0, "flat", 0, 1.0]]}, "length"),
        ({"x": [["a", "float99", [3], 0, "flat", 0, 1]]}, "dtype"),
        ({"x": [["a", "float32", [3], 0, "flat", 2, 2]]}, "flat range"),
        ({"x": [["a", "float32", [3], 0, "flat", 2]]}, "piece"),
        ({"x": {"a": 1}}, "global_parts"),
    ]:
        with pytest.raises(CorruptCheckpointError, match=member):
            gm.parts_from_json(bad, "r00001/zarr.json")
    idx = gm.build_index(2, 1, {0: {"t": [gm.Piece("t", "float32", (2,), gm.whole((2,)))]}}).to_json()
    idx["tensors"]["t"]["parts"][0][0] = 1
    with pytest.raises(CorruptCheckpointError, match=r"INDEX: invalid tensors\['t'\].parts\[0\].rank: 1 is above 0"):
        gm.GlobalIndex.from_json(idx, "INDEX")


# --- in the format: manifests, INDEX, validation ------------------------------------------------------------
def _two_rank_save(url, parts_of, step=1):
    """Ranks 0 and 1 of one step saved by two stores of this process (threads): rank r saves ``{"flat": ...}``
    with ``global_parts=parts_of(r)``. Returns each rank's exception (or None)."""
    import threading

    import torch

    import asymstore

    errors = [None, None]

    def run(r):
        try:
            with asymstore.Store(
                [url], rank=r, world_size=2, host_memory="private", compression="none", commit_timeout_s=20
            ) as st:
                st.save({"flat": torch.arange(6, dtype=torch.float32) + 6 * r}, step, global_parts=parts_of(r))
        except Exception as e:
            errors[r] = e

    th = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in th:
        t.start()
    for t in th:
        t.join(60)
    return errors


def test_flat_ranges_given_to_save_make_an_index(tmp_path):
    """ZeRO-like: each rank's flat partition holds pieces of two parameters; the step's INDEX merges them."""
    import asymstore
    from tests import plain_zarr_reader as plain

    def parts(r):  # a (3, 2) parameter then a (6,) one, flattened back to back, 6 elements per rank
        if r == 0:
            return {"flat": [gm.Piece("a", "float32", (3, 2), gm.FlatRange(0, 6))]}
        return {"flat": [gm.Piece("b", "float32", (6,), gm.FlatRange(0, 6))]}

    url = str(tmp_path / "ck")
    assert _two_rank_save(url, parts) == [None, None]
    idx = gm.load_index(asymstore.backends.open_object_store(url), 1)
    assert {n: (g.shape, [(p.rank, p.local_name) for p in g.parts]) for n, g in idx.tensors.items()} == {
        "a": ((3, 2), [(0, "flat")]),
        "b": ((6,), [(1, "flat")]),
    }
    assert plain.read_global(url, 1, "a").tolist() == [[0, 1], [2, 3], [4, 5]]
    assert plain.read_global(url, 1, "b").tolist() == [6, 7, 8, 9, 10, 11]
    step_dir = tmp_path / "ck" / "step_000000000001"
    files = [p for p in step_dir.rglob("*") if p.is_file()]
    assert (step_dir / "INDEX") in files
    assert plain.read_marker(str(step_dir / "COMMIT"))["objects"] == len(files)  # INDEX counted
    with asymstore.Store([url], rank=0, world_size=2, host_memory="private") as st:  # rank 0 deletes the index
        st.delete(1)
    assert not (step_dir / "INDEX").exists() and not (step_dir / "COMMIT").exists()


def test_parts_that_do_not_cover_a_tensor_do_not_commit(tmp_path):
    import asymstore

    def parts(r):  # both ranks claim the first half of "a": the second half is never stored
        return (
            {"flat": [gm.Piece("a", "float32", (12,), gm.FlatRange(0, 6))]}
            if r == 0
            else {"flat": [gm.Piece("a", "float32", (12,), gm.FlatRange(3, 6))]}
        )

    url = str(tmp_path / "ck")
    errors = _two_rank_save(url, parts)
    assert errors[1] is None
    assert "overlap without being identical" in str(errors[0])
    with asymstore.open_store(url) as st:
        assert st.steps() == []


def test_single_rank_manifests_without_global_tensors_are_unchanged(tmp_path):
    import torch

    import asymstore
    from tests import plain_zarr_reader as plain

    url = str(tmp_path / "ck")
    with asymstore.Store([url], host_memory="private") as st:
        st.save({"w": torch.ones(3)}, 1)
        st.save({"w": torch.ones(4)}, 2, global_parts={"w": gm.Piece("W", "float32", (8,), gm.FlatRange(4, 4))})
        assert torch.equal(st.restore(2)["w"], torch.ones(4))  # the local tensor, as stored
        with pytest.raises(ConfigError, match=r"global_parts\['w'\]: piece 0 is bfloat16, the stored tensor float32"):
            st.save({"w": torch.ones(4)}, 3, global_parts={"w": gm.Piece("W", "bfloat16", (8,), gm.FlatRange(4, 4))})
    assert "global_parts" not in plain.manifest(url, 1)
    assert list(plain.manifest(url, 1))[-1] == "user"  # no new member, the order of section 4
    assert plain.manifest(url, 2)["global_parts"] == {"w": [["W", "float32", [8], 0, "flat", 4, 4]]}
    with pytest.raises(CorruptCheckpointError, match=r"hold 4 elements.*has 8"):  # half of W: not an index
        gm.load_index(asymstore.backends.open_object_store(url), 2)


def test_hostile_global_parts_are_refused_naming_the_member(tmp_path):
    import copy

    import torch

    import asymstore
    from asymstore import validate
    from tests import plain_zarr_reader as plain

    url = str(tmp_path / "ck")
    with asymstore.Store([url], host_memory="private") as st:
        st.save({"w": torch.ones(4)}, 1, global_parts={"w": gm.Piece("W", "float32", (8,), gm.FlatRange(4, 4))})
    good = plain.manifest(url, 1)
    validate.manifest(good, "m", step=1)
    for change, match in [
        (lambda m: m["global_parts"].update(x=m["global_parts"]["w"]), r"global_parts\['x'\]: no tensor"),
        (lambda m: m["global_parts"]["w"][0].__setitem__(3, 1), r"needs elements \[1, 5\), it has 4"),
        (lambda m: m["global_parts"]["w"][0].__setitem__(5, 5), r"flat range \[5, 9\) is not inside"),
        (lambda m: m["global_parts"]["w"][0].__setitem__(1, "int32"), "piece 0 is int32"),
        (lambda m: m.__setitem__("global_parts", []), "global_parts: expected a JSON object"),
    ]:
        bad = copy.deepcopy(good)
        change(bad)
        with pytest.raises(CorruptCheckpointError, match=match):
            validate.manifest(bad, "step_000000000001/zarr.json", step=1)
