"""DeepSpeed ZeRO 1-3 checkpoints restored on another world size (real DeepSpeed, gloo on CPU).

Each case trains on N ranks with an asymmetric checkpoint at every step, takes a reference of the
world-size independent state after step S through DeepSpeed's own accessors (per parameter: the
low-precision value, the fp32 master and both Adam moments; counters, scheduler, optimizer step),
then fresh processes on M ranks (differently initialised engines) resume step S and must reproduce
that reference bit for bit. Then they train on: the first loss after the resume is a forward pass on
the restored parameters, so for every rank that exists in both runs it equals the original run's loss
of the same step and batch; later losses differ by design (the gradient is averaged over M ranks'
batches, not N), so the state, not the losses, is what is compared.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

try:  # only to decide whether to skip: the workers import it themselves
    import deepspeed  # noqa: F401
except Exception as e:  # pragma: no cover - depends on the environment
    pytest.skip(f"deepspeed cannot be imported: {e}", allow_module_level=True)

from tests.ranks import free_port
from tests.test_deepspeed import REPO, assert_same

STEPS = 3
MORE = 2


def launch(mode: str, args: dict[str, Any], out: Path, world: int) -> list[subprocess.Popen[bytes]]:
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(world),
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        OMP_NUM_THREADS="1",
    )
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/asymstore/torch_extensions"))
    procs = []
    for r in range(world):
        with open(out / f"{mode}_w{world}_r{r}.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tests._ds_worker", mode, json.dumps(args)],
                    cwd=REPO,
                    env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    return procs


def run(mode: str, args: dict[str, Any], out: Path, world: int, timeout: float = 300) -> None:
    procs = launch(mode, args, out, world)
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    bad = [r for r, p in enumerate(procs) if p.returncode != 0]
    if bad:
        logs = "\n".join(
            f"--- rank {r} ---\n" + (out / f"{mode}_w{world}_r{r}.log").read_text(errors="replace")[-4000:] for r in bad
        )
        pytest.fail(f"{mode} on {world} ranks: ranks {bad} failed\n{logs}")


def stored_partition_bytes(store_dir: Path, step: int) -> tuple[int, int]:
    """The bytes of the saved ranks' partition tensors of ``step`` (what a full read would fetch), and the
    stream's chunk size (the unit of a ranged read)."""
    from asymstore.lazy import open_checkpoint

    total = 0
    ck0 = open_checkpoint(str(store_dir), step, rank=0)
    world = int(ck0.skeleton["deepspeed"]["world_size"])
    for r in range(world):
        ck = open_checkpoint(str(store_dir), step, rank=r)
        total += sum(ck[n].nbytes for n in ck if n.startswith("zero/"))
    assert ck0.reader is not None
    return total, ck0.reader.manifest.chunk_bytes


MOMENTS = ("exp_avg", "exp_avg_sq")


def check_index(store_dir: Path, step: int, n: int, want: dict[str, Any], fp32: dict[str, torch.Tensor]) -> None:
    """The step's merged index of global tensors (docs/format.md 9.3) lists every parameter's low-precision
    value, fp32 master and Adam moments, each covered exactly once by the ranks' flat pieces; read back through
    it (asymstore.reshard, and the plain zarr reader) they equal DeepSpeed's own accessors' values and
    ``fp32_state_dict`` bit for bit; ``asymstore show --json`` lists them."""
    import contextlib
    import io

    import numpy as np

    from asymstore import globalmeta as gm
    from asymstore import reshard
    from asymstore.catalog import commit_info
    from asymstore.cli import main as cli_main
    from asymstore.manifest import step_dir
    from asymstore.store import Store
    from tests import plain_zarr_reader as plain

    assert (store_dir / step_dir(step) / "INDEX").is_file()
    from asymstore.backends import open_object_store

    assert "index_crc32c" in commit_info(open_object_store(str(store_dir)), step)
    classes = {"zero/lp": "lp", "zero/fp32": "fp32", **{f"zero/optimizer_state/{k}": k for k in MOMENTS}}
    expect = {f"{c}/{p}": want[k][p] for c, k in classes.items() for p in want["fp32"]}
    st = Store([str(store_dir)], rank=0, world_size=n, host_memory="private", host_slots=1)
    try:
        idx = reshard.load_index(st, step)
        assert idx.ranks == n
        assert sorted(idx.tensors) == sorted(expect), sorted(set(idx.tensors) ^ set(expect))
        assert {r for g in idx.tensors.values() for r in (p.rank for p in g.parts)} == set(range(n))
        got = {k: torch.empty(tuple(v.shape), dtype=v.dtype) for k, v in expect.items()}
        reshard.read_global(st, step, {k: (gm.whole(tuple(t.shape)), t) for k, t in got.items()})
    finally:
        st.close()
    assert_same(got, expect, "read through the INDEX")
    assert_same({p: got[f"zero/fp32/{p}"] for p in want["fp32"]}, {p: fp32[p] for p in want["fp32"]}, "fp32 INDEX")
    for p in list(want["fp32"])[:3]:  # with zarr, json and numpy alone
        assert np.array_equal(plain.read_global(str(store_dir), step, f"zero/fp32/{p}"), fp32[p].numpy()), p
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["show", str(store_dir), "--step", str(step), "--json"]) == 0
    shown = {g["name"]: g for g in json.loads(out.getvalue())["global_tensors"]}
    assert sorted(shown) == sorted(expect)
    w = "zero/fp32/blocks.0.lin.weight"
    assert shown[w]["shape"] == list(expect[w].shape) and shown[w]["dtype"] == "float32", shown[w]


