"""torch.distributed.checkpoint on asymstore: real dcp.save/load/async_save, multi-process resharding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import asymstore
from asymstore.errors import StepExistsError
from asymstore.trainer_hooks.dcp import (
    AsymStorageReader,
    AsymStorageWriter,
    WeightsOnlyLoadPlanner,
    metadata_from_json,
    metadata_to_json,
    parse_checkpoint_id,
)
from tests.helpers import assert_bitequal
from tests.ranks import launch_ranks

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).to(torch.float32)
    m[2].to(torch.bfloat16)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(2):
        m[2](m[1](m[0](torch.randn(3, 8))).to(torch.bfloat16)).float().sum().backward()
        opt.step()
        opt.zero_grad()
    return m, opt


def _state(seed: int) -> dict:
    m, opt = _model(seed)
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6) * (seed + 1)
    return {
        "model": m.state_dict(),
        "optim": opt.state_dict(),
        "extra": {"epoch": seed, "name": f"run{seed}", "lr": [0.1 * seed, 2.0]},
        "scalar": torch.tensor(seed, dtype=torch.int64),
        "strided": base.t()[1:5],  # non-contiguous view
        "empty": torch.empty(0, 3),
    }


def _clone(state):
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {k: _clone(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_clone(v) for v in state]
    return state


def test_checkpoint_id_maps_to_url_and_step(tmp_path):
    assert parse_checkpoint_id(f"{tmp_path}/step_12") == (str(tmp_path), 12)
    assert parse_checkpoint_id("hdfs://nn:8020/ckpt/step_000000000003/") == ("hdfs://nn:8020/ckpt", 3)
    assert AsymStorageWriter.validate_checkpoint_id("/x/step_1")
    assert not AsymStorageReader.validate_checkpoint_id("/x/checkpoint")
    with pytest.raises(ValueError):
        parse_checkpoint_id("/x/y")


def test_save_load_bit_exact_without_process_group(tmp_path):
    saved = _state(1)
    want = _clone(saved)
    w = AsymStorageWriter(str(tmp_path))
    md = dcp.save(saved, storage_writer=w, checkpoint_id=f"{tmp_path}/step_5")
    assert w.last_step == 5
    w.close()

    target = _state(2)  # different values, same structure
    dcp.load(target, storage_reader=AsymStorageReader(str(tmp_path)), checkpoint_id=f"{tmp_path}/step_5")
    assert_bitequal(dict(target["model"]), want["model"])
    assert_bitequal(target["optim"]["state"], want["optim"]["state"])
    assert target["extra"] == want["extra"]  # bytes items (pickled by DCP)
    assert_bitequal(target["scalar"], want["scalar"])
    assert_bitequal(target["strided"], want["strided"])

    # the step is an ordinary asymstore step; DCP's metadata is JSON in rank 0's manifest
    with asymstore.open_store(str(tmp_path)) as store:
        assert store.steps() == [5]
        ck = store.open_checkpoint(5)
        doc = ck.user["dcp"]
        json.dumps(doc)  # plain JSON
        back = metadata_from_json(json.loads(json.dumps(doc)))
        assert back.state_dict_metadata == md.state_dict_metadata
        assert back.planner_data == md.planner_data
        assert metadata_to_json(back) == doc
        # tensors are stored under "<fqn>@<offsets>", bytes items as uint8
        assert "model.0.weight@0,0" in ck and ck["extra.name"].dtype == torch.uint8
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert not p.read_bytes().startswith(b"\x80"), f"{p} looks like a pickle"


def test_step_defaults_and_existing_step_refused(tmp_path):
    w = AsymStorageWriter(str(tmp_path))
    dcp.save({"a": torch.ones(3)}, storage_writer=w)
    dcp.save({"a": torch.full((3,), 2.0)}, storage_writer=w)  # newest + 1
    assert w.last_step == 1
    with pytest.raises(CheckpointException) as ei:  # DCP wraps errors per rank
        dcp.save({"a": torch.zeros(3)}, storage_writer=AsymStorageWriter(str(tmp_path), step=1))
    assert isinstance(ei.value.failures[0][0], StepExistsError)
    w.close()
    got = {"a": torch.zeros(3)}
    dcp.load(got, storage_reader=AsymStorageReader(str(tmp_path)))  # newest step
    assert torch.equal(got["a"], torch.full((3,), 2.0))
    got = {"a": torch.zeros(3)}
    dcp.load(got, storage_reader=AsymStorageReader(str(tmp_path), step=0))
    assert torch.equal(got["a"], torch.ones(3))


def test_async_save_thread_mode(tmp_path):
    m, opt = _model(3)
    state = {"model": m.state_dict(), "optim": opt.state_dict()}
    want = _clone(state)
    w = AsymStorageWriter(str(tmp_path))
    fut = dcp.async_save(state, storage_writer=w, checkpoint_id=f"{tmp_path}/step_1")
    fut = getattr(fut, "upload_completion", fut)
    with torch.no_grad():  # training goes on: the staged copy is what gets saved
        for p in m.parameters():
            p.add_(1)
    fut.result(timeout=60)
    w.close()
    target = {"model": _model(4)[0].state_dict(), "optim": _model(4)[1].state_dict()}
    dcp.load(target, storage_reader=AsymStorageReader(str(tmp_path), step=1))
    assert_bitequal(dict(target["model"]), want["model"])
    assert_bitequal(target["optim"]["state"], want["optim"]["state"])


def test_weights_only_planner_loads_plain_values(tmp_path):
    w = AsymStorageWriter(str(tmp_path))
    dcp.save({"t": torch.ones(2), "cfg": {"k": [1, 2.5, "x"]}}, storage_writer=w, checkpoint_id=f"{tmp_path}/step_0")
    w.close()
    got = {"t": torch.zeros(2), "cfg": {"k": []}}
    dcp.load(got, storage_reader=AsymStorageReader(str(tmp_path), step=0), planner=WeightsOnlyLoadPlanner())
    assert got["cfg"] == {"k": [1, 2.5, "x"]} and torch.equal(got["t"], torch.ones(2))


# --- several processes (gloo) ----------------------------------------------------------
def _launch(n: int, *args: str) -> None:
    """Run ``n`` ranks of tests/_dcp_worker.py."""
    launch_ranks(n, "tests._dcp_worker", args, timeout_s=120)


@pytest.mark.slow
def test_two_ranks_save_then_load_on_one_and_three(tmp_path):
    from tests._dcp_worker import reference

    url = str(tmp_path / "ck")
    _launch(2, "save", url, "4")

    with asymstore.open_store(url) as store:  # one step, two shards, one global commit
        assert store.steps() == [4]
        assert store.tiers[0].commit_info(4)["ranks"] == 2
        assert "rank_local_1@0" in store.tiers[0].reader(4, 1).manifest.layout.by_name()

    # world size 1, no process group: full tensors assembled from both ranks' chunks
    ref = reference()
    target = {
        "model": {k: torch.zeros_like(v) for k, v in ref.items()},
        "meta": {"step": 0, "tag": ""},
        "rank_local_0": torch.zeros(4),
        "rank_local_1": torch.zeros(4),
    }
    dcp.load(target, storage_reader=AsymStorageReader(url, step=4))
    assert_bitequal(target["model"], ref)
    assert target["meta"] == {"step": 4, "tag": "run-a"}
    assert torch.equal(target["rank_local_1"], torch.full((4,), 1.0))

    # world size 3: DTensor shards of another size; DCP's planner reshards
    out = str(tmp_path / "load3")
    _launch(3, "load", url, "4", out)
    for r in range(3):
        got = json.loads(Path(f"{out}.rank{r}.json").read_text())
        assert got.pop("meta") == {"step": 4, "tag": "run-a"}
        for k, d in got.items():
            assert d["got"] == d["want"], f"rank {r} of 3: {k} differs"


def test_two_tiers_metadata_travels_with_the_step(tmp_path):
    """The DCP metadata lives in rank 0's manifest, so a lower tier alone can serve dcp.load."""
    fast, slow = str(tmp_path / "nvme"), str(tmp_path / "hdfs-like")
    saved = {"w": torch.arange(10, dtype=torch.float32), "cfg": {"a": 1}}
    w = AsymStorageWriter([fast, slow])
    dcp.save(saved, storage_writer=w, checkpoint_id=f"{fast}/step_3")
    w.close()  # waits for the promotion to the second tier
    got = {"w": torch.zeros(10), "cfg": {"a": 0}}
    dcp.load(got, storage_reader=AsymStorageReader(slow, step=3))
    assert torch.equal(got["w"], saved["w"]) and got["cfg"] == {"a": 1}
