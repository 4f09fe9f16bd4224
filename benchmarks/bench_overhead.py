"""Per-iteration overhead of checkpointing at every iteration, GPT-2-style model, CPU.

Variants, measured in ONE run, interleaved in rotation (docs/benchmarking.md):

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

    python -m benchmarks.bench_overhead            # full run (~25 min on 2 cores)
    python -m benchmarks.bench_overhead --quick    # smoke run (~2 min)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

import asymstore
from asymstore.store import Store, TierSpec
from asymstore.trainer_hooks import AsymCheckpointer
from benchmarks._gpt2 import Data, add_model_args, build_model
from benchmarks._harness import (
    RESULTS,
    Block,
    busy_warning,
    command_line,
    fmt_ms,
    machine_info,
    machine_line,
    median,
    now,
    other_cpu_busy,
    paired,
    round_order,
    round_pcts,
    time_block,
    write_report,
)
from benchmarks._rawio import write_direct

VARIANTS = (
    "baseline",
    "sync",
    "checkfreq",
    "uniform",
    "asym",
    "checkfreq-host",
    "uniform-host",
    "asym-host",
    "asym-no-idle",
    "asym-private",
    "asym-slots3",
    "torch.save",
    "dcp.async_save",
    "write-floor",
)
#: variants that run by default. Extra ones: asym-host (checkfreq-host, uniform-host) = that strategy into host
#: memory only (no persistent tier: the snapshot mechanism alone, without the disk writes); asym-no-idle = asym
#: with its background threads at normal priority (``background_idle=False``: the ablation of ``SCHED_IDLE``); asym-private = asym with its host slots in
#: this process's memory (``host_memory="private"``) instead of shared memory that outlives it (the default);
#: asym-slots3 = asym with 3 host slots instead of 2 (its slot fills during the next iteration, so with 2 slots a
#: step's persistence has one iteration to free its slot, CheckFreq's two: the ablation of that).
#: write-floor is a reference, not a checkpointer: see :class:`WriteFloor`.
DEFAULT_VARIANTS = ("baseline", "sync", "checkfreq", "uniform", "asym", "torch.save", "dcp.async_save", "write-floor")
#: the heavy-copy regime (``--regime heavy``): the same model with a smaller per-step batch, so that copying the
#: state is 20-30% of an iteration, as on GPU clusters (a 7B model under ZeRO-3 on 8 GPUs: ~14 GB per GPU over
#: PCIe against a 1-2 s iteration); the blocking snapshot and the uniform partitions are what asym must beat there.
#: On a CPU-only machine persisting the state every iteration competes with training for the same cores (on a GPU
#: node the copy is DMA and the writes run on other cores), so the regime also runs each strategy into host memory
#: only (``-host``): the snapshot's own cost, which is what the partitioning decides
HEAVY_VARIANTS = (
    "baseline",
    "checkfreq",
    "uniform",
    "asym",
    "asym-private",
    "checkfreq-host",
    "uniform-host",
    "asym-host",
    "dcp.async_save",
)
HEAVY_BATCH = 1
#: the share of an iteration copying the whole state takes in the heavy-copy regime (the report says where it fell)
HEAVY_COPY_RANGE = (0.20, 0.30)
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
    # on a GPU each phase ends with a synchronize, so wall times are the GPU's (a training loop that logs its
    # loss every step synchronizes as often); the snapshot copies run on their own stream meanwhile
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    t0 = time.perf_counter()
    loss = model(input_ids=x, labels=x).loss
    sync()
    t1 = time.perf_counter()
    loss.backward()
    sync()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
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
) -> Block:
    """One block: ``warmup`` untimed iterations, a drain, then ``block`` timed iterations and the final drain."""
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

    def step() -> None:
        train_step(model, opt, data.next(), phases)
        v.after_iter()

    phases.enabled = True
    res = time_block(step, v.drain, iterations=block)
    phases.enabled = False
    if isinstance(v, AsymstoreVariant) and record:
        v.end_timed()
    if isinstance(v, (TorchSave, DcpAsync)):
        v.timed = False
    v.after_block()
    return res


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
    p.add_argument(
        "--regime",
        choices=("default", "heavy"),
        default="default",
        help=f"default: the copy is a few %% of an iteration; heavy: batch {HEAVY_BATCH} unless --batch is given, "
        f"variants {','.join(HEAVY_VARIANTS)} unless --variants is, results tagged _heavy: the copy is 20-30%% of an "
        "iteration",
    )
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
    p.add_argument("--variants", default=None, help="comma-separated subset of " + ",".join(VARIANTS))
    add_model_args(p, layers=8, batch=0, seq=128)  # batch 0: the regime's (16, heavy: HEAVY_BATCH)
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept per variant (older ones deleted)")
    p.add_argument("--dir", default=None, help="checkpoint directory (default: a fresh temp dir, removed after)")
    p.add_argument("--out", default=RESULTS, help="where overhead.md and the PNG go")
    p.add_argument("--tag", default=None, help="suffix for the output file names (e.g. _before; heavy: _heavy)")
    a = p.parse_args(argv)
    heavy = a.regime == "heavy"
    if a.batch < 0:
        p.error("--batch must be positive")
    a.batch = a.batch or (HEAVY_BATCH if heavy else 16)
    if a.variants is None:
        a.variants = ",".join(HEAVY_VARIANTS if heavy else DEFAULT_VARIANTS)
    if a.tag is None:
        a.tag = "_heavy" if heavy else ""
    if a.quick:
        a.rounds, a.block, a.warmup, a.warmup_rounds = 1, 3, 2, 0
    return a


@dataclass
class Run:
    """What a run measured, per variant: blocks' seconds per iteration, CPU, iterations, drains, steady means."""

    args: argparse.Namespace
    names: list[str]
    variants: dict[str, Variant]
    root: str
    n_params: int
    p_bytes: int
    o_bytes: int
    per_iter: dict[str, list[float]] = field(default_factory=dict)
    raw_iters: dict[str, list[float]] = field(default_factory=dict)
    cpu_iter: dict[str, list[float]] = field(default_factory=dict)
    drains: dict[str, list[float]] = field(default_factory=dict)
    steady: dict[str, list[float]] = field(default_factory=dict)  # per block: mean of iterations 2..N
    asym_window: tuple[float, float] | None = None
    asym_spans: list[tuple[str, float, float]] = field(default_factory=list)


