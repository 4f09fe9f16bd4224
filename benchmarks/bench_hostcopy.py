"""Host-to-host copy as the snapshot copy thread does it: ``memmove`` against the streaming copy.

The copy thread copies the training state into a host slot tensor by tensor (partition ranges cut tensors).
For each piece size, 220 MiB (the benchmark GPT-2's state) is copied piece by piece from one pre-faulted
buffer into another, with ``ctypes.memmove`` (glibc: cached ``rep movsb`` stores below its non-temporal
threshold) and with :func:`asymstore.snapshot.host_copy` (non-temporal stores from ``asymstore._native``). The
methods alternate for ``--rounds`` rounds; we report the median wall time and the calling thread's CPU time.

Usage::

    PYTHONPATH=. python benchmarks/bench_hostcopy.py
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from _machine import machine_line  # noqa: E402

from asymstore.snapshot import host_copy, streaming_copy_available  # noqa: E402

SIZES = (64 << 10, 1 << 20, 14 << 20)


def run(total: int, piece: int, fn, dst: np.ndarray, src: np.ndarray) -> tuple[float, float]:
    d, s = dst.ctypes.data, src.ctypes.data
    t0, c0 = time.perf_counter(), time.thread_time()
    for off in range(0, total, piece):
        fn(d + off, s + off, min(piece, total - off))
    return time.perf_counter() - t0, time.thread_time() - c0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=220)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--out", default=os.path.join(HERE, "results", "hostcopy.md"))
    a = p.parse_args()
    if not streaming_copy_available():
        sys.exit("asymstore._native is not built (no C compiler at install time): nothing to compare")
    total = a.mib << 20
    src = np.random.default_rng(0).integers(0, 256, total, dtype=np.uint8)
    dst = np.ones(total, np.uint8)  # touched: page faults are not what is measured
    methods = {"memmove": ctypes.memmove, "streaming (asymstore)": host_copy}
    res: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in range(a.rounds + 1):
        for piece in SIZES:
            for name, fn in methods.items() if r % 2 else reversed(list(methods.items())):
                w = run(total, piece, fn, dst, src)
                if r:  # round 0 warms up
                    res.setdefault((name, piece), []).append(w)
        assert np.array_equal(dst, src)
        dst[:] = 1
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
        f"`PYTHONPATH=. python benchmarks/bench_hostcopy.py --mib {a.mib} --rounds {a.rounds}`.\n\n"
        f"{a.mib} MiB copied piece by piece between two pre-faulted buffers on one thread; medians of "
        f"{a.rounds} rounds (methods alternating).\n\n"
        "| piece | method | wall ms | GB/s | thread CPU ms | speed-up vs memmove |\n|---|---|---:|---:|---:|---:|\n"
        + "\n".join(rows)
        + f"\n\n## Machine\n\n- {machine_line()}\n"
    )
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
