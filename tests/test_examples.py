"""CI smoke test of examples/: every family trains a few steps with checkpointing and resumes.

Each example runs as a subprocess (as a user runs it), tiny preset, 3-4 steps, with a timeout.
GPT-2 and ResNet are SIGKILLed mid-run (``--kill-at 3``), resumed (``--resume``) from step 3 and must end
bit-identical to an uninterrupted run; the others run, then resume from their last checkpoint.
The independent chains run concurrently (most of a run is interpreter and transformers start-up).
``examples/demo.py`` (``./run.sh demo``) runs once with the tiny preset: its whole story is checked.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIMEOUT = 240
STEPS = 4


def _env(**extra: str) -> dict[str, str]:
    return dict(
        os.environ,
        **extra,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        COLUMNS="120",
        TRANSFORMERS_VERBOSITY="error",
        HF_HUB_OFFLINE="1",
    )


def _run(name: str, *args: str, tmp: Path, tag: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    out = tmp / f"{name}-{tag}.json"
    cmd = [sys.executable, str(EXAMPLES / f"{name}.py"), "--threads", "1", "--summary-json", str(out), *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env(**(env or {})), cwd=ROOT)
    res: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    res["_rc"], res["_stdout"], res["_stderr"] = p.returncode, p.stdout, p.stderr
    return res


def _straight(name: str, tmp: Path) -> dict[str, dict[str, Any]]:
    """An uninterrupted run, the reference for the killed one."""
    return {
        "straight": _run(name, "--steps", str(STEPS), "--dir", str(tmp / f"{name}-straight"), tmp=tmp, tag="straight")
    }


def _kill_chain(name: str, tmp: Path) -> dict[str, dict[str, Any]]:
    """A run SIGKILLed at step 3, then resumed to the last step."""
    d = tmp / f"{name}-killed"
    return {
        "killed": _run(name, "--steps", str(STEPS), "--kill-at", "3", "--dir", str(d), tmp=tmp, tag="killed"),
        "resumed": _run(name, "--steps", str(STEPS), "--resume", "--dir", str(d), tmp=tmp, tag="resumed"),
    }


def _kill_chain_private(name: str, tmp: Path) -> dict[str, dict[str, Any]]:
    """The same with host slots in private memory: the kill waits until step 3 is durable on --dir."""
    args = ("--steps", str(STEPS), "--dir", str(tmp / f"{name}-killed-private"))
    env = {"ASYMSTORE_HOST_MEMORY": "private"}
    return {
        "killed-private": _run(name, *args, "--kill-at", "3", tmp=tmp, tag="killed-private", env=env),
        "resumed-private": _run(name, *args, "--resume", tmp=tmp, tag="resumed-private", env=env),
    }


def _resume_chain(name: str, tmp: Path) -> dict[str, dict[str, Any]]:
    """3 steps, a clean exit, then ``--resume`` to step 4 (another strategy, to cover them all)."""
    d = tmp / name
    strategy = {"bert": "sync", "roberta": "checkfreq", "bloom": "uniform", "vit": "asym"}[name]
    return {
        "first": _run(name, "--steps", "3", "--strategy", strategy, "--dir", str(d), tmp=tmp, tag="first"),
        "resumed": _run(
            name, "--steps", str(STEPS), "--resume", "--strategy", strategy, "--dir", str(d), tmp=tmp, tag="resumed"
        ),
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, dict[str, Any]]]:
    tmp = tmp_path_factory.mktemp("examples")
    jobs = [(n, f, n) for n in ("gpt2", "resnet") for f in (_kill_chain, _straight)]
    jobs += [("gpt2", _kill_chain_private, "gpt2")]
    jobs += [(n, _resume_chain, n) for n in ("bert", "roberta", "bloom", "vit")]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    # chains of at most two runs, four at a time: about 3 minutes on a busy 2-core machine
    with ThreadPoolExecutor(max_workers=int(os.environ.get("ASYMSTORE_EXAMPLE_JOBS", "4"))) as pool:
        futs = [(n, pool.submit(f, arg, tmp)) for n, f, arg in jobs]
        for n, fut in futs:
            out.setdefault(n, {}).update(fut.result())
    return out


def _ok(r: dict[str, Any]) -> None:
    assert r["_rc"] == 0, f"rc={r['_rc']}\nstdout:\n{r['_stdout'][-3000:]}\nstderr:\n{r['_stderr'][-3000:]}"
    assert r["check"]["bit_identical"] and r["check"]["verify_ok"], r["check"]
    assert "summary" in r["_stdout"] and "median stall per checkpoint" in r["_stdout"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gpt2", "resnet"])
def test_kill_and_resume_is_bit_identical(runs: dict[str, Any], name: str) -> None:
    r = runs[name]
    _ok(r["straight"])
    k = r["killed"]
    assert k["_rc"] == -signal.SIGKILL, (k["_rc"], k["_stdout"][-2000:], k["_stderr"][-2000:])
    # the kill came once the checkpoint of step 3 was reported: committed in host shared memory, or durable
    info = json.loads(k["_stdout"].split("[kill-at] SIGKILL at step 3:")[1].splitlines()[0])
    assert info["checkpoint"] == 3 and "host" in info["where"]
    if not info["shared_host_slots"]:
        assert 3 in info["durable"]  # private host memory dies with the process: the hook waited for the disk
    res = r["resumed"]
    _ok(res)
    assert res["resumed_from"] == 3, (res["resumed_from"], res["resumed_tier"], res["resumed_detail"])
    if info["shared_host_slots"]:  # the killed process's committed slot, verified, not the file tier
        assert res["resumed_tier"] == "host", (res["resumed_tier"], res["resumed_detail"])
        assert f"left by pid {info['pid']}" in res["resumed_detail"]
    else:
        assert res["resumed_tier"] == "file"
    assert "resumed from step 3 (" in res["_stdout"] and "step 3 from " in res["_stdout"]
    assert res["final_step"] == STEPS and res["iterations"] == STEPS - 3
    # same batches, same RNG (dropout), same optimizer and scheduler state: the same model
    assert res["state_hash"] == r["straight"]["state_hash"]


@pytest.mark.slow
def test_kill_and_resume_with_private_host_memory(runs: dict[str, Any]) -> None:
    """Private host slots die with the process: --kill-at waits until step 3 is durable, the resume reads it."""
    r = runs["gpt2"]
    k, res = r["killed-private"], r["resumed-private"]
    assert k["_rc"] == -signal.SIGKILL, (k["_rc"], k["_stdout"][-2000:], k["_stderr"][-2000:])
    info = json.loads(k["_stdout"].split("[kill-at] SIGKILL at step 3:")[1].splitlines()[0])
    assert not info["shared_host_slots"] and 3 in info["durable"] and "file" in info["where"], info
    _ok(res)
    assert not res["shared_host_slots"]
    assert res["resumed_from"] == 3 and res["resumed_tier"] == "file", (res["resumed_tier"], res["resumed_detail"])
    assert res["state_hash"] == r["straight"]["state_hash"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "roberta", "bloom", "vit"])
def test_run_then_resume(runs: dict[str, Any], name: str) -> None:
    first, res = runs[name]["first"], runs[name]["resumed"]
    _ok(first)
    assert first["iterations"] == 3 and first["checkpoints"] == 3 and first["steps"] == [1, 2, 3]
    assert first["bytes_per_checkpoint"] > 0 and first["where"]["3"][0] == "host"
    _ok(res)
    assert res["resumed_from"] == 3 and res["iterations"] == 1 and res["steps"][-1] == STEPS
    assert "file" in res["where"][str(STEPS)]
    # a clean exit leaves nothing in shared memory (keep_shm is off): the summary names the file tier
    assert res["resumed_tier"] == "file" and "step 3 from tier file" in res["_stdout"], res["resumed_detail"]


@pytest.mark.slow
def test_demo_kills_resumes_bit_identical_and_learns(tmp_path: Path) -> None:
    """./run.sh demo's story on the tiny preset: three timed runs, a SIGKILL after step 3's checkpoint was
    reported, a resume of step 3 in another process, bit-identical at step 3 and at the end, the loss falls."""
    out = tmp_path / "demo.json"
    cmd = [sys.executable, str(EXAMPLES / "demo.py"), "--preset", "tiny", "--steps", "6", "--kill-at", "3"]
    cmd += ["--threads", "1", "--out", str(tmp_path / "work"), "--summary-json", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env(), cwd=ROOT)
    assert p.returncode == 0, f"rc={p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    s = json.loads(out.read_text())
    m, kill = s["measured"], s["kill"]
    for name in ("none", "torch.save", "asymstore"):
        assert m[name]["seconds"] > 0 and len(m[name]["step_s"]) == 6, name
    assert m["asymstore"]["checkpoints"] == 6 and m["asymstore"]["steps_stored"] == [1, 2, 3, 4, 5, 6]
    assert s["variants_bit_identical"]  # checkpointing does not change the training
    losses = m["none"]["losses"]
    assert losses[-1] < losses[0] - 0.1, losses  # learnable data: the loss visibly falls
    assert s["loss_fell"] and kill["resume_losses"][-1] < kill["resume_losses"][0], kill["resume_losses"]

    assert kill["rc"] == -signal.SIGKILL
    rep, rs = kill["report"], kill["restored"]
    assert rep["checkpoint"] == 3 and rep["step"] == 3 and rep["pid"] == kill["pid"] != rs["pid"]
    assert rs["step"] == 3, rs
    if rep["shared_host_slots"]:
        assert rs["tier"] == "host" and f"left by pid {kill['pid']}" in rs["detail"], rs
    else:
        assert rs["tier"] == "file" and 3 in rep["durable"], rs
    assert s["at_kill_bit_identical"] and s["final_bit_identical"]
    assert kill["done"]["step"] == 6 and kill["done"]["steps_stored"][-1] == 6

    png = m["timeline"]["png"]
    assert png and Path(png).stat().st_size > 10_000 and Path(m["timeline"]["trace"]).stat().st_size > 0
    text = p.stdout
    assert "SIGKILL to pid" in text and f"restored step 3 from {rs['detail'] or rs['tier']}" in text
    assert text.count("the uninterrupted run's: bit-identical") == 2 and "MISMATCH" not in text and png in text


def test_list_presets_reach_the_reference_sizes() -> None:
    """The large presets are the reference runs' sizes (counted on the meta device, nothing allocated)."""
    import argparse
    import importlib.util

    from asymstore_examples.runner import count_params  # examples/ is on pytest's pythonpath (pyproject.toml)

    def load(name: str) -> Any:  # under a private name: no top-level module "gpt2" in sys.modules
        spec = importlib.util.spec_from_file_location(f"_asymstore_example_{name}", EXAMPLES / f"{name}.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    def n(name: str, preset: str) -> float:
        mod = load(name)
        p = mod.PRESETS[preset]
        return count_params(mod.EXAMPLE, p, argparse.Namespace(size=p.size, data=None)) / 1e9

    assert 9.0 < n("gpt2", "10b") < 11.0 and 0.12 < n("gpt2", "small") < 0.13
    assert 9.0 < n("bloom", "10b") < 11.0 and 0.55 < n("bloom", "560m") < 0.57
    assert 9.0 < n("bert", "10b") < 11.0 and 0.33 < n("bert", "large") < 0.34
    assert 9.0 < n("roberta", "10b") < 11.0
    assert 0.6 < n("vit", "huge") < 0.65
    assert 0.05 < n("resnet", "resnet152") < 0.07


def test_demo_refuses_to_clear_a_directory_it_did_not_make(tmp_path: Path) -> None:
    """--out pointing at a user's non-empty directory: an error, nothing deleted, no child started."""
    keep = tmp_path / "notes.txt"
    keep.write_text("mine")
    cmd = [sys.executable, str(EXAMPLES / "demo.py"), "--preset", "tiny", "--out", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=_env(), cwd=ROOT)
    assert p.returncode == 2 and "not an earlier demo's directory" in p.stderr, (p.returncode, p.stderr[-2000:])
    assert keep.read_text() == "mine" and sorted(tmp_path.iterdir()) == [keep]


def test_cycle_source_is_learnable_and_deterministic() -> None:
    """The demo's data: batch k is a pure function of k; the next token is a fixed function of the current one."""
    from asymstore_examples.data import cycle_lm_source

    src = cycle_lm_source(batch=4, seq=32, vocab_size=512, seed=3, period=16)
    a, b = src.batch(5)["input_ids"], src.batch(5)["input_ids"]
    assert torch.equal(a, b) and not torch.equal(a, src.batch(6)["input_ids"])
    assert int(a.min()) >= 5 and int(a.max()) < 512 and len(set(a.flatten().tolist())) <= 16
    succ: dict[int, int] = {}
    for row in torch.cat([src.batch(k)["input_ids"] for k in range(4)]).tolist():
        for x, y in itertools.pairwise(row):
            assert succ.setdefault(x, y) == y
    with pytest.raises(ValueError, match="period"):
        cycle_lm_source(batch=1, seq=8, vocab_size=16, seed=0, period=64)