def elastic_case(tmp_path: Path, stage: int, n: int, ms: list[int]) -> None:
    """Train on ``n`` ranks, then resume the step on each world size of ``ms`` (each from its own copy of the
    store: the resumed run saves its next steps) and check the state, the bytes read and the first loss."""
    from asymstore.trainer_hooks.deepspeed_tools import fp32_state_dict

    store = tmp_path / "ckpt"
    args = {"out": str(tmp_path), "store": str(store), "stage": stage, "steps": STEPS}
    t0 = time.monotonic()
    run("etrain", args, tmp_path, n)
    print(f"ZeRO-{stage} train on {n}: {time.monotonic() - t0:.1f} s")
    want = torch.load(tmp_path / "eref_save.pt", weights_only=False)
    # the consolidated fp32 weights, read from every rank's part without DeepSpeed processes
    sd = fp32_state_dict(str(store), step=STEPS)
    assert_same({k: sd[k] for k in want["fp32"]}, want["fp32"], "fp32_state_dict")
    check_index(store, STEPS, n, want, sd)
    trained = [json.loads((tmp_path / f"etrain_r{r}.json").read_text()) for r in range(n)]
    total, chunk = stored_partition_bytes(store, STEPS)
    for m in ms:
        copy = tmp_path / f"ckpt_w{m}"
        shutil.copytree(store, copy)
        t1 = time.monotonic()
        run("eresume", dict(args, store=str(copy), step=STEPS, more=MORE), tmp_path, m)
        print(f"ZeRO-{stage} {n}->{m}: resume + {MORE} steps {time.monotonic() - t1:.1f} s")
        got = torch.load(tmp_path / f"eref_resume_w{m}.pt", weights_only=False)
        assert_same(want, got, f"ZeRO-{stage} {n}->{m}")
        assert got["global_steps"] == STEPS and got["opt_step"] is not None
        for r in range(m):
            res = json.loads((tmp_path / f"eresume_w{m}_r{r}.json").read_text())
            rep = res["report"]
            assert rep["resharded"] and rep["saved_world_size"] == n and rep["world_size"] == m, rep
            # each rank reads the ranges its partitions need, each chunk once: never more than one pass over
            # the saved partitions plus the partly used chunks at the ends of each span (4 tensors per saved
            # rank); at stage 1/2 (a new partition is one contiguous range of the saved ones) its share only
            slack = 2 * chunk * 4 * n
            assert 0 < rep["bytes_read"] <= total + slack, (rep, total, chunk)
            if stage in (1, 2):
                assert rep["bytes_read"] <= total // m + slack, (rep, total, chunk)
            losses = res["losses"]
            assert sorted(int(k) for k in losses) == list(range(STEPS + 1, STEPS + 1 + MORE))
            assert all(v == v and abs(v) < 1e3 for v in losses.values()), losses  # trains on, finite
            if r < n:  # same parameters, same batch: the forward pass gives the same loss
                assert losses[str(STEPS + 1)] == trained[r][str(STEPS + 1)], (r, losses, trained[r])


