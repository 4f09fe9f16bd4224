"""Per-iteration overhead of checkpointing at every iteration, GPT-2-style model, CPU.

Variants, measured in ONE run, interleaved in rotation (design section 8):

* ``baseline``      no checkpointing
* ``sync``          asymstore, blocking copy + persist at the step boundary
* ``checkfreq``     asymstore, blocking snapshot at the step boundary, background persist (CheckFreq policy)
* ``uniform``       asymstore, equal partitions over forward/backward windows (DataStates-LLM policy)
* ``asym``          asymstore, asymmetric partitions sized to the profiled windows (the default)
* ``torch.save``    ``torch.save`` of model + optimizer state, ``fsync``, every iteration
* ``dcp.async_save`` ``torch.distributed.checkpoint.async_save`` (thread mode, no process group); the previous
  future is waited for before the next save, as a user would
* ``write-floor``   not a checkpointer: the same number of bytes written per iteration to the same disk by a
  background thread (``O_DIRECT`` from one prepared buffer, ``fsync``), nothing else: what writing a checkpoint
  per iteration to this disk costs the training at least, whoever writes it

Method: each variant runs a *block*: ``--warmup`` untimed iterations (checkpointing on), then its background work
is drained, then ``--block`` timed iterations, then the timer stops only after its background work is drained
again (so each timed block holds exactly ``--block`` complete checkpoints, persisted). Blocks are repeated in
rotation for ``--rounds`` rounds (the starting variant rotates too, or a seeded shuffle), after
``--warmup-rounds`` untimed rounds that run every variant once (first file creation on the checkpoint disk,
allocator, the profiling warm-up of asym/uniform); we report medians of the per-block per-iteration times. Old steps are deleted inside the timed loop, keeping the last ``--keep``, for every
checkpointing variant alike.

The asymstore checkpointers are created once and attached for each of their blocks (detached in between), so the
profiling warm-up of asym/uniform happens once, in the warm-up round, as in a real run where a checkpointer stays
attached; detaching finishes the snapshot in flight outside the timed region.

Usage::

    PYTHONPATH=. python benchmarks/bench_overhead.py            # full run (~25 min on 2 cores)
    PYTHONPATH=. python benchmarks/bench_overhead.py --quick    # smoke run (~2 min)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as _dt
import gc
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _use_source_tree() -> None:
    """Import ``asymstore``, ``asymstore.backends`` and ``asymstore.trainer_hooks`` from this checkout.

    The package maps ``backends/`` and ``trainer_hooks/`` to ``asymstore.*`` through package-dir; an editable
    install of another checkout would otherwise supply those two from there.
    """
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import asymstore  # noqa: F401  (from ROOT, first on sys.path)

    for sub, d in (("backends", "backends"), ("trainer_hooks", "trainer_hooks")):
        name = f"asymstore.{sub}"
        path = os.path.join(ROOT, d, "__init__.py")
        if name in sys.modules or not os.path.exists(path):
            continue
        spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=[os.path.join(ROOT, d)])
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        setattr(sys.modules["asymstore"], sub, mod)


_use_source_tree()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _gpt2 import Data, add_model_args, build_model  # noqa: E402
from _machine import machine_info, machine_line, other_cpu_busy  # noqa: E402
from _rawio import write_direct  # noqa: E402

import asymstore  # noqa: E402
from asymstore.store import Store, TierSpec  # noqa: E402
from asymstore.trainer_hooks import AsymCheckpointer  # noqa: E402

VARIANTS = (
    "baseline",
    "sync",
    "checkfreq",
    "uniform",
    "asym",
    "asym-host",
    "asym-no-idle",
    "torch.save",
    "dcp.async_save",
    "write-floor",
)
#: variants that run by default. Extra ones: asym-host = asym into host memory only (no persistent tier: the
#: snapshot mechanism alone, without the disk writes); asym-no-idle = asym with its background threads at normal
#: priority (``background_idle=False``: the ablation of ``SCHED_IDLE``).
#: write-floor is a reference, not a checkpointer: see :class:`WriteFloor`.
DEFAULT_VARIANTS = ("baseline", "sync", "checkfreq", "uniform", "asym", "torch.save", "dcp.async_save", "write-floor")
ASYM_STRATEGIES = ("sync", "checkfreq", "uniform", "asym")


class PhaseLog:
    """Forward / backward / optimizer-step spans of the training thread (perf_counter seconds)."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, float, float]] = []
        self.enabled = False

    def add(self, name: str, t0: float, t1: float) -> None:
        if self.enabled:
            self.spans.append((name, t0, t1))


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, phases: PhaseLog) -> None:
    t0 = time.perf_counter()
    loss = model(input_ids=x, labels=x).loss
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    phases.add("forward", t0, t1)
    phases.add("backward", t1, t2)
    phases.add("optimizer step", t2, t3)


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[int, int]:
    params = {p.data_ptr(): p.numel() * p.element_size() for p in model.parameters()}
    opt_b = 0
    for s in opt.state.values():
        for v in s.values():
            if isinstance(v, torch.Tensor):
                opt_b += v.numel() * v.element_size()
    return sum(params.values()), opt_b


