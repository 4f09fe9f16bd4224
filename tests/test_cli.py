"""The ``asymstore`` command line: ls, show, verify, export, and its exit codes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import asymstore
from asymstore.cli import main

safetensors_torch = pytest.importorskip("safetensors.torch")


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {
            "wte.weight": torch.randn(512, 256, generator=g),  # 512 KiB: several chunks
            "h.0.attn.weight": torch.randn(64, 64, generator=g).to(torch.bfloat16),
            "h.0.attn.bias": torch.randn(64, generator=g).to(torch.float16),
            "h.0.mlp.weight": torch.randn(32, 16, generator=g).to(torch.float8_e4m3fn),
            "tokens": torch.arange(100, dtype=torch.int64),
            "mask": torch.rand(33, generator=g) > 0.5,
        },
        "optimizer": {
            "state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.randn(100, generator=g)}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0]}],
        },
        "step": 7,
        "epoch": 1,
        "note": "hello",
    }


@pytest.fixture
def ckpt(tmp_path: Path) -> tuple[Path, Path, dict]:
    """Two tiers; steps 1 and 2 on both, step 3 only on the first; step 2 compressible."""
    a, b = tmp_path / "nvme", tmp_path / "shared"
    st = _state()
    with asymstore.open_store([str(a), str(b)], chunk_bytes=64 * 1024, partition_bytes=256 * 1024) as s:
        s.save(st, step=1, user={"run": "test", "tokens_seen": 123})
    # step 2 compressed on purpose ("auto" decides from measured speeds, which vary from run to run)
    with asymstore.open_store(
        [str(a), str(b)], chunk_bytes=64 * 1024, partition_bytes=256 * 1024, compression="zstd3"
    ) as s:
        st2 = _state()
        st2["model"]["wte.weight"] = torch.zeros(512, 256)
        s.save(st2, step=2)
    with asymstore.open_store([str(a)], chunk_bytes=64 * 1024, partition_bytes=256 * 1024) as s:
        s.save(_state(1), step=3)
    return a, b, st


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_ls_table_and_tiers(ckpt, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # long tmp paths (e.g. under xdist) must not wrap table rows
    a, b, _ = ckpt
    rc, out, _ = _run(["ls", str(a), str(b)], capsys)
    assert rc == 0
    assert str(a) in out and str(b) in out
    lines = {ln.split()[1]: ln for ln in out.splitlines() if ln.startswith("│")}
    assert set(lines) == {"1", "2", "3"}
    assert lines["1"].count("yes") == 2 and lines["3"].count("yes") == 1


def test_ls_json(ckpt, capsys):
    a, b, _ = ckpt
    os.makedirs(b / "step_000000000009/r00000")  # an interrupted save: objects of a step, no commit marker
    (b / "step_000000000009/r00000/part").write_bytes(b"partial")
    rc, out, _ = _run(["ls", "--json", str(a), str(b)], capsys)
    assert rc == 0
    doc = json.loads(out)
    steps = {r["step"]: r for r in doc["steps"]}
    assert sorted(steps) == [1, 2, 3, 9]
    assert steps[3]["tiers"] == {str(a): "complete", str(b): "absent"}
    assert steps[9]["tiers"] == {str(a): "absent", str(b): "partial"}
    assert steps[9]["raw_bytes"] is None
    r1 = steps[1]
    assert r1["raw_bytes"] > 0 and r1["stored_bytes"] > 0 and r1["tensors"] == 8
    assert sum(r1["codecs"].values()) >= 2  # several partitions
    assert steps[2]["ratio"] < steps[1]["ratio"]  # zeros compress
    assert isinstance(r1["time"], float)


def test_show(ckpt, capsys):
    a, _, _st = ckpt
    rc, out, _ = _run(["show", str(a), "--step", "1"], capsys)
    assert rc == 0
    for name in ("model/wte.weight", "model/h.0.attn.weight", "optimizer/state/0/exp_avg"):
        assert name in out
    assert "bfloat16" in out and "float8_e4m3fn" in out and "(512, 256)" in out
    assert "partitions" in out and "bytes" in out  # codec chain of each partition
    assert '"tokens_seen": 123' in out  # user metadata
    assert "optimizer/param_groups" in out and '"hello"' in out  # non-tensor values


def test_show_filter_and_json(ckpt, capsys):
    a, _, _ = ckpt
    rc, out, _ = _run(["show", str(a), "--filter", "model/h.0.*", "--json"], capsys)
    assert rc == 0
    doc = json.loads(out)
    assert doc["step"] == 3  # newest by default
    assert sorted(t["name"] for t in doc["tensors"]) == [
        "model/h.0.attn.bias",
        "model/h.0.attn.weight",
        "model/h.0.mlp.weight",
    ]
    assert all(p["tensors"] > 0 and p["chain"] for p in doc["partitions"])
    assert doc["values"]["step"] == 7
    rc, _, err = _run(["show", str(a), "--filter", "nothing*"], capsys)
    assert rc == 2 and "matches" in err


def test_verify_ok_and_all(ckpt, capsys):
    a, _, _ = ckpt
    rc, out, _ = _run(["verify", str(a)], capsys)
    assert rc == 0 and "step 3: ok" in out
    rc, out, _ = _run(["verify", str(a), "--all"], capsys)
    assert rc == 0 and "3 of 3 steps ok" in out


def _first_shard(root: Path, step: int) -> Path:
    d = root / f"step_{step:012d}"
    shards = sorted(p for p in d.rglob("c/*") if p.is_file())
    assert shards
    return shards[0]


def test_verify_detects_corrupted_byte(ckpt, capsys):
    a, b, _ = ckpt
    shard = _first_shard(a, 1)
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0x01  # one flipped bit in a data chunk
    shard.write_bytes(bytes(raw))
    key = shard.relative_to(a).as_posix()
    rc, out, _ = _run(["verify", str(a), "--step", "1"], capsys)
    assert rc == 1
    assert key in out and "checksum" in out
    rc, out, _ = _run(["verify", str(a), "--all"], capsys)
    assert rc == 1 and "2 of 3 steps ok" in out
    rc, _, _ = _run(["verify", str(b), "--step", "1"], capsys)  # the other tier's copy is intact
    assert rc == 0


def test_verify_detects_damaged_metadata(ckpt, capsys):
    a, _, _ = ckpt
    marker = a / "step_000000000002" / "COMMIT"
    marker.write_bytes(marker.read_bytes().replace(b'"step":2', b'"step":4'))
    rc, out, _ = _run(["verify", str(a), "--step", "2"], capsys)
    assert rc == 1 and "step_000000000002/COMMIT" in out


def test_export_round_trip_bit_exact(ckpt, tmp_path, capsys):
    a, _, st = ckpt
    out_file = tmp_path / "out.safetensors"
    rc, _, _ = _run(["export", str(a), str(out_file), "--step", "1", "-q"], capsys)
    assert rc == 0
    loaded = safetensors_torch.load_file(str(out_file))
    ck = asymstore.open_checkpoint(str(a), 1)
    assert set(loaded) == {n.replace("/", ".") for n in ck}  # real key paths joined with "."
    for name, lt in ck.items():
        t = loaded[name.replace("/", ".")]
        assert t.dtype == lt.dtype and tuple(t.shape) == tuple(lt.shape), name
        assert torch.equal(
            t.view(torch.uint8) if t.dim() else t.reshape(1).view(torch.uint8),
            lt.read().view(torch.uint8) if t.dim() else lt.read().reshape(1).view(torch.uint8),
        ), name
    assert torch.equal(loaded["model.wte.weight"], st["model"]["wte.weight"])
    assert loaded["model.h.0.attn.weight"].dtype == torch.bfloat16
    assert loaded["model.h.0.mlp.weight"].dtype == torch.float8_e4m3fn
    from safetensors import safe_open

    with safe_open(str(out_file), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["step"]) == 7 and json.loads(meta["note"]) == "hello"
    assert json.loads(meta["optimizer/param_groups"])[0]["lr"] == 1e-3
    assert json.loads(meta["asymstore.user"])["tokens_seen"] == 123
    assert json.loads(meta["asymstore.step"]) == 1


def test_export_filter(ckpt, tmp_path, capsys):
    a, _, _ = ckpt
    out_file = tmp_path / "model.safetensors"
    rc, _, _ = _run(["export", str(a), str(out_file), "--filter", "model/*", "-q"], capsys)
    assert rc == 0
    loaded = safetensors_torch.load_file(str(out_file))
    assert loaded and all(k.startswith("model.") for k in loaded)  # the stored names' glob still selects
    rc, _, err = _run(["export", str(a), str(tmp_path / "none.safetensors"), "--filter", "zzz"], capsys)
    assert rc == 2 and "zzz" in err and not (tmp_path / "none.safetensors").exists()


def test_export_damaged_fails_without_output(ckpt, tmp_path, capsys):
    a, _, _ = ckpt
    shard = _first_shard(a, 3)
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    out_file = tmp_path / "bad.safetensors"
    rc, _, err = _run(["export", str(a), str(out_file)], capsys)
    assert rc == 1 and "checksum" in err and "Traceback" not in err
    assert not out_file.exists() and not list(tmp_path.glob("bad.safetensors.tmp-*"))


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["show", "{a}", "--step", "42"], "step 42 is not committed"),
        (["verify", "{a}", "--step", "42"], "step 42 is not committed"),
        (["export", "{a}", "{tmp}/x.safetensors", "--step", "42"], "step 42 is not committed"),
        (["ls", "{tmp}/does-not-exist"], "no such directory"),
        (["show", "{tmp}/empty"], "no committed checkpoint"),
        (["verify", "nosuchscheme://x"], "no asymstore backend"),
        (["verify", "{a}", "--step", "1", "--all"], "not allowed"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_user_errors_exit_2_without_traceback(ckpt, tmp_path, capsys, argv, needle):
    a, _, _ = ckpt
    (tmp_path / "empty").mkdir()
    argv = [x.format(a=a, tmp=tmp_path) for x in argv]
    rc, _out, err = _run(argv, capsys)
    assert rc == 2
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "does-not-exist").exists()  # the CLI never creates a tier


def test_debug_shows_traceback(ckpt):
    a, _, _ = ckpt
    with pytest.raises(asymstore.StepNotFoundError):
        main(["--debug", "show", str(a), "--step", "42"])
    with pytest.raises(asymstore.StepNotFoundError):
        main(["show", str(a), "--step", "42", "--debug"])


@pytest.mark.slow
def test_python_dash_m_and_exit_codes(ckpt):
    a, _, _ = ckpt
    env = dict(os.environ, PYTHONPATH=str(Path(asymstore.__file__).parent.parent))
    ok = subprocess.run([sys.executable, "-m", "asymstore", "ls", str(a)], capture_output=True, text=True, env=env)
    assert ok.returncode == 0 and "step" in ok.stdout
    assert "\x1b[" not in ok.stdout  # no colour codes or progress bars into a pipe
    missing = subprocess.run(
        [sys.executable, "-m", "asymstore", "verify", str(a), "--step", "99"], capture_output=True, text=True, env=env
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


def test_help(capsys):
    rc, out, _ = _run(["--help"], capsys)
    assert rc == 0 and all(c in out for c in ("ls", "show", "verify", "export"))


# --- multi-rank steps: every rank is listed, shown and verified --------------------------------------------
_SMALL = dict(chunk_bytes=4096, partition_bytes=16384)


def _rank_state(step: int, rank: int) -> dict:
    g = torch.Generator().manual_seed(100 * step + rank)
    return {"w": torch.randn(2000 + 500 * rank, generator=g), "b": torch.randn(7, generator=g), "rank": rank}


def _world(root: Path, step: int, world: int, **save_kw) -> None:
    """Each rank of a ``world``-rank job saves its part of ``step``: one Store per rank, as in a job (threads of
    this process instead of processes; the stores meet only through the tier, as separate processes do)."""
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            with asymstore.Store([str(root)], rank=r, world_size=world, commit_timeout_s=60.0, **_SMALL) as s:
                kw = {k: v(r) for k, v in save_kw.items()}
                s.save(_rank_state(step, r), step, **kw)
        except BaseException as e:  # surfaced by the test
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in reversed(range(world))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> dict[int, Path]:
    """A 2-rank root (steps 1 and 2) and a 4-rank root (step 1), written once; tests copy before damaging."""
    out = {}
    for world, steps in ((2, (1, 2)), (4, (1,))):
        root = tmp_path_factory.mktemp(f"world{world}")
        for step in steps:
            _world(root, step, world)
        out[world] = root
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _flip(root: Path, step: int, rank: int, which: int = 0) -> str:
    """Flip one byte in a data chunk of ``rank``'s part of ``step``; its key relative to the root."""
    shards = sorted(p for p in (root / f"step_{step:012d}" / f"r{rank:05d}").rglob("c/*") if p.is_file())
    shard = shards[which]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3] ^= 0x40
    shard.write_bytes(bytes(raw))
    return shard.relative_to(root).as_posix()


