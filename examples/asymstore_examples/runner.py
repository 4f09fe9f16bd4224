"""The training loop, flags and summary shared by every example.

A family file (``examples/gpt2.py`` ...) declares an :class:`Example`: its presets, how to build
a transformers config and model from one, and its data. :func:`run` does the rest:

1. parse the flags (strategy, tiers, steps, kill-and-resume, preset, data, DeepSpeed);
2. open the store: host memory, then ``--dir`` (local / NVMe), then ``--hdfs URL`` if given;
3. optionally resume from the newest complete checkpoint (``--resume``);
4. train with :class:`asymstore.trainer_hooks.AsymCheckpointer` checkpointing every ``--every``
   steps; ``--kill-at K`` SIGKILLs the process once the checkpoint of step K is reported (committed
   in host shared memory, or durable on the first tier when the host slots are private), as a crash
   would (:class:`KillAfterCheckpoint`);
5. restore the newest checkpoint into a fresh model and optimizer, check it bit for bit, and
   print a summary (iterations, the tier a resume came from, median stall, checkpoint bytes,
   compression, where each checkpoint lives).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from .data import Source, to_device

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # configs built from scratch: no warnings about hub files

STRATEGIES = ("sync", "checkfreq", "uniform", "asym")


@dataclass(frozen=True)
class Preset:
    """A model size: transformers config overrides plus the default batch and sequence/image size."""

    config: dict[str, Any]
    batch: int
    size: int  # sequence length (text) or image side (vision)
    note: str = ""


@dataclass
class Example:
    name: str  # "gpt2"
    title: str  # "GPT-2, causal language modelling"
    kind: str  # "text" or "image"
    presets: dict[str, Preset]
    make_config: Callable[[Preset, argparse.Namespace], Any]  # -> a transformers PretrainedConfig
    make_model: Callable[[Any], nn.Module]  # config -> model (random init, no download)
    make_data: Callable[[argparse.Namespace, Any], Source]  # (args, config) -> batches
    data_help: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)  # flag defaults of this example


# --- flags ----------------------------------------------------------------------------
def parser(ex: Example) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=f"examples/{ex.name}.py",
        description=f"{ex.title}, trained with asymstore checkpointing (tiny by default: minutes on a CPU).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = ap.add_argument_group("model and data")
    g.add_argument("--preset", default="tiny", choices=list(ex.presets), help="model size")
    g.add_argument("--list-presets", action="store_true", help="print the presets with parameter counts and exit")
    g.add_argument("--data", default=None, help=ex.data_help or "dataset path (default: synthetic data)")
    g.add_argument("--batch", type=int, default=None, help="batch size per process (default: the preset's)")
    if ex.kind == "text":
        g.add_argument("--seq", dest="size", type=int, default=None, help="sequence length (default: the preset's)")
    else:
        g.add_argument("--image-size", dest="size", type=int, default=None, help="image side (default: the preset's)")
    g.add_argument("--lr", type=float, default=3e-4)
    g.add_argument("--warmup-steps", type=int, default=4, help="linear learning-rate warm-up")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")

    c = ap.add_argument_group("checkpointing")
    c.add_argument("--steps", type=int, default=8, help="train until this optimizer step")
    c.add_argument("--every", type=int, default=1, help="checkpoint every N steps")
    c.add_argument(
        "--strategy",
        default="asym",
        choices=STRATEGIES,
        help="asym: asymmetric partitions in forward/backward; uniform: equal partitions "
        "(DataStates-LLM-like); checkfreq: blocking snapshot, background persist; sync: blocking",
    )
    c.add_argument(
        "--dir",
        default=None,
        help="local (NVMe) checkpoint tier (default: a fresh temporary directory; with --kill-at or "
        "--resume a fixed one under the temporary directory, so the two runs meet)",
    )
    c.add_argument(
        "--hdfs",
        default=None,
        metavar="URL",
        help="also promote checkpoints to this HDFS tier, e.g. hdfs://namenode:9000/ckpt/gpt2",
    )
    c.add_argument("--keep", type=int, default=None, help="keep the newest N checkpoints on --dir (default: all)")
    c.add_argument("--keep-hdfs", type=int, default=None, help="keep the newest N checkpoints on --hdfs")
    c.add_argument("--host-slots", type=int, default=2, help="snapshot slots in host memory")
    c.add_argument("--compression", default="auto", help="auto (selective, measured), none, zstd3, lz4, ...")
    c.add_argument("--warmup", type=int, default=2, help="profiling iterations before partitions are planned")
    c.add_argument("--trace", default=None, metavar="PATH", help="write a Chrome/Perfetto timeline JSON")

    r = ap.add_argument_group("failure and recovery")
    r.add_argument(
        "--kill-at",
        type=int,
        default=None,
        metavar="K",
        help="SIGKILL this process once the checkpoint of step K is reported: committed in host shared memory "
        "(or, with private host slots, durable on --dir); then --resume continues from step K (with --every N: "
        "from the newest checkpoint up to K; with --deepspeed: killed right after optimizer step K)",
    )
    r.add_argument("--resume", action="store_true", help="restore the newest complete checkpoint and continue")
    r.add_argument("--fresh", action="store_true", help="delete checkpoints already in --dir/--hdfs first")
    r.add_argument(
        "--no-check", action="store_true", help="skip the closing restore into a fresh model and the bit-identity check"
    )
    r.add_argument("--summary-json", default=None, metavar="PATH", help="also write the summary as JSON")

    d = ap.add_argument_group("clusters")
    d.add_argument(
        "--deepspeed",
        default=None,
        metavar="CONFIG",
        help="train with DeepSpeed (e.g. examples/launch/ds_zero3.json); launch with the deepspeed launcher",
    )
    d.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    ap.set_defaults(**ex.defaults)
    return ap


# --- helpers --------------------------------------------------------------------------
def count_params(ex: Example, preset: Preset, args: argparse.Namespace) -> int:
    """Parameters of a preset, counted on the meta device (nothing allocated)."""
    cfg = ex.make_config(preset, args)
    with torch.device("meta"):
        m = ex.make_model(cfg)
    return sum(p.numel() for p in m.parameters())


def state_hash(model: nn.Module) -> str:
    """sha256 of the model's state (names, then raw bytes), to compare runs bit for bit."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _tensors_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (
            isinstance(b, (list, tuple))
            and len(a) == len(b)
            and all(_tensors_equal(x, y) for x, y in zip(a, b, strict=True))
        )
    return True  # plain values (lr, betas ...) are not the point of the check


