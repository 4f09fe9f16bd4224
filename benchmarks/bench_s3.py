"""S3 promotion benchmark: asymstore's B* batching against a sweep of object sizes and one large upload, on a
real S3-compatible server (SeaweedFS, started by this script through ``tests.s3server``), in one run.

What is measured, on a GPT-2-like training state (parameters + two Adam moments, fp32, random data, as in
``bench_format.py``), snapshotted once into a host slot (``Store([])``); every variant writes the same bytes
from that slot to the server through one ``S3ObjectStore`` (pyarrow's ``S3FileSystem``) each:

* ``asym B*``: ``TierManager.promote(1, step)`` of the slot into an S3 ``PersistentTier`` (local dir above
  it): the real promotion path with the batch size the tier picks itself (``PersistentTier.partition_bytes``
  from ``T_d``/``BW`` fitted to its probe writes, then refreshed by its own traffic);
* ``asym <P> MiB``: ``CheckpointWriter`` with fixed partitions of P MiB, a sweep up to the whole checkpoint
  as one partition;
* ``single upload``: the whole stream as one object (``S3ObjectStore.put``: one multipart upload).

All writer variants use ``compression="none"`` (random data does not compress), so every variant stores the
same bytes. Throughput is raw state bytes / wall seconds until the step is on the server (writer variants:
data + zarr metadata + commit marker). Method: an untimed warm-up (B* and single upload), then all variants in
a seeded shuffled order per round, ``--repeats`` rounds, medians; after each variant (untimed) its objects are
deleted and the script pauses ``--settle-s`` and runs ``sync`` (the server's volume files are page cache).

    python -m benchmarks.bench_s3                    # ~0.5 GiB state, 3 rounds
    python -m benchmarks.bench_s3 --size-gib 0.1 --repeats 1 --out -
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
from typing import Any

import asymstore
from asymstore.backends.s3 import S3ObjectStore
from asymstore.batch_plan import continuous_optimal_batch_bytes
from asymstore.config import Config
from asymstore.manifest import step_dir
from asymstore.tiermanager import TierManager
from asymstore.tiers import PersistentTier
from asymstore.write_plan import WriteOptions, plan_write
from asymstore.writer import CheckpointWriter
from benchmarks.bench_format import build_state, run_and_report
from benchmarks.bench_hdfs import fmt_bytes, pick_layers
from tests.s3server import VERSION, SeaweedS3

GiB = 1 << 30
MiB = 1 << 20
STEP = 1000
BUCKET = "bench"
GOALS = {"bstar_vs_single": 0.95, "bstar_vs_best_sweep": 0.90}


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="asymstore-s3bench-")
        self.times: dict[str, list[float]] = {}
        self.objects: dict[str, int] = {}
        self.bstar_seen: list[int] = []
        self.fits: list[str] = []
        self.log(f"starting SeaweedFS {VERSION} under {self.tmp}")
        self.server = SeaweedS3()
        self.server.start(os.path.join(self.tmp, "s3"))
        self.server.create_bucket(BUCKET)
        self.log(f"server up in {self.server.start_seconds:.1f} s at {self.server.endpoint}")

        n_layer = pick_layers(int(args.size_gib * GiB), args.n_embd)
        self.state_desc = (args.n_embd, n_layer)
        state = build_state(args.n_embd, n_layer)
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
        self.log(
            f"state: n_embd={args.n_embd}, n_layer={n_layer}: {len(self.layout.tensors)} tensors, {self.C / GiB:.3f} GiB"
        )

        self.cfg = Config(compression="none")
        self.run_id = uuid.uuid4().hex[:6]
        self.local = PersistentTier(os.path.join(self.tmp, "local"), self.cfg, name="local")
        self.s3_tier = PersistentTier(self._store("bstar"), self.cfg, name="s3")
        self.tm = TierManager([self.local, self.s3_tier], self.host.host)
        self.tm.close()  # promotions are driven by promote() below (the method the promotion thread calls)
        self.stores: dict[str, S3ObjectStore] = {}

    def log(self, msg: str) -> None:
        if not self.args.quiet:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def _store(self, name: str) -> S3ObjectStore:
        return S3ObjectStore(f"s3://{BUCKET}/bench-{self.run_id}/{name}", **self.server.options)

    def store(self, name: str) -> S3ObjectStore:
        if name not in self.stores:
            self.stores[name] = self._store(name)
        return self.stores[name]

    def probe(self) -> None:
        st = self.s3_tier.probe()
        self.probe_samples = list(st.model._samples)
        self.fit0 = st.model.fit()
        self.stage_bw = st.stage_bandwidth
        self.bstar0 = self.s3_tier.partition_bytes(self.C)
        self.cont0 = continuous_optimal_batch_bytes(
            self.C, self.fit0.latency_s, self.fit0.bandwidth, stage_bandwidth=self.stage_bw
        )
        self.log(
            f"fitted T_d = {self.fit0.latency_s * 1e3:.1f} ms, BW = {self.fit0.bandwidth / 1e6:.0f} MB/s "
            f"-> B* = {fmt_bytes(self.bstar0)}"
        )

    # --- variants ----------------------------------------------------------------------
    def v_bstar(self) -> tuple[float, int]:
        t0 = time.perf_counter()
        rep = self.tm.promote(1, STEP)
        dt = time.perf_counter() - t0
        b = self.tm.activity["s3"].last_partition_bytes or 0
        self.bstar_seen.append(b)
        st = self.s3_tier.stats
        self.fits.append(
            f"B* {fmt_bytes(b)}: {rep.objects} partitions, write {rep.write_seconds:.2f} s + encode "
            f"{rep.encode_seconds:.2f} s of {rep.seconds:.2f} s; model after: T_d {st.latency_s * 1e3:.1f} ms, "
            f"BW {st.bandwidth / 1e6:.0f} MB/s"
        )
        n = sum(1 for _ in self.s3_tier.backend.list(step_dir(STEP) + "/"))
        self.tm._mark(self.s3_tier, STEP, False)
        self.s3_tier.delete(STEP)
        return dt, n

    def v_fixed(self, pbytes: int) -> Callable[[], tuple[float, int]]:
        def run() -> tuple[float, int]:
            s = self.store(f"p{pbytes // MiB}")
            opts = WriteOptions(chunk_bytes=self.cfg.chunk_bytes, partition_bytes=pbytes, compression="none")
            plan = plan_write(STEP, self.layout, opts, prefix=step_dir(STEP) + "/")
            t0 = time.perf_counter()
            CheckpointWriter(s).write(plan, self.mv, self.slot.content)
            dt = time.perf_counter() - t0
            n = sum(1 for _ in s.list(step_dir(STEP) + "/"))
            s.delete_prefix(step_dir(STEP) + "/")
            return dt, n

        return run

    def v_single(self) -> tuple[float, int]:
        s = self.store("single")
        t0 = time.perf_counter()
        s.put("one/blob", self.mv)
        dt = time.perf_counter() - t0
        s.delete_prefix("one/")
        return dt, 1

    def variants(self) -> list[tuple[str, Callable[[], tuple[float, int]]]]:
        out: list[tuple[str, Callable[[], tuple[float, int]]]] = [("asym B*", self.v_bstar)]
        whole = -(-self.C // self.cfg.chunk_bytes) * self.cfg.chunk_bytes
        for tok in self.args.sweep.split(","):
            p = whole if tok == "all" else int(tok) * MiB
            if tok == "all" or p < whole:
                out.append((f"asym whole ({fmt_bytes(whole)})" if tok == "all" else f"asym {tok} MiB", self.v_fixed(p)))
        out.append(("single upload", self.v_single))
        return out

    def settle(self) -> None:
        time.sleep(self.args.settle_s)
        os.sync()

    def run(self) -> None:
        self.load0 = os.getloadavg()
        self.probe()
        vs = self.variants()
        self.names = [n for n, _ in vs]
        for name, fn in vs:
            if name in ("asym B*", "single upload"):
                dt, _ = fn()
                self.log(f"  warm-up {name}: {dt:.2f} s")
                self.settle()
        self.bstar_seen.clear()
        self.fits.clear()
        for r in range(self.args.repeats):
            order = list(vs)
            random.Random(r).shuffle(order)
            for name, fn in order:
                dt, n = fn()
                self.times.setdefault(name, []).append(dt)
                self.objects[name] = n
                self.log(
                    f"round {r + 1}/{self.args.repeats} {name:24s} {dt:7.2f} s  {self.C / dt / 1e9:.3f} GB/s  {n} objects"
                )
                self.settle()
        self.load1 = os.getloadavg()

    # --- report ------------------------------------------------------------------------
    def med(self, name: str) -> float:
        return statistics.median(self.times[name])

    def report(self, info: dict[str, str], command: str) -> str:
        a = self.args
        L = ["# asymstore S3 promotion benchmark", "", f"- command: `{command}`"]
        L += [
            f"- {k}: {info[k]}"
            for k in ("cpu", "ram", "disk", "os", "python", "torch", "asymstore", "date")
            if k in info
        ]
        L.append(
            f"- s3: SeaweedFS {VERSION} (`weed server -s3`: master, volume server, filer and S3 gateway in one process, "
            f"data on the disk above) on this machine, plain http on 127.0.0.1; client pyarrow {_pyarrow_version()} "
            "`S3FileSystem` through `S3ObjectStore` (multipart uploads in the background, default part size)"
        )
        n_embd, n_layer = self.state_desc
        L.append(
            f"- state: GPT-2-like (n_embd={n_embd}, n_layer={n_layer}), params + 2 Adam moments, fp32 random: "
            f"{len(self.layout.tensors)} tensors, {self.C / GiB:.3f} GiB ({self.C} bytes); promoted from the host slot"
        )
        L.append(
            f"- method: warm-up (B*, single upload), then {a.repeats} rounds of all variants (seeded shuffle per "
            f"round), medians; after each variant (untimed) its objects are deleted, {a.settle_s:.0f} s pause and `sync`"
        )
        l0, l1 = self.load0, self.load1
        L.append(
            f"- load average (1/5/15 min) at start {l0[0]:.2f}/{l0[1]:.2f}/{l0[2]:.2f}, at end {l1[0]:.2f}/{l1[1]:.2f}/"
            f"{l1[2]:.2f}: the server, the client and other work on the machine share {os.cpu_count()} cores"
        )
        L += ["", "## Fitted model (probe writes of the S3 tier)", ""]
        L.append("- probe writes: " + ", ".join(f"{fmt_bytes(b)} {t * 1e3:.1f} ms" for b, t in self.probe_samples))
        cont = "inf" if self.cont0 == float("inf") else fmt_bytes(self.cont0)
        L.append(
            f"- fit: T_d = {self.fit0.latency_s * 1e3:.1f} ms, BW = {self.fit0.bandwidth / 1e6:.0f} MB/s; staging "
            f"bandwidth (crc32c) = {self.stage_bw / 1e9:.2f} GB/s"
        )
        L.append(
            f"- B* for C = {fmt_bytes(self.C)}: **{fmt_bytes(self.bstar0)}** = {-(-self.C // self.bstar0)} partitions "
            f"(closed form {cont}; staging budget {fmt_bytes(self.cfg.staging_budget_bytes)})"
        )
        L.append("- B* used in the timed rounds: " + ", ".join(fmt_bytes(b) for b in sorted(set(self.bstar_seen))))
        L += [f"  - {f}" for f in self.fits]
        L += ["", "## Throughput (GB/s = 1e9 bytes of state per second; ratio vs the single upload)", ""]
        L += [
            "| variant | objects / checkpoint | median s | GB/s | vs single upload | min..max s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        single = self.med("single upload")
        for name in self.names:
            m, xs = self.med(name), self.times[name]
            L.append(
                f"| {name} | {self.objects[name]} | {m:.3f} | {self.C / m / 1e9:.3f} | {single / m:.2f}x | "
                f"{min(xs):.3f}..{max(xs):.3f} |"
            )
        L += ["", "## Goals", ""]
        sweep = {n: self.med(n) for n in self.times if n.startswith("asym ") and n != "asym B*"}
        best = min(sweep, key=sweep.__getitem__)
        b = self.med("asym B*")
        r1, r2 = single / b, sweep[best] / b
        g1, g2 = GOALS["bstar_vs_single"], GOALS["bstar_vs_best_sweep"]
        L.append(
            f"- B* throughput / single large upload: {r1:.2f} (goal >= {g1}): **{'PASS' if r1 >= g1 else 'FAIL'}**"
        )
        L.append(
            f"- B* throughput / best swept size ({best}): {r2:.2f} (goal: within 10%, >= {g2}): "
            f"**{'PASS' if r2 >= g2 else 'FAIL'}**"
        )
        return "\n".join(L) + "\n"

    def close(self) -> None:
        try:
            self.host.host.unlease(self.slot)
            self.host.close()
        except Exception:
            pass
        self.server.stop()
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)


def _pyarrow_version() -> str:
    import pyarrow

    return str(pyarrow.__version__)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=float, default=0.5, help="target state size (params + 2 moments)")
    p.add_argument("--n-embd", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sweep", default="4,16,64,128,256,all", help="fixed partition sizes in MiB; 'all' = one partition")
    p.add_argument("--settle-s", type=float, default=2.0)
    p.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "s3.md"),
        help="markdown report path ('-': print only)",
    )
    p.add_argument("--quiet", action="store_true")
    args: Any = p.parse_args(argv)
    command = "python -m benchmarks.bench_s3" + (
        "" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv)
    )
    bench = Bench(args)
    run_and_report(bench, bench.tmp, command, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
