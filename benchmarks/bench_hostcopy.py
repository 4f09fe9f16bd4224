"""Host-to-host copy as the snapshot copy thread does it: ``memmove`` against the streaming copy.

The copy thread copies the training state into a host slot tensor by tensor (partition ranges cut tensors).
For each piece size, 220 MiB (the benchmark GPT-2's state) is copied piece by piece from one pre-faulted
buffer into another, with ``ctypes.memmove`` (glibc: cached ``rep movsb`` stores below its non-temporal
threshold) and with :func:`asymstore.snapshot.host_copy` (non-temporal stores from ``asymstore._native``). The
methods alternate for ``--rounds`` rounds; we report the median wall time and the calling thread's CPU time.

Usage::

    python -m benchmarks.bench_hostcopy            # 220 MiB, 9 rounds
    python -m benchmarks.bench_hostcopy --quick    # smoke run: 16 MiB, 1 round
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from asymstore.snapshot import host_copy, streaming_copy_available
from benchmarks._harness import RESULTS, machine_line, write_report

Copy = Callable[[int, int, int], Any]

SIZES = (64 << 10, 1 << 20, 14 << 20)


def run(total: int, piece: int, fn: Copy, dst: np.ndarray, src: np.ndarray) -> tuple[float, float]:
    d, s = dst.ctypes.data, src.ctypes.data
    t0, c0 = time.perf_counter(), time.thread_time()
    for off in range(0, total, piece):
        fn(d + off, s + off, min(piece, total - off))
    return time.perf_counter() - t0, time.thread_time() - c0


def measure(a: argparse.Namespace, methods: dict[str, Copy]) -> dict[tuple[str, int], list[tuple[float, float]]]:
    """(wall, thread CPU) seconds per method and piece size; methods alternate, round 0 warms up."""
    total = a.mib << 20
    src = np.random.default_rng(0).integers(0, 256, total, dtype=np.uint8)
    dst = np.ones(total, np.uint8)  # touched: page faults are not what is measured
    res: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in range(a.rounds + 1):
        for piece in SIZES:
            for name, fn in methods.items() if r % 2 else reversed(list(methods.items())):
                w = run(total, piece, fn, dst, src)
                if r:  # round 0 warms up
                    res.setdefault((name, piece), []).append(w)
        assert np.array_equal(dst, src)
        dst[:] = 1
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--mib", type=int, default=220)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--quick", action="store_true", help="smoke run: 16 MiB, 1 round")
    p.add_argument("--out", default=os.path.join(RESULTS, "hostcopy.md"))
    a = p.parse_args()
    if a.quick:
        a.mib, a.rounds = 16, 1
    if not streaming_copy_available():
        sys.exit("asymstore._native is not built (no C compiler at install time): nothing to compare")
    total = a.mib << 20
    methods: dict[str, Copy] = {"memmove": ctypes.memmove, "streaming (asymstore)": host_copy}
    res = measure(a, methods)
    rows = []
    for piece in SIZES:
        base = statistics.median(w for w, _ in res[("memmove", piece)])
        for name in methods:
            wall = statistics.median(w for w, _ in res[(name, piece)])
            cpu = statistics.median(c for _, c in res[(name, piece)])
            rows.append(
                f"| {piece >> 10} KiB | {name} | {wall * 1e3:.1f} | {total / wall / 1e9:.2f} | {cpu * 1e3:.1f} "
                f"| {base / wall:.2f}x |"
            )
            print(rows[-1], flush=True)
    now = _dt.datetime.now(_dt.timezone.utc)
    text = (
        f"# Host copy: memmove vs streaming stores\n\nMeasured {now:%Y-%m-%d %H:%M} UTC by "
        f"`python -m benchmarks.bench_hostcopy --mib {a.mib} --rounds {a.rounds}`.\n\n"
        f"{a.mib} MiB copied piece by piece between two pre-faulted buffers on one thread; medians of "
        f"{a.rounds} rounds (methods alternating).\n\n"
        "| piece | method | wall ms | GB/s | thread CPU ms | speed-up vs memmove |\n|---|---|---:|---:|---:|---:|\n"
        + "\n".join(rows)
        + f"\n\n## Machine\n\n- {machine_line()}\n"
    )
    data = {"args": vars(a), "seconds": {f"{n} {piece}": v for (n, piece), v in res.items()}}
    print(f"wrote {write_report(a.out, text, data)}")


if __name__ == "__main__":
    main()