def _durable_steps(store: Any) -> list[int]:
    return [s for s in store.steps() if any(w != "host" for w in store.where(s))]


def shared_host_slots(store: Any) -> bool:
    """Whether the store's host slots are in shared memory that outlives this process (``host_memory``)."""
    mode = getattr(store, "host_memory", None)  # what the store opened ("shared" / "private")
    if not isinstance(mode, str):
        mode = getattr(store.config, "host_memory", None)
    return mode == "shared"


def committed_in_host(store: Any, step: int) -> bool:
    """Whether a host slot holds ``step`` committed: ready and, in shared memory, its record written."""
    for slot in store.host.slots:
        if slot.step == step and slot.state == "ready":
            return getattr(slot, "record", True) is not None  # private slots: ready is committed
    return False


def restore_source(store: Any) -> tuple[str, str | None]:
    """``(tier, detail)`` of the store's last restore, e.g. ``("host", "host shared memory, left by pid 12")``."""
    rep = store.last_restore
    if rep is None:
        return "?", None
    return str(rep.tier), getattr(rep, "detail", None)


def fmt_source(tier: str, detail: str | None) -> str:
    """The store's words for a restore's source ('host shared memory, left by pid 12', 'tier file (/ckpt)'),
    with the tier's name in front when they do not say it; the name alone when there is no detail."""
    if not detail:
        return tier
    return detail if tier in detail else f"{tier}: {detail}"