def test_zero2_two_to_one(tmp_path: Path) -> None:
    """ZeRO-2 saved on 2 ranks restores on 1 (params, fp32 masters, moments bit-exact) and trains on."""
    elastic_case(tmp_path, 2, 2, [1])


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "n", "ms"), [(1, 2, [3]), (2, 4, [2]), (3, 2, [1, 3])])
def test_elastic(tmp_path: Path, stage: int, n: int, ms: list[int]) -> None:
    elastic_case(tmp_path, stage, n, ms)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("ASYMSTORE_ELASTIC_ALL"), reason="the rest of the N->M matrix: set ASYMSTORE_ELASTIC_ALL=1"
)
@pytest.mark.parametrize(("stage", "n", "ms"), [(1, 2, [1]), (1, 4, [2]), (2, 2, [3]), (3, 4, [2])])
def test_elastic_matrix(tmp_path: Path, stage: int, n: int, ms: list[int]) -> None:
    elastic_case(tmp_path, stage, n, ms)


# --- the planner alone (no processes): simulated stage 1/2 and stage 3 layouts, every N -> M ---------------
class _Flat:
    """A saved partition standing in for a lazy tensor."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t, self.dtype = t, t.dtype

    def read_flat_into(self, start: int, out: torch.Tensor) -> None:
        out.copy_(self.t[start : start + out.numel()])


def _sim_layout(sizes: list[int], world: int, rank: int, stage: int, align: int = 4) -> dict[str, Any]:
    from asymstore.trainer_hooks.deepspeed_elastic import LAYOUT_FORMAT

    params = {f"p{i}": {"shape": [n], "dtype": "float32"} for i, n in enumerate(sizes)}
    groups: list[dict[str, Any]] = []
    if stage in (1, 2):  # parameters concatenated, the group padded to world * align
        total = sum(sizes)
        total += (-total) % (world * align)
        ps = total // world
        lo, hi, off, frags = rank * ps, (rank + 1) * ps, 0, []
        for i, n in enumerate(sizes):
            a, b = max(off, lo), min(off + n, hi)
            if b > a:
                frags.append([f"p{i}", a - off, a - lo, b - a])
            off += n
        groups.append({"numel": ps, "fragments": frags})
    else:  # each parameter split in equal padded pieces; a rank's pieces concatenated
        off, frags = 0, []
        for i, n in enumerate(sizes):
            pn = -(-n // world)
            cnt = max(0, min(pn, n - rank * pn))
            if cnt:
                frags.append([f"p{i}", rank * pn, off, cnt])
            off += pn
        groups.append({"numel": off, "fragments": frags})
    return {
        "format": LAYOUT_FORMAT,
        "stage": stage,
        "world_size": world,
        "rank": rank,
        "params": params,
        "groups": groups,
    }


def _partition(full: dict[str, torch.Tensor], lay: dict[str, Any]) -> torch.Tensor:
    out = torch.zeros(lay["groups"][0]["numel"])
    for name, ps, ls, n in lay["groups"][0]["fragments"]:
        out[ls : ls + n] = full[name][ps : ps + n]
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_plan_reads_every_world_size(stage: int) -> None:
    from asymstore.errors import StateMismatchError
    from asymstore.trainer_hooks.deepspeed_elastic import fill_partition, plan_reads

    sizes = [7, 64, 1, 33, 5, 128, 3]
    g = torch.Generator().manual_seed(0)
    full = {f"p{i}": torch.randn(n, generator=g) for i, n in enumerate(sizes)}
    for n in (1, 2, 3, 4):
        saved = [_sim_layout(sizes, n, r, stage) for r in range(n)]
        parts = [_partition(full, lay) for lay in saved]
        for m in (1, 2, 3, 4):
            for r in range(m):
                mine = _sim_layout(sizes, m, r, stage)
                (copies,) = plan_reads(mine, saved)
                dst = torch.full((mine["groups"][0]["numel"],), float("nan"))
                fill_partition(dst, copies, lambda rr, gg, parts=parts: _Flat(parts[rr]), what="t")
                assert torch.equal(dst, _partition(full, mine)), (stage, n, m, r)
                if stage in (1, 2):  # contiguous in both layouts: at most one read per saved rank touched
                    assert len(copies) <= n, copies
    saved = [_sim_layout(sizes[:-1], 2, r, stage) for r in range(2)]
    with pytest.raises(StateMismatchError, match="p6"):
        plan_reads(_sim_layout(sizes, 1, 0, stage), saved)


def test_chunk_cache_reads_each_chunk_once() -> None:
    """Adjacent ranged reads through the chunk cache return the right bytes and fetch each chunk once."""
    from asymstore.chunkcache import ChunkCache

    data = bytes(range(256)) * 40  # 10240 bytes: chunks of 1000, the last one short

    class Src:
        def __init__(self) -> None:
            self.bytes_read = 0
            self.fetched: list[tuple[int, int]] = []

        def read_range_into(self, start: int, end: int, out: memoryview) -> None:
            assert start % 1000 == 0 and (end % 1000 == 0 or end == len(data)), (start, end)
            out[:] = data[start:end]
            self.bytes_read += end - start
            self.fetched.append((start, end))

    src = Src()
    cache = ChunkCache(src, 1000, len(data))
    cuts = [0, 10, 999, 1000, 1001, 2500, 2500, 4100, 7000, 10239, 10240]
    for a, b in itertools.pairwise(cuts):
        out = bytearray(b - a)
        cache.read_range_into(a, b, memoryview(out))
        assert bytes(out) == data[a:b], (a, b)
    assert cache.bytes_read == len(data), src.fetched  # every chunk fetched exactly once


@pytest.mark.parametrize("stage", [2, 3])
def test_layout_global_parts_cover_every_parameter(stage: int) -> None:
    """The global tensor metadata of simulated ZeRO layouts (an empty parameter among them) covers every
    parameter exactly once on any world size, and reading the pieces back gives the parameters; a layout
    that loses a fragment is refused by the coverage check (such a step would not commit)."""
    from asymstore import globalmeta as gm
    from asymstore.errors import CorruptCheckpointError
    from asymstore.trainer_hooks.deepspeed_elastic import layout_global_parts

    sizes = [7, 64, 0, 1, 33, 5]
    g = torch.Generator().manual_seed(1)
    full = {f"p{i}": torch.randn(n, generator=g) for i, n in enumerate(sizes)}
    for n in (1, 2, 3, 4):
        lays = [_sim_layout(sizes, n, r, stage) for r in range(n)]
        parts_of: dict[int, Any] = {}
        local: dict[int, dict[str, torch.Tensor]] = {}
        for r, lay in enumerate(lays):
            part = _partition(full, lay)
            local[r] = {
                "zero/lp/0": part.clone(),
                "zero/fp32/0": part.clone(),
                "zero/optimizer_state/0/exp_avg": part * 2,
                "zero/optimizer_state/0/step": torch.tensor(3.0),  # not partition-shaped: local to the rank
            }
            parts_of[r] = layout_global_parts(lay, local[r])
            assert "zero/optimizer_state/0/step" not in parts_of[r]
            gm.check_parts(parts_of[r], {k: ("float32", tuple(t.shape)) for k, t in local[r].items()}, "t")
        idx = gm.build_index(1, n, parts_of)
        names = {f"{c}/p{i}" for c in ("zero/lp", "zero/fp32", "zero/optimizer_state/exp_avg") for i in range(6)}
        assert set(idx.tensors) == names, (stage, n, sorted(idx.tensors))
        for name, gt in idx.tensors.items():
            p = name.rsplit("/", 1)[1]
            out = torch.full((gt.shape[0],), float("nan"))
            for rd in gm.plan_reads(gt, gm.whole(tuple(gt.shape))):
                src = local[rd.rank][rd.local_name]
                out[rd.dst_start : rd.dst_start + rd.numel] = src[rd.src_start : rd.src_stop]
            assert torch.equal(out, full[p] * (2 if "exp_avg" in name else 1)), (stage, n, name)
        assert idx.tensors["zero/fp32/p2"].shape == (0,) and len(idx.tensors["zero/fp32/p2"].parts) == 1
    lays = [_sim_layout(sizes, 2, r, stage) for r in range(2)]
    lays[1]["groups"][0]["fragments"].pop(0)  # a description that misses a fragment
    broken = {r: layout_global_parts(lay, {"zero/fp32/0": _partition(full, lay)}) for r, lay in enumerate(lays)}
    with pytest.raises(CorruptCheckpointError):
        gm.build_index(1, 2, broken)
