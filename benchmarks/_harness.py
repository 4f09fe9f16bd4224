"""What every benchmark shares: the machine and date of a run, the busy-machine check, the order of variants
in rotation, warm-up + block timing, medians paired against a baseline of the same run, and the report files.

Benchmarks run from the repository root as modules (``python -m benchmarks.bench_x``), so they import the
installed ``asymstore`` and each other as ``benchmarks.*``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

#: The repository root (the working directory benchmarks run from).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Where committed results live; every benchmark's ``--out`` default points here.
RESULTS = os.path.join(ROOT, "benchmarks", "results")


# --- the machine ----------------------------------------------------------------------------------------------
def _first(path: str, prefix: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, OS, Python and (when imported) torch with its intra-op threads."""
    mem = _first("/proc/meminfo", "MemTotal")
    info: dict[str, Any] = {
        "cpu": _first("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "ram_gib": int(mem.split()[0]) / 2**20 if mem else float("nan"),
        "os": platform.platform(),
        "python": platform.python_version(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    return info


def machine_line(info: dict[str, Any] | None = None) -> str:
    """``CPU, N cores, X GiB RAM; OS; Python v[, torch v (T intra-op threads)]``."""
    mi = info or machine_info()
    line = f"CPU: {mi['cpu']}, {mi['cores']} cores, {mi['ram_gib']:.1f} GiB RAM; {mi['os']}; Python {mi['python']}"
    if "torch" in mi:
        line += f", torch {mi['torch']} ({mi['torch_threads']} intra-op threads)"
    return line


def git_rev() -> str:
    """Short commit of the checkout, ``+dirty`` when tracked files changed; ``no git`` outside one."""
    try:
        rev = subprocess.run(
            ["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "") if rev else "no git"
    except (OSError, subprocess.SubprocessError):
        return "no git"


def now() -> _dt.datetime:
    """The local time with its zone: the date a report says it was measured."""
    return _dt.datetime.now().astimezone()


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """How this run was started, for the report: ``python -m benchmarks.NAME ARGS``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if module == "__main__":  # run with -m: the module's own name is in its spec
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        module = spec.name if spec is not None else "benchmarks"
    return " ".join(["python -m", module, *map(shlex.quote, args)])


# --- other load ------------------------------------------------------------------------------------------------
def other_cpu_busy(seconds: float = 3.0) -> float | None:
    """Fraction of all cores busy over ``seconds`` (from ``/proc/stat``), sampled while the caller is idle: how
    much other work the machine runs right now. The load average lags by minutes (a benchmark run just before
    still shows in it); this does not. ``None`` where ``/proc/stat`` is absent."""

    def sample() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as f:
                vals = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
        return sum(vals[:8]), idle

    a = sample()
    time.sleep(seconds)
    b = sample()
    if a is None or b is None or b[0] == a[0]:
        return None
    return 1.0 - (b[1] - a[1]) / (b[0] - a[0])


def busy_warning(busy: float | None, *, threshold: float = 0.25, when: str = "before the model was built") -> str:
    """A bold markdown warning when ``busy`` (from :func:`other_cpu_busy`) exceeds ``threshold``, else ``""``."""
    if busy is None or busy <= threshold:
        return ""
    cores = os.cpu_count() or 1
    return (
        f"**Warning: the machine was busy with other work when the run started ({busy:.0%} of {cores} cores "
        f"busy over 3 s {when}): wall times include that contention; see the block "
        f"min-max column before trusting small differences.**\n\n"
    )


# --- rotation and timing ---------------------------------------------------------------------------------------
def round_order(names: Sequence[str], r: int, *, order: str = "rotate", seed: Any = None) -> list[str]:
    """The variants of round ``r``: ``rotate`` starts one later each round (cyclic neighbours stay), ``shuffle``
    is a fresh permutation seeded by ``seed`` (``random.Random(seed)``; a list seeds numpy's generator as
    ``bench_overhead`` always did) so no variant always follows the same one."""
    out = list(names)
    if order == "rotate":
        k = r % len(out) if out else 0
        return out[k:] + out[:k]
    if isinstance(seed, list):
        import numpy as np

        np.random.default_rng(seed).shuffle(out)
    else:
        random.Random(seed).shuffle(out)
    return out


def rotate(
    variants: Sequence[tuple[str, Callable[[], float]]],
    *,
    rounds: int,
    warmup_rounds: int = 1,
    order: str = "rotate",
    seed: Callable[[int], Any] | None = None,
    on_block: Callable[[int, str, float], None] | None = None,
) -> dict[str, list[float]]:
    """Run every variant once per round for ``warmup_rounds`` untimed rounds and then ``rounds`` timed ones,
    in :func:`round_order`; returns each variant's seconds per timed round. ``seed(r)`` seeds round ``r``'s
    shuffle; ``on_block(r, name, seconds)`` sees every block (``r < 0``: warm-up)."""
    fns = dict(variants)
    times: dict[str, list[float]] = {n: [] for n in fns}
    for r in range(-warmup_rounds, rounds):
        for name in round_order(list(fns), r, order=order, seed=seed(r) if seed else r):
            dt = fns[name]()
            if r >= 0:
                times[name].append(dt)
            if on_block is not None:
                on_block(r, name, dt)
    return times


@dataclass(frozen=True)
class Block:
    """One timed block: wall and process-CPU seconds per iteration (including the final drain), each
    iteration's own seconds, the timed window (perf_counter) and the drain's seconds."""

    per_iter: float
    iters: list[float]
    window: tuple[float, float]
    cpu_per_iter: float
    drain: float


def time_block(step: Callable[[], None], drain: Callable[[], None], *, iterations: int) -> Block:
    """``iterations`` calls of ``step``, then ``drain`` (background work) inside the timing."""
    iters: list[float] = []
    c0 = time.process_time()
    t0 = time.perf_counter()
    for _ in range(iterations):
        ti = time.perf_counter()
        step()
        iters.append(time.perf_counter() - ti)
    t_last = time.perf_counter()
    drain()
    t1 = time.perf_counter()
    c1 = time.process_time()
    return Block((t1 - t0) / iterations, iters, (t0, t1), (c1 - c0) / iterations, t1 - t_last)


# --- statistics ------------------------------------------------------------------------------------------------
def warm_memory(nbytes: int) -> None:
    """Fault in and free a buffer of ``nbytes`` (plus 64 MiB), untimed, before a timed step that allocates its
    result: that step then gets memory this machine holds. A virtual machine may hand memory freed seconds ago
    back to its host, and faulting it in again cost 0.7-2.5 s per GiB on the 2-core VMs these benchmarks ran on;
    without this, that cost lands on whichever step happens to allocate such memory first."""
    from asymstore.prefault import MADV_POPULATE_WRITE, madvise
    from asymstore.snapshot import new_host_buffer

    buf = new_host_buffer(nbytes + (64 << 20))
    if not madvise(buf.data_ptr(), buf.numel() // 4096 * 4096, MADV_POPULATE_WRITE):
        buf[::4096] = 0
    del buf


def median(xs: Sequence[float]) -> float:
    """The median, ``nan`` for no samples."""
    return float(statistics.median(xs)) if xs else float("nan")


@dataclass(frozen=True)
class Paired:
    """Per-round overhead in percent of a variant against the baseline of the same round: median, min, max."""

    median: float
    min: float
    max: float


def round_pcts(xs: Sequence[float], base: Sequence[float]) -> list[float]:
    """Each round's ``xs`` against the same round's ``base``, in % (the rounds :func:`paired` summarises)."""
    return [(x / b - 1) * 100 for x, b in zip(xs, base, strict=False)]


def paired(xs: Sequence[float], base: Sequence[float]) -> Paired:
    """Each round's ``xs`` against the same round's ``base`` (slow drift of the machine cancels), in %."""
    pct = round_pcts(xs, base)
    if not pct:
        return Paired(float("nan"), float("nan"), float("nan"))
    return Paired(median(pct), min(pct), max(pct))


def fmt_ms(s: float) -> str:
    """Seconds as ``12.3`` ms, ``-`` for nan."""
    return "-" if s != s else f"{s * 1e3:.1f}"


# --- reports ---------------------------------------------------------------------------------------------------
def write_report(md_path: str, markdown: str, data: dict[str, Any] | None = None) -> str:
    """Write the markdown report to ``md_path`` and, when given, ``data`` (plus machine and date unless
    present) as JSON next to it (same name, ``.json``); ``-`` prints only. Returns the markdown path."""
    if md_path == "-":
        return md_path
    os.makedirs(os.path.dirname(os.path.abspath(md_path)) or ".", exist_ok=True)
    with open(md_path, "w") as f:
        f.write(markdown)
    if data is not None:
        payload = {"machine": machine_info(), "date": now().isoformat(timespec="seconds"), **data}
        with open(os.path.splitext(md_path)[0] + ".json", "w") as f:
            json.dump(payload, f, indent=1, default=str)
    return md_path


def markdown_table(header: Sequence[str], align: str, rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of a markdown table; ``align`` has one letter per column: ``l`` left, ``r`` right."""
    sep = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    return ["| " + " | ".join(header) + " |", sep, *("| " + " | ".join(r) + " |" for r in rows)]