class KillAfterCheckpoint:
    """SIGKILL the training process once the checkpoint of step ``step`` has been reported, as a crash would.

    An asymmetric snapshot of step K is copied during the forward/backward of step K+1 and committed at the
    barrier before step K+1's optimizer step; this hook runs right after that barrier. With host slots in
    shared memory, the committed slot outlives the process: the kill comes at once, typically before step K
    is durable. With private host slots it dies with the process, so the hook first waits until step K is
    durable on the first persistent tier; either way ``--resume`` then continues from step K.
    ``report(info)`` is called before the kill (``info``: the step, the newest checkpoint, where it is
    complete, the durable steps, whether the slots are shared, the pid); ``kill=False`` only reports (the
    caller, e.g. a parent process, delivers the SIGKILL).
    """

    def __init__(
        self, ck: Any, store: Any, step: int, report: Callable[[dict[str, Any]], None], *, kill: bool = True
    ) -> None:
        self.ck, self.store, self.step, self.report, self.kill = ck, store, step, report, kill
        self.fired = False
        self._hook: Any = None

    def attach(self) -> KillAfterCheckpoint:
        """Install after ``ck`` is attached: optimizer pre-hooks run in order, so the barrier comes first."""
        self._hook = self.ck.optimizers[0].register_step_pre_hook(self._pre_step)
        return self

    def _pre_step(self, *_: Any) -> None:
        if self.ck.step == self.step and not self.fired:
            self.fire()

    def fire(self) -> None:
        """Wait until the newest checkpoint counts as reported, call ``report``, then SIGKILL this process."""
        self.fired = True
        shared = shared_host_slots(self.store)
        newest = self.ck.handles[-1] if self.ck.handles else None
        if newest is not None:
            if shared:
                # committed (bytes, checksums, record) in a slot that outlives the process, or durable: the
                # background threads that seal and persist only run on idle cores, on a busy machine later
                t_end = time.monotonic() + 600
                while not committed_in_host(self.store, newest.step) and not newest.done() and time.monotonic() < t_end:
                    time.sleep(0.005)
            else:  # private host memory dies with the process: only a durable checkpoint survives
                newest.result(timeout=600)
        info = {
            "step": self.ck.step,
            "checkpoint": newest.step if newest is not None else None,
            "committed_in_host": shared and newest is not None and committed_in_host(self.store, newest.step),
            "where": self.store.where(newest.step) if newest is not None else [],
            "durable": _durable_steps(self.store),
            "shared_host_slots": shared,
            "pid": os.getpid(),
        }
        self.report(info)
        if self.kill:
            os.kill(os.getpid(), signal.SIGKILL)


def _ranges(steps: list[int]) -> str:
    """[1,2,3,5] -> '1-3, 5'"""
    out, i = [], 0
    while i < len(steps):
        j = i
        while j + 1 < len(steps) and steps[j + 1] == steps[j] + 1:
            j += 1
        out.append(str(steps[i]) if i == j else f"{steps[i]}-{steps[j]}")
        i = j + 1
    return ", ".join(out)


def where_summary(store: Any) -> list[tuple[str, str]]:
    """Checkpoints grouped by where they are complete: [('1-3', 'file'), ('4-5', 'host, file')]."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for s in store.steps():
        groups.setdefault(tuple(store.where(s)), []).append(s)
    rows = sorted(groups.items(), key=lambda kv: kv[1][0])
    return [(_ranges(v), ", ".join(k)) for k, v in rows]


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def _die(msg: str, code: int = 2) -> NoReturn:
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def resolve_dir(ex: Example, args: argparse.Namespace) -> tuple[str, bool]:
    """The local tier's directory, and whether it is one of ours (safe to clear)."""
    if args.dir:
        return args.dir, False
    if args.kill_at is not None or args.resume:
        d = Path(tempfile.gettempdir()) / "asymstore-examples" / f"{ex.name}-{args.preset}"
        d.mkdir(parents=True, exist_ok=True)
        return str(d), True
    return tempfile.mkdtemp(prefix=f"asymstore-{ex.name}-"), True