def test_ls_multi_rank_sums_every_rank(worlds, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    root = worlds[2]
    rc, out, _ = _run(["ls", "--json", str(root)], capsys)
    assert rc == 0
    steps = {r["step"]: r for r in json.loads(out)["steps"]}
    assert sorted(steps) == [1, 2]
    commit = json.loads((root / "step_000000000001" / "COMMIT").read_text())
    r1 = steps[1]
    assert r1["ranks"] == 2 and r1["tensors"] == 4  # w and b on each rank
    assert r1["raw_bytes"] == commit["raw_bytes"] and r1["stored_bytes"] == commit["stored_bytes"]
    assert r1["raw_bytes"] >= (2000 + 2500 + 14) * 4  # both ranks' tensors, not rank 0's alone
    rc, out, _ = _run(["ls", str(root)], capsys)
    row = next(ln for ln in out.splitlines() if ln.startswith("│") and ln.split()[1] == "1")
    assert row.split()[3] == "2"  # the ranks column


def test_show_multi_rank_every_rank_or_one(worlds, capsys):
    root = worlds[4]
    rc, out, _ = _run(["show", "--json", str(root)], capsys)
    assert rc == 0
    doc = json.loads(out)
    assert doc["ranks"] == 4 and doc["shown_ranks"] == [0, 1, 2, 3]
    shapes = {(t["rank"], t["name"]): t["shape"] for t in doc["tensors"]}
    assert shapes == {(r, n): [2000 + 500 * r] if n == "w" else [7] for r in range(4) for n in ("w", "b")}
    assert {p["rank"] for p in doc["partitions"]} == {0, 1, 2, 3}
    assert all(p["object"].startswith(f"step_000000000001/r{p['rank']:05d}/") for p in doc["partitions"])
    assert doc["values"]["rank"] == 0 and doc["global_tensors"] is None
    rc, out, _ = _run(["show", "--json", "--rank", "3", str(root)], capsys)
    doc = json.loads(out)
    assert doc["shown_ranks"] == [3] and {t["rank"] for t in doc["tensors"]} == {3} and doc["values"]["rank"] == 3
    rc, out, _ = _run(["show", str(root)], capsys)
    assert rc == 0 and "4 ranks" in out and "r00003" not in out  # the table has a rank column instead
    rc, _, err = _run(["show", "--rank", "4", str(root)], capsys)
    assert rc == 2 and "not rank 4" in err


@pytest.mark.parametrize("world, damaged", [(2, (1,)), (4, (2,)), (4, (0, 3))])
def test_verify_names_damaged_rank_and_object(worlds, tmp_path, capsys, world, damaged):
    root = _copy(worlds[world], tmp_path / "ck")
    rc, out, _ = _run(["verify", str(root)], capsys)
    assert rc == 0 and f"step {1 if world == 4 else 2}: ok ({world} ranks" in out
    step = 1
    keys = {r: _flip(root, step, r) for r in damaged}
    rc, out, _ = _run(["verify", str(root), "--step", str(step)], capsys)
    assert rc == 1, out
    assert f"step {step}: {len(damaged)} problem(s)" in out
    for r, key in keys.items():
        assert f"rank {r}: {key}" in out and "checksum" in out
    rc, out, _ = _run(["verify", "--json", str(root), "--step", str(step)], capsys)
    assert rc == 1
    doc = json.loads(out)
    assert doc["ok"] is False and [s["step"] for s in doc["steps"]] == [step]
    res = doc["steps"][0]
    assert res["ranks"] == world and res["ok"] is False
    assert sorted((p["rank"], p["object"]) for p in res["problems"]) == sorted(keys.items())


def test_verify_reports_all_damage_and_continues(worlds, tmp_path, capsys):
    root = _copy(worlds[2], tmp_path / "ck")
    k1 = _flip(root, 1, 1)
    (root / "step_000000000001" / "r00000" / "COMMIT").write_text("{}")  # rank 0's marker no longer matches
    k2 = _flip(root, 2, 0)
    rc, out, _ = _run(["verify", "--all", "--json", str(root)], capsys)
    assert rc == 1
    doc = json.loads(out)
    by_step = {s["step"]: s for s in doc["steps"]}
    assert sorted(by_step) == [1, 2] and not by_step[1]["ok"] and not by_step[2]["ok"]
    p1 = {(p["rank"], p["object"]) for p in by_step[1]["problems"]}
    assert p1 == {(0, "step_000000000001/r00000/COMMIT"), (1, k1)}  # rank 1 still read after rank 0 failed
    assert {(p["rank"], p["object"]) for p in by_step[2]["problems"]} == {(0, k2)}
    rc, out, _ = _run(["verify", "--all", str(root)], capsys)
    assert rc == 1 and "0 of 2 steps ok" in out and k1 in out and k2 in out


def test_verify_json_of_a_healthy_single_rank_step(ckpt, capsys):
    a, _, _ = ckpt
    rc, out, err = _run(["verify", "--json", str(a), "--all"], capsys)
    assert rc == 0 and not err
    doc = json.loads(out)
    assert doc["ok"] is True and [s["step"] for s in doc["steps"]] == [1, 2, 3]
    assert all(s["ranks"] == 1 and s["problems"] == [] and s["objects"] > 2 and s["bytes"] > 0 for s in doc["steps"])
    rc, out, err = _run(["verify", "--json", str(a), "--step", "42"], capsys)
    assert rc == 2 and out == "" and "step 42 is not committed" in err  # errors stay on stderr


def test_show_global_tensors(tmp_path, capsys):
    import inspect

    from asymstore import globalmeta as gm

    if "global_parts" not in inspect.signature(asymstore.Store.save).parameters:
        pytest.skip("this Store cannot record global tensor metadata yet")
    root = tmp_path / "ck"

    def parts(r: int) -> dict:
        n = 2000 + 500 * r
        start = 0 if r == 0 else 2000
        return {"w": gm.Piece("w", "float32", (4500,), gm.FlatRange(start, n))}

    _world(root, 1, 2, global_parts=parts)
    rc, out, _ = _run(["show", "--json", str(root)], capsys)
    assert rc == 0
    g = {t["name"]: t for t in json.loads(out)["global_tensors"]}
    assert g["w"]["shape"] == [4500] and g["w"]["dtype"] == "float32"
    assert sorted((p["rank"], p["region"]["start"], p["region"]["length"]) for p in g["w"]["parts"]) == [
        (0, 0, 2000),
        (1, 2000, 2500),
    ]
    rc, out, _ = _run(["show", str(root)], capsys)
    assert "global tensors (1)" in out and "flat [2000:4500]" in out


def test_shm_ls_and_rm_json(tmp_path, capsys):
    shm = str(tmp_path / "shm")
    os.makedirs(shm)
    with asymstore.open_store(str(tmp_path / "ck"), shm_dir=shm, keep_shm=True) as store:
        store.save(_rank_state(3, 0), 3)
    rc, out, _ = _run(["shm", "ls", "--dir", shm, "--json"], capsys)
    assert rc == 0
    rows = json.loads(out)
    assert len(rows) == 1 and rows[0]["steps"] == [3] and rows[0]["alive"] is False
    job = rows[0]["job"]
    rc, out, err = _run(["shm", "rm", "--dir", shm, "--json", job], capsys)
    assert rc == 0 and not err
    doc = json.loads(out)
    assert [r["path"] for r in doc["removed"]] == [rows[0]["path"]] and doc["errors"] == []
    rc, out, err = _run(["shm", "rm", "--dir", shm, "--json", job], capsys)
    assert rc == 2 and out == "" and "no region" in err  # errors on stderr, with the exit code
    rc, out, _ = _run(["shm", "ls", "--dir", shm, "--json"], capsys)
    assert rc == 0 and json.loads(out) == []


@pytest.mark.slow
def test_gloo_4_rank_dtensor_step(tmp_path, capsys):
    """A 4-rank step written by real torch.distributed (gloo) processes, each saving its shard of a DTensor: ls,
    show (with the global tensors) and verify over every rank; flipped bytes in ranks 1 and 3 are both named."""
    root = tmp_path / "ck"
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH")) if p))
    p = subprocess.run(
        [sys.executable, "-m", "tests._cli_worker", str(root), "4", "1"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    rc, out, _ = _run(["ls", "--json", str(root)], capsys)
    (row,) = json.loads(out)["steps"]
    assert rc == 0 and row["ranks"] == 4 and row["tensors"] == 8
    rc, out, _ = _run(["show", "--json", str(root)], capsys)
    doc = json.loads(out)
    g = {t["name"]: t for t in doc["global_tensors"]}
    assert g["model/w"]["shape"] == [32, 16] and g["model/b"]["shape"] == [5]
    boxes = sorted((q["rank"], q["region"]["offsets"], q["region"]["lengths"]) for q in g["model/w"]["parts"])
    assert boxes == [(r, [8 * r, 0], [8, 16]) for r in range(4)]
    assert sorted(q["rank"] for q in g["model/b"]["parts"]) == [0, 1, 2, 3]  # replicas on every rank
    rc, out, _ = _run(["verify", str(root)], capsys)
    assert rc == 0 and "step 1: ok (4 ranks" in out
    keys = {r: _flip(root, 1, r) for r in (1, 3)}
    rc, out, _ = _run(["verify", "--json", str(root)], capsys)
    assert rc == 1
    (res,) = json.loads(out)["steps"]
    assert sorted((q["rank"], q["object"]) for q in res["problems"]) == sorted(keys.items())
    index = root / "step_000000000001" / "INDEX"
    index.write_bytes(index.read_bytes().replace(b"32", b"33", 1))
    rc, out, _ = _run(["verify", str(root)], capsys)
    assert rc == 1 and "step 1: 3 problem(s)" in out and "step_000000000001/INDEX: checksum mismatch" in out
    rc, _, err = _run(["show", str(root)], capsys)
    assert rc == 1 and "INDEX: checksum mismatch" in err


def test_ls_marks_a_tier_with_a_damaged_rank(worlds, tmp_path, capsys):
    a = _copy(worlds[2], tmp_path / "a")
    b = _copy(worlds[2], tmp_path / "b")
    (a / "step_000000000001" / "r00001" / "COMMIT").write_text("{}")  # rank 1's marker: not the one committed
    rc, out, _ = _run(["ls", "--json", str(a), str(b)], capsys)
    assert rc == 0
    s1 = {r["step"]: r for r in json.loads(out)["steps"]}[1]
    assert s1["tiers"] == {str(a): "damaged", str(b): "complete"}
    assert s1["ranks"] == 2 and s1["raw_bytes"] > 0  # the details come from the intact copy
    assert any("r00001/COMMIT" in p for p in s1["problems"])
