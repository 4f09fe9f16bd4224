"""Consolidation and export: real key names, tied weights, Hugging Face folders from_pretrained loads, DCP steps
of several ranks stitched into full tensors, what is refused, and the DCP bridge."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import asymstore
from asymstore import Store
from asymstore.cli import main as cli
from asymstore.export import (
    ConsolidationError,
    consolidate,
    dcp_to_torch_save,
    export_safetensors,
    open_step,
    parse_size,
    tensor_paths,
)

safetensors_torch = pytest.importorskip("safetensors.torch")
SMALL = {"chunk_bytes": 64 * 1024, "partition_bytes": 256 * 1024, "compression": "none", "host_memory": "private"}


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    wte = torch.randn(10, 4, generator=g)
    return {
        "model": {
            "wte.weight": wte,
            "h.0.attn/qkv": torch.randn(4, 12, generator=g).to(torch.bfloat16),  # a '/' inside a key
            "50%": torch.arange(3),
            "lm_head.weight": wte,  # tied
        },
        "optim": {"state": {0: {"exp_avg": torch.randn(10, 4, generator=g)}}, "param_groups": [{"lr": 0.1}]},
        "step": 3,
    }


def _save(root: str, state: Any, step: int = 1, **kw: Any) -> None:
    with Store([root], **{**SMALL, **kw}) as s:
        s.save(state, step)


def test_real_names_ties_and_selection(tmp_path: Path) -> None:
    root = str(tmp_path / "ck")
    st = _state()
    _save(root, st)
    sd = consolidate(root)
    assert list(sd) == [
        "model.wte.weight",
        "model.h.0.attn/qkv",
        "model.50%",
        "model.lm_head.weight",
        "optim.state.0.exp_avg",
    ]
    assert sd["model.lm_head.weight"] is sd["model.wte.weight"]  # tied: one tensor under both names
    for k, v in st["model"].items():
        assert torch.equal(sd[f"model.{k}"], v) and sd[f"model.{k}"].dtype == v.dtype
    model = consolidate(root, filters=["model.*"], strip_prefix="model.")
    assert set(model) == set(st["model"])
    assert set(consolidate(root, sep="/")) >= {"model/h.0.attn/qkv", "optim/state/0/exp_avg"}
    assert tensor_paths({"a": {"__tensor__": "a"}, "____k": [{"__tensor__": "x"}]}) == [
        (("a",), "a"),
        (("__k", "0"), "x"),
    ]

    # the command: safetensors loads it; names, ties, rename, strip; --json summary
    out = str(tmp_path / "all.safetensors")
    assert cli(["-q", "export", root, out, "--strip-prefix", "model.", "--rename", "50%=fifty"]) == 0
    got = safetensors_torch.load_file(out)
    assert set(got) == {"wte.weight", "h.0.attn/qkv", "fifty", "lm_head.weight", "optim.state.0.exp_avg"}
    assert torch.equal(got["lm_head.weight"], st["model"]["wte.weight"])
    # '{"a.b": t}' and '{"a": {"b": t}}' would clash under '.': refused (exit 1), fine with --sep /
    clash = str(tmp_path / "clash")
    _save(clash, {"a.b": torch.ones(1), "a": {"b": torch.zeros(1)}})
    assert cli(["-q", "export", clash, str(tmp_path / "c.safetensors")]) == 1
    assert not (tmp_path / "c.safetensors").exists()
    assert cli(["-q", "export", clash, str(tmp_path / "c.safetensors"), "--sep", "/"]) == 0
    assert set(safetensors_torch.load_file(str(tmp_path / "c.safetensors"))) == {"a.b", "a/b"}


def test_json_summary_and_option_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "ck")
    _save(root, _state())
    capsys.readouterr()
    assert cli(["export", root, str(tmp_path / "m"), "--hf", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["step"] == 1 and doc["kind"] == "single" and doc["ranks"] == 1
    assert doc["tied"] == [["wte.weight", "lm_head.weight"]]
    assert {t["name"] for t in doc["tensors"]} == set(_state()["model"])  # --hf: the model's own state dict
    assert doc["files"] == [{"path": str(tmp_path / "m" / "model.safetensors"), "tensors": 4}]
    # weights already there: refused without --force
    assert cli(["-q", "export", root, str(tmp_path / "m"), "--hf"]) == 1
    assert cli(["-q", "export", root, str(tmp_path / "m"), "--hf", "--force"]) == 0
    assert cli(["-q", "export", root, str(tmp_path / "x.safetensors"), "--config", "c.json"]) == 2  # needs --hf
    assert cli(["-q", "export", root, str(tmp_path / "m"), "--hf", "--force", "--max-shard-size", "lots"]) == 1
    (tmp_path / "gen.json").write_text('{"max_new_tokens": 5}')
    (tmp_path / "bad.json").write_text("{not json")
    args = [
        "-q",
        "export",
        root,
        str(tmp_path / "m"),
        "--hf",
        "--force",
        "--generation-config",
        str(tmp_path / "gen.json"),
    ]
    assert cli(args) == 0 and json.loads((tmp_path / "m" / "generation_config.json").read_text()) == {
        "max_new_tokens": 5
    }
    assert cli([*args, "--config", str(tmp_path / "bad.json")]) == 1
    doc = export_safetensors(root, tmp_path / "lib.safetensors", filters=["optim.*"])  # the library call
    assert [t["name"] for t in doc["tensors"]] == ["optim.state.0.exp_avg"]
    assert set(safetensors_torch.load_file(str(tmp_path / "lib.safetensors"))) == {"optim.state.0.exp_avg"}
    capsys.readouterr()
    shard = next(p for p in Path(root).rglob("c/0") if p.is_file())
    raw = bytearray(shard.read_bytes())
    raw[5] ^= 0xFF  # a flipped byte: exit 1, a JSON document saying so, no file
    shard.write_bytes(bytes(raw))
    assert cli(["export", root, str(tmp_path / "bad.safetensors"), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False and not (tmp_path / "bad.safetensors").exists()
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 << 20 and parse_size("1.5KB") == 1500


def test_lazy_access_by_real_key_path(tmp_path: Path) -> None:
    root = str(tmp_path / "ck")
    st = {"with/slash": torch.ones(2), "model": {"h/0": torch.zeros(3), "lm_head.weight": torch.arange(4.0)}}
    st["model"]["tied"] = st["model"]["lm_head.weight"]
    _save(root, st)
    ck = asymstore.open_checkpoint(root)
    assert torch.equal(ck["with/slash"].read(), torch.ones(2))  # the state's key
    assert torch.equal(ck["with%2Fslash"].read(), torch.ones(2))  # the stored name still works
    assert torch.equal(ck["model/h/0"].read(), torch.zeros(3)) and torch.equal(ck["model.h/0"].read(), torch.zeros(3))
    assert torch.equal(ck["model.tied"].read(), torch.arange(4.0))  # a tied name
    assert "with/slash" in ck and "nope" not in ck
    with pytest.raises(KeyError, match="nope"):
        ck["nope"]


def test_multi_rank_steps_without_metadata_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two ranks' plain Store parts: asymstore cannot tell sharded from replicated, so 'all' is refused (exit 1);
    one rank's part is exported on request."""
    root = str(tmp_path / "ck")
    s0 = Store([root], rank=0, world_size=2, commit_timeout_s=30, **SMALL)
    s1 = Store([root], rank=1, world_size=2, commit_timeout_s=30, **SMALL)
    try:
        s1.save({"w": torch.full((2,), 1.0)}, 1)
        s0.save({"w": torch.full((2,), 0.0)}, 1, blocking=False).result(30)
    finally:
        s0.close()
        s1.close()
    with pytest.raises(ConsolidationError, match="2 ranks without global tensor metadata"):
        consolidate(root)
    capsys.readouterr()
    out = str(tmp_path / "x.safetensors")
    assert cli(["export", root, out]) == 1
    assert "--rank" in capsys.readouterr().err and not os.path.exists(out)
    assert cli(["-q", "export", root, out, "--rank", "1"]) == 0
    assert torch.equal(safetensors_torch.load_file(out)["w"], torch.full((2,), 1.0))
    assert cli(["-q", "export", root, out, "--rank", "2"]) == 1


