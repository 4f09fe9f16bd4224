"""Checkpointing beside busy cores: the overhead benchmark (baseline, checkfreq, asym, and asym with private host
slots; default options, a
checkpoint every iteration) with 0, 1 and 2 extra processes spinning on the CPU, as data-loader workers that
decode or tokenize do on a training node.

Per load level: iteration overhead against the baseline of the same level (paired medians over rounds), the
median stall of the training thread (asym: the barrier; checkfreq: its blocking snapshot copy), and whether every
checkpoint became durable (none skipped, none late). Goals: training never stops, every checkpoint durable,
asym's stall <= checkfreq's and asym's overhead <= checkfreq's at every level; and asym with its host slots in
shared memory (the default) within the noise of asym with private slots.

    python -m benchmarks.bench_load [--loads 0,1,2] [--rounds 3] [--out benchmarks/results/load.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from benchmarks._harness import RESULTS, command_line, git_rev, machine_line, markdown_table, now, write_report

SPIN = "import os\nos.nice(0)\nwhile True:\n    pass\n"


def run_level(n_busy: int, args: argparse.Namespace, out_dir: str) -> list[dict[str, object]]:
    """bench_overhead with ``n_busy`` spinning processes beside it; its rows."""
    busy = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(n_busy)]
    try:
        cmd = [
            sys.executable, "-m", "benchmarks.bench_overhead",
            "--variants", "baseline,checkfreq,asym,asym-private",
            "--rounds", str(args.rounds), "--block", str(args.block), "--warmup-rounds", "1",
            "--layers", str(args.layers), "--batch", str(args.batch),
            "--out", out_dir, "--tag", f"_load{n_busy}",
        ]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"bench_overhead failed at load {n_busy}: {r.stderr[-3000:]}")
    finally:
        for p in busy:
            p.kill()
            p.wait()
    with open(os.path.join(out_dir, f"overhead_load{n_busy}.json")) as f:
        return list(json.load(f)["rows"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loads", default="0,1,2", help="numbers of busy processes, comma-separated")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--block", type=int, default=6)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", default=os.path.join(RESULTS, "load.md"))
    args = p.parse_args(argv)
    started = now()
    levels = [int(x) for x in args.loads.split(",")]
    raw = tempfile.mkdtemp(prefix="bench-load-")
    results = {n: {str(r["variant"]): r for r in run_level(n, args, raw)} for n in levels}
    rows, verdicts = [], []
    for n, by in results.items():
        a, c = by["asym"], by["checkfreq"]
        for name in ("checkfreq", "asym", "asym-private"):
            r = by[name]
            rows.append(
                [
                    str(n), name, f"{float(r['paired_pct']):+.1f}%", f"{float(r['median_stall_ms']):.1f}",
                    f"{r.get('durable')}/{r.get('checkpoints')}", str(r.get("skipped")), str(r.get("late")),
                ]
            )  # fmt: skip
        all_durable = all(
            by[x].get("durable") == by[x].get("checkpoints") and not by[x].get("skipped")
            for x in by
            if "checkpoints" in by[x]
        )
        ok = (
            all_durable
            and float(a["median_stall_ms"]) <= float(c["median_stall_ms"])
            and float(a["paired_pct"]) <= float(c["paired_pct"])
        )
        verdicts.append(f"- {n} busy: every checkpoint durable: {all_durable}; asym stall <= checkfreq's and asym "
                        f"overhead <= checkfreq's: {'PASS' if ok else 'FAIL'}")  # fmt: skip
    md = "\n".join(
        [
            "# Checkpointing beside busy cores (0, 1, 2 spinning processes)",
            "",
            f"- machine: {machine_line()}",
            f"- date: {started:%Y-%m-%d %H:%M} UTC, git {git_rev()}",
            f"- command: `{command_line('benchmarks.bench_load', argv)}`",
            f"- model: GPT-2 {args.layers} layers, batch {args.batch} x 128, a checkpoint every iteration, default "
            f"options (background threads under SCHED_IDLE); {args.rounds} rounds of {args.block}-iteration blocks "
            "per level, paired against the baseline of the same level",
            "",
            *markdown_table(
                ["busy processes", "variant", "overhead", "median stall ms", "durable", "skipped", "late"],
                "llrrrrr",
                rows,
            ),
            "",
            *verdicts,
            "",
            f"Per-level reports: `{raw}/overhead_load*.md` (not kept).",
            "",
        ]
    )
    print(md)
    write_report(args.out, md, {"levels": {str(k): v for k, v in results.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
