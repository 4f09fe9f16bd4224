"""HDFS promotion benchmark: asymstore's B* batching against small objects, one file per tensor and one
large write, on a real MiniDFSCluster started by this script, in one run.

What is measured, on a GPT-2-like training state (parameters + two Adam moments, fp32, random data, shapes
from a transformers ``GPT2Config`` on the meta device, as in ``bench_format.py``), snapshotted once into a host
slot (``Store([])``); every variant writes the same bytes from that slot to HDFS through one
``HdfsObjectStore`` client each:

* ``asym B*``: ``TierManager.promote(1, step)`` of the slot into an HDFS ``PersistentTier`` (local dir above
  it), i.e. the real promotion path with the batch size the tier picks itself
  (``PersistentTier.partition_bytes``: ``batch_plan.optimal_batch_bytes`` with ``T_d``/``BW`` fitted from the
  tier's probe writes, then refreshed by its own traffic);
* ``asym <P> MiB``: ``CheckpointWriter`` with fixed partitions of P MiB (1 and 4 MiB are the "no batching"
  baselines; the rest a sweep up to the whole checkpoint as one partition);
* ``per-tensor``: each tensor its own object (``store.put`` per tensor; no manifest);
* ``single write``: the whole stream as one object (``store.put``).

All writer variants use ``compression="none"`` so every variant stores the same bytes (random data does not
compress; ``auto`` would add codec trials). Throughput is raw state bytes / wall seconds until the step is
durable on HDFS (writer variants: data + zarr metadata + barrier + commit marker).

Method (docs/benchmarking.md): one untimed warm-up write (B* and single), then all variants in rotation
``--repeats`` times (a different seeded order each round, so no variant always runs after the same one);
medians reported. After each variant, outside its timing: its objects are counted and deleted, and the
script waits for the DataNodes to drop the deleted blocks and runs ``sync`` (the DataNodes do not fsync; their dirty pages must not be flushed on the next
variant's time).

    python -m benchmarks.bench_hdfs                          # ~0.5 GiB state, 3 rounds, 2 DataNodes, repl. 2
    python -m benchmarks.bench_hdfs --datanodes 1 --replication 1 --out -
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable

import asymstore
from asymstore.backends.hdfs import HdfsObjectStore
from asymstore.batch_plan import continuous_optimal_batch_bytes
from asymstore.config import Config
from asymstore.manifest import step_dir
from asymstore.tiermanager import TierManager
from asymstore.tiers import PersistentTier
from asymstore.write_plan import WriteOptions, plan_write
from asymstore.writer import CheckpointWriter
from benchmarks.bench_format import build_state, gpt2_shapes, run_and_report
from tests.minidfs import MiniDFS

GiB = 1 << 30
MiB = 1 << 20
STEP = 1000
GOALS = {"bstar_vs_best_sweep": 0.9, "bstar_vs_single": 0.8}


def pick_layers(target_bytes: int, n_embd: int) -> int:
    best = (1, float("inf"))
    for n_layer in range(1, 97):
        n = sum(_numel(s) for _, s in gpt2_shapes(n_embd, n_layer))
        err = abs(n * 12 - target_bytes)
        if err < best[1]:
            best = (n_layer, err)
        if n * 12 > target_bytes:
            break
    return best[0]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def fmt_bytes(n: float) -> str:
    return f"{n / MiB:.0f} MiB" if n >= MiB else f"{n / 1024:.0f} KiB"


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="asymstore-hdfsbench-")
        self.times: dict[str, list[float]] = {}
        self.files: dict[str, int] = {}
        self.bstar_seen: list[int] = []
        self.fits: list[str] = []
        self.parts: dict[str, list[tuple[float, float, float]]] = {}  # (data puts, encode, rest) seconds
        self.log(
            f"starting MiniDFSCluster ({args.datanodes} DataNode(s), replication {args.replication}, "
            f"block {args.block_mib} MiB) under {self.tmp}"
        )
        self.dfs = MiniDFS(
            datanodes=args.datanodes,
            replication=args.replication,
            block_size=args.block_mib * MiB,
            heap=args.heap,
            java_opts=tuple(args.java_opts.split()),
        )
        self.url = self.dfs.start(os.path.join(self.tmp, "dfs"))
        self.log(f"cluster up in {self.dfs.start_seconds:.1f} s at {self.url}")

        n_layer = pick_layers(int(args.size_gib * GiB), args.n_embd)
        self.state_desc = (n_embd := args.n_embd, n_layer)
        state = build_state(n_embd, n_layer)
        self.host = asymstore.Store([], host_slots=1)
        self.host.save(state, STEP)
        del state
        gc.collect()
        slot = self.host.host.lease(STEP)
        assert slot is not None and slot.layout is not None
        self.slot = slot
        self.layout = slot.layout
        self.C = self.layout.total_bytes
        self.mv = slot.memview()
        self.n_tensors = len(self.layout.tensors)
        self.largest = max(e.nbytes for e in self.layout.tensors)
        self.log(
            f"state: n_embd={n_embd}, n_layer={n_layer}: {self.n_tensors} tensors, {self.C / GiB:.3f} GiB "
            f"({self.C} bytes), largest tensor {fmt_bytes(self.largest)}"
        )

        self.cfg = Config(compression="none")
        self.run_id = uuid.uuid4().hex[:6]
        # the B* path: local dir tier above an HDFS tier; the manager's promotion thread is stopped at once,
        # promotions are driven by promote() calls below (the same method the thread calls)
        self.local = PersistentTier(os.path.join(self.tmp, "local"), self.cfg, name="local")
        self.hdfs_tier = PersistentTier(self._store("bstar"), self.cfg, name="hdfs")
        self.tm = TierManager([self.local, self.hdfs_tier], self.host.host)
        self.tm.close()
        self.stores: dict[str, HdfsObjectStore] = {}

    def log(self, msg: str) -> None:
        if not self.args.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def _store(self, name: str) -> HdfsObjectStore:
        return HdfsObjectStore(f"{self.url}/bench-{self.run_id}/{name}", write_chunk=self.args.write_chunk_mib * MiB)

    def store(self, name: str) -> HdfsObjectStore:
        if name not in self.stores:
            self.stores[name] = self._store(name)
        return self.stores[name]

    # --- the model -------------------------------------------------------------------
    def probe(self) -> None:
        st = self.hdfs_tier.probe()
        samples = list(st.model._samples)
        self.probe_samples = samples
        self.fit0 = st.model.fit()
        self.stage_bw = st.stage_bandwidth
        self.bstar0 = self.hdfs_tier.partition_bytes(self.C)
        cont = continuous_optimal_batch_bytes(
            self.C, self.fit0.latency_s, self.fit0.bandwidth, stage_bandwidth=self.stage_bw
        )
        self.cont0 = cont
        self.log("probe writes: " + ", ".join(f"{fmt_bytes(b)} {t * 1e3:.1f} ms" for b, t in samples))
        self.log(
            f"fitted T_d = {self.fit0.latency_s * 1e3:.1f} ms, BW = {self.fit0.bandwidth / 1e6:.0f} MB/s, "
            f"stage BW (crc32c) = {self.stage_bw / 1e9:.2f} GB/s -> B* = {fmt_bytes(self.bstar0)} "
            f"(closed form {fmt_bytes(cont) if cont != float('inf') else 'inf'}, staging budget "
            f"{fmt_bytes(self.cfg.staging_budget_bytes)})"
        )

    # --- variants ----------------------------------------------------------------------
    def v_bstar(self) -> tuple[float, int]:
        t0 = time.perf_counter()
        rep = self.tm.promote(1, STEP)
        dt = time.perf_counter() - t0
        self.parts.setdefault("asym B*", []).append(
            (rep.write_seconds, rep.encode_seconds, dt - rep.write_seconds - rep.encode_seconds)
        )
        b = self.tm.activity["hdfs"].last_partition_bytes or 0
        self.bstar_seen.append(b)
        st = self.hdfs_tier.stats
        self.fits.append(
            f"B* {fmt_bytes(b)}: {rep.objects} partitions, write {rep.write_seconds:.2f} s + encode "
            f"{rep.encode_seconds:.2f} s of {rep.seconds:.2f} s; model after: T_d "
            f"{st.latency_s * 1e3:.1f} ms, BW {st.bandwidth / 1e6:.0f} MB/s"
        )
        n = self._count(self.hdfs_tier.backend, step_dir(STEP) + "/")
        self.tm._mark(self.hdfs_tier, STEP, False)
        self.hdfs_tier.delete(STEP)
        return dt, n

    def v_fixed(self, pbytes: int, label: str) -> Callable[[], tuple[float, int]]:
        def run() -> tuple[float, int]:
            s = self.store(f"p{pbytes // MiB}")
            opts = WriteOptions(chunk_bytes=self.cfg.chunk_bytes, partition_bytes=pbytes, compression="none")
            plan = plan_write(STEP, self.layout, opts, prefix=step_dir(STEP) + "/")
            t0 = time.perf_counter()
            rep = CheckpointWriter(s).write(plan, self.mv, self.slot.content)
            dt = time.perf_counter() - t0
            self.parts.setdefault(label, []).append(
                (rep.write_seconds, rep.encode_seconds, dt - rep.write_seconds - rep.encode_seconds)
            )
            n = self._count(s, step_dir(STEP) + "/")
            s.delete_prefix(step_dir(STEP) + "/")
            return dt, n

        return run

    def v_per_tensor(self) -> tuple[float, int]:
        s = self.store("per-tensor")
        t0 = time.perf_counter()
        for e in self.layout.tensors:
            s.put(f"t/{e.name}", self.mv[e.offset : e.offset + e.nbytes])
        dt = time.perf_counter() - t0
        n = self._count(s, "t/")
        s.delete_prefix("t/")
        return dt, n

    def v_single(self) -> tuple[float, int]:
        s = self.store("single")
        t0 = time.perf_counter()
        s.put("one/blob", self.mv)
        dt = time.perf_counter() - t0
        n = self._count(s, "one/")
        s.delete_prefix("one/")
        return dt, n

    @staticmethod
    def _count(s: HdfsObjectStore, prefix: str) -> int:
        return sum(1 for _ in s.list(prefix))

    def variants(self) -> list[tuple[str, Callable[[], tuple[float, int]]]]:
        out: list[tuple[str, Callable[[], tuple[float, int]]]] = [("asym B*", self.v_bstar)]
        whole = -(-self.C // self.cfg.chunk_bytes) * self.cfg.chunk_bytes
        for tok in self.args.sweep.split(","):
            if tok == "all":
                name = f"asym whole ({fmt_bytes(whole)})"
                out.append((name, self.v_fixed(whole, name)))
            else:
                p = int(tok) * MiB
                if p < whole:
                    name = f"asym {int(tok)} MiB"
                    out.append((name, self.v_fixed(p, name)))
        out += [("per-tensor", self.v_per_tensor), ("single write", self.v_single)]
        skip = self.args.skip or []
        return [(n, f) for n, f in out if n in ("asym B*", "single write") or not any(s in n for s in skip)]

    def settle(self) -> None:
        """Outside any timing: let the DataNodes drop deleted blocks, then flush dirty pages."""
        time.sleep(self.args.settle_s)
        os.sync()

    def run(self) -> None:
        self.load0 = os.getloadavg()
        self.probe()
        vs = self.variants()
        self.names = [n for n, _ in vs]
        self.log("warm-up (untimed): asym B*, single write")
        for name, fn in vs:
            if name in ("asym B*", "single write"):
                dt, _ = fn()
                self.log(f"  warm-up {name}: {dt:.2f} s")
                self.settle()
        self.bstar_seen.clear()
        self.fits.clear()
        self.parts.clear()
        for r in range(self.args.repeats):
            order = list(vs)
            random.Random(r).shuffle(order)  # a new order each round: no variant always follows the same one
            for name, fn in order:
                dt, n = fn()
                self.times.setdefault(name, []).append(dt)
                self.files[name] = n
                self.log(
                    f"round {r + 1}/{self.args.repeats} {name:24s} {dt:7.2f} s  {self.C / dt / 1e9:.3f} GB/s  {n} files"
                )
                self.settle()
        self.load1 = os.getloadavg()

    # --- report ------------------------------------------------------------------------
    def med(self, name: str) -> float:
        return statistics.median(self.times[name])

    def report(self, info: dict[str, str], command: str) -> str:
        """The result table: header, fitted model, throughput, writer parts and goals."""
        parts = [self._header(info, command), self._model(), self._throughput(), self._goals()]
        return "\n".join(line for part in parts for line in part) + "\n"

    def _header(self, info: dict[str, str], command: str) -> list[str]:
        """Command, machine, cluster, state and method."""
        a = self.args
        L = ["# asymstore HDFS promotion benchmark", ""]
        L.append(f"- command: `{command}`")
        for k in ("cpu", "ram", "disk", "os", "python", "torch", "asymstore", "date"):
            if k in info:
                L.append(f"- {k}: {info[k]}")
        L.append(
            f"- hdfs: MiniDFSCluster (Hadoop 3.3.6, one JVM, -Xmx{a.heap}, {a.java_opts}) on this machine, "
            f"{a.datanodes} DataNode(s), replication {a.replication}, block size {a.block_mib} MiB, "
            f"close.num-committed-allowed 0 (HDFS default); client hdfs-native {_hdfs_native_version()} "
            f"through `HdfsObjectStore` (write_chunk {a.write_chunk_mib} MiB, no hsync)"
        )
        n_embd, n_layer = self.state_desc
        L.append(
            f"- state: GPT-2-like (n_embd={n_embd}, n_layer={n_layer}, vocab 50257), params + 2 Adam moments, "
            f"fp32 random: {self.n_tensors} tensors, {self.C / GiB:.3f} GiB ({self.C} bytes), largest tensor "
            f"{fmt_bytes(self.largest)}; promoted from the host slot"
        )
        L.append(
            f"- method: warm-up (B*, single write), then {a.repeats} rounds of all variants in rotation (seeded shuffle per round), medians; "
            f"after each variant (untimed) its files are deleted, {a.settle_s:.0f} s pause and `sync`"
        )
        l0, l1 = self.load0, self.load1
        L.append(
            f"- load average (1/5/15 min) at start {l0[0]:.2f}/{l0[1]:.2f}/{l0[2]:.2f}, at end "
            f"{l1[0]:.2f}/{l1[1]:.2f}/{l1[2]:.2f} (the cluster JVM, the client and the rest of the machine share "
            f"{os.cpu_count()} cores)"
        )
        L.append("")
        return L

    def _model(self) -> list[str]:
        """The tier's fitted write model and the B* it gives."""
        L: list[str] = []
        L.append("## Fitted model (probe writes of the HDFS tier)")
        L.append("")
        L.append("- probe writes: " + ", ".join(f"{fmt_bytes(b)} {t * 1e3:.1f} ms" for b, t in self.probe_samples))
        cont = "inf" if self.cont0 == float("inf") else fmt_bytes(self.cont0)
        L.append(
            f"- fit: T_d = {self.fit0.latency_s * 1e3:.1f} ms, BW = {self.fit0.bandwidth / 1e6:.0f} MB/s; "
            f"staging bandwidth (crc32c of 8 MiB) = {self.stage_bw / 1e9:.2f} GB/s"
        )
        L.append(
            f"- B* for C = {fmt_bytes(self.C)}: **{fmt_bytes(self.bstar0)}** = {-(-self.C // self.bstar0)} partitions "
            f"(closed form of the pipelined model min(B_c, B_x) = {cont}; staging budget "
            f"{fmt_bytes(self.cfg.staging_budget_bytes)})"
        )
        seen = sorted(set(self.bstar_seen))
        L.append(
            f"- B* used in the timed rounds (the model is refreshed by the tier's own writes): "
            f"{', '.join(fmt_bytes(b) for b in seen)}"
        )
        for f in self.fits:
            L.append(f"  - {f}")
        L.append("")
        return L

    def _throughput(self) -> list[str]:
        """Throughput of every variant against one large write, and the writer's parts."""
        L: list[str] = []
        L.append("## Throughput (GB/s = 1e9 bytes of state per second; ratio vs single write of the same run)")
        L.append("")
        L.append("| variant | files / checkpoint | median s | GB/s | vs single write | min..max s |")
        L.append("|---|---:|---:|---:|---:|---:|")
        single = self.med("single write")
        for name in self.names:
            m = self.med(name)
            xs = self.times[name]
            L.append(
                f"| {name} | {self.files[name]} | {m:.3f} | {self.C / m / 1e9:.3f} | {single / m:.2f}x | "
                f"{min(xs):.3f}..{max(xs):.3f} |"
            )
        L.append("")
        L.append(
            "Files: objects under the checkpoint's prefix on HDFS after the write (writer variants: partitions + "
            "one zarr.json per codec + the group zarr.json + the commit marker)."
        )
        L.append("")
        L.append(
            "Writer variants, medians of the parts (s): data = the partitions' `put` calls, encode = shard "
            "encoding (crc32c + index), rest = existence checks, zarr metadata, barrier and commit marker "
            "(`WriteReport`; B* also includes the promotion's lease and the tier's batch-size choice)."
        )
        L.append("")
        L.append("| variant | data puts | encode | rest | data-put throughput GB/s |")
        L.append("|---|---:|---:|---:|---:|")
        for name in (n for n in self.names if n in self.parts):
            xs = self.parts[name]
            d, e, r = (statistics.median(x[i] for x in xs) for i in range(3))
            L.append(f"| {name} | {d:.3f} | {e:.3f} | {r:.3f} | {self.C / d / 1e9:.3f} |")
        L.append("")
        return L

    def _goals(self) -> list[str]:
        """B* against the best swept size and against one large write."""
        L = ["## Goals", ""]
        single = self.med("single write")
        sweep = {n: self.med(n) for n in self.times if n.startswith("asym ") and n != "asym B*"}
        best = min(sweep, key=sweep.__getitem__)
        b = self.med("asym B*")
        r1 = sweep[best] / b
        r2 = single / b
        L.append(
            f"- B* throughput / best swept size ({best}): {r1:.2f} (goal >= {GOALS['bstar_vs_best_sweep']}): "
            f"**{'PASS' if r1 >= GOALS['bstar_vs_best_sweep'] else 'FAIL'}**"
        )
        L.append(
            f"- B* throughput / single large write: {r2:.2f} (goal >= {GOALS['bstar_vs_single']}): "
            f"**{'PASS' if r2 >= GOALS['bstar_vs_single'] else 'FAIL'}**"
        )
        return L

    def close(self) -> None:
        try:
            self.host.host.unlease(self.slot)
            self.host.close()
        except Exception:
            pass
        self.dfs.stop()
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)