# --------------------------------------------------------------------------------------------------------------
# variants


class Variant:
    name = ""
    checkpoints = True

    def before_block(self) -> None:
        """Untimed: attach."""

    def after_iter(self) -> float:
        """After each training step: checkpoint (where the variant does it here); returns seconds it blocked."""
        return 0.0

    def drain(self) -> None:
        """Timed at the end of a block: wait for all background work of the block's checkpoints."""

    def after_block(self) -> None:
        """Untimed: detach."""

    def stalls(self) -> list[float]:
        return []

    def close(self) -> None:
        pass


class Baseline(Variant):
    name = "baseline"
    checkpoints = False


class AsymstoreVariant(Variant):
    def __init__(
        self,
        strategy: str,
        model: torch.nn.Module,
        opt: torch.optim.Optimizer,
        root: str,
        keep: int,
        warmup: int,
        name: str | None = None,
        host_only: bool = False,
        **store_options: Any,
    ) -> None:
        self.name = name or strategy
        self.dir = os.path.join(root, self.name)
        # retention runs on the persistence thread after each commit, as a user would configure it
        tiers = [] if host_only else [TierSpec(self.dir, keep=max(keep, 1))]
        self.store = Store(tiers, **store_options)
        self.keep = keep
        self.ck = AsymCheckpointer(
            model,
            opt,
            self.store,
            every=1,
            strategy=strategy,
            warmup=warmup,  # type: ignore[arg-type]
            trace=True,
        )
        self.timed: list[int] = []  # indices into ck.history of checkpoints completed inside timed regions
        self._mark = 0

    def before_block(self) -> None:
        self.ck.attach()

    def start_timed(self) -> None:
        self._mark = len(self.ck.history)

    def drain(self) -> None:
        self.ck.wait()

    def end_timed(self) -> None:
        self.timed.extend(range(self._mark, len(self.ck.history)))

    def after_block(self) -> None:
        self.ck.detach(finish=True)

    def timed_stats(self) -> list[Any]:
        return [self.ck.history[i] for i in self.timed if not self.ck.history[i].skipped]

    def stalls(self) -> list[float]:
        # training-thread time per checkpoint: the synchronous begin (state walk, volatile tensors, and for
        # sync/checkfreq the whole copy) plus the wait at the barrier before the optimizer step
        return [s.begin_s + s.stall_s for s in self.timed_stats()]

    def close(self) -> None:
        self.ck.detach(finish=True)
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    return {"model": model.state_dict(), "optim": opt.state_dict(), "step": step}