def open_tiers(
    args: argparse.Namespace, ckpt_dir: str, *, rank: int = 0, world_size: int = 1, private_host: bool = False
) -> Any:
    """The example's store; ``private_host``: host slots in this process's memory (not shared), where the
    store has that option (a second store of the same job in one process, e.g. the closing check)."""
    import dataclasses

    from asymstore.config import Config
    from asymstore.store import Store, TierSpec

    tiers = [TierSpec(ckpt_dir, keep=args.keep)]
    if args.hdfs:
        tiers.append(TierSpec(args.hdfs, keep=args.keep_hdfs))
    extra: dict[str, Any] = {}
    if private_host and "host_memory" in {f.name for f in dataclasses.fields(Config)}:
        extra["host_memory"] = "private"
    return Store(
        tiers, host_slots=args.host_slots, compression=args.compression, rank=rank, world_size=world_size, **extra
    )


def list_presets(ex: Example, args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    tab = Table(title=f"{ex.title}: presets")
    for col in ("preset", "parameters", "batch", "seq" if ex.kind == "text" else "image", "note"):
        tab.add_column(col)
    for name, p in ex.presets.items():
        n = count_params(ex, p, args)
        tab.add_row(name, f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M", str(p.batch), str(p.size), p.note)
    Console().print(tab)
    return 0


# --- the run ----------------------------------------------------------------------------
def run(ex: Example, argv: list[str] | None = None) -> int:
    args = parser(ex).parse_args(argv)
    preset = ex.presets[args.preset]
    args.batch = args.batch or preset.batch
    args.size = args.size or preset.size
    if args.list_presets:
        return list_presets(ex, args)
    if args.deepspeed:
        return run_deepspeed(ex, args, preset)
    if args.kill_at is not None and not 1 <= args.kill_at <= args.steps:
        _die(f"--kill-at must be in 1..--steps ({args.steps}), got {args.kill_at}")

    from rich.console import Console

    from asymstore.trainer_hooks import AsymCheckpointer

    con = Console()
    torch.set_num_threads(args.threads or max(os.cpu_count() or 1, 1))
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    cfg = ex.make_config(preset, args)
    torch.manual_seed(args.seed)
    model = ex.make_model(cfg).to(device)
    model.train()
    source = ex.make_data(args, cfg)
    opt, sched = _optim(model, args)

    ckpt_dir, ours = resolve_dir(ex, args)
    store = open_tiers(args, ckpt_dir)
    existing = store.steps()
    if existing and not args.resume:
        if args.fresh or ours:
            for s in reversed(existing):
                store.delete(s)
            con.print(f"[dim]deleted {len(existing)} old checkpoint(s) in {ckpt_dir}[/]")
        else:
            store.close()
            _die(
                f"{ckpt_dir} already holds checkpoints (steps {_ranges(existing)}); pass --resume to continue "
                "from the newest, or --fresh to delete them"
            )

    pos = {"batch": 0}  # data position: batches consumed, read right after each optimizer step
    ck = AsymCheckpointer(
        model,
        opt,
        store,
        every=args.every,
        scheduler=sched,
        strategy=args.strategy,
        warmup=args.warmup,
        extras=lambda: dict(pos),
        trace=bool(args.trace),
    )
    resumed: dict[str, Any] | None = None
    if args.resume:
        if existing:
            t = time.perf_counter()
            extras = ck.resume()
            pos["batch"] = int(extras.get("batch", ck.step))
            seconds = time.perf_counter() - t
            tier, detail = restore_source(store)
            resumed = {
                "step": ck.step,
                "tier": tier,
                "detail": detail,
                "seconds": seconds,
                "events": store.last_restore.events if store.last_restore else [],
            }
        else:
            con.print(f"[yellow]--resume: no complete checkpoint in {ckpt_dir}; starting from step 0[/]")
    start = ck.step

    n_params = sum(p.numel() for p in model.parameters())
    tiers_txt = " -> ".join(["host memory"] + [f"{name} ({url})" for name, url in store.tier_urls.items()])
    con.print(
        f"[bold]{ex.title}[/] \\[{args.preset}]: {n_params / 1e6:.2f}M parameters on {device}, {source.description}"
    )
    con.print(f"strategy [cyan]{args.strategy}[/], checkpoint every {args.every} step(s) into {tiers_txt}")
    if resumed:
        con.print(
            f"[green]resumed from step {resumed['step']}[/] ({fmt_source(resumed['tier'], resumed['detail'])}, "
            f"{resumed['seconds'] * 1000:.0f} ms), data position {pos['batch']}"
        )

    losses: list[float] = []

    def kill_report(info: dict[str, Any]) -> None:
        print(f"[kill-at] SIGKILL at step {info['step']}: {json.dumps(info)}", flush=True)

    killer = KillAfterCheckpoint(ck, store, args.kill_at, kill_report) if args.kill_at is not None else None
    t0 = time.perf_counter()
    with ck:
        if killer is not None:
            killer.attach()
        while ck.step < args.steps:
            batch = to_device(source.batch(pos["batch"]), device)
            loss = model(**batch).loss
            loss.backward()
            pos["batch"] += 1
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.item()))
    if killer is not None and ck.step == args.kill_at:  # the last step: the checkpoint is complete by now
        killer.fire()
    train_s = time.perf_counter() - t0
    store.flush(timeout=600)
    iters = ck.step - start
    summ = ck.summary()
    final_hash = state_hash(model)

    check: dict[str, Any] = {}
    if not args.no_check and store.steps():
        check = _restore_check(ex, cfg, args, model, opt, store, ckpt_dir, device)

    result = {
        "example": ex.name,
        "preset": args.preset,
        "parameters": n_params,
        "strategy": args.strategy,
        "device": str(device),
        "data": source.description,
        "dir": ckpt_dir,
        "hdfs": args.hdfs,
        "start_step": start,
        "final_step": ck.step,
        "iterations": iters,
        "resumed_from": resumed["step"] if resumed else None,
        "resumed_tier": resumed["tier"] if resumed else None,
        "resumed_detail": resumed["detail"] if resumed else None,
        "resume_seconds": resumed["seconds"] if resumed else None,
        "shared_host_slots": shared_host_slots(store),
        "train_seconds": train_s,
        "seconds_per_iteration": train_s / max(iters, 1),
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "checkpoints": summ["checkpoints"],
        "skipped": summ["skipped"],
        "median_stall_s": summ["median_stall_s"],
        "hidden_fraction": summ["hidden_fraction"],
        "bytes_per_checkpoint": summ["bytes_per_checkpoint"],
        "state_hash": final_hash,
        "steps": store.steps(),
        "memory": store.memory_report(),
        "where": {str(s): store.where(s) for s in store.steps()},
        "tiers": [
            {k: t[k] for k in ("name", "url", "steps", "bytes_written", "errors", "last_error")}
            for t in store.status()["tiers"]
        ],
        "check": check,
    }
    stored = [h for h in ck.history if h.stored_bytes]
    if stored:
        result["stored_bytes"] = stored[-1].stored_bytes
        result["compression_ratio"] = stored[-1].stored_bytes / max(stored[-1].bytes, 1)
        result["codecs"] = stored[-1].codecs
    _print_summary(con, ex, args, result, store)
    if args.trace:
        con.print(f"timeline written to {ck.write_trace(args.trace)}")
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(result, indent=1, default=str))
    store.close()
    return 0 if not check or (check.get("bit_identical") and check.get("verify_ok")) else 1


