"""DeepSpeed ZeRO-2, 2 ranks (gloo, CPU): DeepSpeed's default checkpoint engine against asymstore.

Variants, in the same processes and engine, run in rotation in blocks (docs/benchmarking.md):

* ``none``     no checkpointing (the baseline);
* ``default``  ``engine.save_checkpoint(dir)`` every N steps with DeepSpeed's default
               TorchCheckpointEngine (torch.save, synchronous; it does not fsync);
* ``asym``     :class:`DeepSpeedAsymCheckpointer` every N steps: copies during forward/backward,
               barrier before the optimizer step, background persistence (fsynced) to a local
               directory, rank 0 commits after both shards are durable.

A block is ``block`` iterations ending by draining background work (``ck.detach()`` waits for
persistence), so no variant's writes leak into the next one's timing. Save stall per checkpoint:
``default``: the wall time of ``save_checkpoint``; ``asym``: the time training is blocked by the
hooks (volatile copy at the snapshot begin + the barrier's remainder and wait), max over ranks.
Iteration overhead: (block time - median ``none`` block time) / iterations. Medians over blocks.

Run: ``python -m benchmarks.bench_deepspeed`` (spawns the two ranks itself; ``--quick``: a smoke run).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._harness import RESULTS, ROOT, machine_line, round_order, write_report

REPO = Path(ROOT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_engine(a: argparse.Namespace) -> tuple[Any, Any, Any, int]:
    """The ZeRO-2 engine over an MLP, its asymstore store and checkpointer, and the parameter count."""
    import deepspeed
    import torch
    from torch import nn

    from asymstore.store import Store, TierSpec
    from asymstore.trainer_hooks.deepspeed_hooks import DeepSpeedAsymCheckpointer

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(a.depth):
        layers += [nn.Linear(a.width, a.width), nn.GELU()]
    model = nn.Sequential(*layers, nn.Linear(a.width, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    cfg = {
        "train_micro_batch_size_per_gpu": a.batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    n_params = sum(p.numel() for p in model.parameters())
    work = Path(a.work)
    store = Store([TierSpec(str(work / "asym"), keep=2)], rank=rank, world_size=world, compression="none", host_slots=2)
    ck = DeepSpeedAsymCheckpointer(
        engine, store, every=a.every, warmup=2, blocks=[m for m in model if isinstance(m, nn.Linear)]
    )
    return engine, store, ck, n_params


def run_variant(v: str, a: argparse.Namespace, engine: Any, ck: Any, it: Any, stalls: dict[str, list[float]]) -> None:
    """One block of variant ``v`` (``none``, ``default`` or ``asym``), its save stalls appended to ``stalls``."""
    work = Path(a.work)
    if v == "none":
        for _ in range(a.block):
            it()
    elif v == "default":
        for _ in range(a.block):
            it()
            if engine.global_steps % a.every == 0:
                s0 = time.perf_counter()
                engine.save_checkpoint(str(work / "default"), tag=f"global_step{engine.global_steps}")
                stalls["default"].append(time.perf_counter() - s0)
    else:
        n0 = len(ck.history)
        ck.attach()
        for _ in range(a.block):
            it()
        ck.detach()  # completes nothing in flight (see global_steps parity), waits for persistence
        stalls["asym"] += [s.stall_s + s.begin_s for s in ck.history[n0:] if not s.skipped]


def rank_main(a: argparse.Namespace) -> None:
    """One rank: warm-up, one untimed asym block (profiling), then the variants' blocks in rotation."""
    import torch

    rank = int(os.environ["RANK"])
    engine, store, ck, n_params = build_engine(a)
    work = Path(a.work)
    x = torch.randn(a.batch, a.width)
    y = torch.randn(a.batch, 1)

    def it() -> None:
        loss = ((engine(x) - y) ** 2).mean()
        engine.backward(loss)
        engine.step()

    for _ in range(3):  # warm-up; global_steps odd at every block start (no snapshot begins at a block's end)
        it()
    results: dict[str, list[float]] = {"none": [], "default": [], "asym": []}
    stalls: dict[str, list[float]] = {"default": [], "asym": []}
    # the asym planner needs measured windows: one untimed block first
    ck.attach()
    for _ in range(a.block):
        it()
    ck.detach()
    ck.history.clear()
    for rep in range(a.repeats):
        for v in round_order(["none", "default", "asym"], rep):
            torch.distributed.barrier()
            t0 = time.perf_counter()
            run_variant(v, a, engine, ck, it, stalls)
            torch.distributed.barrier()
            results[v].append(time.perf_counter() - t0)
            if v == "default" and rank == 0:
                for d in (work / "default").glob("global_step*"):
                    shutil.rmtree(d, ignore_errors=True)
    summary = ck.summary()
    store.close()
    default_bytes = (
        sum(f.stat().st_size for f in (work / "default").rglob("*.pt")) if (work / "default").exists() else 0
    )
    (work / f"rank{rank}.json").write_text(
        json.dumps(
            {
                "blocks": results,
                "stalls": stalls,
                "asym_bytes": summary["bytes_per_checkpoint"],
                "params": n_params,
                "hidden_fraction": summary["hidden_fraction"],
                "copy_bw": summary["copy_bandwidth"],
                "default_bytes_last": default_bytes,
            }
        )
    )


