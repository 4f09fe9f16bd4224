"""The comparison: every checkpointing system the AsymCheck papers compare against, as a variant of one benchmark,
on the six model families (GPT-2, BERT, RoBERTa, BLOOM, ResNet, ViT), checkpoint at every iteration.

Variants (benchmarks/_variants.py; real = the system's own code, emulation = its policy on asymstore's storage):

* ``baseline``       no checkpointing
* ``asym``           asymstore, asymmetric partitions sized to the profiled forward/backward windows (default)
* ``datastates``     DataStates-LLM (emulation): equal partitions during forward and backward
* ``checkfreq``      CheckFreq (emulation): blocking snapshot at the step boundary, background persist
* ``deepfreeze``     DeepFreeze (emulation): layer-wise snapshots issued after each layer's forward, fixed size
* ``gemini``         Gemini (emulation): every checkpoint in local and a peer process's host memory (peer
  replicas), persisted to disk every ``--persist-every`` checkpoints
* ``excp``           ExCP: asym snapshots, a lossless first tier and an archive tier with the ExCP lossy codec
* ``fastpersist``    FastPersist (real): DeepSpeed's FastCheckpointEngine (async-I/O ``O_DIRECT`` writer)
* ``torchsnapshot``  TorchSnapshot (real): ``Snapshot.async_take``
* ``torch.save``     ``torch.save`` + fsync (real)
* ``dcp.async_save`` PyTorch DCP ``async_save`` (real)

Method: Per family, every variant runs a block per round: ``--warmup`` untimed iterations, a drain, then
``--block`` timed iterations ended by a drain of the variant's background work (benchmarks/_harness.py
``time_block``); rounds rotate the order of the variants; the iteration overhead of a variant is the median over
rounds of its block against the baseline block of the same round (paired). After each block the variant's
newest checkpoint is restored into a fresh model and optimizer (timed: read + ``load_state_dict``; the page cache
is warm, as right after a save) and compared with the live state: bit-exact for the lossless variants, within the
recorded bound for ExCP. Stall: training-thread time per checkpoint. Bytes: what the newest checkpoint occupies
on its durable storage (Gemini: a persisted one; ExCP: the archive's).

Usage::

    python -m benchmarks.compare --quick          # smoke run: tiny models, 1 round (a minute or two)
    python -m benchmarks.compare                  # the table: CPU presets, 3 rounds
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any

import torch

from benchmarks import _variants as V
from benchmarks._families import FAMILIES, Family, build, train_step
from benchmarks._harness import (
    RESULTS,
    Block,
    command_line,
    git_rev,
    machine_info,
    machine_line,
    markdown_table,
    median,
    now,
    other_cpu_busy,
    paired,
    round_order,
    time_block,
    write_report,
)
from benchmarks.bench_overhead import Variant, state_bytes


def run_block(v: Variant, fam: Family, warmup: int, block: int) -> Block:
    """``warmup`` untimed iterations, a drain, ``block`` timed iterations and the final drain (timed)."""
    gc.collect()
    v.before_block()
    for _ in range(warmup):
        train_step(fam)
        v.after_iter()
    v.drain()
    cv: Any = v
    cv.set_timed(True)

    def step() -> None:
        train_step(fam)
        v.after_iter()

    res = time_block(step, v.drain, iterations=block)
    cv.set_timed(False)
    v.after_block()
    return res


def restore_check(v: Any, fam: Family, model2: torch.nn.Module, opt2: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore ``v``'s newest checkpoint into ``model2``/``opt2`` (timed) and compare it with the live state."""
    t0 = time.perf_counter()
    source = v.restore_into(model2, opt2)
    dt = time.perf_counter() - t0
    err = V.check_restore(fam.model, fam.opt, model2, opt2)
    out: dict[str, Any] = {"seconds": dt, "source": source, "errors": err}
    exact = all(x == 0 for x in err.values())
    out["exact"] = exact
    if v.info.lossless:
        out["ok"] = exact
    else:
        man = v.archive_manifest()
        bounds = {c: float(e["bound"]) for c, e in man.lossy["errors"].items()}
        out["bounds"] = bounds
        out["ok"] = err["mismatch"] == 0 and all(
            err[c] <= bounds.get(c, 0.0) for c in ("weight", "exp_avg", "exp_avg_sq")
        )
        out["ok"] = out["ok"] and err["exact"] == 0
    return out


