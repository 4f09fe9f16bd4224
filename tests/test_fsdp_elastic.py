"""FSDP2 / DTensor checkpoints restored on any world size through :class:`AsymCheckpointer` (real gloo ranks).

Each case trains an FSDP2 MLP (odd layer sizes, so shards are uneven and, on 4 ranks, some are empty) with AdamW
and StepLR for 7 steps on N ranks, checkpointing step 4 asymmetrically, and records the digests of the full state
right after step 4 and the losses of steps 5-7. Then M ranks (a model with other initial values) resume:

* the restored state (every parameter, AdamW ``exp_avg``, ``exp_avg_sq`` and ``step``, the learning rate and the
  scheduler) is bit-identical to the state before the save, compared through digests of the gathered tensors;
* each rank read only parts of the stored shards (the bytes read are counted);
* 3 more training steps on M ranks: on an unchanged world size their losses are bit-identical to the uninterrupted
  run's. On another world size the arithmetic differs (the loss and gradient reductions sum over another number
  of ranks in another order), so bit-identity is not expected there: the state is compared exactly and the losses
  only to 1e-5 relative.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import asymstore
from asymstore import globalmeta as gm
from asymstore.errors import CorruptCheckpointError
from tests import plain_zarr_reader as plain
from tests.ranks import launch_ranks


def _launch(n: int, out: Path, **args) -> list[dict]:
    """Run ``n`` ranks of tests/_fsdp_worker.py; their JSON results, by rank."""
    launch_ranks(n, "tests._fsdp_worker", [json.dumps({**args, "out": str(out)})], timeout_s=180)
    return [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(n)]


def _train(root: Path, n: int):
    url = str(root / f"ck{n}")
    return url, _launch(n, root / f"train{n}", mode="train", store=url, steps=7, every=4)


def _check_resume(root: Path, url: str, before: list[dict], m: int, tag: str) -> list[dict]:
    res = _launch(m, root / f"resume{tag}", mode="resume", store=url, steps=3)
    n = before[0]["world"]
    want = before[0]["digests"]
    for r in res:
        assert "error" not in r, r.get("error")
        assert r["step"] == 4
        assert r["extras"] == {"seen": 4 * 12}
        assert r["digests"] == want, f"{n}->{m}: rank {r['rank']} restored another state"
        assert r["last_resume"]["saved_ranks"] == n and r["last_resume"]["world_size"] == m
    # only the needed parts are read: together the ranks read about one copy of the parameters and moments
    stored = sum(int(r["last_resume"]["bytes"]) for r in res)
    assert stored > 0
    uninterrupted = before[0]["losses"][4:]
    got = res[0]["losses"]
    if m == n:
        assert got == uninterrupted, "same world size: the same arithmetic, the same losses"
    else:
        np.testing.assert_allclose(got, uninterrupted, rtol=1e-5)
    return res


@pytest.fixture(scope="module")
def saved2(tmp_path_factory):
    """One training run on 2 ranks (checkpoint of step 4), shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("fsdp2")
    url, lower = str(root / "ck2"), str(root / "ck2-lower")  # two tiers: the step reaches both
    before = _launch(2, root / "train2", mode="train", store=[url, lower], steps=7, every=4)
    assert before[0]["digests"] == before[1]["digests"]
    return root, url, before


def test_two_ranks_save_an_index_and_resume_on_one(saved2):
    root, url, before = saved2
    with asymstore.open_store(url) as store:
        assert store.steps() == [4]
        idx = gm.load_index(store.tiers[0].backend, 4)
        assert idx.ranks == 2
        w = idx.tensors["model/0.weight"]
        assert (w.dtype, w.shape) == ("float32", (257, 7))
        assert sorted((p.rank, p.region) for p in w.parts) == [
            (0, gm.box([0, 0], [129, 7])),
            (1, gm.box([129, 0], [128, 7])),
        ]
        assert "optimizers/0/state/0/exp_avg" in idx.tensors
    one = _check_resume(root, url, before, 1, "2to1")
    assert one[0]["last_resume"]["ranks"] == [0, 1]


