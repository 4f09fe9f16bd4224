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

    PYTHONPATH=. python benchmarks/bench_memory.py                    # 300 checkpoints per variant (~6 min)
    PYTHONPATH=. python benchmarks/bench_memory.py --checkpoints 40   # smoke run
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _gpt2 import add_model_args  # noqa: E402
from _machine import machine_line  # noqa: E402

VARIANTS = ("baseline", "asym", "dcp.async_save")


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One variant in this (fresh) process; returns its samples."""
    import torch
    from _gpt2 import Data, build_model

    from asymstore.testing.process import rss_bytes

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
    state_bytes = sum(unique.values())
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
            from asymstore.store import Store, TierSpec
            from asymstore.trainer_hooks import AsymCheckpointer

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
        else:
            import torch.distributed.checkpoint as dcp

            fut: Any = None
            paths: list[str] = []
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
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "variant": args.variant,
        "rss_start": rss_start,
        "samples": samples,
        "reports": reports,
        "state_bytes": state_bytes,
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
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--variant", help=argparse.SUPPRESS)  # set in the child processes
    a = p.parse_args(argv)
    if a.warm >= a.checkpoints:
        p.error("--warm must be smaller than --checkpoints")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.variant:
        print(json.dumps(child(args)))
        return 0
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variants {bad}; choose from {VARIANTS}")
    started = _dt.datetime.now().astimezone()
    results: dict[str, dict[str, Any]] = {}
    summaries: dict[str, dict[str, float]] = {}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    fwd = list(argv if argv is not None else sys.argv[1:])
    for n in names:
        print(f"[bench_memory] {n}: {args.checkpoints} iterations, a checkpoint at each ...", flush=True)
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *fwd, "--variant", n],
            env=env,
            check=True,
            stdout=subprocess.PIPE,
            text=True,
        ).stdout
        results[n] = json.loads(out.strip().splitlines()[-1])
        s = summaries[n] = summarize(results[n], args.warm)
        print(
            f"[bench_memory] {n}: RSS {s['warm'] / 2**20:.0f} -> {s['end'] / 2**20:.0f} MiB, "
            f"slope {s['slope'] / 2**20:+.2f} MiB/100 checkpoints ({results[n]['seconds']:.0f} s)",
            flush=True,
        )

    state = next(iter(results.values()))["state_bytes"]
    w = int(next(iter(summaries.values()))["window"])
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
    checks = []
    if "asym" in results:
        ra = results["asym"]
        reps, k, ck_bytes = ra["reports"], ra["host_slots"], ra["checkpoint_bytes"]
        bound = k * ck_bytes  # K host slots x checkpoint bytes; no delta bases by default
        worst = max(r["host_slots"] + r["delta_bases"] for r in reps)
        changed = sum(1 for a, b in zip(reps, reps[1:]) if a != b)
        checks.append(
            f"- asym: the store reported {worst / 2**20:.1f} MiB of host slots + delta bases at most "
            f"(bound K x checkpoint = {k} x {ck_bytes / 2**20:.1f} MiB = {bound / 2**20:.1f} MiB, plus a "
            f"page per slot): **{'within' if worst <= bound + k * 8192 else 'ABOVE'}**; the report changed "
            f"{changed} times over {len(reps)} checkpoints (it is fixed once the slots exist); staging "
            f"budget {reps[-1]['staging_budget'] / 2**20:.0f} MiB"
        )
        s = summaries["asym"]
        checks.append(
            f"- asym: resident set growth from the first to the last {w} checkpoints after warm-up "
            f"{s['growth'] / 2**20:+.1f} MiB over {args.checkpoints - args.warm} checkpoints (slope "
            f"{s['slope'] / 2**20:+.2f} MiB / 100)"
        )
    cmd = "PYTHONPATH=. python benchmarks/bench_memory.py" + ("".join(" " + a for a in fwd))
    r0 = next(iter(results.values()))
    md = (
        f"# Host memory over {args.checkpoints} checkpoints\n\n"
        f"Measured {started:%Y-%m-%d %H:%M %Z} by `{cmd}`.\n\n"
        + "\n".join(rows)
        + "\n\n"
        + "\n".join(checks)
        + f"\n\n## Sizes\n\n- GPT-2 (`n_layer={args.layers}, n_embd={args.embd}, vocab_size={args.vocab}`), "
        f"{r0['params'] / 1e6:.2f}M parameters, AdamW; state {state / 2**20:.1f} MiB; batch {args.batch} x "
        f"{args.seq}; a checkpoint at every iteration, the last {args.keep} kept; each variant in a fresh "
        f"process; RSS = `VmRSS` sampled after each iteration; warm-up = the first {args.warm} checkpoints\n\n"
        f"## Machine\n\n- {machine_line()}\n\n## Method\n\n"
        + (__doc__ or "").split("\n\n", 1)[1].split("Usage::")[0].strip()
        + "\n"
    )
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "memory.md")
    with open(path, "w") as f:
        f.write(md)
    with open(os.path.join(args.out, "memory.json"), "w") as f:
        json.dump(
            {
                "args": {k: v for k, v in vars(args).items() if k != "variant"},
                "date": started.isoformat(),
                "results": results,
            },
            f,
        )
    print("\n".join(rows))
    print("\n".join(checks))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