def run_family(name: str, names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """One family: every variant's blocks in rotation, restores after each block; the family's rows."""
    fam = build(name, args.preset, seed=args.seed)
    for _ in range(2):  # allocator, AdamW state
        train_step(fam)
    p_b, o_b = state_bytes(fam.model, fam.opt)
    root = tempfile.mkdtemp(prefix=f"asym-compare-{name}-", dir=os.environ.get("ASYM_BENCH_DIR"))
    skipped: dict[str, str] = {}
    failed: dict[str, str] = {}
    variants: dict[str, Variant] = {}
    for n in names:
        why = V.available(n)
        if why is not None:
            skipped[n] = why
            continue
        variants[n] = V.make(
            n, fam.model, fam.opt, root, keep=args.keep, warmup=args.warmup + 1, persist_every=args.persist_every
        )
    model2, opt2 = fam.fresh()
    run_names = list(variants)
    per_iter: dict[str, list[float]] = {n: [] for n in run_names}
    cpu: dict[str, list[float]] = {n: [] for n in run_names}
    restores: dict[str, list[dict[str, Any]]] = {n: [] for n in run_names}
    print(f"\n== {fam.describe()}, state {(p_b + o_b) / 2**20:.1f} MiB; variants {', '.join(run_names)}", flush=True)
    if skipped:
        print(f"   not run: {skipped}", flush=True)
    try:
        for r in range(-args.warmup_rounds, args.rounds):
            for n in round_order(run_names, r):
                if n in failed:
                    continue
                v = variants[n]
                try:
                    b = run_block(v, fam, args.warmup, args.block)
                    rs = restore_check(v, fam, model2, opt2) if n != "baseline" else None
                except Exception as e:  # one system failing must not lose the others' cells
                    if n == "baseline":
                        raise
                    failed[n] = f"{type(e).__name__}: {e}"
                    print(f"   {n} FAILED: {failed[n]}", flush=True)
                    continue
                if r < 0:
                    print(f"   warm-up {n:>15}: {b.per_iter * 1e3:8.1f} ms/iter", flush=True)
                    continue
                per_iter[n].append(b.per_iter)
                cpu[n].append(b.cpu_per_iter)
                if rs is not None:
                    restores[n].append(rs)
                print(
                    f"   round {r + 1}/{args.rounds} {n:>15}: {b.per_iter * 1e3:8.1f} ms/iter"
                    + (f", restore {rs['seconds'] * 1e3:.0f} ms ({'ok' if rs['ok'] else 'FAILED'})" if rs else ""),
                    flush=True,
                )
        rows = []
        for n in run_names:
            if n in failed:
                continue
            cv: Any = variants[n]
            pair = paired(per_iter[n], per_iter["baseline"]) if "baseline" in per_iter else None
            done = restores[n]
            row: dict[str, Any] = {
                "variant": n,
                "system": cv.info.system,
                "how": cv.info.how,
                "lossless": cv.info.lossless,
                "median_ms": median(per_iter[n]) * 1e3,
                "blocks": len(per_iter[n]),
                "paired_pct": pair.median if pair else float("nan"),
                "paired_min": pair.min if pair else float("nan"),
                "paired_max": pair.max if pair else float("nan"),
                "cpu_ms": median(cpu[n]) * 1e3,
                "median_stall_ms": median(cv.stalls()) * 1e3 if n != "baseline" else 0.0,
                "stored_bytes": cv.stored_bytes() if n != "baseline" else 0,
                "restore_ms": median([x["seconds"] for x in done]) * 1e3 if done else float("nan"),
                "restore_source": done[-1]["source"] if done else "",
                "restores_ok": f"{sum(x['ok'] for x in done)}/{len(done)}" if done else "",
                "restore_errors": done[-1]["errors"] if done else {},
            }
            if done and "bounds" in done[-1]:
                row["restore_bounds"] = done[-1]["bounds"]
            if isinstance(cv, V.GeminiV):
                row["host_bytes"] = cv.host_bytes()
                row["replicas_pushed"] = cv.host.replicas.pushed if cv.host.replicas is not None else 0
                row["persisted"] = len(cv.persisted)
                row["persist_missed"] = cv.missed
                row["persist_every"] = cv.persist_every
            rows.append(row)
    finally:
        for closing in variants.values():
            try:
                closing.close()
            except Exception as e:  # one variant's failed cleanup must not lose the family's results
                print(f"   closing {getattr(closing, 'name', closing)} failed: {e}", flush=True)
        shutil.rmtree(root, ignore_errors=True)
    return {
        "family": name,
        "title": fam.title,
        "describe": fam.describe(),
        "preset": args.preset,
        "n_params": fam.n_params,
        "state_bytes": p_b + o_b,
        "baseline_ms": median(per_iter.get("baseline", [])) * 1e3,
        "rows": rows,
        "skipped": skipped,
        "failed": failed,
        "per_block_s": per_iter,
    }


# --- report ---------------------------------------------------------------------------------------------------------
def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def family_table(fr: dict[str, Any]) -> list[str]:
    rows = []
    for r in fr["rows"]:
        if r["variant"] == "baseline":
            rows.append([r["variant"], r["how"], f"{r['median_ms']:.0f}", "-", "-", "-", "-", "-"])
            continue
        ok = r["restores_ok"]
        if not r["lossless"] and r.get("restore_bounds"):
            e, b = r["restore_errors"], r["restore_bounds"]
            ok += f" lossy: weight max err {e['weight']:.2g} <= {b.get('weight', 0):.2g}"
        else:
            ok += " bit-exact" if r["restores_ok"].split("/")[0] == r["restores_ok"].split("/")[-1] else " NOT exact"
        stored = _mib(r["stored_bytes"])
        if "host_bytes" in r:
            stored += f" (every {r.get('persist_every', '')}th; host {_mib(r['host_bytes'])} x2)"
        rows.append(
            [
                r["variant"],
                r["how"],
                f"{r['median_ms']:.0f}",
                f"**{r['paired_pct']:+.1f}%** [{r['paired_min']:+.0f}, {r['paired_max']:+.0f}]",
                f"{r['median_stall_ms']:.1f}",
                stored,
                f"{r['restore_ms']:.0f}",
                ok,
            ]
        )
    header = [
        "variant",
        "what",
        "ms/iter",
        "overhead vs baseline (paired median [min, max])",
        "stall ms/ckpt",
        "MiB stored/ckpt",
        "restore ms",
        "restores checked",
    ]
    return markdown_table(header, "llrrrrrl", rows)


def headline(fr: dict[str, Any]) -> str:
    rows = [r for r in fr["rows"] if r["variant"] != "baseline" and r["paired_pct"] == r["paired_pct"]]
    if not rows:
        return ""
    best = min(rows, key=lambda r: r["paired_pct"])
    asym = next((r for r in rows if r["variant"] == "asym"), None)
    text = f"lowest overhead: `{best['variant']}` {best['paired_pct']:+.1f}%"
    if asym is not None:
        others = sorted(rows, key=lambda r: r["paired_pct"])
        rank = [r["variant"] for r in others].index("asym") + 1
        text += f"; `asym` {asym['paired_pct']:+.1f}% (rank {rank} of {len(rows)})"
    smallest = min(rows, key=lambda r: r["stored_bytes"] or float("inf"))
    text += f"; smallest checkpoint: `{smallest['variant']}` {_mib(smallest['stored_bytes'])} MiB"
    return text


def plot_family(fr: dict[str, Any], path: str, stamp: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in fr["rows"] if r["variant"] != "baseline"]
    names = [r["variant"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [
        ("iteration overhead vs baseline (%)", [r["paired_pct"] for r in rows]),
        ("stall per checkpoint (ms)", [r["median_stall_ms"] for r in rows]),
        ("restore (ms)", [r["restore_ms"] for r in rows]),
    ]
    colors = [
        "#c44e52" if r["variant"] == "asym" else ("#8172b2" if "emulation" in r["how"] else "#4c72b0") for r in rows
    ]
    for ax, (title, vals) in zip(axes, panels, strict=True):
        ax.bar(range(len(names)), vals, color=colors)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if min(vals, default=0) < 0:
            ax.axhline(0, color="black", lw=0.6)
    fig.suptitle(
        f"{fr['describe']}, {fr['state_bytes'] / 2**20:.0f} MiB state, checkpoint every iteration "
        f"(red: asymstore, purple: emulations on asymstore storage, blue: real systems) — {stamp}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def lscpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    keep = ("Model name", "CPU(s):", "Thread(s) per core", "Core(s) per socket")
    return "; ".join(" ".join(line.split()) for line in out.splitlines() if line.startswith(keep))


def report(results: list[dict[str, Any]], env: dict[str, Any], args: argparse.Namespace) -> str:
    mi = env["machine"]
    busy = env["busy"]
    out = [
        "# Comparison: the systems the AsymCheck papers compare against, six model families",
        "",
        f"Measured {env['started']:%Y-%m-%d %H:%M %Z} by `{env['cmd']}` ({env['total_s'] / 60:.1f} min), "
        f"commit {env['rev']}.",
        "",
        f"- machine: {machine_line(mi)}; lscpu: {env['lscpu']}",
        (
            f"- other work on the machine: {busy:.0%} of the cores busy over 3 s before the run"
            if busy is not None
            else "- other work on the machine: not measurable"
        )
        + f"; load average at start {env['load'][0][0]:.1f}, at end {env['load'][-1][0]:.1f} (1 min)",
        f"- {args.rounds} rounds of {args.block}-iteration blocks (+{args.warmup} untimed iterations, "
        f"{args.warmup_rounds} warm-up round(s)), checkpoint every iteration, keep {args.keep}; Gemini persists "
        f"every {args.persist_every}th checkpoint; preset `{args.preset}`",
        "",
    ]
    if busy is not None and busy > 0.25:
        out.append(
            f"**Noise: the machine was shared ({busy:.0%} of the cores busy with other work at the start): wall "
            f"times include that contention; read the [min, max] of the paired overhead before trusting "
            f"differences smaller than that spread.**\n"
        )
    if env.get("missing"):
        out.append(f"**Not measured in this run (stopped before them): {', '.join(env['missing'])}.**\n")
    for fr in results:
        out += [f"## {fr['describe']}", ""]
        out.append(
            f"State {fr['state_bytes'] / 2**20:.1f} MiB (parameters + AdamW moments); baseline "
            f"{fr['baseline_ms']:.0f} ms/iteration. Headline: {headline(fr)}.\n"
        )
        out += family_table(fr)
        if fr["skipped"]:
            out += ["", "Not run: " + "; ".join(f"`{k}`: {v}" for k, v in fr["skipped"].items())]
        if fr["failed"]:
            out += ["", "**Failed** (no cell): " + "; ".join(f"`{k}`: {v[:300]}" for k, v in fr["failed"].items())]
        out += ["", f"![{fr['family']}](compare_{fr['family']}{args.tag}.png)", ""]
    method = (__doc__ or "").split("Method:", 1)[1].split("Usage::", 1)[0].strip()
    out += ["## Method", "", method, ""]
    return "\n".join(out) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny presets, 1 round of 2-iteration blocks")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--variants", default=",".join(V.VARIANTS))
    p.add_argument("--preset", default="cpu", help="cpu (default) or an example preset such as tiny")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--block", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations at the start of each block")
    p.add_argument("--warmup-rounds", type=int, default=1)
    p.add_argument("--keep", type=int, default=2)
    p.add_argument("--persist-every", type=int, default=4, help="Gemini: persist every Nth checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--tag", default="", help="suffix of the output names (compare<tag>.md ...)")
    a = p.parse_args(argv)
    if a.quick:
        a.preset, a.rounds, a.block, a.warmup, a.warmup_rounds = "tiny", 1, 2, 1, 0
    return a


def _write(results: list[dict[str, Any]], env: dict[str, Any], args: argparse.Namespace, t0: float) -> tuple[str, str]:
    env["load"] = [*env["load"][:1], os.getloadavg()]
    env["total_s"] = time.perf_counter() - t0
    env["machine"] = machine_info()
    env["lscpu"] = lscpu()
    env["rev"] = git_rev()
    md = report(results, env, args)
    path = write_report(
        os.path.join(args.out, f"compare{args.tag}.md"),
        md,
        {
            "families": results,
            "missing_families": env["missing"],
            "args": vars(args),
            "load": env["load"],
            "other_busy_at_start": env["busy"],
            "lscpu": env["lscpu"],
            "commit": env["rev"],
            "date": env["started"].isoformat(),
        },
    )
    return md, path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    bad = [n for n in names if n not in V.VARIANTS] + [f for f in families if f not in FAMILIES]
    if bad or "baseline" not in names:
        raise SystemExit(f"unknown {bad} (and baseline is required); variants {V.VARIANTS}, families {FAMILIES}")
    env: dict[str, Any] = {"started": now(), "load": [os.getloadavg()], "cmd": command_line(__name__, argv)}
    env["busy"] = other_cpu_busy()
    t0 = time.perf_counter()
    results = []
    os.makedirs(args.out, exist_ok=True)
    stamp = f"{env['started']:%Y-%m-%d}"
    path = ""
    md = ""
    for f in families:
        fr = run_family(f, names, args)
        results.append(fr)
        plot_family(fr, os.path.join(args.out, f"compare_{f}{args.tag}.png"), stamp)
        # written after every family: a run stopped early keeps the families it finished
        env["missing"] = [x for x in families if x not in {r["family"] for r in results}]
        md, path = _write(results, env, args, t0)
    print("\n" + md)
    print(f"wrote {path} in {env['total_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