def _hdfs_native_version() -> str:
    try:
        from importlib.metadata import version

        return version("hdfs-native")
    except Exception:
        return "?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=float, default=0.5, help="target state size (params + 2 moments)")
    p.add_argument("--n-embd", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--datanodes", type=int, default=2)
    p.add_argument("--replication", type=int, default=2)
    p.add_argument("--block-mib", type=int, default=128)
    p.add_argument("--heap", default="1g")
    p.add_argument(
        "--java-opts",
        default="-XX:+UseSerialGC -Xshare:auto",
        help="cluster JVM options (MiniDFS's default also has -XX:TieredStopAtLevel=1, C1 only)",
    )
    p.add_argument("--write-chunk-mib", type=int, default=8)
    p.add_argument("--sweep", default="1,4,16,64,256,all", help="fixed partition sizes in MiB; 'all' = one partition")
    p.add_argument("--settle-s", type=float, default=2.0)
    p.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "hdfs.md"),
        help="markdown report path ('-': print only)",
    )
    p.add_argument(
        "--skip",
        action="append",
        help="skip variants whose name contains this (repeatable; B* and single write always run)",
    )
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    command = "python -m benchmarks.bench_hdfs" + (
        "" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv)
    )
    bench = Bench(args)
    run_and_report(bench, bench.tmp, command, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
