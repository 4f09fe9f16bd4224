"""Compression on trained states: every lossless chain per tensor class, XOR deltas, zipnn, ExCP, and `auto`.

The states are real training states: a GPT-2 (transformers config, nothing downloaded; sizes from
``benchmarks/_gpt2.py``'s options) trained ``--steps`` AdamW steps on synthetic tokens, twice:

* ``bf16``: forward/backward under ``torch.autocast(bfloat16)``, fp32 master weights and fp32 AdamW moments;
  the checkpoint holds the bf16 model weights (what a bf16 module's ``state_dict`` holds), the fp32 master
  weights and the optimizer state;
* ``fp32``: plain fp32 training; the checkpoint holds the fp32 weights and the optimizer state.

Per tensor class (bf16 weights, fp32 weights, exp_avg, exp_avg_sq) it reports, for each lossless chain asymstore
writes (all standard zarr v3 codecs: ``bytes`` + ``zstd`` or ``blosc`` with byte/bit shuffle), the stored/raw
ratio and the single-core encode and decode speed, measured in *process CPU time* (blosc pinned to one thread)
so that other load on the machine does not distort it; the same for XOR deltas between the state after step
``N`` and after step ``N + k``; `zipnn` (if installed) as a reference; ExCP (lossy, asymstore/excp.py) with its
recorded errors. Then the per-tier check of ``compression="auto"``: the end-to-end flush time (encode + write to
durable, ``WriteReport.seconds``, wall time) of ``auto`` against raw and every fixed chain on the local tier,
rounds interleaved, and with deltas on, which steps were written in full.

    python -m benchmarks.bench_compress                    # writes benchmarks/results/compress.md (+ .json)
    python -m benchmarks.bench_compress --quick --out -    # a smoke run, printed only
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numcodecs
import numpy as np
import torch

from asymstore import Store, excp
from asymstore.codecs import LZ4, ZSTD1, ZSTD3, CodecSpec, blosc_shuffle, decode_chunk, encode_chunk, xor_into
from asymstore.layout import plan_layout
from asymstore.state import flatten
from asymstore.store import TierSpec
from benchmarks import _harness as H
from benchmarks._gpt2 import Data, add_model_args, build_model

MiB = 1 << 20
CLASSES = ("bf16 weights", "fp32 weights", "exp_avg", "exp_avg_sq")


# --- the trained states -------------------------------------------------------------------------------------
def train(args: argparse.Namespace, mode: str, keep: set[int]) -> dict[int, dict[str, Any]]:
    """Train ``max(keep)`` steps; the checkpoint state after each step in ``keep`` (deep copies)."""
    model, opt = build_model(args)
    data = Data(args)
    out: dict[int, dict[str, Any]] = {}
    for step in range(1, max(keep) + 1):
        x = data.next()
        if mode == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=x, labels=x).loss
        else:
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 4 == 0:
            print(f"  {mode} step {step}/{max(keep)}, loss {float(loss.detach()):.3f}", file=sys.stderr, flush=True)
        if step in keep:
            if mode == "bf16":
                cast: dict[int, torch.Tensor] = {}  # tied weights (wte = lm_head) stay one tensor
                state = {
                    "model": {
                        k: cast.setdefault(v.data_ptr(), v.detach().to(torch.bfloat16))
                        for k, v in model.state_dict().items()
                    },
                    "master": {k: p.detach().clone() for k, p in model.named_parameters()},
                    "optim": copy.deepcopy(opt.state_dict()),
                }
            else:
                state = {"model": copy.deepcopy(model.state_dict()), "optim": copy.deepcopy(opt.state_dict())}
            out[step] = state
    return out


def class_of(name: str, t: torch.Tensor) -> str | None:
    """The tensor class of a flattened tensor name, ``None`` for what is not reported (scalars, buffers)."""
    base = name.rsplit("/", 1)[-1]
    if t.numel() < 1024 or not t.is_floating_point():
        return None
    if base in ("exp_avg", "exp_avg_sq"):
        return base
    if t.dtype == torch.bfloat16:
        return "bf16 weights"
    if t.dtype == torch.float32 and "/state/" not in f"/{name}":
        return "fp32 weights"
    return None


def class_bytes(state: dict[str, Any]) -> dict[str, np.ndarray]:
    """Each class's tensors' bytes back to back (uint8), in state order."""
    parts: dict[str, list[np.ndarray]] = {}
    for name, t in flatten(state).tensors.items():
        c = class_of(name, t)
        if c is not None:
            raw = t.detach().contiguous().view(-1).view(torch.uint8).numpy()
            parts.setdefault(c, []).append(raw)
    return {c: np.concatenate(v) for c, v in parts.items()}


def sample_chunks(buf: np.ndarray, cap: int, chunk: int = MiB) -> list[tuple[int, int]]:
    """1 MiB chunks (asymstore's default chunk) of ``buf``, evenly spread, about ``cap`` bytes in all."""
    n = -(-len(buf) // chunk)
    take = min(n, max(1, cap // chunk))
    idx = sorted({int(i) for i in np.linspace(0, n - 1, take)})
    return [(i * chunk, min((i + 1) * chunk, len(buf))) for i in idx]


# --- chains -------------------------------------------------------------------------------------------------
def chains(typesize: int) -> list[CodecSpec]:
    """Every lossless chain asymstore writes, byte-grouped ones with the class's element size."""
    return [
        LZ4,
        ZSTD1,
        ZSTD3,
        CodecSpec("blosc", 5, "lz4", "shuffle", typesize),
        blosc_shuffle(typesize, "zstd", 1),
        blosc_shuffle(typesize, "zstd", 3),
        CodecSpec("blosc", 1, "zstd", "bitshuffle", typesize),
    ]


def measure(
    spec: CodecSpec, buf: np.ndarray, ranges: list[tuple[int, int]], base: np.ndarray | None = None
) -> dict[str, float]:
    """Stored/raw ratio, encode and decode speed (MB/s of raw bytes per process-CPU second) over ``ranges``;
    with ``base``, each chunk is XOR-ed with it first (timed as part of the encode), and checked on decode."""
    raw = stored = 0
    enc_cpu = dec_cpu = 0.0
    scratch = np.empty(MiB, np.uint8)
    out = bytearray(MiB)
    for a, b in ranges:
        piece = buf[a:b].data
        c0 = time.process_time()
        if base is not None:
            xor_into(scratch, piece, base[a:b].data)
            piece = scratch[: b - a].data
        data = encode_chunk(spec, piece)
        c1 = time.process_time()
        ov = memoryview(out)[: b - a]
        decode_chunk(spec, data, ov)
        c2 = time.process_time()
        if bytes(ov) != bytes(piece):
            raise AssertionError(f"{spec.label} did not round-trip")
        enc_cpu += c1 - c0
        dec_cpu += c2 - c1
        raw += b - a
        stored += len(data)
    return {
        "ratio": stored / raw,
        "enc_mbs": raw / max(enc_cpu, 1e-9) / 1e6,
        "dec_mbs": raw / max(dec_cpu, 1e-9) / 1e6,
    }


def measure_zipnn(buf: np.ndarray, ranges: list[tuple[int, int]], dtype: str) -> dict[str, float] | str:
    """zipnn's ratio and single-thread speeds on the same bytes, or why it could not run."""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import zipnn  # type: ignore[import-untyped]
    except Exception as e:  # not installed
        return f"zipnn not importable ({type(e).__name__}: {e})"
    z = zipnn.ZipNN(input_format="byte", bytearray_dtype=dtype, threads=1)
    data = b"".join(bytes(buf[a:b]) for a, b in ranges)
    work = bytearray(data)  # zipnn 0.5.4 reorders the bytes of its input in place: give it a copy
    c0 = time.process_time()
    comp = z.compress(work)
    c1 = time.process_time()
    back = z.decompress(comp)
    c2 = time.process_time()
    if bytes(back) != data:
        return "zipnn did not round-trip"
    return {
        "ratio": len(comp) / len(data),
        "enc_mbs": len(data) / (c1 - c0) / 1e6,
        "dec_mbs": len(data) / (c2 - c1) / 1e6,
    }


def stream_of(state: dict[str, Any]) -> tuple[Any, bytearray, Any]:
    """The state as asymstore lays it out: (layout, stream, skeleton)."""
    flat = flatten(state)
    layout = plan_layout(
        (n, str(t.dtype).removeprefix("torch."), tuple(t.shape), t.numel() * t.element_size())
        for n, t in flat.tensors.items()
    )
    buf = bytearray(layout.total_bytes)
    for e in layout.tensors:
        t = flat.tensors[e.name]
        if e.nbytes:
            buf[e.offset : e.end] = t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return layout, buf, flat.skeleton


def measure_excp(states: dict[int, dict[str, Any]], a: int, b: int) -> dict[str, Any]:
    """ExCP on step ``a`` (a key checkpoint) then ``b`` (residuals against ``a`` as rebuilt): stored bytes after
    its zstd stage and the errors it records, per class."""
    out: dict[str, Any] = {}
    base: tuple[int, memoryview] | None = None
    for step in (a, b):
        layout, stream, skel = stream_of(states[step])
        c0 = time.process_time()
        enc = excp.encode(layout, memoryview(stream), excp.ExcpOptions(), base=base, skeleton=skel)
        stored = sum(
            len(encode_chunk(ZSTD3, memoryview(enc.stream)[i : i + MiB])) for i in range(0, len(enc.stream), MiB)
        )
        cpu = time.process_time() - c0
        out["key" if base is None else "residual"] = {
            "raw": layout.total_bytes,
            "stored": stored,
            "ratio": stored / layout.total_bytes,
            "cpu_mbs": layout.total_bytes / cpu / 1e6,
            "errors": enc.lossy["errors"],
        }
        base = (step, memoryview(enc.reconstruction))
    return out


# --- the per-tier `auto` check ------------------------------------------------------------------------------
def flush_check(
    root: str,
    states: list[dict[str, Any]],
    variants: list[tuple[str, dict[str, Any]]],
    rounds: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Each variant (a store of its own on ``root``) saves ``states`` in turn, rounds interleaved; per save the
    end-to-end flush time to the tier (``WriteReport.seconds``), stored bytes and delta base.

    A store of its own saves once first, untimed: measured on the local tier (70 MiB states, three or four stores
    in rotation, 16 rounds), the first store to save in a process was the slowest in each of seven runs, by 1-8 ms
    on 40-50 ms flushes, whatever its codec, and with an untimed first saver four stores flushed alike (0.041 s
    each); without it that cost lands on whichever variant happens to save first."""
    with Store([TierSpec(f"{root.rstrip('/')}/_warmup", keep=1)], host_memory="private", host_slots=1) as first:
        first.save(states[0], 1).result()
    stores = {}
    for name, opts in variants:
        d = f"{root.rstrip('/')}/{name.replace('/', '_')}"
        stores[name] = Store([TierSpec(d, keep=2)], host_memory="private", host_slots=1, **opts)
    rows: dict[str, list[dict[str, Any]]] = {n: [] for n, _ in variants}
    try:
        for r in range(rounds):
            for name in H.round_order([n for n, _ in variants], r):
                state = states[r % len(states)]
                res = stores[name].save(state, r + 1).result()
                rep = next(iter(res.reports.values()))
                rows[name].append(
                    {
                        "seconds": rep.seconds,
                        "stored": rep.stored_bytes,
                        "raw": rep.raw_bytes,
                        "delta_base": rep.delta_base,
                        "codecs": dict(rep.codecs),
                        "state": r % len(states),
                    }
                )
            log(f"  round {r + 1}/{rounds} done")
    finally:
        for s in stores.values():
            s.close()
    return rows


def delta_audit(rows: list[dict[str, Any]], states: list[dict[str, Any]], cap: int) -> list[dict[str, Any]]:
    """For each save of ``auto`` with deltas on: whether the cadence asked for a full step, and for a full step it
    did not ask for, how small the XOR delta against the base it was offered (the last full step) measures."""
    streams = [np.frombuffer(stream_of(s)[1], np.uint8) for s in states]
    out = []
    since: int | None = None
    base: int | None = None
    for i, r in enumerate(rows):
        full = r["delta_base"] is None
        entry: dict[str, Any] = {"save": i + 1, "full": full, "cadence_base": full and (since is None or since >= 3)}
        if full and not entry["cadence_base"] and base is not None:
            buf, other = streams[r["state"]], streams[base]
            d = measure(blosc_shuffle(4, "zstd", 1).with_delta(), buf, sample_chunks(buf, cap), base=other)
            entry["delta_ratio"] = d["ratio"]
            entry["full_ratio"] = r["stored"] / r["raw"]
            entry["violation"] = d["ratio"] * 10 <= entry["full_ratio"]
        if full:
            since, base = 0, r["state"]
        else:
            since = (since or 0) + 1
        out.append(entry)
    return out


# --- report -------------------------------------------------------------------------------------------------
def fmt(x: float, nd: int = 3) -> str:
    return "-" if x != x else f"{x:.{nd}f}"


def busy_pct(busy: float | None) -> str:
    """:func:`~benchmarks._harness.other_cpu_busy`'s fraction as a percentage (``-`` where it was not measured)."""
    return "-" if busy is None else f"{100 * busy:.0f}%"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p, layers=4, batch=4, seq=128)
    p.set_defaults(vocab=8192)
    p.add_argument("--steps", type=int, default=16, help="N: AdamW steps before the measured state")
    p.add_argument("--ks", default="1,4,16", help="XOR deltas between step N and step N+k for these k")
    p.add_argument("--sample-mib", type=int, default=32, help="bytes per class measured per chain (1 MiB chunks)")
    p.add_argument("--rounds", type=int, default=6, help="rounds of the auto flush check")
    p.add_argument("--dir", default=None, help="where the local tier lives (default: a temporary directory)")
    p.add_argument("--quick", action="store_true", help="tiny model, few steps: a smoke run")
    p.add_argument("--hdfs", action="store_true", help="also run the auto flush check on a MiniDFSCluster")
    p.add_argument("--out", default=os.path.join(H.ROOT, "benchmarks", "results", "compress.md"))
    args = p.parse_args(argv)
    if args.quick:
        args.embd, args.layers, args.vocab, args.seq, args.steps, args.ks = 64, 2, 1024, 32, 3, "1,2"
        args.sample_mib, args.rounds = 2, 2
    numcodecs.blosc.set_nthreads(1)  # single-core speeds
    numcodecs.blosc.use_threads = False
    ks = sorted({int(k) for k in args.ks.split(",")})
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    busy = H.other_cpu_busy(2.0)
    N = args.steps
    R = max(2, min(args.rounds, 4))  # consecutive states for the flush check: N .. N+R-1
    keep = {N, *(N + k for k in ks), *range(N, N + R)}
    data: dict[str, Any] = {"args": vars(args), "busy_before": busy, "modes": {}}
    dfs: Any = None
    dfs_url: str | None = None
    if args.hdfs:
        sys.path.insert(0, H.ROOT)
        from tests.minidfs import MiniDFS

        dfs = MiniDFS(datanodes=1, replication=1, block_size=128 * MiB, heap="1g")
        dfs_tmp = tempfile.mkdtemp(prefix="bench_compress_dfs_", dir=args.dir)
        dfs_url = dfs.start(dfs_tmp)
        log(f"MiniDFSCluster up at {dfs_url} (1 DataNode, replication 1, 128 MiB blocks)")
        data["hdfs"] = {"datanodes": 1, "replication": 1, "block_mib": 128}
    for mode in ("bf16", "fp32"):
        log(f"training {mode}: {max(keep)} steps")
        c0 = time.time()
        states = train(args, mode, keep)
        train_s = time.time() - c0
        cls = class_bytes(states[N])
        m: dict[str, Any] = {"train_s": train_s, "classes": {}, "deltas": {}, "zipnn": {}}
        for c, buf in cls.items():
            ts = 2 if c == "bf16 weights" else 4
            ranges = sample_chunks(buf, args.sample_mib * MiB)
            log(f"{mode} {c}: {len(buf) / MiB:.1f} MiB, chains on {sum(b - a for a, b in ranges) / MiB:.0f} MiB")
            m["classes"][c] = {
                "bytes": len(buf),
                "chains": {s.label: measure(s, buf, ranges) for s in chains(ts)},
            }
            m["zipnn"][c] = measure_zipnn(buf, ranges, "bfloat16" if ts == 2 else "float32")
            for k in ks:
                other = class_bytes(states[N + k])[c]
                m["deltas"].setdefault(c, {})[str(k)] = {
                    s.label: measure(s.with_delta(), buf, ranges, base=other)
                    for s in (ZSTD1, CodecSpec("blosc", 5, "lz4", "shuffle", ts), blosc_shuffle(ts, "zstd", 1))
                }
        log(f"{mode}: ExCP")
        m["excp"] = measure_excp(states, N, N + 1)
        root = tempfile.mkdtemp(prefix=f"bench_compress_{mode}_", dir=args.dir)
        try:
            fixed: list[tuple[str, dict[str, Any]]] = [
                ("auto", {}),
                ("raw", {"compression": "none"}),
                ("lz4", {"compression": "lz4"}),
                ("zstd1", {"compression": "zstd1"}),
                ("zstd3", {"compression": "zstd3"}),
                ("blosc-shuffle", {"compression": "blosc-shuffle"}),
            ]
            seq = [states[s] for s in range(N, N + R)]
            log(f"{mode}: auto flush check, {len(fixed)} variants x {args.rounds} rounds")
            m["flush"] = flush_check(root, seq, fixed, args.rounds, log)
            shutil.rmtree(root, ignore_errors=True)
            os.makedirs(root, exist_ok=True)
            deltas: list[tuple[str, dict[str, Any]]] = [
                ("auto+delta4", {"delta_every": 4}),
                ("raw", {"compression": "none"}),
                ("xor-zstd+delta4", {"compression": "xor-zstd", "delta_every": 4}),
            ]
            log(f"{mode}: auto with deltas, {len(deltas)} variants x {2 * args.rounds} saves")
            m["flush_delta"] = flush_check(root, seq, deltas, max(2 * args.rounds, 8), log)
            m["delta_audit"] = delta_audit(m["flush_delta"]["auto+delta4"], seq, args.sample_mib * MiB)
            if dfs_url is not None:
                log(f"{mode}: auto flush check on HDFS, {len(fixed)} variants x {args.rounds} rounds")
                m["flush_hdfs"] = flush_check(f"{dfs_url}/bench_{mode}", seq, fixed, args.rounds, log)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        data["modes"][mode] = m
        del states
        gc.collect()
    if dfs is not None:
        dfs.stop()
        shutil.rmtree(dfs_tmp, ignore_errors=True)
    data["busy_after"] = H.other_cpu_busy(2.0)
    md = render(data, args, ks, N)
    H.write_report(args.out, md, data)
    print(md)
    return 0


def render(data: dict[str, Any], args: argparse.Namespace, ks: list[int], N: int) -> str:
    mi = H.machine_info()
    lines = [
        "# Compression on trained states",
        "",
        f"Measured {H.now():%Y-%m-%d %H:%M %Z} on {H.machine_line(mi)}; commit {H.git_rev()}.",
        f"Command: `{H.command_line('benchmarks.bench_compress', sys.argv[1:])}`.",
        "",
        f"Other load: {busy_pct(data['busy_before'])} of all cores busy before, {busy_pct(data['busy_after'])} "
        f"after{' (the machine is shared)' if max(data['busy_before'] or 0, data['busy_after'] or 0) > 0.25 else ''}. "
        "Codec speeds are "
        "**single-core, in process CPU time** (blosc pinned to one thread): MB of raw bytes per CPU second, so "
        "other load does not enter them; the flush check is wall time (it includes writes) and is noisy.",
        "",
        f"States: GPT-2 (`n_embd={args.embd}`, `n_layer={args.layers}`, `vocab={args.vocab}`, `seq={args.seq}`, "
        f"batch {args.batch}), AdamW (lr 1e-4, weight decay 0.01), synthetic tokens, after N={N} real steps. "
        "`bf16`: autocast bf16 forward/backward, fp32 master weights; the checkpoint holds the bf16 weights, the "
        "fp32 master weights and the moments. `fp32`: plain fp32 training. Ratios are stored/raw (smaller is "
        "better) over 1 MiB chunks (asymstore's chunk), at most "
        f"{args.sample_mib} MiB per class, evenly spread; every chunk was decoded and compared.",
        "",
    ]
    for mode, m in data["modes"].items():
        lines += [f"## {mode} state", ""]
        for c in CLASSES:
            if c not in m["classes"]:
                continue
            info = m["classes"][c]
            lines += [f"### {mode}: {c} ({info['bytes'] / MiB:.1f} MiB)", ""]
            rows = [
                [f"`{label}`", fmt(v["ratio"]), fmt(v["enc_mbs"], 0), fmt(v["dec_mbs"], 0)]
                for label, v in info["chains"].items()
            ]
            z = m["zipnn"].get(c)
            if isinstance(z, dict):
                rows.append(
                    ["zipnn 0.5.4 (reference, 1 thread)", fmt(z["ratio"]), fmt(z["enc_mbs"], 0), fmt(z["dec_mbs"], 0)]
                )
            elif z:
                rows.append([f"zipnn: {z}", "-", "-", "-"])
            for k in ks:
                for label, v in m["deltas"][c][str(k)].items():
                    rows.append(
                        [f"`{label}`, step N vs N+{k}", fmt(v["ratio"], 4), fmt(v["enc_mbs"], 0), fmt(v["dec_mbs"], 0)]
                    )
            lines += H.markdown_table(
                ["chain", "stored/raw", "encode MB/s (1 core)", "decode MB/s (1 core)"], "lrrr", rows
            )
            lines.append("")
        ex = m["excp"]
        lines += [
            f"### {mode}: ExCP (lossy, archive tiers only; default options)",
            "",
            "| checkpoint | stored/raw (whole state, after zstd) | CPU MB/s | weight max abs / rel L2 | exp_avg rel L2 | exp_avg_sq rel L2 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for kind, v in ex.items():
            e = v["errors"]
            w = e.get("weight", {})
            wtxt = f"{w['max_abs']:.2e} / {w['rel_l2']:.2e}" if w else "exact (key)"
            lines.append(
                f"| {kind} (step {N if kind == 'key' else N + 1}) | {fmt(v['ratio'], 4)} | {fmt(v['cpu_mbs'], 0)} | "
                f"{wtxt} | {fmt(e.get('exp_avg', {}).get('rel_l2', float('nan')))} | "
                f"{fmt(e.get('exp_avg_sq', {}).get('rel_l2', float('nan')))} |"
            )
        lines.append("")
        lines += flush_section(mode, m)
    return "\n".join(lines) + "\n"


def flush_section(mode: str, m: dict[str, Any]) -> list[str]:
    lines = flush_table(mode, m["flush"], "the local tier")
    if "flush_hdfs" in m:
        lines += flush_table(mode, m["flush_hdfs"], "HDFS (MiniDFSCluster, 1 DataNode)")
        fh = m["flush_hdfs"]
        rate = {n: statistics.median([r["raw"] / r["seconds"] for r in rows]) for n, rows in fh.items()}
        x = rate["auto"] / rate["raw"]
        lines += [
            f"**{'PASS' if x >= 1.25 else 'FAIL'}** (goal >= 1.25x): on HDFS `auto` flushed {rate['auto'] / 1e6:.0f} "
            f"logical MB/s, {x:.2f}x raw's {rate['raw'] / 1e6:.0f} MB/s (medians over rounds).",
            "",
        ]
    return lines + delta_section(mode, m)


def flush_table(mode: str, fl: dict[str, list[dict[str, Any]]], where: str) -> list[str]:
    med = {n: statistics.median([r["seconds"] for r in rows]) for n, rows in fl.items()}
    best_other = min(v for n, v in med.items() if n != "auto")
    best_name = min((n for n in med if n != "auto"), key=lambda n: med[n])
    # paired per round: auto against the fastest other variant of that round
    per_round = [
        fl["auto"][i]["seconds"] / min(fl[n][i]["seconds"] for n in fl if n != "auto") for i in range(len(fl["auto"]))
    ]
    verdict = "PASS" if med["auto"] <= best_other else "FAIL"
    lines = [
        f"### {mode}: `auto` end-to-end flush on {where} (goal: auto <= min(raw, every fixed chain))",
        "",
        "| variant | median flush s | min | max | stored/raw | chains used (last save) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for n, rows in fl.items():
        secs = [r["seconds"] for r in rows]
        ratio = statistics.median([r["stored"] / r["raw"] for r in rows])
        lines.append(
            f"| {n} | {med[n]:.3f} | {min(secs):.3f} | {max(secs):.3f} | {ratio:.3f} | "
            f"{', '.join(f'{k}x{v}' for k, v in rows[-1]['codecs'].items())} |"
        )
    lines += [
        "",
        f"**{verdict}**: median `auto` {med['auto']:.3f} s vs the fastest other, `{best_name}`, {best_other:.3f} s "
        f"({(med['auto'] / best_other - 1) * 100:+.1f}%); per round auto / fastest other of that round: median "
        f"{statistics.median(per_round):.3f} (min {min(per_round):.3f}, max {max(per_round):.3f}).",
        "",
    ]
    return lines


def delta_section(mode: str, m: dict[str, Any]) -> list[str]:
    fd = m["flush_delta"]
    lines: list[str] = []
    lines += [
        f"### {mode}: deltas on (`delta_every=4`), local tier: every save, in order",
        "",
        "| variant | delta bases per save (`-`: written in full) | stored/raw per save | median flush s |",
        "|---|---|---|---:|",
    ]
    for n, rows in fd.items():
        bases = ["-" if r["delta_base"] is None else str(r["delta_base"]) for r in rows]
        ratios = [f"{r['stored'] / r['raw']:.3f}" for r in rows]
        lines.append(
            f"| {n} | {' '.join(bases)} | {' '.join(ratios)} | {statistics.median([r['seconds'] for r in rows]):.3f} |"
        )
    audit = m["delta_audit"]
    off = [a for a in audit if a["full"] and not a["cadence_base"]]
    bad = [a["save"] for a in off if a.get("violation")]
    why = ", ".join(
        f"save {a['save']}: delta {a['delta_ratio']:.3f} vs full {a['full_ratio']:.3f}"
        for a in off
        if "delta_ratio" in a
    )
    lines += [
        "",
        (
            f"**{'PASS' if not bad else 'FAIL'}**: `auto` never wrote a full step where a delta is >= 10x smaller, "
            "except where the cadence asks for a base"
            + (f"; violations at saves {bad}" if bad else "")
            + (
                f". Full steps outside the cadence, each with the XOR delta it was offered (measured here): {why}"
                if why
                else ""
            )
            + ". The states saved in turn are the trained states after consecutive steps (cycled)."
        ),
        "",
    ]
    return lines


if __name__ == "__main__":
    sys.exit(main())
