"""What a checkpoint costs the machine with host slots in shared memory against private slots, measured in the
same run: process CPU seconds per checkpoint (every thread: snapshot copy, slot seal, encode, checksums, write)
and wall seconds of a blocking save (snapshot + seal + durable on the local tier).

CPU time is the figure to read on a busy machine: training shares the cores with everything asymstore does in
the background, so CPU seconds are what a checkpoint takes away from it, and unlike wall time they barely move
with other load. Variants alternate, each round in a fresh store; medians over rounds.

Goal: shared slots cost no more CPU than private ones beyond the rounds' spread.

    python -m benchmarks.bench_slots [--rounds 5] [--mib 220] [--saves 6] [--out benchmarks/results/slots.md]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from collections.abc import Sequence

import torch

import asymstore
from benchmarks._harness import (
    RESULTS,
    busy_warning,
    command_line,
    git_rev,
    machine_line,
    markdown_table,
    median,
    now,
    other_cpu_busy,
    write_report,
)

KINDS = ("shared", "private")


def build_state(mib: int) -> dict[str, torch.Tensor]:
    """Four fp32 tensors of ``mib`` MiB in all (the cost per byte does not depend on the values)."""
    g = torch.Generator().manual_seed(0)
    per = max(mib * (1 << 20) // 4 // 4, 1)
    return {f"layer{i}.weight": torch.randn(per, generator=g) for i in range(4)}


def one_round(kind: str, state: dict[str, torch.Tensor], saves: int, root: str) -> tuple[float, float]:
    """(CPU s, wall s) per blocking save of ``state`` into a fresh store with ``kind`` host slots."""
    d = tempfile.mkdtemp(dir=root)
    try:
        st = asymstore.open_store(d, host_memory=kind, host_slots=2, keep=2)
        try:
            st.save(state, 0)  # slots allocated and first-touched; the tier probed
            c0, w0 = time.process_time(), time.perf_counter()
            for s in range(1, saves + 1):
                st.save(state, s)
            return (time.process_time() - c0) / saves, (time.perf_counter() - w0) / saves
        finally:
            st.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mib", type=int, default=220, help="state size (MiB)")
    ap.add_argument("--saves", type=int, default=6, help="timed saves per round")
    ap.add_argument("--dir", default=None, help="where the tier lives (default: a temporary directory)")
    ap.add_argument("--out", default=f"{RESULTS}/slots.md")
    a = ap.parse_args(argv)
    busy = other_cpu_busy()
    state = build_state(a.mib)
    root = a.dir or tempfile.mkdtemp(prefix="asymstore-bench-slots-")
    res: dict[str, list[tuple[float, float]]] = {k: [] for k in KINDS}
    try:
        for r in range(a.rounds):
            for k in KINDS if r % 2 == 0 else KINDS[::-1]:
                res[k].append(one_round(k, state, a.saves, root))
                print(f"round {r} {k}: cpu {res[k][-1][0]:.3f} s, wall {res[k][-1][1]:.3f} s", flush=True)
    finally:
        if a.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    cpu = {k: median([c for c, _ in v]) for k, v in res.items()}
    wall = {k: median([w for _, w in v]) for k, v in res.items()}
    rows = [
        [
            k,
            f"{cpu[k] * 1e3:.0f}",
            f"{min(c for c, _ in res[k]) * 1e3:.0f}..{max(c for c, _ in res[k]) * 1e3:.0f}",
            f"{cpu[k] / cpu['private']:.2f}x",
            f"{wall[k] * 1e3:.0f}",
        ]
        for k in KINDS
    ]
    md = [
        "# Host slots: shared memory against private memory, cost per checkpoint",
        "",
        f"- command: `{command_line(__name__, argv)}`",
        f"- machine: {machine_line()}",
        f"- asymstore: {git_rev()}",
        f"- date: {now().isoformat(timespec='seconds')}",
        f"- state: {a.mib} MiB fp32 in 4 tensors; {a.saves} blocking saves per round, {a.rounds} rounds, variants "
        "alternating, medians",
        "",
        busy_warning(busy, when="before the first round"),
        *markdown_table(
            ["slots", "CPU ms / checkpoint", "min..max", "vs private", "wall ms / blocking save"], "lrrrr", rows
        ),
        "",
        "CPU = process CPU time over the saves (all threads) / saves. A shared slot is checksummed once when it "
        "is sealed (so a restarted process can verify it); raw tier writes reuse those checksums.",
        "",
    ]
    write_report(a.out, "\n".join(md), {"cpu_s": cpu, "wall_s": wall, "rounds": res, "busy_before": busy})
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