def make_variants(
    names: list[str],
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    root: str,
    args: argparse.Namespace,
    nbytes: int,
) -> dict[str, Variant]:
    """The checkpointers (and references) by name, each writing under ``root``."""
    out: dict[str, Variant] = {}
    for n in names:
        if n == "baseline":
            out[n] = Baseline()
        elif n in ASYM_STRATEGIES:
            out[n] = AsymstoreVariant(n, model, opt, root, args.keep, warmup=args.warmup)
        elif n.endswith("-host") and n[: -len("-host")] in ASYM_STRATEGIES:
            out[n] = AsymstoreVariant(
                n[: -len("-host")], model, opt, root, args.keep, warmup=args.warmup, name=n, host_only=True
            )
        elif n == "asym-no-idle":
            out[n] = AsymstoreVariant(
                "asym", model, opt, root, args.keep, warmup=args.warmup, name=n, background_idle=False
            )
        elif n == "asym-slots3":
            out[n] = AsymstoreVariant("asym", model, opt, root, args.keep, warmup=args.warmup, name=n, host_slots=3)
        elif n == "asym-private":
            out[n] = AsymstoreVariant(
                "asym", model, opt, root, args.keep, warmup=args.warmup, name=n, host_memory="private"
            )
        elif n == "torch.save":
            out[n] = TorchSave(model, opt, root, args.keep)
        elif n == "write-floor":
            out[n] = WriteFloor(nbytes, root)
        else:
            out[n] = DcpAsync(model, opt, root, args.keep)
    return out