class TorchSave(Variant):
    name = "torch.save"

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, root: str, keep: int) -> None:
        self.model, self.opt, self.keep = model, opt, keep
        self.dir = os.path.join(root, "torch_save")
        os.makedirs(self.dir, exist_ok=True)
        self.step = 0
        self.paths: list[str] = []
        self.timed = False
        self._stalls: list[float] = []

    def after_iter(self) -> float:
        t0 = time.perf_counter()
        self.step += 1
        path = os.path.join(self.dir, f"step_{self.step}.pt")
        with open(path, "wb") as f:
            torch.save(full_state(self.model, self.opt, self.step), f)
            f.flush()
            os.fsync(f.fileno())
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)
        self.paths.append(path)
        while len(self.paths) > self.keep:
            os.unlink(self.paths.pop(0))
        dt = time.perf_counter() - t0
        if self.timed:
            self._stalls.append(dt)
        return dt

    def stalls(self) -> list[float]:
        return self._stalls

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class DcpAsync(Variant):
    name = "dcp.async_save"

    def __init__(self, model: torch.nn.Module, opt: torch.optim.Optimizer, root: str, keep: int) -> None:
        import torch.distributed.checkpoint as dcp

        self.dcp = dcp
        self.model, self.opt, self.keep = model, opt, keep
        self.dir = os.path.join(root, "dcp")
        os.makedirs(self.dir, exist_ok=True)
        self.step = 0
        self.fut: Any = None
        self.paths: list[str] = []
        self.timed = False
        self._stalls: list[float] = []

    def after_iter(self) -> float:
        t0 = time.perf_counter()
        if self.fut is not None:
            self.fut.result()  # the previous save must be done before the next (and before deleting)
            self.fut = None
        while len(self.paths) >= self.keep:
            shutil.rmtree(self.paths.pop(0), ignore_errors=True)
        self.step += 1
        path = os.path.join(self.dir, f"step_{self.step}")
        self.fut = self.dcp.async_save(
            {"model": self.model.state_dict(), "optim": self.opt.state_dict()}, checkpoint_id=path
        )
        self.paths.append(path)
        dt = time.perf_counter() - t0
        if self.timed:
            self._stalls.append(dt)
        return dt

    def drain(self) -> None:
        if self.fut is not None:
            self.fut.result()
            self.fut = None

    def stalls(self) -> list[float]:
        return self._stalls

    def close(self) -> None:
        self.drain()
        shutil.rmtree(self.dir, ignore_errors=True)


class WriteFloor(Variant):
    """Reference: the cost of only *moving the bytes*. After each iteration a background thread writes as many
    bytes as the state holds to the same disk, with ``O_DIRECT`` from one page-aligned buffer prepared once,
    and fsyncs: no copy of the state, no format, no checksums. What this costs the training is what writing a
    checkpoint per iteration to this disk costs at least, whatever does it; it is measured so that the
    checkpointers' overheads can be read against it."""

    name = "write-floor"

    def __init__(self, nbytes: int, root: str) -> None:
        import mmap

        self.nbytes = nbytes
        self.buf = mmap.mmap(-1, self.nbytes)  # page-aligned, as a host snapshot slot is
        for off in range(0, self.nbytes, 1 << 20):  # not zero pages: real bytes to write
            self.buf[off : off + 16] = os.urandom(16)
        self.dir = os.path.join(root, "write_floor")
        os.makedirs(self.dir, exist_ok=True)
        self.pending: Any = None
        self.i = 0
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="write-floor")

    def after_iter(self) -> float:
        t0 = time.perf_counter()
        self.drain()  # one write in flight, as the checkpointers with K=2 slots have at most
        self.i += 1
        self.pending = self.pool.submit(write_direct, os.path.join(self.dir, f"w{self.i % 2}"), memoryview(self.buf))
        return time.perf_counter() - t0

    def drain(self) -> None:
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def close(self) -> None:
        self.drain()
        self.pool.shutdown()
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# running


def run_block(
    v: Variant,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    data: Data,
    phases: PhaseLog,
    warmup: int,
    block: int,
    record: bool = True,
) -> tuple[float, list[float], tuple[float, float], float, float]:
    """One block; returns (seconds per iteration incl. the final drain, the iterations' own times, the timed
    window, process CPU seconds per iteration, the final drain's seconds)."""
    gc.collect()
    v.before_block()
    for _ in range(warmup):
        train_step(model, opt, data.next(), phases)
        v.after_iter()
    v.drain()  # the warm-up's background work must not land in the timed region
    if isinstance(v, AsymstoreVariant) and record:
        v.start_timed()
    if isinstance(v, (TorchSave, DcpAsync)):
        v.timed = record
    iters: list[float] = []
    phases.enabled = True
    c0 = time.process_time()
    t0 = time.perf_counter()
    for _ in range(block):
        ti = time.perf_counter()
        train_step(model, opt, data.next(), phases)
        v.after_iter()
        iters.append(time.perf_counter() - ti)
    t_last = time.perf_counter()
    v.drain()
    t1 = time.perf_counter()
    c1 = time.process_time()
    phases.enabled = False
    if isinstance(v, AsymstoreVariant) and record:
        v.end_timed()
    if isinstance(v, (TorchSave, DcpAsync)):
        v.timed = False
    v.after_block()
    return (t1 - t0) / block, iters, (t0, t1), (c1 - c0) / block, t1 - t_last


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def fmt_ms(s: float) -> str:
    return "-" if s != s else f"{s * 1e3:.1f}"