def test_zero_partitions_without_layout_are_refused(tmp_path: Path) -> None:
    """A state laid out as the DeepSpeed hook's for ZeRO-1+ but without the partition layout (flat partitions,
    no record of which parameter ranges they hold) cannot be consolidated: refused, exit 1."""
    root = str(tmp_path / "ck")
    _save(root, {"deepspeed": {"zero_stage": 2, "world_size": 1, "rank": 0}, "zero": {"fp32": [torch.ones(8)]}})
    with pytest.raises(ConsolidationError, match="ZeRO-2 flat partitions that cannot be consolidated"):
        open_step(root)
    assert cli(["-q", "export", root, str(tmp_path / "x.safetensors")]) == 1


@pytest.mark.slow
def test_deepspeed_zero2_two_ranks_exports_fp32_parameters(tmp_path: Path) -> None:
    """Real DeepSpeed, ZeRO-2 on 2 gloo ranks through DeepSpeedAsymCheckpointer: export writes every parameter
    whole, its fp32 master weights equal to DeepSpeed's own accessors' after the same step."""
    pytest.importorskip("deepspeed")
    from tests.test_deepspeed_elastic import run

    store = tmp_path / "ckpt"
    run("etrain", {"out": str(tmp_path), "store": str(store), "stage": 2, "steps": 2}, tmp_path, 2)
    want = torch.load(tmp_path / "eref_save.pt", weights_only=False)["fp32"]
    contents = open_step(str(store))
    assert contents.kind == "deepspeed" and contents.ranks == 2
    sd = consolidate(str(store))
    assert set(want) <= set(sd)
    for k, v in want.items():
        assert sd[k].dtype == torch.float32 and torch.equal(sd[k], v), k
    out = str(tmp_path / "hf")
    assert cli(["-q", "export", str(store), out, "--hf"]) == 0
    got = safetensors_torch.load_file(os.path.join(out, "model.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in want.items())
    assert cli(["-q", "export", str(store), str(tmp_path / "r.safetensors"), "--rank", "1"]) == 1


# --- Hugging Face models ---------------------------------------------------------------------------------------
def _train(model: torch.nn.Module, vocab: int, root: str, *, hooks: bool, steps: int = 3) -> None:
    """A few AdamW steps; checkpointed through the project's AsymCheckpointer hooks (every step), or saved with
    Store.save as ``{"model", "optim", "step"}`` after the last one."""
    from asymstore.trainer_hooks.torch_hooks import AsymCheckpointer

    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    store = asymstore.open_store(root, **SMALL)
    with AsymCheckpointer(model, opt, store, every=1) if hooks else contextlib.nullcontext():
        for _ in range(steps):
            ids = torch.randint(0, vocab, (2, 12), generator=g)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
    if not hooks:
        store.save({"model": model.state_dict(), "optim": opt.state_dict(), "step": steps}, steps)
    store.close()
    model.eval()


def _tiny(kind: str) -> tuple[torch.nn.Module, Any, Any]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97, n_positions=32)
        return transformers.GPT2LMHeadModel(cfg), cfg, transformers.AutoModelForCausalLM
    cfg = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=97,
        max_position_embeddings=32,
    )  # fmt: skip
    return transformers.BertForMaskedLM(cfg), cfg, transformers.AutoModelForMaskedLM


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_hf_export_loads_with_from_pretrained(tmp_path: Path, kind: str) -> None:
    model, cfg, auto = _tiny(kind)
    root = str(tmp_path / "ck")
    _train(model, cfg.vocab_size, root, hooks=kind == "gpt2")  # GPT-2 through the hooks, BERT through Store
    cfg.to_json_file(str(tmp_path / "config.json"))
    ids = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    one, sharded = tmp_path / "hf", tmp_path / "hf-sharded"
    assert cli(["-q", "export", root, str(one), "--hf", "--config", str(tmp_path / "config.json")]) == 0
    assert sorted(os.listdir(one)) == ["config.json", "model.safetensors"]
    args = ["-q", "export", root, str(sharded), "--hf", "--config", str(tmp_path / "config.json")]
    assert cli([*args, "--max-shard-size", "40KB"]) == 0
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    sd = model.state_dict()
    assert set(index["weight_map"]) == set(sd)  # every name state_dict() lists, tied ones included
    for folder in (one, sharded):
        loaded: dict[str, torch.Tensor] = {}
        for f in sorted(folder.glob("*.safetensors")):
            loaded.update(safetensors_torch.load_file(str(f)))
        assert set(loaded) == set(sd) and all(torch.equal(loaded[k], v) for k, v in sd.items())
        back = auto.from_pretrained(str(folder)).eval()
        with torch.no_grad():
            assert torch.equal(back(input_ids=ids).logits, want), folder