def run_rounds(run: Run, model: torch.nn.Module, opt: torch.optim.Optimizer, data: Data, phases: PhaseLog) -> None:
    """Every variant's block per round, ``--warmup-rounds`` untimed rounds first, in rotation or shuffled."""
    args = run.args
    for d in (run.per_iter, run.raw_iters, run.cpu_iter, run.drains, run.steady):
        d.update({n: [] for n in run.names})
    for r in range(-args.warmup_rounds, args.rounds):
        record = r >= 0
        # shuffle: a fresh seeded permutation each round; rotate: the starting variant rotates
        seed = [args.seed, r + args.warmup_rounds] if args.order == "shuffle" else None
        for n in round_order(run.names, r, order=args.order, seed=seed):
            if n == "asym":
                phases.spans.clear()
            b = run_block(run.variants[n], model, opt, data, phases, args.warmup, args.block, record)
            if not record:
                print(f"warm-up round {n:>15}: {b.per_iter * 1e3:8.1f} ms/iter (not counted)", flush=True)
                continue
            if n == "asym":
                run.asym_window = b.window
                run.asym_spans = list(phases.spans)
            phases.spans.clear()
            run.per_iter[n].append(b.per_iter)
            run.cpu_iter[n].append(b.cpu_per_iter)
            run.raw_iters[n].extend(b.iters)
            run.drains[n].append(b.drain)
            run.steady[n].append(statistics.fmean(b.iters[1:]) if len(b.iters) > 1 else b.iters[0])
            print(
                f"round {r + 1}/{args.rounds} {n:>15}: {b.per_iter * 1e3:8.1f} ms/iter, cpu "
                f"{b.cpu_per_iter * 1e3:6.0f} ms/iter  (iterations {', '.join(f'{x * 1e3:.0f}' for x in b.iters)} ms)",
                flush=True,
            )


def summarize(run: Run) -> list[dict[str, Any]]:
    """One row per variant: medians, overhead vs the baseline's median, paired overheads, stalls, CPU."""
    base = median(run.per_iter["baseline"])
    base_cpu = median(run.cpu_iter["baseline"])
    rows = []
    for n in run.names:
        med = median(run.per_iter[n])
        pair = paired(run.per_iter[n], run.per_iter["baseline"])
        rows.append(
            {
                "variant": n,
                "median_ms": med * 1e3,
                "overhead_pct": (med - base) / base * 100,
                "median_stall_ms": median(run.variants[n].stalls()) * 1e3,
                "paired_pct": pair.median,
                "paired_min": pair.min,
                "paired_max": pair.max,
                "steady_paired_pct": paired(run.steady[n], run.steady["baseline"]).median,
                "drain_ms": median(run.drains[n]) * 1e3,
                "cpu_ms": median(run.cpu_iter[n]) * 1e3,
                "cpu_overhead_pct": (median(run.cpu_iter[n]) - base_cpu) / base_cpu * 100,
                "blocks": len(run.per_iter[n]),
                "iters": len(run.raw_iters[n]),
                "min_ms": min(run.per_iter[n]) * 1e3,
                "max_ms": max(run.per_iter[n]) * 1e3,
                **_durability(run.variants[n]),
            }
        )
    return rows


def _durability(v: Variant) -> dict[str, Any]:
    """For an asymstore variant: checkpoints taken, how many became durable, how many were late, and the share of
    the snapshot's bytes copied while training ran (inside the forward/backward windows) rather than blocking."""
    if not isinstance(v, AsymstoreVariant):
        return {}
    taken = [s for s in v.ck.history if not s.skipped]
    return {
        "checkpoints": len(taken),
        "durable": sum(s.durable for s in taken),
        "skipped": len(v.ck.history) - len(taken),
        "late": v.store.late,
        "hidden_pct": 100 * hidden_fraction(v.timed_stats()),
    }


def hidden_fraction(stats: list[Any]) -> float:
    """The share of these checkpoints' snapshot bytes copied inside the forward/backward windows."""
    return sum(s.hidden_bytes for s in stats) / max(sum(s.bytes for s in stats), 1)


def shared_vs_private(run: Run) -> dict[str, float] | None:
    """asym (host slots in shared memory) against asym-private, paired per round; the noise it is judged against
    is the baseline's own spread: the median absolute deviation of its blocks, in % of their median."""
    if "asym" not in run.per_iter or "asym-private" not in run.per_iter:
        return None
    base = run.per_iter["baseline"]
    shared = round_pcts(run.per_iter["asym"], base)
    private = round_pcts(run.per_iter["asym-private"], base)
    diffs = [a - b for a, b in zip(shared, private, strict=False)]
    mid = median(base)
    noise = median([abs(b - mid) for b in base]) / mid * 100
    return {"diff_pct": median(diffs), "min_pct": min(diffs), "max_pct": max(diffs), "noise_pct": noise}


def _persist_part(ck: AsymCheckpointer, attr: str) -> float:
    return median(
        [
            getattr(h.result().reports[k], attr)
            for h in ck.handles
            if h.done() and not h.skipped
            for k in h.result().reports
        ]
    )


