"""Time to resume a ~1 GiB training state after a SIGKILL: from host shared memory, from the local tier, and
``torch.load`` of the same bytes, against memcpy of the same bytes and one iteration of the overhead
benchmark's model, all measured in the same run.

Each round: a child process builds a GPT-2 (transformers config, no download) sized so that weights + AdamW
moments are ~1 GiB, trains it a few steps (a trained state, not random init), saves it with asymstore (host
slots in shared memory, a local directory tier, ``compression="auto"``) and with ``torch.save``, and SIGKILLs
itself. Then each variant runs in a fresh process, the way a restarted job would: open the store and restore
(into new tensors, and in place into a model's tensors), or ``torch.load``. Times are wall clock in the fresh
process (store opening included in "resume"; the variants run in an order rotated by the round); the page cache holds the tier's files (the same for both file
readers). memcpy is measured in the same processes (a new destination and a preallocated one). The restore into
new tensors is timed twice: cold (the first allocations of the fresh process: on a virtual machine that hands
freed memory back to its host they fault in slowly, for asymstore and memcpy alike) and warm (the store opened
again and a state-sized buffer faulted in and freed first, untimed), each against memcpy measured the same way.

Goals (docs/benchmarking.md): restore from shared memory, every chunk verified, >= 0.8x memcpy bandwidth (new tensors,
warm, and in place), and a
whole resume from shared memory <= one training iteration of the overhead benchmark's model.

    python -m benchmarks.bench_resume [--rounds 3] [--gib 1.0] [--out benchmarks/results/resume.md]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

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
    round_order,
    write_report,
)

SAVE = r"""
import os, sys, time, torch
import asymstore
from benchmarks.bench_resume import build_state
ck, shm, pt, gib = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
torch.manual_seed(0)
state = build_state(gib)
st = asymstore.open_store(ck, shm_dir=shm)
st.save(state, 1)                      # persisted: the tier has it too
torch.save(state, pt)
os.sync()
os.kill(os.getpid(), 9)
"""

RESUME = r"""
import json, sys, time
t0 = time.perf_counter()
import torch, asymstore
from benchmarks._harness import warm_memory
from benchmarks.bench_resume import memcpy_times, state_tensors
mode, ck, shm, pt = sys.argv[1:5]
imported = time.perf_counter() - t0
out = {"import_s": imported}
if mode == "torch.load":
    t = time.perf_counter(); state = torch.load(pt, weights_only=True); out["resume_s"] = time.perf_counter() - t
    out["bytes"] = sum(x.numel() * x.element_size() for x in state_tensors(state))
else:
    opts = {"shm_dir": shm, "keep_shm": True} if mode == "shm" else {"host_memory": "private"}
    t = time.perf_counter(); st = asymstore.open_store(ck, **opts); out["open_s"] = time.perf_counter() - t
    t = time.perf_counter(); state = st.restore(); out["restore_s"] = time.perf_counter() - t
    out["resume_s"] = out["open_s"] + out["restore_s"]
    out["tier"], out["detail"] = st.last_restore.tier, st.last_restore.detail
    out["bytes"] = sum(x.numel() * x.element_size() for x in state_tensors(state))
    into = {k: v for k, v in state.items()}
    if mode == "shm":
        for s in st.host.slots:
            s.verified = False  # verify again: the in-place restore is timed with its verification
    t = time.perf_counter(); st.restore(into=into); out["inplace_s"] = time.perf_counter() - t
    st.close()
    del state, into
    # the same restore in a store opened again (new mappings), into memory this machine holds
    st = asymstore.open_store(ck, **opts)
    warm_memory(out["bytes"])
    t = time.perf_counter(); state = st.restore(); out["restore_warm_s"] = time.perf_counter() - t
    st.close()
    del state
out.update(memcpy_times(out["bytes"]))
print(json.dumps(out), flush=True)
"""


def build_state(gib: float) -> dict[str, Any]:
    """A GPT-2 trained 3 steps with AdamW, sized so weights + moments are about ``gib`` GiB."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    # params ~ 12 * layers * embd^2 + vocab * embd; weights + exp_avg + exp_avg_sq are 12 bytes per parameter
    embd, vocab = 768, 50257
    params = gib * 2**30 / 12
    layers = max(1, round((params - vocab * embd) / (12 * embd * embd)))
    cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=embd, n_layer=layers, n_head=12)
    model = GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randint(0, vocab, (1, 64), generator=g)
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return {"model": model.state_dict(), "optim": opt.state_dict()}