@pytest.mark.slow
def test_two_ranks_resume_on_two_and_three(saved2):
    root, url, before = saved2
    same = _check_resume(root, url, before, 2, "2to2")
    assert same[0]["last_resume"]["ranks"] == [0] and same[1]["last_resume"]["ranks"] == [1]
    three = _check_resume(root, url, before, 3, "2to3")
    # each of 3 ranks reads about a third of what one rank reads alone
    whole = sum(int(r["last_resume"]["bytes"]) for r in same)
    assert max(int(r["last_resume"]["bytes"]) for r in three) < whole * 0.6


@pytest.mark.slow
def test_four_ranks_resume_on_two(tmp_path):
    url, before = _train(tmp_path, 4)
    _check_resume(tmp_path, url, before, 2, "4to2")


def test_flipped_byte_in_one_ranks_shard_is_detected_on_resume(saved2, tmp_path):
    """Only part of rank 1's directory is read, and still verified: a flipped byte in it is read from the lower
    tier instead; flipped on both tiers, resume fails naming the object."""
    _, url0, before = saved2
    urls = [str(tmp_path / "ck"), str(tmp_path / "ck-lower")]
    shutil.copytree(url0, urls[0])
    shutil.copytree(url0 + "-lower", urls[1])
    m = plain.manifest(urls[0], 4, 1)
    e = next(t for t in m["layout"]["tensors"] if t[0] == "model/0.weight")
    for k, url in enumerate(urls):
        shard = Path(url) / "step_000000000004" / "r00001" / "raw" / "c" / "0"
        data = bytearray(shard.read_bytes())
        data[e[3] + 5] ^= 0x40  # inside rank 1's shard of the first weight
        shard.write_bytes(bytes(data))
        res = _launch(1, tmp_path / f"bad{k}", mode="resume", store=urls, steps=1)
        if k == 0:
            assert "error" not in res[0], res[0]["error"]
            assert res[0]["digests"] == before[0]["digests"]
        else:
            assert "CorruptCheckpointError" in res[0]["error"] and "r00001" in res[0]["error"], res[0]["error"]


def test_store_save_of_dtensors_writes_an_index_a_plain_reader_follows(tmp_path):
    """Store.save of DTensors on 2 ranks: manifests carry global_parts, the step an INDEX whose crc is in the
    global marker, and the reference reader (zarr + json + numpy only) reassembles every global tensor."""
    from tests._fsdp_worker import reference

    url = str(tmp_path / "ck")
    res = _launch(2, tmp_path / "save", mode="save", store=url, step=3)
    assert [r["boxes_agree"] for r in res] == [True, True]
    marker = plain.read_marker(str(Path(url) / "step_000000000003" / "COMMIT"))
    assert marker["ranks"] == 2 and "index_crc32c" in marker
    ref = reference()
    for name in ("w", "v", "r"):
        got = plain.read_global(url, 3, f"model/{name}")
        assert got.shape == tuple(ref[name].shape)
        assert got.tobytes() == ref[name].contiguous().view(torch.uint8).numpy().tobytes(), name
    m1 = plain.manifest(url, 3, 1)
    assert m1["global_parts"]["model/w"] == [["model/w", "float32", [13, 7], 0, "box", [7, 0], [6, 7]]]
    assert m1["global_parts"]["model/r"] == [["model/r", "int64", [6], 0, "box", [0], [6]]]
    assert "own" not in m1["global_parts"]
    with asymstore.open_store(url) as store:  # the index is checked when read: a damaged INDEX is refused
        idx = gm.load_index(store.tiers[0].backend, 3)
        assert set(idx.tensors) == {"model/w", "model/v", "model/r"}
    index = Path(url) / "step_000000000003" / "INDEX"
    index.write_bytes(index.read_bytes().replace(b'"ranks":2', b'"ranks":3'))
    with asymstore.open_store(url) as store, pytest.raises(CorruptCheckpointError, match="index_crc32c"):
        gm.load_index(store.tiers[0].backend, 3)