def asym_details(run: Run) -> dict[str, Any]:
    """asym: predicted vs measured stall, hidden fraction, persistence ({} without asym)."""
    av = run.variants.get("asym")
    if not isinstance(av, AsymstoreVariant):
        return {}
    ck = av.ck
    ts = av.timed_stats()
    plan = ck._plan_cache[1] if ck._plan_cache else None  # the plan in use (read-only peek for reporting)
    return {
        "predicted_barrier_stall_ms": plan.predicted_stall_s * 1e3 if plan is not None else float("nan"),
        "plan_remainder_bytes": plan.remainder_bytes if plan is not None else 0,
        "plan_partitions": len([p for p in plan.partitions if p.nbytes]) if plan is not None else 0,
        "measured_barrier_stall_ms": median([s.stall_s for s in ts]) * 1e3,
        "measured_begin_ms": median([s.begin_s for s in ts]) * 1e3,
        "hidden_fraction": hidden_fraction(ts),
        "persist_ms": median([s.persist_s for s in ts if s.persist_s is not None]) * 1e3,
        "hidden_copy_ms": median([s.hidden_copy_s for s in ts]) * 1e3,
        "copy_bandwidth_gbs": (ck._copy_bw or 0) / 1e9,
        "replans": ck.replans,
        "persist_encode_ms": _persist_part(ck, "encode_seconds") * 1e3,
        "persist_write_ms": _persist_part(ck, "write_seconds") * 1e3,
        "checkpoint_bytes": ts[-1].bytes if ts else 0,
    }


def write_timeline(run: Run, res_dir: str) -> str | None:
    """The asym timeline PNG and its Chrome trace (the last timed asym block); returns the PNG's path."""
    av = run.variants.get("asym")
    if not isinstance(av, AsymstoreVariant) or run.asym_window is None:
        return None
    png = os.path.join(res_dir, f"timeline_asym{run.args.tag}.png")
    # the last timed asym block, its first two iterations and its drain
    w0, w1 = run.asym_window
    its = [s for s in run.asym_spans if s[0] == "forward"]
    if len(its) >= 3 and run.args.block > 3:
        w1 = min(w1, its[2][1] + 0.05)
    plot_timeline(
        av.ck,
        run.asym_spans,
        (w0 - 0.02, w1 + 0.02),
        png,
        f"asym: {run.n_params / 1e6:.1f}M-param GPT-2, {(run.p_bytes + run.o_bytes) / 2**20:.0f} MiB state, "
        f"checkpoint every iteration (from the Chrome-trace events of the last timed block)",
    )
    av.ck.write_trace(os.path.join(res_dir, f"trace_asym{run.args.tag}.json"))
    return png


def goals(by: dict[str, dict[str, Any]], sp: dict[str, float] | None = None, regime: str = "default") -> str:
    """The goals' PASS/FAIL lines (and the write-floor reference) of ``regime``: the default one's or the
    heavy-copy one's; shared against private slots in either when both ran (``sp``)."""
    out = []
    if "asym" in by and regime == "default":  # the heavy regime's report points to the default one's
        ov = by["asym"]["paired_pct"]
        out.append(("asym overhead <= 5% of the iteration time", ov <= 5.0, f"{ov:.2f}%"))
        dcp = by.get("dcp.async_save")
        if dcp is not None and dcp["paired_pct"] > 0:
            ratio = ov / dcp["paired_pct"]
            out.append(("asym overhead <= 0.25 x dcp.async_save overhead", ratio <= 0.25, f"ratio {ratio:.3f}"))
    for suffix, what in (("", "persisting every checkpoint"), ("-host", "into host memory only")):
        mine = by.get(f"asym{suffix}")
        for other in ("checkfreq", "uniform") if regime == "heavy" and mine is not None else ():
            if f"{other}{suffix}" in by:
                ov, ref = mine["paired_pct"], by[f"{other}{suffix}"]["paired_pct"]
                # a reference that cost nothing cannot be halved: the goal then asks asym to cost nothing too
                ok = ov <= 0.5 * ref if ref > 0 else ov <= 0
                ratio_s = f"ratio {ov / ref:.3f}" if ref > 0 else f"{other} {ref:+.2f}%"
                out.append(
                    (
                        f"heavy-copy regime, {what}: asym{suffix} overhead <= 0.5 x {other}{suffix}'s",
                        ok,
                        f"{ov:.2f}% vs {ref:.2f}%, {ratio_s}",
                    )
                )
    if sp is not None:
        out.append(
            (
                "shared-memory host slots (asym) within noise of private slots (asym-private): |paired difference| "
                "<= the baseline's own spread",
                abs(sp["diff_pct"]) <= sp["noise_pct"],
                f"difference {sp['diff_pct']:+.2f}% [{sp['min_pct']:+.1f}, {sp['max_pct']:+.1f}] per round, "
                f"baseline spread {sp['noise_pct']:.2f}%",
            )
        )
    text = "\n".join(f"- {'PASS' if ok else 'FAIL'}: {g} ({val})" for g, ok, val in out)
    if "write-floor" in by and "asym" in by:
        floor = by["write-floor"]["paired_pct"]
        text += (
            f"\n- for reference (not a goal): writing the same bytes alone each iteration (`write-floor`) "
            f"cost {floor:+.2f}%; asym's overhead beyond that: {by['asym']['paired_pct'] - floor:+.2f}%"
        )
    return text


