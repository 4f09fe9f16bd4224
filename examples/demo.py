"""asymstore's story in one run, as ``./run.sh demo`` shows it (about a minute on 2 CPU cores).

    python examples/demo.py                                   # GPT-2 [demo], 12 steps, SIGKILL after step 6
    python examples/demo.py --preset tiny --steps 6 --kill-at 3   # the quick version the tests run
    python examples/demo.py --strategy sync                   # another checkpointing strategy

1. Train a small GPT-2 (a ``GPT2Config``, random init, nothing downloaded) on learnable synthetic data (windows
   of a fixed token cycle: the loss visibly falls) three ways in this process, same seed: without checkpoints,
   with ``torch.save`` + ``fsync`` every step, and with asymstore (``AsymCheckpointer``, the hook the examples
   use) every step; the three take turns in blocks of 4 steps (the order rotating), each block timed until its
   checkpoints are durable. The overhead is measured here and now, on this machine.
2. Train again in a child process and SIGKILL it from here once it has reported the checkpoint of step K
   (committed in host shared memory, or durable on disk when the host slots are private).
3. Resume in a new process: the restore's time, the tier it came from (in the store's words), the step; the
   restored weights and optimizer state must be bit-identical to the uninterrupted run's at step K, and again
   after continuing to the last step.
4. The timeline of the checkpointed run: a PNG (``benchmarks.bench_overhead.plot_timeline``) and a Chrome trace.

Every figure printed is measured in the run that prints it. Exit status 0 only when both checks are
bit-identical and the loss fell.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

T_START = time.time()

import torch  # noqa: E402  (T_START first: the import time of a demo child is reported)
from gpt2 import PRESETS, make_config, make_model  # noqa: E402

from asymstore_examples.data import Source, cycle_lm_source, to_device  # noqa: E402
from asymstore_examples.runner import (  # noqa: E402
    KillAfterCheckpoint,
    _fmt_bytes,
    _optim,
    fmt_source,
    restore_source,
)

MARK = "@demo "  # a child's report lines: MARK + JSON
Spans = list[tuple[str, float, float]]


# --- flags ----------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="examples/demo.py",
        description="asymstore in one run: overhead, a SIGKILL, a bit-identical resume, the timeline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--preset", default="demo", choices=["tiny", "demo", "small"], help="GPT-2 size (gpt2.py)")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps of every run")
    ap.add_argument(
        "--kill-at", type=int, default=None, help="SIGKILL after this step's checkpoint (None: half of --steps)"
    )
    ap.add_argument("--strategy", default="asym", choices=["sync", "checkfreq", "uniform", "asym"])
    ap.add_argument("--batch", type=int, default=None, help="None: the preset's")
    ap.add_argument("--seq", dest="size", type=int, default=None, help="sequence length (None: the preset's)")
    ap.add_argument("--period", type=int, default=256, help="length of the token cycle the model learns")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-steps", type=int, default=2, help="linear learning-rate warm-up")
    ap.add_argument("--warmup", type=int, default=2, help="profiling iterations before asym plans its partitions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: all cores)")
    ap.add_argument(
        "--out", default=None, help="work directory (None: $TMPDIR/asymstore-demo; an earlier demo's is cleared)"
    )
    ap.add_argument("--summary-json", default=None, metavar="PATH", help="also write every figure as JSON")
    ap.add_argument("--role", default="main", choices=["main", "train", "resume"], help=argparse.SUPPRESS)
    ap.add_argument("--dir", default=None, help=argparse.SUPPRESS)  # the children's checkpoint directory
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    args.batch = args.batch or p.batch
    args.size = args.size or p.size
    if args.kill_at is None:
        args.kill_at = max(args.steps // 2, 1)
    if not 1 <= args.kill_at < args.steps:
        ap.error(f"--kill-at must be in 1..{args.steps - 1} (a step before the last), got {args.kill_at}")
    return args


# --- the training -----------------------------------------------------------------------------------------------
class Run:
    """A model, its optimizer and scheduler, the data and the data position: the same start for every run."""

    def __init__(self, args: argparse.Namespace, seed: int | None = None) -> None:
        self.args = args
        self.cfg = make_config(PRESETS[args.preset], args)
        torch.manual_seed(args.seed if seed is None else seed)
        self.model = make_model(self.cfg)
        self.model.train()
        self.opt, self.sched = _optim(self.model, args)
        self.source: Source = cycle_lm_source(
            batch=args.batch, seq=args.size, vocab_size=self.cfg.vocab_size, seed=args.seed, period=args.period
        )
        self.pos = {"batch": 0}  # batches consumed: checkpointed, so a resumed run sees the same batches
        self.step = 0
        self.losses: list[float] = []
        self.step_s: list[float] = []
        self.spans: Spans = []
        self.rng = torch.get_rng_state()  # its own random stream (dropout) when runs take turns in one process

    def train_step(self) -> float:
        t0 = time.perf_counter()
        loss = self.model(**to_device(self.source.batch(self.pos["batch"]), "cpu")).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        self.pos["batch"] += 1
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        self.spans += [("forward", t0, t1), ("backward", t1, t2), ("optimizer step", t2, t3)]
        self.step += 1
        self.step_s.append(t3 - t0)
        self.losses.append(float(loss.item()))
        return self.losses[-1]

    def state_bytes(self) -> int:
        sd = self.model.state_dict()
        n = sum(t.numel() * t.element_size() for t in sd.values())
        for s in self.opt.state.values():
            n += sum(v.numel() * v.element_size() for v in s.values() if isinstance(v, torch.Tensor))
        return n

    def state_hash(self) -> str:
        """sha256 of the weights, the optimizer state (moments, step counts, hyper-parameters) and the scheduler."""
        h = hashlib.sha256()

        def add(name: str, v: Any) -> None:
            h.update(name.encode())
            if isinstance(v, torch.Tensor):
                h.update(str((v.dtype, tuple(v.shape))).encode())
                h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                h.update(json.dumps(v, sort_keys=True, default=str).encode())

        for k, v in sorted(self.model.state_dict().items()):
            add(k, v)
        osd = self.opt.state_dict()
        for pid in sorted(osd["state"]):
            for k in sorted(osd["state"][pid]):
                add(f"opt.{pid}.{k}", osd["state"][pid][k])
        add("opt.param_groups", osd["param_groups"])
        add("sched", {k: v for k, v in self.sched.state_dict().items() if k != "lr_lambdas"})
        return h.hexdigest()


def open_store(ckpt_dir: str) -> Any:
    from asymstore.store import Store, TierSpec

    return Store([TierSpec(ckpt_dir)], host_slots=2)


def checkpointer(r: Run, store: Any, *, trace: bool = False) -> Any:
    from asymstore.trainer_hooks import AsymCheckpointer

    a = r.args
    return AsymCheckpointer(
        r.model,
        r.opt,
        store,
        every=1,
        scheduler=r.sched,
        strategy=a.strategy,
        warmup=a.warmup,
        extras=lambda: dict(r.pos),
        trace=trace,
    )


def torch_save(r: Run, path: Path) -> None:
    """What a user without asymstore writes every step: ``torch.save`` of model + optimizer, then ``fsync``."""
    f = path / f"step_{r.step}.pt"
    with open(f, "wb") as fh:
        torch.save({"model": r.model.state_dict(), "optimizer": r.opt.state_dict(), "step": r.step}, fh)
        fh.flush()
        os.fsync(fh.fileno())


BLOCK = 4  # steps per timed block; the three runs take turns block by block


def measured_runs(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The three runs, same seed, interleaved: blocks of BLOCK steps in turn, the order rotating every round, so
    a change in the machine's load falls on all three alike. Each block is timed until its checkpoints are
    durable (asymstore: ``ck.wait()`` at the block's end), so no run's background work lands on another's time."""
    warm = Run(args)  # untimed: first-iteration costs (allocator, kernels) land on no measured run
    for _ in range(2):
        warm.train_step()
    del warm

    ts_dir = out / "torch-save"
    ts_dir.mkdir()
    runs = {"none": Run(args), "torch.save": Run(args), "asymstore": Run(args)}
    store = open_store(str(out / "asym-run"))
    ck = checkpointer(runs["asymstore"], store, trace=True).attach()
    seconds = dict.fromkeys(runs, 0.0)
    hashes: dict[str, str] = {}
    names = list(runs)
    try:
        for b in range(-(-args.steps // BLOCK)):
            n = min(BLOCK, args.steps - b * BLOCK)
            for name in names[b % 3 :] + names[: b % 3]:
                r = runs[name]
                torch.set_rng_state(r.rng)  # each run draws its own dropout masks, as if it ran alone
                t0 = time.perf_counter()
                for _ in range(n):
                    r.train_step()
                    if name == "torch.save":
                        t = time.perf_counter()
                        torch_save(r, ts_dir)
                        r.step_s[-1] += time.perf_counter() - t
                    if name == "none" and r.step == args.kill_at:  # the state the resumed run is compared with
                        t = time.perf_counter()
                        hashes["at_kill"] = r.state_hash()
                        t0 += time.perf_counter() - t  # hashing is not training
                if name == "asymstore":
                    if r.step == args.steps:
                        ck.detach()  # completes the last snapshot, waits until everything is durable
                    else:
                        ck.wait()
                seconds[name] += time.perf_counter() - t0
                r.rng = torch.get_rng_state()
    finally:
        ck.detach()  # idempotent; after an error: nothing left attached
    ref, ts, r = runs["none"], runs["torch.save"], runs["asymstore"]
    hashes["final"] = ref.state_hash()
    summ = ck.summary()
    res: dict[str, Any] = {
        "hashes": hashes,
        "state_bytes": ref.state_bytes(),
        "parameters": sum(p.numel() for p in ref.model.parameters()),
        "data": ref.source.description,
        "block": BLOCK,
        "none": {"seconds": seconds["none"], "step_s": ref.step_s, "losses": ref.losses},
        "torch.save": {
            "seconds": seconds["torch.save"],
            "step_s": ts.step_s,
            "final_hash": ts.state_hash(),
            "file_bytes": (ts_dir / f"step_{ts.step}.pt").stat().st_size,
        },
        "asymstore": {
            "seconds": seconds["asymstore"],
            "step_s": r.step_s,
            "final_hash": r.state_hash(),
            "median_stall_s": summ["median_stall_s"],
            "hidden_fraction": summ["hidden_fraction"],
            "checkpoints": summ["checkpoints"],
            "bytes_per_checkpoint": summ["bytes_per_checkpoint"],
            "host_memory": getattr(store, "host_memory", "private"),
            "steps_stored": store.steps(),
        },
    }
    shutil.rmtree(ts_dir, ignore_errors=True)
    res["timeline"] = write_timeline(args, ck, r.spans, out)
    store.close()
    return res


def write_timeline(args: argparse.Namespace, ck: Any, spans: Spans, out: Path) -> dict[str, str | None]:
    """The checkpointed run's Chrome trace, and two planned iterations of it as a PNG (the benchmark's plotter)."""
    trace = ck.write_trace(str(out / "trace_demo.json"))
    png: str | None = str(out / "timeline_demo.png")
    note = None
    try:
        from benchmarks.bench_overhead import plot_timeline
    except ImportError as e:  # benchmarks/ is importable from the repository root (./run.sh demo sets PYTHONPATH)
        png, note = None, f"no PNG: {e} (run ./run.sh demo, or PYTHONPATH=. from the repository root)"
    if png is not None:
        fwd = [s for s in spans if s[0] == "forward"]
        opt = [s for s in spans if s[0] == "optimizer step"]
        # two steps of one block, past the profiling warm-up (partitions planned)
        later = [j for j in range(args.warmup + 1, len(fwd) - 1) if j % BLOCK < BLOCK - 1]
        i = later[0] if later else 0
        window = (fwd[i][1] - 0.01, opt[min(i + 1, len(opt) - 1)][2] + 0.01)
        plot_timeline(
            ck,
            spans,
            window,
            png,
            f"{args.strategy}: GPT-2 [{args.preset}], checkpoint every step, steps {i + 1}-{i + 2} "
            f"(measured in this demo run)",
        )
    return {"png": png, "trace": trace, "note": note}


# --- the children -----------------------------------------------------------------------------------------------
def emit(**kv: Any) -> None:
    print(MARK + json.dumps(kv), flush=True)


def wait_for_go(pid_note: str) -> None:
    """Imports done and model built: say so, then wait until the parent says go (EOF: the parent is gone)."""
    emit(event="ready", pid=os.getpid(), import_s=time.time() - T_START, note=pid_note)
    if sys.stdin.readline().strip() != "go":
        os._exit(3)


def child_train(args: argparse.Namespace) -> int:
    """Train with checkpoints every step; after the checkpoint of --kill-at is reported, wait for the SIGKILL."""
    r = Run(args)
    wait_for_go("train")
    store = open_store(args.dir)
    for s in reversed(store.steps()):  # a fresh run: nothing of an earlier demo
        store.delete(s)
    ck = checkpointer(r, store)

    def reported(info: dict[str, Any]) -> None:
        emit(event="reported", **info)
        sys.stdin.read()  # the parent SIGKILLs this process now; EOF: the parent is gone
        os._exit(3)

    killer = KillAfterCheckpoint(ck, store, args.kill_at, reported, kill=False)
    emit(event="started", pid=os.getpid(), host_memory=getattr(store, "host_memory", "private"))
    with ck:
        killer.attach()
        while r.step < args.steps:  # the SIGKILL comes during step --kill-at + 1
            loss = r.train_step()
            emit(event="step", step=r.step, loss=loss)
    print(f"error: step {args.kill_at}'s checkpoint was never reported", file=sys.stderr)
    return 3


def child_resume(args: argparse.Namespace) -> int:
    """Restore into a model built with another seed, report the restored state's hash, continue to --steps."""
    r = Run(args, seed=args.seed + 1)
    wait_for_go("resume")
    t0 = time.perf_counter()
    store = open_store(args.dir)
    t1 = time.perf_counter()
    ck = checkpointer(r, store)
    extras = ck.resume()
    t2 = time.perf_counter()
    r.pos["batch"], r.step = int(extras["batch"]), ck.step
    tier, detail = restore_source(store)
    emit(
        event="restored",
        pid=os.getpid(),
        step=ck.step,
        tier=tier,
        detail=detail,
        open_s=t1 - t0,
        restore_s=t2 - t1,
        hash=r.state_hash(),
        host_memory=getattr(store, "host_memory", "private"),
    )
    with ck:
        while r.step < args.steps:
            emit(event="step", step=r.step + 1, loss=r.train_step())
    emit(event="done", step=r.step, hash=r.state_hash(), steps_stored=store.steps())
    store.close()
    return 0


class Child:
    """A child process of the demo: started early (its imports overlap the parent's, before anything is timed),
    idle until :meth:`go`."""

    def __init__(self, args: argparse.Namespace, role: str, ckpt_dir: str) -> None:
        self.p = spawn(args, role, ckpt_dir)
        self.ready: dict[str, Any] = {}

    def events(self) -> Any:
        """The child's report lines as dicts; its other output is passed through."""
        assert self.p.stdout is not None
        for line in self.p.stdout:
            if line.startswith(MARK):
                yield json.loads(line[len(MARK) :])
            else:
                print("    | " + line.rstrip(), flush=True)

    def wait_ready(self) -> dict[str, Any]:
        for ev in self.events():
            if ev["event"] == "ready":
                self.ready = ev
                return ev
        raise SystemExit(f"error: a demo child exited ({self.p.wait()}) before it was ready")

    def go(self) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write("go\n")
        self.p.stdin.flush()


def spawn(args: argparse.Namespace, role: str, ckpt_dir: str) -> subprocess.Popen[str]:
    flags = ["--preset", args.preset, "--steps", str(args.steps), "--kill-at", str(args.kill_at)]
    flags += ["--strategy", args.strategy, "--batch", str(args.batch), "--seq", str(args.size)]
    flags += ["--period", str(args.period), "--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps)]
    flags += ["--warmup", str(args.warmup), "--seed", str(args.seed), "--threads", str(args.threads)]
    cmd = [sys.executable, os.path.abspath(__file__), "--role", role, "--dir", ckpt_dir, *flags]
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)


def kill_and_resume(
    args: argparse.Namespace, trainer: Child, resumer: Child, ckpt: str, say: Callable[[str], None]
) -> dict[str, Any]:
    res: dict[str, Any] = {"dir": ckpt}
    p = trainer.p
    trainer.go()
    losses = []
    for ev in trainer.events():
        if ev["event"] == "started":
            res["pid"] = ev["pid"]
            say(f"2/4 training again in a child process (pid {ev['pid']}), checkpoint every step")
        elif ev["event"] == "step":
            losses.append(ev["loss"])
        elif ev["event"] == "reported":
            t = time.perf_counter()
            p.send_signal(signal.SIGKILL)
            rc = p.wait()
            res.update(report=ev, rc=rc, kill_ms=(time.perf_counter() - t) * 1e3, losses=losses)
            where = ", ".join(ev["where"]) or "nowhere"
            pending = "" if "file" in ev["where"] else " (not yet on disk)"
            say(
                f"    steps 1-{ev['step']}: loss {losses[0]:.3f} -> {losses[-1]:.3f}; the checkpoint of step "
                f"{ev['checkpoint']} reported complete on: {where}{pending}"
            )
            say(
                f"    SIGKILL to pid {ev['pid']} during step {ev['step'] + 1} (after its forward/backward, before its "
                f"optimizer step): exit status {rc}"
            )
            break
    if "report" not in res:
        p.wait()
        raise SystemExit(f"error: the training child exited ({p.returncode}) before reporting step {args.kill_at}")

    p = resumer.p
    resumer.go()
    losses = []
    for ev in resumer.events():
        if ev["event"] == "restored":
            res["restored"] = dict(ev, import_s=resumer.ready["import_s"])
        elif ev["event"] == "step":
            losses.append(ev["loss"])
        elif ev["event"] == "done":
            res["done"] = ev
    p.wait()
    res["resume_rc"] = p.returncode
    res["resume_losses"] = losses
    if "done" not in res:
        raise SystemExit(f"error: the resumed child exited ({p.returncode}) before the last step")
    return res


# --- the story --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    torch.set_num_threads(args.threads or max(os.cpu_count() or 1, 1))
    if args.role == "train":
        return child_train(args)
    if args.role == "resume":
        return child_resume(args)

    out = Path(args.out or Path(tempfile.gettempdir()) / "asymstore-demo")
    marker = out / ".asymstore-demo"  # only a directory an earlier demo made is cleared
    if out.exists() and any(out.iterdir()):
        if not marker.exists():
            print(f"error: {out} is not empty and not an earlier demo's directory; pass another --out", file=sys.stderr)
            return 2
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text("made by examples/demo.py; cleared by its next run\n")

    def say(s: str) -> None:
        print(s, flush=True)

    # both children start now: their imports overlap this process's; they stay idle while anything is timed
    ckpt = str(out / "killed-run")
    trainer, resumer = Child(args, "train", ckpt), Child(args, "resume", ckpt)
    cores, threads = os.cpu_count() or 1, torch.get_num_threads()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    say(f"asymstore demo: GPT-2 [{args.preset}] on cpu ({cores} cores, {threads} torch threads, load {load:.1f})")
    say(
        f"1/4 training {args.steps} steps three ways, same seed, taking turns in blocks of {BLOCK} steps "
        "(each timed until its checkpoints are durable), on this machine now ..."
    )
    trainer.wait_ready()
    resumer.wait_ready()
    m = measured_runs(args, out)
    none_s = m["none"]["seconds"]
    say(
        f"    {m['parameters'] / 1e6:.2f}M parameters, {_fmt_bytes(m['state_bytes'])} of weights + optimizer state; "
        f"data: {m['data']}"
    )
    a = m["asymstore"]
    rows = [
        ("no checkpoints", m["none"], ""),
        ("torch.save + fsync, every step", m["torch.save"], ""),
        (
            f"asymstore {args.strategy}, every step",
            a,
            f"  stall {a['median_stall_s'] * 1e3:.0f} ms/ckpt, {a['hidden_fraction'] * 100:.0f}% copied in fwd/bwd",
        ),
    ]
    for name, r, extra in rows:
        over = "" if r is m["none"] else f"  {(r['seconds'] / none_s - 1) * 100:+5.1f}%"
        med = statistics.median(r["step_s"])
        say(f"    {name:<32} {r['seconds']:6.2f} s  (median step {med * 1e3:4.0f} ms){over}{extra}")
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if max(load, load_after) > cores + 0.5:
        say(
            f"    (other work was running: load {max(load, load_after):.1f} on {cores} cores; these timings are "
            "noisy, a quiet machine gives steadier ones)"
        )
    same = m["torch.save"]["final_hash"] == m["hashes"]["final"] == a["final_hash"]
    losses = m["none"]["losses"]
    say(
        f"    loss {losses[0]:.3f} -> {losses[-1]:.3f}; the three runs end bit-identical: {'yes' if same else 'NO'}; "
        f"asymstore kept steps {a['steps_stored'][0]}-{a['steps_stored'][-1]} (host memory: {a['host_memory']})"
    )

    kr = kill_and_resume(args, trainer, resumer, ckpt, say)
    rs, done = kr["restored"], kr["done"]
    at_kill_ok = rs["hash"] == m["hashes"]["at_kill"] and rs["step"] == args.kill_at
    final_ok = done["hash"] == m["hashes"]["final"] and done["step"] == args.steps
    rl = kr["resume_losses"]
    say(
        f"3/4 resuming in a new process (pid {rs['pid']}; started in advance, its imports took "
        f"{rs['import_s']:.1f} s, idle until the kill)"
    )
    say(
        f"    restored step {rs['step']} from {fmt_source(rs['tier'], rs['detail'])} in "
        f"{(rs['open_s'] + rs['restore_s']) * 1e3:.0f} ms (open the store {rs['open_s'] * 1e3:.0f} ms + restore "
        f"{rs['restore_s'] * 1e3:.0f} ms)"
    )
    say(
        f"    step {rs['step']}: weights + optimizer state == the uninterrupted run's: "
        f"{'bit-identical' if at_kill_ok else 'MISMATCH'}"
    )
    say(
        f"    continued to step {done['step']} (loss {rl[0]:.3f} -> {rl[-1]:.3f}): == the uninterrupted run's: "
        f"{'bit-identical' if final_ok else 'MISMATCH'}"
    )
    tl = m["timeline"]
    if tl["png"]:
        say(f"4/4 timeline of the checkpointed run: {tl['png']}  (Chrome trace: {tl['trace']})")
    else:
        say(f"4/4 timeline of the checkpointed run: Chrome trace {tl['trace']}; {tl['note']}")
    learned = losses[-1] < losses[0] and rl[-1] < losses[0]
    total = time.time() - T_START
    say(f"done in {total:.0f} s; checkpoints and timeline under {out}")

    if args.summary_json:
        summary = dict(
            args=vars(args),
            measured=m,
            kill=kr,
            at_kill_bit_identical=at_kill_ok,
            final_bit_identical=final_ok,
            variants_bit_identical=same,
            loss_fell=learned,
            total_s=total,
            cores=cores,
            threads=threads,
            load=load,
        )
        Path(args.summary_json).write_text(json.dumps(summary, indent=1, default=str))
    return 0 if at_kill_ok and final_ok and same and learned else 1


if __name__ == "__main__":
    raise SystemExit(main())