# --------------------------------------------------------------------------------------------------------------
# timeline figure


def plot_timeline(
    ck: AsymCheckpointer, spans: list[tuple[str, float, float]], window: tuple[float, float], path: str, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    t0 = window[0]  # x axis: ms from the start of the plotted window
    lo, hi = 0.0, (window[1] - window[0]) * 1e3
    shift = (ck.timeline.t0 - t0) * 1e3  # trace timestamps are relative to the timeline's own t0
    rows = ["compute", "snapshot (train thread)", "barrier stall", "copy thread", "persist thread"]
    y = {r: len(rows) - 1 - i for i, r in enumerate(rows)}
    colors = {
        "forward": "#4c72b0",
        "backward": "#55a868",
        "optimizer step": "#8172b2",
        "copy forward": "#dd8452",
        "copy backward": "#c44e52",
        "copy step": "#000000",
        "copy begin": "#937860",
        "snapshot begin": "#937860",
        "stall": "#d62728",
        "persist": "#64b5cd",
    }
    fig, ax = plt.subplots(figsize=(16, 4.8))

    def bar(row: str, a: float, b: float, color: str, h: float = 0.7) -> None:
        if b < lo or a > hi:
            return
        ax.broken_barh([(a, max(b - a, 0.4))], (y[row] - h / 2, h), facecolors=color, edgecolor="none")

    for name, a, b in spans:
        bar("compute", (a - t0) * 1e3, (b - t0) * 1e3, colors[name])
    for e in ck.timeline.events():
        a = e["ts"] / 1e3 + shift
        b = a + e["dur"] / 1e3
        name = e["name"]
        if e["tid"] == "copy":
            where = name.split()[1]
            bar(
                "copy thread" if where in ("forward", "backward") else "snapshot (train thread)",
                a,
                b,
                colors.get(f"copy {where}", "#333333"),
            )
        elif name.startswith("snapshot begin"):
            bar("snapshot (train thread)", a, b, colors["snapshot begin"])
        elif name.startswith("barrier"):
            bar("barrier stall", a, b, colors["stall"])
        elif name.startswith("persist"):
            bar("persist thread", a, b, colors["persist"])
    ax.set_xlim(lo, hi)
    ax.set_yticks([y[r] for r in rows])
    ax.set_yticklabels(rows)
    ax.set_xlabel("time from the start of the window (ms)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    legend = [
        Patch(color=colors[k], label=k)
        for k in (
            "forward",
            "backward",
            "optimizer step",
            "copy forward",
            "copy backward",
            "copy step",
            "snapshot begin",
            "stall",
            "persist",
        )
    ]
    ax.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=9, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round of 3-iteration blocks")
    p.add_argument("--rounds", type=int, default=8, help="measured rounds of blocks (default 8)")
    p.add_argument(
        "--warmup-rounds",
        type=int,
        default=1,
        help="untimed rounds first, every variant once (file system, allocator, profiling warm-up)",
    )
    p.add_argument(
        "--block",
        type=int,
        default=8,
        help="timed iterations per block (default 8; each block ends with one drain, its cost spread "
        "over these iterations)",
    )
    p.add_argument(
        "--order",
        choices=("rotate", "shuffle"),
        default="rotate",
        help="block order per round: rotate (default) or a seeded shuffle",
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations at the start of each block")
    p.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS)
    )
    add_model_args(p, layers=8, batch=16, seq=128)
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept per variant (older ones deleted)")
    p.add_argument("--dir", default=None, help="checkpoint directory (default: a fresh temp dir, removed after)")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="where overhead.md and the PNG go")
    p.add_argument("--tag", default="", help="suffix for the output file names (e.g. _before)")
    a = p.parse_args(argv)
    if a.quick:
        a.rounds, a.block, a.warmup, a.warmup_rounds = 1, 3, 2, 0
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad or "baseline" not in names:
        raise SystemExit(f"unknown variants {bad} (and baseline is required); choose from {VARIANTS}")
    started = _dt.datetime.now().astimezone()
    load0 = os.getloadavg()
    busy0 = other_cpu_busy()  # before this process does anything
    t_start = time.perf_counter()
    model, opt = build_model(args)
    data = Data(args)
    phases = PhaseLog()
    n_params = sum(p.numel() for p in model.parameters())
    for _ in range(2):  # global warm-up: allocator, AdamW state creation
        train_step(model, opt, data.next(), phases)
    p_bytes, o_bytes = state_bytes(model, opt)
    root = args.dir or tempfile.mkdtemp(prefix="asym-bench-", dir=os.environ.get("ASYM_BENCH_DIR"))
    os.makedirs(root, exist_ok=True)
    variants: dict[str, Variant] = {}
    for n in names:
        if n == "baseline":
            variants[n] = Baseline()
        elif n in ASYM_STRATEGIES:
            variants[n] = AsymstoreVariant(n, model, opt, root, args.keep, warmup=args.warmup)
        elif n == "asym-host":
            variants[n] = AsymstoreVariant(
                "asym", model, opt, root, args.keep, warmup=args.warmup, name=n, host_only=True
            )
        elif n == "asym-no-idle":
            variants[n] = AsymstoreVariant(
                "asym", model, opt, root, args.keep, warmup=args.warmup, name=n, background_idle=False
            )
        elif n == "torch.save":
            variants[n] = TorchSave(model, opt, root, args.keep)
        elif n == "write-floor":
            variants[n] = WriteFloor(p_bytes + o_bytes, root)
        else:
            variants[n] = DcpAsync(model, opt, root, args.keep)

    print(
        f"model: GPT-2 ({args.layers} layers, d={args.embd}, vocab {args.vocab}), {n_params / 1e6:.2f}M params; "
        f"state {(p_bytes + o_bytes) / 2**20:.1f} MiB (params {p_bytes / 2**20:.1f} + AdamW moments "
        f"{o_bytes / 2**20:.1f}); batch {args.batch} x seq {args.seq}; torch threads {torch.get_num_threads()}",
        flush=True,
    )
    per_iter: dict[str, list[float]] = {n: [] for n in names}
    raw_iters: dict[str, list[float]] = {n: [] for n in names}
    cpu_iter: dict[str, list[float]] = {n: [] for n in names}
    drains: dict[str, list[float]] = {n: [] for n in names}
    steady: dict[str, list[float]] = {n: [] for n in names}  # per block: mean of iterations 2..N
    asym_window: tuple[float, float] | None = None
    for r in range(-args.warmup_rounds, args.rounds):
        record = r >= 0
        if args.order == "shuffle":  # a fresh seeded permutation each round: no fixed neighbour for any variant
            order = list(names)
            np.random.default_rng([args.seed, r + args.warmup_rounds]).shuffle(order)
        else:  # rotation: the starting variant rotates, the cyclic neighbours stay the same
            order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            v = variants[n]
            phases.spans.clear() if n == "asym" else None
            dt, its, win, cpu, drain = run_block(v, model, opt, data, phases, args.warmup, args.block, record)
            if not record:
                print(f"warm-up round {n:>15}: {dt * 1e3:8.1f} ms/iter (not counted)", flush=True)
                continue
            if n == "asym":
                asym_window = win
                asym_spans = list(phases.spans)
            phases.spans.clear()
            per_iter[n].append(dt)
            cpu_iter[n].append(cpu)
            raw_iters[n].extend(its)
            drains[n].append(drain)
            steady[n].append(statistics.fmean(its[1:]) if len(its) > 1 else its[0])
            print(
                f"round {r + 1}/{args.rounds} {n:>15}: {dt * 1e3:8.1f} ms/iter, cpu {cpu * 1e3:6.0f} ms/iter  "
                f"(iterations {', '.join(f'{x * 1e3:.0f}' for x in its)} ms)",
                flush=True,
            )

    base = median(per_iter["baseline"])
    base_cpu = median(cpu_iter["baseline"])
    rows = []
    for n in names:
        med = median(per_iter[n])
        ov = (med - base) / base * 100
        v = variants[n]
        st = v.stalls()
        # paired: each round's block against the same round's baseline block (slow drift of the machine cancels)
        paired = [(x / b - 1) * 100 for x, b in zip(per_iter[n], per_iter["baseline"])]
        paired_steady = [(x / b - 1) * 100 for x, b in zip(steady[n], steady["baseline"])]
        rows.append(
            {
                "variant": n,
                "median_ms": med * 1e3,
                "overhead_pct": ov,
                "median_stall_ms": median(st) * 1e3,
                "paired_pct": median(paired),
                "paired_min": min(paired),
                "paired_max": max(paired),
                "steady_paired_pct": median(paired_steady),
                "drain_ms": median(drains[n]) * 1e3,
                "cpu_ms": median(cpu_iter[n]) * 1e3,
                "cpu_overhead_pct": (median(cpu_iter[n]) - base_cpu) / base_cpu * 100,
                "blocks": len(per_iter[n]),
                "iters": len(raw_iters[n]),
                "min_ms": min(per_iter[n]) * 1e3,
                "max_ms": max(per_iter[n]) * 1e3,
            }
        )
    by = {r["variant"]: r for r in rows}

    # asym: predicted vs measured stall, hidden fraction, persistence
    extra: dict[str, Any] = {}
    if "asym" in variants:
        av = variants["asym"]
        assert isinstance(av, AsymstoreVariant)
        ck = av.ck
        ts = av.timed_stats()
        plan = ck._plan_cache[1] if ck._plan_cache else None  # the plan in use (read-only peek for reporting)
        extra = {
            "predicted_barrier_stall_ms": plan.predicted_stall_s * 1e3 if plan is not None else float("nan"),
            "plan_remainder_bytes": plan.remainder_bytes if plan is not None else 0,
            "plan_partitions": len([p for p in plan.partitions if p.nbytes]) if plan is not None else 0,
            "measured_barrier_stall_ms": median([s.stall_s for s in ts]) * 1e3,
            "measured_begin_ms": median([s.begin_s for s in ts]) * 1e3,
            "hidden_fraction": (sum(s.hidden_bytes for s in ts) / max(sum(s.bytes for s in ts), 1)),
            "persist_ms": median([s.persist_s for s in ts if s.persist_s is not None]) * 1e3,
            "hidden_copy_ms": median([s.hidden_copy_s for s in ts]) * 1e3,
            "copy_bandwidth_gbs": (ck._copy_bw or 0) / 1e9,
            "replans": ck.replans,
            "persist_encode_ms": median(
                [
                    h.result().reports[k].encode_seconds
                    for h in ck.handles
                    if h.done() and not h.skipped
                    for k in h.result().reports
                ]
            )
            * 1e3,
            "persist_write_ms": median(
                [
                    h.result().reports[k].write_seconds
                    for h in ck.handles
                    if h.done() and not h.skipped
                    for k in h.result().reports
                ]
            )
            * 1e3,
            "checkpoint_bytes": ts[-1].bytes if ts else 0,
        }
    res_dir = args.out
    os.makedirs(res_dir, exist_ok=True)
    png = None
    if "asym" in variants and asym_window is not None:
        av = variants["asym"]
        assert isinstance(av, AsymstoreVariant)
        png = os.path.join(res_dir, f"timeline_asym{args.tag}.png")
        # the last timed asym block, its first two iterations and its drain
        w0, w1 = asym_window
        its = [s for s in asym_spans if s[0] == "forward"]
        if len(its) >= 3:
            w1 = min(w1, its[2][1] + 0.05) if args.block > 3 else w1
        plot_timeline(
            av.ck,
            asym_spans,
            (w0 - 0.02, w1 + 0.02),
            png,
            f"asym: {n_params / 1e6:.1f}M-param GPT-2, {(p_bytes + o_bytes) / 2**20:.0f} MiB state, "
            f"checkpoint every iteration (from the Chrome-trace events of the last timed block)",
        )
        av.ck.write_trace(os.path.join(res_dir, f"trace_asym{args.tag}.json"))

    for v in variants.values():
        v.close()
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)

    load1 = os.getloadavg()
    total_s = time.perf_counter() - t_start
    ratio = (
        by["asym"]["paired_pct"] / by["dcp.async_save"]["paired_pct"]
        if "asym" in by and "dcp.async_save" in by and by["dcp.async_save"]["paired_pct"] > 0
        else float("nan")
    )
    goals = []
    if "asym" in by:
        ov = by["asym"]["paired_pct"]
        goals.append(("asym overhead <= 5% of the iteration time", ov <= 5.0, f"{ov:.2f}%"))
        if ratio == ratio:
            goals.append(("asym overhead <= 0.25 x dcp.async_save overhead", ratio <= 0.25, f"ratio {ratio:.3f}"))

    # ---- report ----
    lines = []
    lines.append(
        "| variant | median ms/iter | overhead vs baseline | paired overhead: median [min, max] | "
        "median stall per checkpoint (ms) | drain at block end (ms) | in-block iterations 2..N, paired "
        "(no drain) | process CPU ms/iter (vs baseline) | blocks x iters | block min-max ms/iter |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        is_base = r["variant"] == "baseline"
        ov_s = "-" if is_base else "%+.2f%%" % r["overhead_pct"]
        pair_s = "-" if is_base else f"**{r['paired_pct']:+.2f}%** [{r['paired_min']:+.1f}, {r['paired_max']:+.1f}]"
        st_s = "-" if is_base else fmt_ms(r["median_stall_ms"] / 1e3)
        cpu_s = f"{r['cpu_ms']:.0f}" + ("" if is_base else " (%+.1f%%)" % r["cpu_overhead_pct"])
        drain_s = "-" if is_base else f"{r['drain_ms']:.0f}"
        steady_s = "-" if is_base else f"{r['steady_paired_pct']:+.2f}%"
        lines.append(
            f"| {r['variant']} | {r['median_ms']:.1f} | {ov_s} | {pair_s} | {st_s} | {drain_s} | {steady_s} | {cpu_s} | "
            f"{r['blocks']} x {args.block} | {r['min_ms']:.0f}-{r['max_ms']:.0f} |"
        )
    table = "\n".join(lines)
    mi = machine_info()
    cmd = (
        "PYTHONPATH=. python benchmarks/"
        + os.path.basename(__file__)
        + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    )
    sizes = (
        f"- model: GPT-2 (`GPT2Config(n_layer={args.layers}, n_embd={args.embd}, n_head={args.heads}, "
        f"vocab_size={args.vocab})`, tied embeddings, dropout 0), **{n_params / 1e6:.2f}M parameters**, AdamW\n"
        f"- state: **{(p_bytes + o_bytes) / 2**20:.1f} MiB** = params {p_bytes / 2**20:.1f} MiB + AdamW moments "
        f"{o_bytes / 2**20:.1f} MiB"
        + (
            f" (asymstore checkpoint: {extra['checkpoint_bytes'] / 2**20:.1f} MiB incl. RNG states, step counters)"
            if extra
            else ""
        )
        + "\n"
        f"- batch {args.batch} x sequence length {args.seq} synthetic tokens (seeded RNG); "
        f"baseline iteration **{base * 1e3:.0f} ms** (median)\n"
        f"- blocks: {args.warmup} untimed warm-up + {args.block} timed iterations (+ drain), {args.rounds} rounds "
        f"({args.order}) after {args.warmup_rounds} untimed warm-up round(s); checkpoint every iteration; keep last {args.keep} per variant\n"
    )
    goal_lines = "\n".join(f"- {'PASS' if ok else 'FAIL'}: {g} ({val})" for g, ok, val in goals)
    if "write-floor" in by and "asym" in by:
        floor = by["write-floor"]["paired_pct"]
        goal_lines += (
            f"\n- for reference (not a goal): writing the same bytes alone each iteration (`write-floor`) "
            f"cost {floor:+.2f}%; asym's overhead beyond that: {by['asym']['paired_pct'] - floor:+.2f}%"
        )
    asym_lines = ""
    if extra:
        asym_lines = (
            f"- asym plan: {extra['plan_partitions']} partitions, remainder {extra['plan_remainder_bytes'] / 2**20:.2f} "
            f"MiB, predicted barrier stall **{extra['predicted_barrier_stall_ms']:.1f} ms** vs measured median "
            f"**{extra['measured_barrier_stall_ms']:.1f} ms** (plus {extra['measured_begin_ms']:.1f} ms synchronous "
            f"snapshot begin after the step)\n"
            f"- asym: {extra['hidden_fraction'] * 100:.1f}% of bytes copied inside forward/backward windows, "
            f"median copy-thread time {extra['hidden_copy_ms']:.1f} ms/checkpoint, measured copy bandwidth "
            f"{extra['copy_bandwidth_gbs']:.2f} GB/s, median persistence {extra['persist_ms']:.0f} ms/checkpoint "
            f"(encode incl. codec choice {extra['persist_encode_ms']:.0f} ms, writes incl. fsync "
            f"{extra['persist_write_ms']:.0f} ms), "
            f"replans {extra['replans']}\n"
        )
    cores = os.cpu_count() or 1
    busy = busy0 is not None and busy0 > 0.25  # at the start: during the run, training loads every core
    warn = (
        f"**Warning: the machine was busy with other work when the run started ({busy0:.0%} of {cores} cores "
        f"busy over 3 s before the model was built): wall times include that contention; see the block "
        f"min-max column before trusting small differences.**\n\n"
        if busy
        else ""
    )
    md = (
        f"# Checkpointing overhead per iteration (checkpoint at every iteration)\n\n"
        f"Measured {started:%Y-%m-%d %H:%M %Z} by `{cmd}` ({total_s / 60:.1f} min).\n\n{warn}"
        f"{table}\n\n"
        f"Overhead vs baseline: median of the variant's blocks against the median of the baseline's. Paired "
        f"overhead: each round's block against the baseline block of the same round, median over the rounds "
        f"(with the smallest and largest round): the machine's slow drift, which moves all variants of a round "
        f"together, cancels; the goals are judged on it. It includes each block's final drain (the background "
        f"work of the block's last checkpoint, waited for with the training stopped), which a run that never "
        f"stops would overlap with its next iteration: that drain, spread over the block's {args.block} "
        f"iterations, is in the figure. For reference, the in-block column pairs the mean of each block's "
        f"iterations 2..N (each carrying the background work of the previous checkpoint, as in a long run; the "
        f"first has none in flight) without the drain.\n\n"
        f"Stall per checkpoint: training-thread time spent on it. asymstore: synchronous snapshot begin after the "
        f"step + wait at the barrier before the next optimizer step (for `sync` the barrier includes the "
        f"persistence); torch.save: the whole save + fsync; dcp.async_save: waiting for the previous future + the "
        f"`async_save` call (staging). Process CPU: user+system time of all threads of this process per "
        f"iteration (less sensitive than wall time to other load on a shared machine).\n\n"
        f"## Goals\n\n{goal_lines}\n\n## asym details\n\n{asym_lines}\n"
        f"## Sizes\n\n{sizes}\n"
        f"## Machine\n\n- {machine_line(mi)}\n"
        f"- asymstore "
        f"{asymstore.__version__} imported from `{os.path.dirname(asymstore.__file__)}`, hooks from "
        f"`{os.path.dirname(sys.modules['asymstore.trainer_hooks'].__file__ or '')}`, backends from "
        f"`{os.path.dirname(sys.modules['asymstore.backends'].__file__ or '')}`\n"
        f"- other work at start: "
        + (f"{busy0:.0%} of the cores busy over 3 s" if busy0 is not None else "not measurable (no /proc/stat)")
        + f"; load average at start {load0[0]:.2f}, at end {load1[0]:.2f} (1-min, lags by minutes)\n"
        f"- checkpoint directory on the local disk ({root if args.dir else 'a temp dir under ' + tempfile.gettempdir()})\n\n"
        f"## Method\n\n"
        + (__doc__ or "").split("Method:", 1)[1].split("Usage::", 1)[0].strip()
        + "\n\n"
        + (f"Timeline of asym: `{os.path.basename(png)}`.\n" if png else "")
    )
    out_md = os.path.join(res_dir, f"overhead{args.tag}.md")
    with open(out_md, "w") as f:
        f.write(md)
    with open(os.path.join(res_dir, f"overhead{args.tag}.json"), "w") as f:
        json.dump(
            {
                "rows": rows,
                "per_block_s": per_iter,
                "cpu_per_block_s": cpu_iter,
                "iterations_s": raw_iters,
                "drain_s": drains,
                "steady_per_block_s": steady,
                "asym": extra,
                "args": vars(args),
                "machine": mi,
                "load": [load0, load1],
                "other_busy_at_start": busy0,
                "date": started.isoformat(),
            },
            f,
            indent=1,
        )
    print()
    print(table)
    print()
    print(sizes)
    print(asym_lines)
    print(goal_lines)
    print(f"\nwrote {out_md}" + (f" and {png}" if png else "") + f" in {total_s / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
