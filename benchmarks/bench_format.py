"""Format benchmark: asymstore's local and host tiers against plain baselines, in one run.

What is measured, on a GPT-2 training state (fp32 parameters + AdamW's two moments; by default after real
training steps in bf16 autocast, ``--state random`` for random tensors of the same shapes; a transformers
``GPT2Config``, nothing downloaded):

* save + fsync and load of asymstore's local tier (``compression="none"`` and ``"auto"``)
  against ``torch.save`` + fsync, safetensors ``save_file`` + fsync,
  ``torch.distributed.checkpoint.save`` (no process group) and raw sequential writes /
  reads of the same bytes (one file: buffered, fsync every 64 MiB, ``O_DIRECT``; reads buffered and
  ``O_DIRECT``); load goals are judged against the fastest raw read and the fastest peer of the run;
* the host tier (``Store([])``: save = snapshot copy into a slot, restore from the slot into a new
  buffer and in place) against one ``Tensor.copy_`` of the same bytes into a preallocated buffer
  (and, beside it, into a new buffer);
* lazy reads of slices: bytes fetched vs the bytes of the chunks touched vs the slice.

Method (docs/benchmarking.md): every variant runs once untimed (warm-up), then all variants
run in rotation ``--repeats`` times; medians are reported, and each goal is the median over rounds
of the ratio within a round. The page cache is dropped
(``sync; echo 3 > /proc/sys/vm/drop_caches``) before every read when that works (root);
otherwise the report says reads came from the page cache. Before every variant that allocates its result
a buffer of the state's size is faulted in and freed, untimed (``Bench.warm_memory`` says why). Every write is fsynced inside
its timing, and its files are deleted before the next variant runs, outside the timing.

    python -m benchmarks.bench_format                       # ~1 GiB state, 5 rounds (./run.sh bench bench_format)
    python -m benchmarks.bench_format --size-gib 0.25 --repeats 2 --out /tmp/format.md
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import gc
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

import asymstore
from asymstore.prefault import Prefaulter
from asymstore.snapshot import new_host_buffer
from asymstore.state import flatten
from benchmarks import _harness as _machine
from benchmarks._rawio import write_direct

GiB = 1 << 30
MiB = 1 << 20
GOALS = {
    "local_save": 0.9,
    "local_load": 0.9,
    "local_load_peer": 1.0,
    "host_save": 0.3,
    "host_restore": 0.8,
    "lazy_overread": 2.0,
}
#: the raw baselines: the goals are measured against the fastest of each group in the same run
WRITE_BASELINES = ("raw write", "raw write fsync/64MiB", "raw write O_DIRECT")
READ_BASELINES = ("raw read", "raw read O_DIRECT")
LOAD_PEERS = ("torch.load", "safetensors load", "dcp load")


# --- the state --------------------------------------------------------------------
def gpt2_shapes(n_embd: int, n_layer: int, vocab: int = 50257, n_positions: int = 1024) -> list[tuple[str, tuple]]:
    """Parameter names and shapes of GPT2LMHeadModel (tied lm_head counted once), no weights built."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            n_embd=n_embd, n_layer=n_layer, n_head=max(n_embd // 64, 1), vocab_size=vocab, n_positions=n_positions
        )
        with torch.device("meta"):
            model = GPT2LMHeadModel(cfg)
        return [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    except ImportError:  # the same shapes, written out
        out = [("transformer.wte.weight", (vocab, n_embd)), ("transformer.wpe.weight", (n_positions, n_embd))]
        for i in range(n_layer):
            p = f"transformer.h.{i}."
            out += [
                (p + "ln_1.weight", (n_embd,)),
                (p + "ln_1.bias", (n_embd,)),
                (p + "attn.c_attn.weight", (n_embd, 3 * n_embd)),
                (p + "attn.c_attn.bias", (3 * n_embd,)),
                (p + "attn.c_proj.weight", (n_embd, n_embd)),
                (p + "attn.c_proj.bias", (n_embd,)),
                (p + "ln_2.weight", (n_embd,)),
                (p + "ln_2.bias", (n_embd,)),
                (p + "mlp.c_fc.weight", (n_embd, 4 * n_embd)),
                (p + "mlp.c_fc.bias", (4 * n_embd,)),
                (p + "mlp.c_proj.weight", (4 * n_embd, n_embd)),
                (p + "mlp.c_proj.bias", (n_embd,)),
            ]
        return [*out, ("transformer.ln_f.weight", (n_embd,)), ("transformer.ln_f.bias", (n_embd,))]


def pick_config(target_bytes: int, n_embd: int) -> tuple[int, int]:
    """The layer count whose params + two fp32 moments come closest to ``target_bytes``."""
    best = (1, math.inf)
    for n_layer in range(1, 97):
        n = (
            sum(math.prod(s) for _, s in gpt2_shapes(n_embd, n_layer))
            if n_layer <= 2
            else _approx_params(n_embd, n_layer)
        )
        err = abs(n * 12 - target_bytes)
        if err < best[1]:
            best = (n_layer, err)
    return n_embd, best[0]


def _approx_params(d: int, layers: int, vocab: int = 50257, pos: int = 1024) -> int:
    return vocab * d + pos * d + layers * (12 * d * d + 13 * d) + 2 * d


def build_state(n_embd: int, n_layer: int, seed: int = 0) -> dict[str, Any]:
    """Params + Adam-like moments (fp32, random) and a little non-tensor state."""
    g = torch.Generator().manual_seed(seed)
    shapes = gpt2_shapes(n_embd, n_layer)
    params = {n: torch.randn(s, generator=g) * 0.02 for n, s in shapes}
    opt_state = {
        i: {
            "step": torch.tensor(1000.0),
            "exp_avg": torch.randn(s, generator=g) * 1e-3,
            "exp_avg_sq": torch.rand(s, generator=g) * 1e-6,
        }
        for i, (_, s) in enumerate(shapes)
    }
    return {
        "model": params,
        "optimizer": {
            "state": opt_state,
            "param_groups": [
                {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1, "params": list(range(len(shapes)))}
            ],
        },
        "step": 1000,
        "epoch": 0,
    }


def build_trained_state(n_embd: int, n_layer: int, steps: int, seed: int = 0) -> dict[str, Any]:
    """A real checkpoint of a GPT-2 (``transformers`` config, nothing downloaded) after ``steps`` AdamW steps in
    bf16 autocast on synthetic tokens: the fp32 parameters (the tied ``lm_head`` once) and AdamW's state dict,
    whose moments are those of real gradients, not random numbers."""
    from benchmarks._gpt2 import Data, build_model

    args = argparse.Namespace(
        vocab=50257, seq=128, embd=n_embd, layers=n_layer, heads=max(n_embd // 64, 1), seed=seed, batch=2
    )
    model, opt = build_model(args)
    data = Data(args)
    for _ in range(steps):
        x = data.next()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    params = {k: v.detach() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to wte
    return {"model": params, "optimizer": opt.state_dict(), "step": steps, "epoch": 0}


# --- helpers ----------------------------------------------------------------------
def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def cached_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Cached:"):
                return int(line.split()[1])
    return 0


def check_drop_caches(d: str) -> tuple[bool, str]:
    """Does dropping the page cache work here? Write 256 MiB, drop, see that it left the cache."""
    path = os.path.join(d, "probe.bin")
    with open(path, "wb") as f:
        f.write(os.urandom(256 * MiB))
        os.fsync(f.fileno())
    before = cached_kib()
    ok = drop_caches()
    after = cached_kib()
    os.unlink(path)
    if not ok:
        return False, "cannot write /proc/sys/vm/drop_caches (not root?): reads are from the page cache"
    if before - after < 200 * 1024:
        return False, (
            f"drop_caches accepted but the page cache shrank only {(before - after) // 1024} MiB: "
            "reads are probably from the page cache"
        )
    return True, (
        f"page cache dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before every read; "
        f"check: Cached fell by {(before - after) // 1024} MiB after writing a 256 MiB file"
    )


def touch(state: Any) -> None:
    """Read one byte of every 4 KiB page of every tensor, so lazily mapped loads (safetensors mmaps
    the file) pay for their I/O inside the timing like the others; costs a few ms for data in memory."""
    for t in flatten(state).tensors.values():
        if t.numel():
            int(t.reshape(-1).view(torch.uint8)[::4096].sum())


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fsync_path(os.path.join(dirpath, f))
        fsync_path(dirpath)


def rm(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)


def machine_info(bench_dir: str) -> dict[str, str]:
    mi = _machine.machine_info()
    info = {
        "cpu": f"{mi['cpu']}, {mi['cores']} cores (torch threads {mi['torch_threads']})",
        "ram": f"{mi['ram_gib']:.1f} GiB",
    }
    try:
        src = subprocess.run(
            ["findmnt", "-no", "SOURCE,FSTYPE", "--target", bench_dir], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dev = src.split()[0] if src else ""
        extra = ""
        if dev.startswith("/dev/"):
            name = os.path.basename(dev)
            rot = f"/sys/block/{name}/queue/rotational"
            if os.path.exists(rot):
                with open(rot) as f:
                    flag = f.read().strip()
                extra = (
                    f" (rotational flag {flag}; virtual disk)"
                    if name.startswith("vd")
                    else f" (rotational flag {flag})"
                )
        du = shutil.disk_usage(bench_dir)
        info["disk"] = f"{bench_dir} on {src or '?'}{extra}, {du.free / GiB:.0f} GiB free"
    except (OSError, subprocess.SubprocessError):
        info["disk"] = bench_dir
    info["os"] = mi["os"]
    info["python"] = mi["python"]
    info["torch"] = mi["torch"]
    try:
        import safetensors

        info["safetensors"] = safetensors.__version__
    except ImportError:
        pass
    info["asymstore"] = f"{asymstore.__version__} ({_machine.git_rev()})"
    info["date"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    return info


# --- the benchmark ----------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.dir = tempfile.mkdtemp(prefix="asymstore-bench-", dir=args.dir)
        self.drop_ok, self.drop_note = check_drop_caches(self.dir)
        n_embd, n_layer = pick_config(int(args.size_gib * GiB), args.n_embd)
        self.n_embd, self.n_layer = n_embd, n_layer
        t0 = time.perf_counter()
        if args.state == "trained":
            self.state = build_trained_state(n_embd, n_layer, args.train_steps)
        else:
            self.state = build_state(n_embd, n_layer)
        self.flat = flatten(self.state).tensors
        self.nbytes = sum(t.numel() * t.element_size() for t in self.flat.values())
        self.ntensors = len(self.flat)
        self.build_s = time.perf_counter() - t0
        # one contiguous copy of the same bytes for the raw and memcpy baselines
        self.flatbuf = torch.empty(self.nbytes, dtype=torch.uint8)
        off = 0
        for t in self.flat.values():
            n = t.numel() * t.element_size()
            self.flatbuf[off : off + n].copy_(t.reshape(-1).view(torch.uint8))
            off += n
        self.times: dict[str, list[float]] = {}
        self.notes: dict[str, str] = {}
        self.breakdown: dict[str, list[tuple[float, float, float, float]]] = {}
        self.stores: dict[str, asymstore.Store] = {}
        self.step = 0

    def log(self, msg: str) -> None:
        if not self.args.quiet:
            print(msg, file=sys.stderr, flush=True)

    def rec(self, name: str, seconds: float) -> None:
        self.times.setdefault(name, []).append(seconds)

    def before_read(self) -> None:
        if self.drop_ok:
            drop_caches()
        gc.collect()
        self.warm_memory()

    def warm_memory(self) -> None:
        """:func:`benchmarks._harness.warm_memory` for the state's size."""
        _machine.warm_memory(self.nbytes)

    # raw baseline -------------------------------------------------------------
    def raw_write(self) -> float:
        path = os.path.join(self.dir, "raw.bin")
        mv = memoryview(self.flatbuf.numpy())
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        pos = 0
        while pos < len(mv):
            pos += os.write(fd, mv[pos : pos + 64 * MiB])
        os.fsync(fd)
        os.close(fd)
        return time.perf_counter() - t0

    def raw_write_chunked(self) -> float:
        """The same, with an fsync after every 64 MiB: keeps write-back streaming (often faster)."""
        path = os.path.join(self.dir, "raw2.bin")
        mv = memoryview(self.flatbuf.numpy())
        t0 = time.perf_counter()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        pos = 0
        while pos < len(mv):
            end = min(pos + 64 * MiB, len(mv))
            while pos < end:
                pos += os.write(fd, mv[pos:end])
            os.fsync(fd)
        os.close(fd)
        dt_ = time.perf_counter() - t0
        os.unlink(path)
        return dt_

    def raw_write_direct(self) -> float:
        """The same bytes with ``O_DIRECT`` from a page-aligned buffer (the page-cache copy skipped, as
        asymstore's local tier does), the unaligned tail written normally, one fsync."""
        import mmap

        if getattr(self, "_aligned", None) is None:
            self._aligned = mmap.mmap(-1, self.nbytes)
            self._aligned[:] = self.flatbuf.numpy().tobytes()
        path = os.path.join(self.dir, "raw3.bin")
        t0 = time.perf_counter()
        write_direct(path, memoryview(self._aligned))
        dt_ = time.perf_counter() - t0
        os.unlink(path)
        return dt_

    def raw_read(self, direct: bool = False) -> float:
        """``raw.bin`` read into a new buffer (the one asymstore's restores allocate: huge-page advised) in 64 MiB
        ``preadv`` calls through the page cache, or with ``O_DIRECT`` in 32 MiB calls, the pages of each faulted in
        ahead on a helper thread (the disk writes into the buffer; the unaligned tail is read normally)."""
        path = os.path.join(self.dir, "raw.bin")
        self.before_read()
        t0 = time.perf_counter()
        buf = new_host_buffer(self.nbytes)
        mv = memoryview(buf.numpy())
        head = len(mv) // 4096 * 4096 if direct else 0
        piece = 32 * MiB if direct else 64 * MiB
        for flags, lo, hi in ((os.O_DIRECT, 0, head), (0, head, len(mv))):
            fd = os.open(path, os.O_RDONLY | flags)
            pieces = [(a, min(a + piece, hi)) for a in range(lo, hi, piece)]
            # direct: the buffer's pages are faulted in ahead on a helper thread, as asymstore's reads do
            with Prefaulter(buf.data_ptr(), pieces if flags else []) as ahead:
                for i, (a, b) in enumerate(pieces):
                    ahead.wait(i)  # at once for a buffered read (no pieces given)
                    pos = a
                    while pos < b:
                        n = os.preadv(fd, [mv[pos:b]], pos)
                        if n <= 0:
                            raise EOFError(path)
                        pos += n
            os.close(fd)
        dt_ = time.perf_counter() - t0
        del buf
        return dt_

    # asymstore local tier ------------------------------------------------------
    def _store(self, kind: str) -> asymstore.Store:
        if kind not in self.stores:
            root = os.path.join(self.dir, f"asym-{kind}")
            # both variants in private slots: with the default (`auto`) the first store of a process gets
            # shared-memory slots, the second private ones, and the two kinds of memory write at different speeds
            # on some machines (benchmarks/results/slot_memory.md); the comparison here is of the writers
            self.stores[kind] = asymstore.Store([root], host_slots=1, compression=kind, host_memory="private")
        return self.stores[kind]

    def asym_save(self, kind: str) -> float:
        store = self._store(kind)
        for s in store.steps():  # the previous round's step (untimed)
            store.delete(s)
        self.step += 1
        t0 = time.perf_counter()
        h = store.save(self.state, step=self.step)
        dt_ = time.perf_counter() - t0
        res = h.result()
        rep = res.reports["file"]
        self.breakdown.setdefault(kind, []).append(
            (res.snapshot_seconds, rep.seconds, rep.encode_seconds, rep.write_seconds)
        )
        self.rec(f"asym-{kind} persist", rep.seconds)
        self.notes[f"asym-{kind}"] = (
            f"stored {rep.stored_bytes / GiB:.3f} GiB in {rep.objects} objects, "
            f"ratio {rep.ratio:.3f}, codecs {rep.codecs}"
        )
        return dt_

    def asym_load(self, kind: str) -> float:
        store = self._store(kind)
        step = store.steps()[-1]
        root = os.path.join(self.dir, f"asym-{kind}")
        self.before_read()
        t0 = time.perf_counter()
        with asymstore.Store([root], host_slots=1, host_memory="private") as fresh:  # read from disk, verified
            out = fresh.restore(step)
            touch(out)
            assert fresh.last_restore is not None and fresh.last_restore.tier == "file"
        dt_ = time.perf_counter() - t0
        del out
        return dt_

    # torch.save -----------------------------------------------------------------
    def torch_save(self) -> float:
        path = os.path.join(self.dir, "torch.pt")
        rm(path)
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            torch.save(self.state, f)
            f.flush()
            os.fsync(f.fileno())
        return time.perf_counter() - t0

    def torch_load(self) -> float:
        path = os.path.join(self.dir, "torch.pt")
        self.before_read()
        t0 = time.perf_counter()
        out = torch.load(path, weights_only=True)
        touch(out)
        dt_ = time.perf_counter() - t0
        del out
        return dt_

    # safetensors ----------------------------------------------------------------
    def st_save(self) -> float:
        from safetensors.torch import save_file

        path = os.path.join(self.dir, "state.safetensors")
        rm(path)
        t0 = time.perf_counter()
        save_file(self.flat, path, metadata={"step": "1000"})
        fsync_path(path)
        return time.perf_counter() - t0

    def st_load(self) -> float:
        from safetensors.torch import load_file

        path = os.path.join(self.dir, "state.safetensors")
        self.before_read()
        t0 = time.perf_counter()
        out = load_file(path)
        touch(out)
        dt_ = time.perf_counter() - t0
        del out
        return dt_

    # torch.distributed.checkpoint -------------------------------------------------
    def dcp_save(self) -> float:
        import torch.distributed.checkpoint as dcp

        path = os.path.join(self.dir, "dcp")
        rm(path)
        t0 = time.perf_counter()
        dcp.save(self.state, checkpoint_id=path)  # FileSystemWriter(sync_files=True): fsyncs each file
        return time.perf_counter() - t0

    def dcp_load(self) -> float:
        import torch.distributed.checkpoint as dcp

        path = os.path.join(self.dir, "dcp")
        target = {
            "model": {n: torch.empty_like(t) for n, t in self.state["model"].items()},
            "optimizer": {
                "state": {
                    i: {k: torch.empty_like(v) for k, v in s.items()}
                    for i, s in self.state["optimizer"]["state"].items()
                },
                "param_groups": self.state["optimizer"]["param_groups"],
            },
            "step": 0,
            "epoch": 0,
        }
        self.before_read()
        t0 = time.perf_counter()
        dcp.load(target, checkpoint_id=path)  # in place: the target is preallocated (untimed)
        touch(target)
        dt_ = time.perf_counter() - t0
        del target
        return dt_

    # host tier --------------------------------------------------------------------
    def host_save(self) -> float:
        if "host" not in self.stores:
            self.stores["host"] = asymstore.Store([], host_slots=1)
        store = self.stores["host"]
        self.step += 1
        t0 = time.perf_counter()
        store.save(self.state, step=self.step)
        return time.perf_counter() - t0

    def host_restore(self) -> float:
        store = self.stores["host"]
        self.warm_memory()
        t0 = time.perf_counter()
        out = store.restore(store.steps()[-1])
        dt_ = time.perf_counter() - t0
        assert store.last_restore is not None and store.last_restore.tier == "host"
        del out
        return dt_

    def host_restore_in_place(self) -> float:
        """``restore(into=)`` a state of the same shapes allocated (and faulted in) once, as a trainer resumes."""
        store = self.stores["host"]
        if not hasattr(self, "_target"):
            self._target = copy.deepcopy(self.state)
        t0 = time.perf_counter()
        store.restore(store.steps()[-1], into=self._target)
        dt_ = time.perf_counter() - t0
        assert store.last_restore is not None and store.last_restore.tier == "host"
        return dt_

    def memcpy(self) -> float:
        if not hasattr(self, "_memdst"):
            self._memdst = torch.empty_like(self.flatbuf)
            self._memdst.copy_(self.flatbuf)  # fault the pages in once
        t0 = time.perf_counter()
        self._memdst.copy_(self.flatbuf)
        return time.perf_counter() - t0

    def memcpy_new(self) -> float:
        """One ``Tensor.copy_`` of the same bytes into a new buffer from the allocator restores use."""
        self.warm_memory()
        t0 = time.perf_counter()
        buf = new_host_buffer(self.nbytes)
        buf.copy_(self.flatbuf)
        dt_ = time.perf_counter() - t0
        del buf
        return dt_

    # the rotation -------------------------------------------------------------------
    def variants(self) -> list[tuple[str, Callable[[], float]]]:
        v: list[tuple[str, Callable[[], float]]] = [
            ("raw write", self.raw_write),
            ("raw write fsync/64MiB", self.raw_write_chunked),
            ("raw write O_DIRECT", self.raw_write_direct),
            ("raw read", self.raw_read),
            ("raw read O_DIRECT", lambda: self.raw_read(direct=True)),
            ("asym-none save", lambda: self.asym_save("none")),
            ("asym-none load", lambda: self.asym_load("none")),
            ("asym-auto save", lambda: self.asym_save("auto")),
            ("asym-auto load", lambda: self.asym_load("auto")),
            ("torch.save", self.torch_save),
            ("torch.load", self.torch_load),
            ("safetensors save", self.st_save),
            ("safetensors load", self.st_load),
            ("dcp save", self.dcp_save),
            ("dcp load", self.dcp_load),
            ("memcpy", self.memcpy),
            ("memcpy new buffer", self.memcpy_new),
            ("host save", self.host_save),
            ("host restore", self.host_restore),
            ("host restore in place", self.host_restore_in_place),
        ]
        skip = set(self.args.skip or [])
        return [(n, f) for n, f in v if not any(s in n for s in skip)]

    def run(self) -> None:
        variants = self.variants()
        self.log(
            f"state: {self.ntensors} tensors, {self.nbytes / GiB:.3f} GiB (built in {self.build_s:.1f} s); "
            f"dir {self.dir}; {self.drop_note}"
        )
        for r in range(self.args.repeats + 1):
            t_round = time.perf_counter()
            took = []
            for name, fn in variants:
                dt_ = fn()
                took.append(f"{name} {dt_:.2f}")
                if r > 0:  # round 0 warms up (allocations, the tier probe, imports)
                    self.rec(name, dt_)
                gc.collect()
            if r == 0:
                self.times.clear()
                self.breakdown.clear()
            self.log(
                f"round {r}{' (warm-up)' if r == 0 else ''}: {time.perf_counter() - t_round:.1f} s: " + ", ".join(took)
            )
        self.lazy()

    def lazy(self) -> None:
        """Slices of the embedding from the asym-none and asym-auto checkpoints."""
        self.lazy_rows: list[dict[str, Any]] = []
        name = "model/transformer.wte.weight"
        for kind in ("none", "auto"):
            store = self.stores.get(kind)
            if store is None:
                continue
            step = store.steps()[-1]
            root = os.path.join(self.dir, f"asym-{kind}")
            row_bytes = self.n_embd * 4
            for label, (a, b) in (
                ("8 rows", (1000, 1008)),
                ("2 rows across a chunk edge", (None, None)),
                ("2000 rows", (20000, 22000)),
            ):
                ck = asymstore.open_checkpoint(root, step)
                e = ck.layout.by_name()[name]
                r = ck.reader
                assert r is not None
                C = r.manifest.chunk_bytes
                if a is None:  # two rows on both sides of a chunk boundary
                    k = (e.offset // C) + 3
                    a = ((k * C) - e.offset) // row_bytes - 1
                    b = a + 2
                lo, hi = e.offset + a * row_bytes, e.offset + b * row_bytes
                touched = 0
                for span in r._spans:  # stored bytes of the chunks the slice touches
                    if span.end <= lo or span.start >= hi:
                        continue
                    rec = r._records[span.index]
                    idx = r._index(rec)
                    k0 = (max(lo, span.start) - span.start) // C
                    k1 = (min(hi, span.end) - span.start - 1) // C
                    touched += int(sum(int(idx[k, 1]) for k in range(k0, k1 + 1)))
                # a fresh reader: its bytes_read counts the shard indexes it fetches too
                self.before_read()
                ck = asymstore.open_checkpoint(root, step)
                t0 = time.perf_counter()
                got = ck[name][a:b]
                dt_ = time.perf_counter() - t0
                assert torch.equal(got, self.state["model"]["transformer.wte.weight"][a:b])
                self.lazy_rows.append(
                    {
                        "ckpt": f"asym-{kind}",
                        "slice": f"{label} [{a}:{b}]",
                        "slice_bytes": hi - lo,
                        "touched": touched,
                        "read": ck.bytes_read,
                        "seconds": dt_,
                    }
                )

    # report ---------------------------------------------------------------------------
    def med(self, name: str) -> float:
        return statistics.median(self.times[name])

    def paired(self, name: str, base: str) -> float | None:
        """The median over rounds of ``base``'s time over ``name``'s in the same round (a speed ratio: above 1,
        ``name`` is faster); pairing by round cancels the drift of a virtual disk across the run."""
        a, b = self.times.get(name), self.times.get(base)
        if not a or not b or len(a) != len(b):
            return None
        return statistics.median(y / x for x, y in zip(a, b, strict=True))

    def report(self, info: dict[str, str], command: str) -> str:
        """The result table: header, throughput, breakdown, lazy reads and goals."""
        wbase, rbase = self.fastest(WRITE_BASELINES), self.fastest(READ_BASELINES)
        parts = [self._header(info, command), self._throughput(wbase, rbase), self._breakdown(), self._lazy_reads()]
        parts.append(self._goals(wbase, rbase))
        return "\n".join(line for part in parts for line in part)

    def fastest(self, names: tuple[str, ...]) -> str:
        """The strongest (fastest by median) of ``names`` measured in this run: the baseline goals are judged by."""
        return min(names, key=lambda n: self.med(n) if n in self.times else math.inf)

    def _header(self, info: dict[str, str], command: str) -> list[str]:
        """The report header: command, machine, state and method."""
        L: list[str] = []
        L.append("# asymstore format benchmark\n")
        L.append(f"- command: `{command}`")
        for k, v in info.items():
            L.append(f"- {k}: {v}")
        L.append(
            f"- state: GPT-2 (n_embd={self.n_embd}, n_layer={self.n_layer}, vocab 50257), params + 2 "
            f"Adam moments, {self.state_words()}: {self.ntensors} tensors, {self.nbytes / GiB:.3f} GiB "
            f"({self.nbytes} bytes); largest tensor "
            f"{max(t.numel() * t.element_size() for t in self.flat.values()) / MiB:.0f} MiB"
        )
        L.append(
            f"- method: 1 warm-up round + {self.args.repeats} timed rounds, all variants in rotation, "
            "medians; writes include fsync; " + self.drop_note + "; before every variant that allocates its "
            "result (loads, reads, new-buffer copies and restores) a buffer of the state's size is faulted in and "
            "freed, untimed, so that no variant pays alone for memory the VM had handed back to its host"
        )
        L.append("")
        return L

    def state_words(self) -> str:
        """How the state was made, in words."""
        if self.args.state == "trained":
            return (
                f"fp32, trained: {self.args.train_steps} AdamW steps in bf16 autocast on synthetic tokens "
                "(transformers GPT2LMHeadModel, tied lm_head stored once)"
            )
        return "fp32 random"

    def _throughput(self, wbase: str, rbase: str) -> list[str]:
        """Throughput rows, each with its ratio to the baseline of the same run."""
        L: list[str] = []
        gbps = lambda s: self.nbytes / s / 1e9  # noqa: E731
        L.append("## Throughput (GB/s = 1e9 bytes/s of state; ratio vs the baseline of the same run)\n")
        L.append(
            f"Write ratios are against `{wbase}` and read ratios against `{rbase}`, the fastest raw write and raw "
            "read baselines of this run; here the ratio is of medians, the goals below pair each round.\n"
        )
        L.append("| variant | median s | GB/s | vs baseline | min..max s |")
        L.append("|---|---:|---:|---:|---:|")

        def row(name: str, base: str | None) -> None:
            if name not in self.times:
                return
            m = self.med(name)
            ratio = f"{self.med(base) / m:.2f}x {base}" if base and base in self.times else "baseline"
            L.append(
                f"| {name} | {m:.3f} | {gbps(m):.2f} | {ratio} | {min(self.times[name]):.3f}..."
                f"{max(self.times[name]):.3f} |"
            )

        for n in (
            "raw write",
            "raw write fsync/64MiB",
            "raw write O_DIRECT",
            "asym-none save",
            "asym-none persist",
            "asym-auto save",
            "asym-auto persist",
            "torch.save",
            "safetensors save",
            "dcp save",
        ):
            row(n, None if n == wbase else wbase)
        for n in (*READ_BASELINES, "asym-none load", "asym-auto load", *LOAD_PEERS):
            row(n, None if n == rbase else rbase)
        for n in ("memcpy", "memcpy new buffer", "host save", "host restore", "host restore in place"):
            row(n, None if n == "memcpy" else "memcpy")
        L.append("")
        L.append(
            "`save` = `Store.save(state)` blocking, from the live tensors: snapshot copy into the host slot "
            "(private slots for both variants; shared ones: `slot_memory.md`), "
            "then encode + write + fsync + commit. `persist` = the writer alone (`WriteReport.seconds`: "
            "host slot -> durable, committed step), the part that runs in the background during training. "
            "`load` = a fresh `Store([dir]).restore(step)`: read + verify every chunk crc32c into a new "
            "buffer. Every load then reads one byte per 4 KiB page of the result (timed) so that "
            "safetensors' memory-mapped tensors are really read from disk. `dcp load` reads into a preallocated state (DCP loads in place); the others allocate. "
            "`raw read` reads the bytes into a new buffer from the allocator asymstore's restores use (huge-page "
            "advised), through the page cache or with `O_DIRECT` (its pages faulted in ahead on a helper thread, as asymstore's "
            "local reads do). "
            "`host save` = `Store([]).save` (snapshot copy into a reused slot); `host restore` copies the "
            "slot into a new buffer, `host restore in place` into a state allocated once (`restore(into=)`); "
            "`memcpy` = one `Tensor.copy_` of the same bytes into a preallocated buffer, `memcpy new buffer` "
            "into a new one (its pages zeroed by the kernel at first touch).\n"
        )
        return L

    def _breakdown(self) -> list[str]:
        """Where the time of a save goes (medians)."""
        L: list[str] = []
        for kind in ("none", "auto"):
            if kind in self.breakdown:
                b = self.breakdown[kind]
                med = [statistics.median(x[i] for x in b) for i in range(4)]
                L.append(
                    f"- asym-{kind} breakdown (medians): snapshot {med[0]:.3f} s, persist {med[1]:.3f} s: "
                    f"partition writes+fsync {med[3]:.3f} s, encode/choose {med[2]:.3f} s in all (on the "
                    f"writer's helper thread, overlapping the previous partition's write), everything else "
                    f"(first encode, metadata, barrier, commit) {med[1] - med[3]:.3f} s; "
                    f"{self.notes.get('asym-' + kind, '')}"
                )
        L.append("")
        return L

    def _lazy_reads(self) -> list[str]:
        """Lazy slice reads against the chunks they touch."""
        L: list[str] = []
        if getattr(self, "lazy_rows", None):
            L.append("## Lazy slice reads (`open_checkpoint(dir)[name][a:b]` of the embedding, cold cache)\n")
            L.append(
                "| checkpoint | slice | slice bytes | stored bytes of touched chunks | bytes read "
                "(`bytes_read`) | read / touched | read / slice | ms |"
            )
            L.append("|---|---|---:|---:|---:|---:|---:|---:|")
            for r in self.lazy_rows:
                L.append(
                    f"| {r['ckpt']} | {r['slice']} | {r['slice_bytes']} | {r['touched']} | {r['read']} | "
                    f"{r['read'] / r['touched']:.3f} | {r['read'] / r['slice_bytes']:.1f} | "
                    f"{r['seconds'] * 1e3:.1f} |"
                )
            L.append("\n`bytes_read` includes the shard index fetched once per touched partition.\n")
        return L

    def _goals(self, wbase: str, rbase: str) -> list[str]:
        """The goals table: each ratio the median over rounds of the ratio within a round."""
        L: list[str] = []
        L.append("## Goals\n")
        L.append("Each ratio is the median over rounds of the ratio within a round (speed over the baseline's).\n")
        L.append("| goal | measured | target | result |")
        L.append("|---|---:|---:|---|")

        def goal(label: str, value: float | None, target: float, higher: bool = True) -> None:
            if value is None:
                L.append(f"| {label} | n/a | {target} | not measured |")
                return
            ok = value >= target if higher else value <= target
            L.append(f"| {label} | {value:.2f} | {'>=' if higher else '<='} {target} | {'PASS' if ok else 'FAIL'} |")

        peer = self.fastest(LOAD_PEERS)
        for kind in ("none", "auto"):
            goal(
                f"local persist (asym-{kind}) / {wbase}",
                self.paired(f"asym-{kind} persist", wbase),
                GOALS["local_save"],
            )
            L.append(
                f"| (beside it) local save incl. snapshot (asym-{kind}) / {wbase} | "
                f"{self.paired(f'asym-{kind} save', wbase) or float('nan'):.2f} | reported | - |"
            )
            goal(
                f"local load (asym-{kind}, verified) / {rbase}",
                self.paired(f"asym-{kind} load", rbase),
                GOALS["local_load"],
            )
            goal(
                f"local load (asym-{kind}, verified) / {peer} (fastest peer)",
                self.paired(f"asym-{kind} load", peer),
                GOALS["local_load_peer"],
            )
        goal("host-tier save / memcpy", self.paired("host save", "memcpy"), GOALS["host_save"])
        goal("host-tier restore, new buffer / memcpy", self.paired("host restore", "memcpy"), GOALS["host_restore"])
        L.append(
            "| (beside it) host-tier restore, new buffer / memcpy new buffer | "
            f"{self.paired('host restore', 'memcpy new buffer') or float('nan'):.2f} | reported | - |"
        )
        goal(
            "host-tier restore, in place / memcpy",
            self.paired("host restore in place", "memcpy"),
            GOALS["host_restore"],
        )
        worst = max((r["read"] / r["touched"] for r in getattr(self, "lazy_rows", [])), default=None)
        goal("lazy slice: bytes read / bytes of touched chunks (worst)", worst, GOALS["lazy_overread"], higher=False)
        L.append("")
        return L

    def close(self) -> None:
        for s in self.stores.values():
            s.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=float, default=1.0, help="target state size (params + 2 moments)")
    p.add_argument("--n-embd", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up round)")
    p.add_argument("--dir", default=None, help="where to write (default: the system temp dir)")
    p.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "format.md"),
        help="markdown report path ('-': print only)",
    )
    p.add_argument(
        "--state",
        choices=("trained", "random"),
        default="trained",
        help="trained: a GPT-2 after --train-steps AdamW steps; random: random fp32 tensors of the same shapes",
    )
    p.add_argument("--train-steps", type=int, default=4)
    p.add_argument("--skip", action="append", help="skip variants whose name contains this (repeatable)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP without a process group
    command = "python -m benchmarks.bench_format" + (
        "" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv)
    )
    bench = Bench(args)
    run_and_report(bench, bench.dir, command, args.out)
    return 0


def run_and_report(bench: Any, workdir: str, command: str, out: str) -> None:
    """Run a benchmark object (``run``/``report``/``close``), print its report and write it to ``out``."""
    t0 = time.perf_counter()
    try:
        info = machine_info(workdir)
        bench.run()
        text = bench.report(info, command)
    finally:
        bench.close()
    text += f"\nTotal run time: {time.perf_counter() - t0:.0f} s.\n"
    print(text)
    if out != "-":
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text)
        print(f"(written to {out})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