SIZES = ("width", "depth", "batch", "every", "block", "repeats")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--block", type=int, default=8)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--quick", action="store_true", help="smoke run: a small MLP, 2 blocks of 4 per variant")
    p.add_argument("--rank-main", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.path.join(RESULTS, "deepspeed.md"))
    a = p.parse_args()
    if a.quick:
        a.width, a.depth, a.batch, a.block, a.repeats = 256, 2, 16, 4, 2
    return a


def spawn_ranks(a: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Run the two ranks (``--rank-main``) and return what each wrote."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2", OMP_NUM_THREADS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/asymstore/torch_extensions"))
    args = [sys.executable, "-m", "benchmarks.bench_deepspeed", "--rank-main", "--work", str(work)]
    args += [f"--{k}={getattr(a, k)}" for k in SIZES]
    procs = []
    for r in range(2):
        with open(work / f"log{r}.txt", "w") as log:
            procs.append(
                subprocess.Popen(
                    args, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log
                )
            )
    rcs = [q.wait() for q in procs]
    if any(rcs):
        print((work / "log0.txt").read_text()[-3000:], (work / "log1.txt").read_text()[-3000:])
        raise SystemExit(f"ranks failed: {rcs}")
    return [json.loads((work / f"rank{r}.json").read_text()) for r in range(2)]


def report(a: argparse.Namespace, res: list[dict[str, Any]], total_s: float) -> str:
    """Medians over blocks (each the slower rank's), overheads vs ``none``, stalls, the goal."""
    blk = {v: [max(r["blocks"][v][i] for r in res) for i in range(len(res[0]["blocks"][v]))] for v in res[0]["blocks"]}
    med = {v: statistics.median(x) for v, x in blk.items()}
    it_none = med["none"] / a.block
    stall = {
        v: statistics.median([max(r["stalls"][v][i] for r in res) for i in range(len(res[0]["stalls"][v]))])
        for v in ("default", "asym")
    }
    ratio = stall["asym"] / stall["default"]
    verdict = "PASS" if ratio <= 0.2 else "FAIL"
    mib = 1 << 20
    lines = [
        "# DeepSpeed ZeRO-2 checkpointing: default engine vs asymstore (asymmetric hooks)",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='seconds')}; machine: {machine_line()}",
        f"- torch {__import__('torch').__version__}, deepspeed {__import__('deepspeed').__version__}; 2 ranks, gloo on "
        "CPU, OMP_NUM_THREADS=1 per rank",
        f"- model: MLP {a.depth} x Linear({a.width}, {a.width}) + GELU, {res[0]['params'] / 1e6:.2f} M params "
        f"(fp32), AdamW, batch {a.batch}; checkpoint every {a.every} steps; blocks of {a.block} iterations "
        f"ending with drained background work, {a.repeats} blocks per variant in rotation, medians",
        f"- checkpoint bytes per rank: asymstore {res[0]['asym_bytes'] / mib:.1f} MiB (rank 0; its parameter "
        f"partition, fp32 partition, Adam moments, small state); default engine writes mp_rank_00_model_states "
        f"(full fp32 module, rank 0) + one zero_pp_rank_*_optim_states per rank",
        "- default engine: torch.save without fsync; asymstore: persisted with fsync to a local directory "
        "(same disk), keep=2",
        f"- asym hidden fraction (bytes copied in forward/backward windows): {res[0]['hidden_fraction']:.2f}; "
        f"measured copy bandwidth {((res[0]['copy_bw'] or 0) / 1e9):.2f} GB/s",
        "",
        "| variant | s / iteration | overhead vs none | save stall / checkpoint |",
        "|---|---:|---:|---:|",
    ]
    for v in ("none", "default", "asym"):
        it_s = med[v] / a.block
        st = stall.get(v)
        lines.append(
            f"| {v} | {it_s:.4f} | {(it_s - it_none) / it_none * 100:+.1f}% | "
            f"{'-' if st is None else f'{st * 1000:.1f} ms'} |"
        )
    lines += ["", f"asymstore stall / default stall = {ratio:.3f} (goal <= 0.2): **{verdict}**", ""]
    lines += [f"(total run {total_s:.0f} s)"]
    return "\n".join(lines) + "\n"


def main() -> None:
    a = parse_args()
    if a.rank_main:
        rank_main(a)
        return
    work = Path(tempfile.mkdtemp(prefix="bench_ds_"))
    t0 = time.time()
    res = spawn_ranks(a, work)
    text = report(a, res, time.time() - t0)
    print(text)
    write_report(a.out, text, {"args": vars(a), "ranks": res})
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
