"""Host memory over hundreds of checkpoints: bounded, reported, flat.

A GPT-2-style model trains with a checkpoint at every iteration for ``--checkpoints`` iterations, keeping the
last ``--keep`` on a local directory. Each variant runs in a fresh process, with the same seed and data;
after every iteration the process's resident set (``VmRSS``) is sampled. Variants:

* ``baseline``       training alone (how much the resident set moves without checkpointing)
* ``asym``           asymstore's ``AsymCheckpointer`` (K host slots, background persistence)
* ``dcp.async_save`` ``torch.distributed.checkpoint.async_save`` (thread mode), the previous save awaited
  before the next, old checkpoints deleted as for asym

Reported per variant: the resident set before the first checkpoint, its mean over the first and over the last
50 checkpoints after the warm-up (one sample swings with the allocator's page use), their difference, its peak,
and its slope (least squares, MiB per 100 checkpoints). For asym also what the store reports it holds
(``Store.memory_report()``) against the bound K x checkpoint bytes (+ delta bases), checked after every
checkpoint.

Usage::

    python -m benchmarks.bench_memory                    # 300 checkpoints per variant (~6 min)
    python -m benchmarks.bench_memory --quick            # smoke run: 30 checkpoints of a 1-layer, 1000-token model
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from benchmarks._gpt2 import add_model_args
from benchmarks._harness import RESULTS, ROOT, command_line, machine_line, now, write_report

VARIANTS = ("baseline", "asym", "dcp.async_save")


def _run_asym(args: argparse.Namespace, model: Any, opt: Any, step: Callable[[int], None], root: str) -> Any:
    """asym: samples, the store's memory reports and the slot facts."""
    from asymstore.store import Store, TierSpec
    from asymstore.testing.process import rss_bytes
    from asymstore.trainer_hooks import AsymCheckpointer

    samples: list[int] = []
    reports: list[dict[str, int]] = []
    with Store([TierSpec(root, keep=args.keep)]) as store:
        ck = AsymCheckpointer(model, opt, store, every=1, strategy="asym")
        ck.attach()
        for i in range(1, args.checkpoints + 1):
            step(i)
            samples.append(rss_bytes())
            reports.append(store.memory_report())
        ck.detach(finish=True)
        store.wait()
        reports.append(store.memory_report())
        extra = {"host_slots": store.config.host_slots, "checkpoint_bytes": ck.history[-1].bytes}
    return samples, reports, extra