def state_tensors(state: Any) -> list[Any]:
    """Every tensor of a nested state."""
    import torch

    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in state_tensors(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in state_tensors(v)]
    return []


def memcpy_times(nbytes: int) -> dict[str, float]:
    """memcpy of ``nbytes`` in seconds: into a new buffer (the faster of a plain one and one in huge pages, as
    asymstore allocates), first as it comes in this fresh process ("cold") and then into memory this machine
    holds (:func:`~benchmarks._harness.warm_memory` before each), and into a preallocated one (best of 2)."""
    import torch

    from asymstore.snapshot import new_host_buffer
    from benchmarks._harness import warm_memory

    src = torch.ones(nbytes, dtype=torch.uint8)
    out: dict[str, float] = {}
    for key, warm in (("memcpy_new_cold_s", False), ("memcpy_new_s", True)):
        best = float("inf")
        for alloc in (lambda: torch.empty_like(src), lambda: new_host_buffer(nbytes)):
            if warm:
                warm_memory(nbytes)
            t = time.perf_counter()
            dst = alloc()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t)
            del dst
        out[key] = best
    dst = new_host_buffer(nbytes)
    dst.copy_(src)
    pre = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        dst.copy_(src)
        pre = min(pre, time.perf_counter() - t)
    out["memcpy_s"] = pre
    return out


def iteration_time(rounds: int = 5) -> float:
    """Median time of one training iteration of the overhead benchmark's default GPT-2 (no checkpoint)."""
    import torch

    from benchmarks._gpt2 import Data, add_model_args, build_model

    p = argparse.ArgumentParser()
    add_model_args(p, layers=8, batch=16, seq=128)  # bench_overhead's defaults
    args = p.parse_args([])
    model, opt = build_model(args)
    data = Data(args)
    times = []
    for i in range(rounds + 2):
        x = data.next()
        t = time.perf_counter()
        model(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        if i >= 2:
            times.append(time.perf_counter() - t)
    del model, opt, torch
    return median(times)


def _env() -> dict[str, str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))


def _py(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=_env())