def copy_section(rows: list[dict[str, Any]], base_ms: float, regime: str = "default") -> str:
    """Per asymstore strategy: the share of the snapshot copied while training ran and the stall; and how much of
    an iteration copying the whole state takes (checkfreq's blocking snapshot against the baseline iteration),
    for the heavy-copy regime against its intended range."""
    lines = [
        f"- {r['variant']}: {r['hidden_pct']:.1f}% of the snapshot's bytes copied while training ran, median stall "
        f"{r['median_stall_ms']:.1f} ms per checkpoint"
        for r in rows
        if "hidden_pct" in r
    ]
    by = {r["variant"]: r for r in rows}
    cf = by.get("checkfreq-host", by.get("checkfreq"))
    if cf is not None:
        lines.append(
            f"- copying the whole state ({cf['variant']}'s blocking snapshot, {cf['median_stall_ms']:.1f} ms) is "
            f"**{cf['median_stall_ms'] / base_ms * 100:.1f}%** of a baseline iteration ({base_ms:.1f} ms)"
        )
        if regime == "heavy":
            share, (lo, hi) = cf["median_stall_ms"] / base_ms, HEAVY_COPY_RANGE
            where = "within" if lo <= share <= hi else ("below" if share < lo else "above")
            lines[-1] += f": {where} the heavy-copy regime's intended {lo:.0%}-{hi:.0%}" + (
                "" if where == "within" else " (choose --batch to move it)"
            )
    return "\n".join(lines)