def _optim(model: nn.Module, args: argparse.Namespace) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warm = max(args.warmup_steps, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    return opt, sched


def _restore_check(
    ex: Example,
    cfg: Any,
    args: argparse.Namespace,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    store: Any,
    ckpt_dir: str,
    device: torch.device,
) -> dict[str, Any]:
    """Restore the newest checkpoint from the persistent tiers into a fresh model, as a restarted job would."""
    from asymstore.trainer_hooks import AsymCheckpointer

    torch.manual_seed(args.seed + 1)
    model2 = ex.make_model(cfg).to(device)
    opt2, sched2 = _optim(model2, args)
    store2 = open_tiers(args, ckpt_dir, private_host=True)
    try:
        ck2 = AsymCheckpointer(model2, opt2, store2, scheduler=sched2)
        t = time.perf_counter()
        ck2.resume()
        seconds = time.perf_counter() - t
        tier, detail = restore_source(store2)
        first = next(iter(store2.tier_urls), None)
        verify = store2.verify(ck2.step, tier=first) if first in store2.where(ck2.step) else None
        same_step = ck2.step == store.steps()[-1]
        exact = _tensors_equal(model.state_dict(), model2.state_dict()) and _tensors_equal(
            opt.state_dict()["state"], opt2.state_dict()["state"]
        )
        return {
            "step": ck2.step,
            "tier": tier,
            "detail": detail,
            "seconds": seconds,
            "verify_ok": verify.ok if verify is not None else True,
            "verify_problems": list(verify.problems) if verify is not None and not verify.ok else [],
            "bit_identical": bool(exact and same_step),
        }
    finally:
        store2.close()


def _print_summary(con: Any, ex: Example, args: argparse.Namespace, r: dict[str, Any], store: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    tab = Table(title=f"asymstore {ex.name} summary", show_header=False)
    tab.add_row("model", f"{ex.title} \\[{r['preset']}], {r['parameters'] / 1e6:.2f}M parameters, {r['device']}")
    tab.add_row("iterations", f"{r['iterations']} (steps {r['start_step']} -> {r['final_step']})")
    tab.add_row(
        "resumed from",
        "-"
        if r["resumed_from"] is None
        else f"step {r['resumed_from']} from {escape(fmt_source(r['resumed_tier'], r['resumed_detail']))} "
        f"in {r['resume_seconds'] * 1000:.0f} ms",
    )
    tab.add_row("training time", f"{r['train_seconds']:.1f} s ({r['seconds_per_iteration']:.2f} s/iter)")
    if r["loss_first"] is not None:
        tab.add_row("loss first -> last", f"{r['loss_first']:.3f} -> {r['loss_last']:.3f}")
    tab.add_row(
        "checkpoints",
        f"{r['checkpoints']} taken this run, strategy {r['strategy']}"
        + (f", {r['skipped']} skipped" if r["skipped"] else ""),
    )
    tab.add_row("median stall per checkpoint", f"{r['median_stall_s'] * 1000:.1f} ms")
    tab.add_row("bytes copied inside fwd/bwd", f"{r['hidden_fraction'] * 100:.0f}%")
    tab.add_row("checkpoint size", _fmt_bytes(r["bytes_per_checkpoint"]))
    if "stored_bytes" in r:
        tab.add_row(
            "stored, stored/raw",
            f"{_fmt_bytes(r['stored_bytes'])}, {r['compression_ratio']:.3f} (codecs {escape(str(r['codecs']))})",
        )
    tab.add_row("host memory reserved", ", ".join(f"{k}={_fmt_bytes(v)}" for k, v in r["memory"].items()))
    for steps, where in where_summary(store):
        tab.add_row(f"steps {steps}", f"complete on {where}")
    for t in r["tiers"]:
        err = f", {t['errors']} errors ({t['last_error']})" if t["errors"] else ""
        tab.add_row(
            f"tier {t['name']}",
            f"{t['url']}: {len(t['steps'])} checkpoints, {_fmt_bytes(t['bytes_written'])} written{err}",
        )
    c = r["check"]
    if c:
        src = escape(fmt_source(c["tier"], c["detail"]))
        tab.add_row("restored", f"step {c['step']} from {src} in {c['seconds'] * 1000:.0f} ms")
        tab.add_row("verify", "ok" if c["verify_ok"] else f"FAILED {c['verify_problems']}")
        tab.add_row("restored == trained", "[green]bit-identical[/]" if c["bit_identical"] else "[red]MISMATCH[/]")
    tab.add_row("state sha256", r["state_hash"][:16])
    con.print(tab)


# --- DeepSpeed (clusters) ---------------------------------------------------------------------
def run_deepspeed(ex: Example, args: argparse.Namespace, preset: Preset) -> int:
    """Train under DeepSpeed (ZeRO-3 for the large presets), checkpointing through asymstore.

    Each rank writes its own shard of every checkpoint (``rank``/``world_size`` of the store);
    rank 0 commits a step once every shard is durable. Launch with the ``deepspeed`` launcher
    (see ``examples/launch/``).
    """
    try:
        import deepspeed
    except ImportError:
        _die("--deepspeed needs DeepSpeed: pip install 'asymstore[deepspeed]'")
    try:
        from asymstore.trainer_hooks import deepspeed_hooks
    except ImportError as e:
        _die(
            "--deepspeed needs asymstore.trainer_hooks.deepspeed_hooks, which this asymstore installation does "
            f"not have ({e}). Update asymstore, or run without --deepspeed (plain PyTorch, one process)."
        )
    checkpointer = deepspeed_hooks.DeepSpeedAsymCheckpointer

    with open(args.deepspeed) as f:
        ds_cfg = json.load(f)
    ds_cfg["train_micro_batch_size_per_gpu"] = args.batch
    ds_cfg.pop("train_batch_size", None)  # derived: micro batch x gradient accumulation x world size
    deepspeed.init_distributed()
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", max(args.local_rank, 0)))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    cfg = ex.make_config(preset, args)
    torch.manual_seed(args.seed)
    stage = int(ds_cfg.get("zero_optimization", {}).get("stage", 0))
    if stage == 3:  # partition the parameters while they are created: a 10B model never exists whole on one rank
        with torch.device("meta"):  # import the model's modules first: imports inside zero.Init break torch._dynamo
            ex.make_model(cfg)
        with deepspeed.zero.Init(config_dict_or_path=ds_cfg):
            model = ex.make_model(cfg)
    else:
        model = ex.make_model(cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()], config=ds_cfg)
    source = ex.make_data(args, cfg)
    if args.dir is None:
        _die("--deepspeed needs --dir (a directory every rank can write, e.g. node-local NVMe)")
    store = open_tiers(args, args.dir, rank=rank, world_size=world)
    pos = {"batch": 0}
    ck = checkpointer(
        engine,
        store,
        every=args.every,
        strategy=args.strategy,
        warmup=args.warmup,
        extras=lambda: dict(pos),
        trace=bool(args.trace),
    )
    start = 0
    source_of: tuple[str, str | None] | None = None
    if args.resume and store.steps():
        extras = ck.resume()
        pos["batch"] = int(extras.get("batch", 0))
        start = ck.step
        source_of = restore_source(store)
        if rank == 0:
            print(f"resumed from step {start} ({fmt_source(*source_of)})", flush=True)
    t0 = time.perf_counter()
    step = ck.step
    with ck:
        while step < args.steps:
            # each rank reads its own batches: global batch k of rank r is source batch k * world + r
            batch = to_device(source.batch(pos["batch"] * world + rank), engine.device)
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
            pos["batch"] += 1
            step += 1
            if rank == 0:
                print(f"step {step} loss {loss.item():.4f}", flush=True)
            if args.kill_at is not None and step == args.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
    store.flush(timeout=3600)
    if rank == 0:
        s = ck.summary() if hasattr(ck, "summary") else {}
        print(
            json.dumps(
                {
                    "example": ex.name,
                    "preset": args.preset,
                    "ranks": world,
                    "iterations": step - start,
                    "resumed_from": start if args.resume else None,
                    "resumed_tier": source_of[0] if source_of else None,
                    "resumed_detail": source_of[1] if source_of else None,
                    "seconds": time.perf_counter() - t0,
                    "summary": s,
                    "where": {str(x): store.where(x) for x in store.steps()},
                },
                default=str,
            )
        )
    store.close()
    return 0


def make_main(ex: Example) -> Callable[[list[str] | None], int]:
    def main(argv: list[str] | None = None) -> int:
        return run(ex, argv)

    return main


def clear_default_dirs() -> None:  # pragma: no cover - a convenience for users
    shutil.rmtree(Path(tempfile.gettempdir()) / "asymstore-examples", ignore_errors=True)