# --- DCP steps ----------------------------------------------------------------------------------------------------
def test_dcp_single_process_export_and_torch_save_bridge(tmp_path: Path) -> None:
    """A DCP step: full tensors under DCP's FQNs; ``dcp_to_torch_save`` gives what torch's own gives for the
    same state saved with DCP's FileSystemWriter."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save as torch_dcp_to_torch_save

    from asymstore.trainer_hooks.dcp import AsymStorageReader, AsymStorageWriter

    st = _state()
    state = {"model": dict(st["model"]), "optim": st["optim"], "meta": {"epoch": 2}}
    url = str(tmp_path / "ck")
    w = AsymStorageWriter(url)
    dcp.save(state, storage_writer=w, checkpoint_id=f"{url}/step_7")
    w.close()
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp_path / "fs")))

    sd = consolidate(url)
    assert open_step(url).kind == "dcp" and open_step(url).skipped == ["optim.param_groups.0.lr", "meta.epoch"]
    for k, v in st["model"].items():
        assert torch.equal(sd[f"model.{k}"], v) and sd[f"model.{k}"].dtype == v.dtype
    assert torch.equal(sd["optim.state.0.exp_avg"], st["optim"]["state"][0]["exp_avg"])

    ours, theirs = tmp_path / "ours.pt", tmp_path / "theirs.pt"
    dcp_to_torch_save(f"{url}/step_7", ours)
    torch_dcp_to_torch_save(str(tmp_path / "fs"), theirs)
    a, b = torch.load(ours, weights_only=True), torch.load(theirs, weights_only=True)
    assert a.keys() == b.keys() and a["meta"] == b["meta"] == {"epoch": 2}
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    dcp_to_torch_save(url, tmp_path / "newest.pt")  # a tier URL: its newest step
    assert torch.equal(torch.load(tmp_path / "newest.pt", weights_only=True)["model"]["50%"], torch.arange(3))

    # dcp.load by checkpoint id: DCP's auto-detection knows only its own readers, so the asymstore reader is
    # passed; the id still names the tier and the step
    target = {"model": {k: torch.zeros_like(v) for k, v in st["model"].items()}}
    dcp.load(target, checkpoint_id=f"{url}/step_7", storage_reader=AsymStorageReader())
    assert torch.equal(target["model"]["h.0.attn/qkv"], st["model"]["h.0.attn/qkv"])
    with pytest.raises(ConsolidationError, match="not written through DCP"):
        plain = str(tmp_path / "plain")
        _save(plain, {"w": torch.ones(1)})
        dcp_to_torch_save(plain, tmp_path / "x.pt")


def test_dcp_two_rank_dtensor_step_exports_full_tensors(tmp_path: Path) -> None:
    """2 gloo processes save DTensors sharded over them; export writes the full tensors, never a half."""
    from tests._dcp_worker import reference
    from tests.test_dcp import _launch

    url = str(tmp_path / "ck")
    _launch(2, "save", url, "4")
    ref = reference()
    sd = consolidate(url)
    for k, v in ref.items():
        assert sd[f"model.{k}"].shape == v.shape and torch.equal(sd[f"model.{k}"], v), k
    assert torch.equal(sd["rank_local_1"], torch.full((4,), 1.0))
    out = str(tmp_path / "full.safetensors")
    assert cli(["-q", "export", url, out]) == 0
    got = safetensors_torch.load_file(out)
    assert {k: tuple(v.shape) for k, v in got.items() if k.startswith("model.")} == {
        f"model.{k}": tuple(v.shape) for k, v in ref.items()
    }
    assert all(torch.equal(got[f"model.{k}"], v) for k, v in ref.items())
    assert cli(["-q", "export", url, str(tmp_path / "hf"), "--hf"]) == 0
    assert set(safetensors_torch.load_file(str(tmp_path / "hf" / "model.safetensors"))) == set(ref)
    with pytest.raises(ConsolidationError, match="leave --rank out"):  # a rank holds chunks only
        consolidate(url, ranks=1)


def test_store_step_of_dtensors_with_global_metadata_exports_full_tensors(tmp_path: Path) -> None:
    """2 gloo processes save DTensor shards with Store.save; the step's global tensor metadata gives full tensors
    (a tied name included), and rank 0's plain tensors come along."""
    from asymstore import globalmeta

    if not hasattr(globalmeta, "load_index"):
        pytest.skip("this build records no global tensor metadata")
    from tests._dcp_worker import reference
    from tests.test_dcp import _launch

    url = str(tmp_path / "ck")
    _launch(2, "store-save", url, "2")
    contents = open_step(url)
    assert contents.kind == "global" and contents.ranks == 2
    sd = consolidate(url, filters=["model.*"], strip_prefix="model.")
    ref = reference()
    assert list(sd) == [*ref, "tied", "buf"]
    assert all(torch.equal(sd[k], v) and sd[k].dtype == v.dtype for k, v in ref.items())
    assert torch.equal(sd["tied"], ref["w"]) and torch.equal(sd["buf"], torch.arange(5))
    assert cli(["-q", "export", url, str(tmp_path / "hf"), "--hf"]) == 0
    got = safetensors_torch.load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(got) == set(sd) and all(torch.equal(got[k], v) for k, v in sd.items())
    assert cli(["-q", "export", url, str(tmp_path / "r1.safetensors"), "--rank", "1"]) == 1  # a rank holds parts