def one_round(work: str, shm_root: str, gib: float, index: int = 0) -> dict[str, dict[str, Any]]:
    """Save + SIGKILL in a child, then each variant in a fresh process (``shm_root``: a tmpfs directory), in an
    order rotated by the round ``index`` (no variant always runs first after the kill)."""
    ck, shm, pt = os.path.join(work, "ck"), os.path.join(shm_root, "slots"), os.path.join(work, "state.pt")
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(shm, ignore_errors=True)
    os.makedirs(work)
    os.makedirs(shm)
    r = _py(SAVE, ck, shm, pt, str(gib))
    if r.returncode != -signal.SIGKILL:
        raise RuntimeError(f"the saving child did not die as planned (rc {r.returncode}): {r.stderr[-3000:]}")
    out = {}
    for mode in round_order(["shm", "tier", "torch.load"], index):
        r = _py(RESUME, mode, ck, shm, pt)
        if r.returncode:
            raise RuntimeError(f"{mode} resume failed: {r.stderr[-3000:]}")
        out[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(shm, ignore_errors=True)
    return out


def report(rounds: list[dict[str, dict[str, Any]]], it_s: float, args: argparse.Namespace, busy: float | None) -> str:
    def med(mode: str, key: str) -> float:
        return median([r[mode][key] for r in rounds if key in r[mode]])

    nbytes = rounds[0]["shm"]["bytes"]
    mc_cold, mc_new, mc = med("shm", "memcpy_new_cold_s"), med("shm", "memcpy_new_s"), med("shm", "memcpy_s")

    def cell(x: float, fmt: str = "{:.3f}") -> str:
        return "-" if x != x else fmt.format(x)

    rows = []
    for mode, label in (
        ("shm", "asymstore, host shared memory"),
        ("tier", "asymstore, local tier"),
        ("torch.load", "torch.load"),
    ):
        res, cold, warm, inp = (med(mode, k) for k in ("resume_s", "restore_s", "restore_warm_s", "inplace_s"))
        rows.append(
            [
                label,
                cell(res),
                cell(cold),
                cell(mc_cold / cold, "{:.2f}x"),
                cell(warm),
                cell(nbytes / warm / 1e9, "{:.2f}"),
                cell(mc_new / warm, "{:.2f}x"),
                cell(inp),
                cell(mc / inp, "{:.2f}x"),
                f"{res / it_s:.2f}",
            ]
        )
    shm_cold, shm_warm = med("shm", "restore_s"), med("shm", "restore_warm_s")
    shm_inp, shm_res = med("shm", "inplace_s"), med("shm", "resume_s")
    goal_bw = min(mc_new / shm_warm, mc / shm_inp)
    lines = [
        "# Resume after SIGKILL: host shared memory vs local tier vs torch.load",
        "",
        f"- machine: {machine_line()}",
        f"- date: {now():%Y-%m-%d %H:%M} UTC, git {git_rev()}",
        f"- command: `{command_line('benchmarks.bench_resume', args.argv)}`",
        f"- state: GPT-2 weights + AdamW moments after 3 steps, {nbytes / 2**30:.2f} GiB; {len(rounds)} rounds, medians",
        f"- memcpy of the same bytes (torch `copy_`, all threads): into a new buffer (the faster of plain and huge "
        f"pages) {nbytes / mc_cold / 1e9:.2f} GB/s cold (the first allocations of the fresh process), "
        f"{nbytes / mc_new / 1e9:.2f} GB/s into memory the machine holds; {nbytes / mc / 1e9:.2f} GB/s into a "
        "preallocated one",
        f"- one iteration of the overhead benchmark's model (GPT-2 8 layers, batch 16 x 128): {it_s:.3f} s",
    ]
    warning = busy_warning(busy, when="before the run")
    if warning:
        lines += ["", warning.strip()]
    lines += [
        "",
        *markdown_table(
            [
                "variant",
                "resume s (open + restore, cold)",
                "restore s (new tensors, cold)",
                "vs memcpy (new, cold)",
                "restore s (new tensors, warm)",
                "GB/s (warm)",
                "vs memcpy (new, warm)",
                "in place s",
                "vs memcpy (in place)",
                "resume / iteration",
            ],
            "lrrrrrrrrr",
            rows,
        ),
        "",
        "Cold: the resume as a restarted job sees it, in a fresh process whose first allocations this virtual "
        "machine may back slowly (memory freed by the killed process is handed back to the host). Warm: the same "
        "restore in a store opened again, after a buffer of the state's size was faulted in and freed (untimed), "
        "against memcpy measured the same way.",
        "",
        "Shared-memory restores verify the crc32c of every 1 MiB chunk, in the same pass as the copy; the tier "
        "restore verifies every chunk's checksum too; torch.load verifies nothing.",
        "",
        f"- Goal restore from shared memory >= 0.8x memcpy (the weaker of new-buffer, warm, and in-place): "
        f"{goal_bw:.2f}x -> {'PASS' if goal_bw >= 0.8 else 'FAIL'} (cold, new tensors: {mc_cold / shm_cold:.2f}x)",
        f"- Goal resume from shared memory <= one iteration: {shm_res:.3f} s vs {it_s:.3f} s -> "
        f"{'PASS' if shm_res <= it_s else 'FAIL'}",
        "",
    ]
    return "\n".join(line for line in lines if line is not None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--gib", type=float, default=1.0, help="state size (GiB)")
    p.add_argument("--out", default=os.path.join(RESULTS, "resume.md"), help="report path ('-': print only)")
    args = p.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    busy = other_cpu_busy()
    work = tempfile.mkdtemp(prefix="bench-resume-")
    shm = tempfile.mkdtemp(prefix="bench-resume-", dir="/dev/shm")
    rounds = []
    for i in range(args.rounds):
        rounds.append(one_round(work, shm, args.gib, i))
        print(
            f"round {i + 1}/{args.rounds}: " + ", ".join(f"{m} {r['resume_s']:.3f} s" for m, r in rounds[-1].items()),
            flush=True,
        )
    it_s = iteration_time()
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(shm, ignore_errors=True)
    md = report(rounds, it_s, args, busy)
    print(md)
    write_report(args.out, md, {"rounds": rounds, "iteration_s": it_s})
    return 0


if __name__ == "__main__":
    sys.exit(main())