def result_table(rows: list[dict[str, Any]], block: int) -> str:
    """The markdown table of :func:`summarize`'s rows."""
    lines = [
        "| variant | median ms/iter | overhead vs baseline | paired overhead: median [min, max] | "
        "median stall per checkpoint (ms) | drain at block end (ms) | in-block iterations 2..N, paired "
        "(no drain) | process CPU ms/iter (vs baseline) | blocks x iters | block min-max ms/iter |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r["variant"] == "baseline":
            ov_s = pair_s = st_s = drain_s = steady_s = "-"
            cpu_s = f"{r['cpu_ms']:.0f}"
        else:
            ov_s = f"{r['overhead_pct']:+.2f}%"
            pair_s = f"**{r['paired_pct']:+.2f}%** [{r['paired_min']:+.1f}, {r['paired_max']:+.1f}]"
            st_s = fmt_ms(r["median_stall_ms"] / 1e3)
            cpu_s = f"{r['cpu_ms']:.0f} ({r['cpu_overhead_pct']:+.1f}%)"
            drain_s = f"{r['drain_ms']:.0f}"
            steady_s = f"{r['steady_paired_pct']:+.2f}%"
        lines.append(
            f"| {r['variant']} | {r['median_ms']:.1f} | {ov_s} | {pair_s} | {st_s} | {drain_s} | {steady_s} | "
            f"{cpu_s} | {r['blocks']} x {block} | {r['min_ms']:.0f}-{r['max_ms']:.0f} |"
        )
    return "\n".join(lines)


def sizes_section(run: Run, extra: dict[str, Any], base_s: float) -> str:
    """The model, state and block sizes of the run."""
    a = run.args
    ck = (
        f" (asymstore checkpoint: {extra['checkpoint_bytes'] / 2**20:.1f} MiB incl. RNG states, step counters)"
        if extra
        else ""
    )
    return (
        f"- model: GPT-2 (`GPT2Config(n_layer={a.layers}, n_embd={a.embd}, n_head={a.heads}, "
        f"vocab_size={a.vocab})`, tied embeddings, dropout 0), **{run.n_params / 1e6:.2f}M parameters**, AdamW\n"
        f"- state: **{(run.p_bytes + run.o_bytes) / 2**20:.1f} MiB** = params {run.p_bytes / 2**20:.1f} MiB + "
        f"AdamW moments {run.o_bytes / 2**20:.1f} MiB{ck}\n"
        f"- batch {a.batch} x sequence length {a.seq} synthetic tokens (seeded RNG); "
        f"baseline iteration **{base_s * 1e3:.0f} ms** (median)\n"
        f"- blocks: {a.warmup} untimed warm-up + {a.block} timed iterations (+ drain), {a.rounds} rounds "
        f"({a.order}) after {a.warmup_rounds} untimed warm-up round(s); checkpoint every iteration; keep last "
        f"{a.keep} per variant\n"
    )


def asym_section(extra: dict[str, Any]) -> str:
    """The asym plan, hidden fraction and persistence lines ("" without asym)."""
    if not extra:
        return ""
    return (
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


EXPLAIN = (
    "Overhead vs baseline: median of the variant's blocks against the median of the baseline's. Paired "
    "overhead: each round's block against the baseline block of the same round, median over the rounds "
    "(with the smallest and largest round): the machine's slow drift, which moves all variants of a round "
    "together, cancels; the goals are judged on it. It includes each block's final drain (the background "
    "work of the block's last checkpoint, waited for with the training stopped), which a run that never "
    "stops would overlap with its next iteration: that drain, spread over the block's {block} "
    "iterations, is in the figure. For reference, the in-block column pairs the mean of each block's "
    "iterations 2..N (each carrying the background work of the previous checkpoint, as in a long run; the "
    "first has none in flight) without the drain.\n\n"
    "Stall per checkpoint: training-thread time spent on it. asymstore: synchronous snapshot begin after the "
    "step + wait at the barrier before the next optimizer step (for `sync` the barrier includes the "
    "persistence); torch.save: the whole save + fsync; dcp.async_save: waiting for the previous future + the "
    "`async_save` call (staging). Process CPU: user+system time of all threads of this process per "
    "iteration (less sensitive than wall time to other load on a shared machine).\n\n"
)


def machine_section(run: Run, mi: dict[str, Any], env: dict[str, Any]) -> str:
    """Machine, where asymstore was imported from, other load, the checkpoint directory."""
    busy0, load0, load1 = env["busy"], env["load"][0], env["load"][1]
    other = f"{busy0:.0%} of the cores busy over 3 s" if busy0 is not None else "not measurable (no /proc/stat)"
    where = run.root if run.args.dir else "a temp dir under " + tempfile.gettempdir()
    return (
        f"## Machine\n\n- {machine_line(mi)}\n"
        f"- asymstore {asymstore.__version__} imported from `{os.path.dirname(asymstore.__file__)}`, hooks from "
        f"`{os.path.dirname(sys.modules['asymstore.trainer_hooks'].__file__ or '')}`, backends from "
        f"`{os.path.dirname(sys.modules['asymstore.backends'].__file__ or '')}`\n"
        f"- other work at start: {other}; load average at start {load0[0]:.2f}, at end {load1[0]:.2f} "
        f"(1-min, lags by minutes)\n"
        f"- checkpoint directory on the local disk ({where})\n\n"
    )


def report(run: Run, rows: list[dict[str, Any]], extra: dict[str, Any], env: dict[str, Any]) -> str:
    """The markdown report."""
    by = {r["variant"]: r for r in rows}
    base = median(run.per_iter["baseline"])
    method = (__doc__ or "").split("Method:", 1)[1].split("Usage::", 1)[0].strip()
    png = env["png"]
    return (
        f"# Checkpointing overhead per iteration (checkpoint at every iteration"
        f"{', heavy-copy regime' if run.args.regime == 'heavy' else ''})\n\n"
        f"Measured {env['started']:%Y-%m-%d %H:%M %Z} by `{env['cmd']}` ({env['total_s'] / 60:.1f} min).\n\n"
        f"{busy_warning(env['busy'])}"
        f"{result_table(rows, run.args.block)}\n\n"
        + EXPLAIN.format(block=run.args.block)
        + f"## Goals\n\n{goals(by, shared_vs_private(run), run.args.regime)}\n\n"
        f"## Copy per strategy\n\n{copy_section(rows, base * 1e3, run.args.regime)}\n\n## asym details\n\n{asym_section(extra)}\n"
        f"## Sizes\n\n{sizes_section(run, extra, base)}\n"
        + machine_section(run, env["machine"], env)
        + f"## Method\n\n{method}\n\n"
        + (f"Timeline of asym: `{os.path.basename(png)}`.\n" if png else "")
    )


def setup(args: argparse.Namespace, names: list[str]) -> tuple[Run, torch.nn.Module, torch.optim.Optimizer, Data]:
    """Model, optimizer, data (two warm-up steps: allocator, AdamW state) and the variants."""
    model, opt = build_model(args)
    data = Data(args)
    for _ in range(2):  # global warm-up: allocator, AdamW state creation
        train_step(model, opt, data.next(), PhaseLog())
    p_bytes, o_bytes = state_bytes(model, opt)
    root = args.dir or tempfile.mkdtemp(prefix="asym-bench-", dir=os.environ.get("ASYM_BENCH_DIR"))
    os.makedirs(root, exist_ok=True)
    variants = make_variants(names, model, opt, root, args, p_bytes + o_bytes)
    n_params = sum(p.numel() for p in model.parameters())
    run = Run(args, names, variants, root, n_params, p_bytes, o_bytes)
    print(
        f"model: GPT-2 ({args.layers} layers, d={args.embd}, vocab {args.vocab}), {n_params / 1e6:.2f}M params; "
        f"state {(p_bytes + o_bytes) / 2**20:.1f} MiB (params {p_bytes / 2**20:.1f} + AdamW moments "
        f"{o_bytes / 2**20:.1f}); batch {args.batch} x seq {args.seq}; torch threads {torch.get_num_threads()}",
        flush=True,
    )
    return run, model, opt, data


def variant_names(spec: str) -> list[str]:
    """The ``--variants`` list, checked (baseline is required)."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad or "baseline" not in names:
        raise SystemExit(f"unknown variants {bad} (and baseline is required); choose from {VARIANTS}")
    return names


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    names = variant_names(args.variants)
    env: dict[str, Any] = {"started": now(), "load": [os.getloadavg()], "cmd": command_line(__name__, argv)}
    env["busy"] = other_cpu_busy()  # before this process does anything
    t_start = time.perf_counter()
    run, model, opt, data = setup(args, names)
    phases = PhaseLog()
    run_rounds(run, model, opt, data, phases)
    rows = summarize(run)
    extra = asym_details(run)
    os.makedirs(args.out, exist_ok=True)
    env["png"] = write_timeline(run, args.out)
    for v in run.variants.values():
        v.close()
    if args.dir is None:
        shutil.rmtree(run.root, ignore_errors=True)
    env["load"].append(os.getloadavg())
    env["total_s"] = time.perf_counter() - t_start
    env["machine"] = machine_info()
    table = result_table(rows, args.block)
    out_md = write_report(
        os.path.join(args.out, f"overhead{args.tag}.md"),
        report(run, rows, extra, env),
        {
            "rows": rows,
            "per_block_s": run.per_iter,
            "cpu_per_block_s": run.cpu_iter,
            "iterations_s": run.raw_iters,
            "drain_s": run.drains,
            "steady_per_block_s": run.steady,
            "asym": extra,
            "shared_vs_private": shared_vs_private(run),
            "args": vars(args),
            "machine": env["machine"],
            "load": env["load"],
            "other_busy_at_start": env["busy"],
            "date": env["started"].isoformat(),
        },
    )
    print(f"\n{table}\n\n{sizes_section(run, extra, median(run.per_iter['baseline']))}\n{asym_section(extra)}")
    print(goals({r["variant"]: r for r in rows}, shared_vs_private(run), args.regime))
    print(copy_section(rows, median(run.per_iter["baseline"]) * 1e3, args.regime))
    png = env["png"]
    print(f"\nwrote {out_md}" + (f" and {png}" if png else "") + f" in {env['total_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