def _run_dcp(args: argparse.Namespace, model: Any, opt: Any, step: Callable[[int], None], root: str) -> list[int]:
    """dcp.async_save: the previous save awaited before the next, old ones deleted; the samples."""
    import torch.distributed.checkpoint as dcp

    from asymstore.testing.process import rss_bytes

    fut: Any = None
    paths: list[str] = []
    samples: list[int] = []
    for i in range(1, args.checkpoints + 1):
        step(i)
        if fut is not None:
            fut.result()
        while len(paths) >= args.keep:
            shutil.rmtree(paths.pop(0), ignore_errors=True)
        paths.append(os.path.join(root, f"step_{i}"))
        fut = dcp.async_save({"model": model.state_dict(), "optim": opt.state_dict()}, checkpoint_id=paths[-1])
        samples.append(rss_bytes())
    if fut is not None:
        fut.result()
    return samples


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One variant in this (fresh) process; returns its samples."""
    import torch

    from asymstore.testing.process import rss_bytes
    from benchmarks._gpt2 import Data, build_model

    model, opt = build_model(args)
    data = Data(args)

    def step(i: int) -> None:
        x = data.next()  # batch i % 8: step() runs once per i, in order
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)  # AdamW state exists from here on
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}  # tied weights once
    unique.update(
        {
            v.data_ptr(): v.numel() * v.element_size()
            for s in opt.state.values()
            for v in s.values()
            if isinstance(v, torch.Tensor)
        }
    )
    extra: dict[str, Any] = {}
    root = tempfile.mkdtemp(prefix="asym-mem-", dir=args.dir)
    samples: list[int] = []
    reports: list[dict[str, int]] = []
    rss_start = rss_bytes()
    t0 = time.perf_counter()
    try:
        if args.variant == "baseline":
            for i in range(1, args.checkpoints + 1):
                step(i)
                samples.append(rss_bytes())
        elif args.variant == "asym":
            samples, reports, extra = _run_asym(args, model, opt, step, root)
        else:
            samples = _run_dcp(args, model, opt, step, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "variant": args.variant,
        "rss_start": rss_start,
        "samples": samples,
        "reports": reports,
        "state_bytes": sum(unique.values()),
        "seconds": time.perf_counter() - t0,
        **extra,
        "params": sum(p.numel() for p in model.parameters()),
    }


def slope_per_100(ys: list[int]) -> float:
    """Least-squares slope of ``ys`` against their index, in bytes per 100 samples."""
    n = len(ys)
    if n < 2:
        return 0.0
    mx = (n - 1) / 2
    my = sum(ys) / n
    num = sum((i - mx) * (y - my) for i, y in enumerate(ys))
    den = sum((i - mx) ** 2 for i in range(n))
    return num / den * 100


def summarize(r: dict[str, Any], warm: int, window: int = 50) -> dict[str, float]:
    """Levels are means over ``window`` checkpoints: the resident set swings with the allocator's and the
    slots' page use from one iteration to the next, a single sample says little."""
    s = r["samples"]
    tail = s[warm:]
    w = max(1, min(window, len(tail) // 2))
    first, last = sum(tail[:w]) / w, sum(tail[-w:]) / w
    return {
        "start": r["rss_start"],
        "warm": first,
        "end": last,
        "peak": max(s),
        "growth": last - first,
        "slope": slope_per_100(tail),
        "window": w,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoints", type=int, default=300, help="iterations, each with a checkpoint")
    p.add_argument("--warm", type=int, default=20, help="checkpoints before the flatness window starts")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--keep", type=int, default=2)
    add_model_args(p, layers=4, batch=2, seq=64)
    p.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    p.add_argument("--quick", action="store_true", help="smoke run: 30 checkpoints of a 1-layer, 1000-token model")
    p.add_argument("--out", default=RESULTS, help="directory for memory.md and memory.json")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # set in the child processes
    a = p.parse_args(argv)
    if a.quick:
        a.checkpoints, a.warm, a.layers, a.vocab = 30, 10, 1, 1000
    if a.warm >= a.checkpoints:
        p.error("--warm must be smaller than --checkpoints")
    return a


def run_variants(args: argparse.Namespace, names: list[str], fwd: list[str]) -> dict[str, dict[str, Any]]:
    """Each variant in a fresh process (``python -m benchmarks.bench_memory ... --variant N``)."""
    results: dict[str, dict[str, Any]] = {}
    for n in names:
        print(f"[bench_memory] {n}: {args.checkpoints} iterations, a checkpoint at each ...", flush=True)
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.bench_memory", *fwd, "--variant", n],
            cwd=ROOT,
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        ).stdout
        results[n] = json.loads(out.strip().splitlines()[-1])
        s = summarize(results[n], args.warm)
        print(
            f"[bench_memory] {n}: RSS {s['warm'] / 2**20:.0f} -> {s['end'] / 2**20:.0f} MiB, "
            f"slope {s['slope'] / 2**20:+.2f} MiB/100 checkpoints ({results[n]['seconds']:.0f} s)",
            flush=True,
        )
    return results


def table(summaries: dict[str, dict[str, float]], w: int) -> list[str]:
    """The markdown table of the resident-set summaries."""
    rows = [
        f"| variant | RSS before 1st checkpoint (MiB) | first {w} after warm-up, mean (MiB) | last {w}, mean (MiB) | "
        f"peak (MiB) | growth first -> last {w} (MiB) | slope (MiB / 100 checkpoints) | above baseline, last {w} "
        "(MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base_end = summaries["baseline"]["end"] if "baseline" in summaries else None
    for n, s in summaries.items():
        above = "-" if base_end is None or n == "baseline" else f"{(s['end'] - base_end) / 2**20:+.0f}"
        rows.append(
            f"| {n} | {s['start'] / 2**20:.0f} | {s['warm'] / 2**20:.0f} | {s['end'] / 2**20:.0f} | "
            f"{s['peak'] / 2**20:.0f} | {s['growth'] / 2**20:+.1f} | {s['slope'] / 2**20:+.2f} | {above} |"
        )
    return rows


def asym_checks(args: argparse.Namespace, ra: dict[str, Any], s: dict[str, float], w: int) -> list[str]:
    """The store's reported host memory against its bound, and asym's resident-set growth."""
    reps, k, ck_bytes = ra["reports"], ra["host_slots"], ra["checkpoint_bytes"]
    bound = k * ck_bytes  # K host slots x checkpoint bytes; no delta bases by default
    worst = max(r["host_slots"] + r["delta_bases"] for r in reps)
    changed = sum(1 for a, b in itertools.pairwise(reps) if a != b)
    return [
        f"- asym: the store reported {worst / 2**20:.1f} MiB of host slots + delta bases at most "
        f"(bound K x checkpoint = {k} x {ck_bytes / 2**20:.1f} MiB = {bound / 2**20:.1f} MiB, plus a "
        f"page per slot): **{'within' if worst <= bound + k * 8192 else 'ABOVE'}**; the report changed "
        f"{changed} times over {len(reps)} checkpoints (it is fixed once the slots exist); staging "
        f"budget {reps[-1]['staging_budget'] / 2**20:.0f} MiB",
        f"- asym: resident set growth from the first to the last {w} checkpoints after warm-up "
        f"{s['growth'] / 2**20:+.1f} MiB over {args.checkpoints - args.warm} checkpoints (slope "
        f"{s['slope'] / 2**20:+.2f} MiB / 100)",
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(child(args)))
        return 0
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variants {bad}; choose from {VARIANTS}")
    started = now()
    fwd = list(argv if argv is not None else sys.argv[1:])
    results = run_variants(args, names, fwd)
    summaries = {n: summarize(r, args.warm) for n, r in results.items()}
    r0 = next(iter(results.values()))
    w = int(next(iter(summaries.values()))["window"])
    rows = table(summaries, w)
    checks = asym_checks(args, results["asym"], summaries["asym"], w) if "asym" in results else []
    method = (__doc__ or "").split("\n\n", 1)[1].split("Usage::")[0].strip()
    md = (
        f"# Host memory over {args.checkpoints} checkpoints\n\n"
        f"Measured {started:%Y-%m-%d %H:%M %Z} by `{command_line(__name__, fwd)}`.\n\n"
        + "\n".join(rows)
        + "\n\n"
        + "\n".join(checks)
        + f"\n\n## Sizes\n\n- GPT-2 (`n_layer={args.layers}, n_embd={args.embd}, vocab_size={args.vocab}`), "
        f"{r0['params'] / 1e6:.2f}M parameters, AdamW; state {r0['state_bytes'] / 2**20:.1f} MiB; batch {args.batch} x "
        f"{args.seq}; a checkpoint at every iteration, the last {args.keep} kept; each variant in a fresh "
        f"process; RSS = `VmRSS` sampled after each iteration; warm-up = the first {args.warm} checkpoints\n\n"
        f"## Machine\n\n- {machine_line()}\n\n## Method\n\n{method}\n"
    )
    data = {
        "args": {k: v for k, v in vars(args).items() if k != "variant"},
        "date": started.isoformat(),
        "results": results,
    }
    path = write_report(os.path.join(args.out, "memory.md"), md, data)
    print("\n".join(rows))
    print("\n".join(checks))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
