"""Per-write latency (T_d) and sequential write bandwidth of HdfsObjectStore against a local MiniDFSCluster.

    python -m benchmarks.hdfs_latency [--datanodes 2 --replication 2] [--mib 256] [--url hdfs://...]

Reports medians over repeated runs. Against the MiniDFSCluster every "network" hop is loopback and
the NameNode skips edit-log fsync (MiniDFSCluster default), so T_d here is a lower bound for a real
cluster; the bandwidth is bounded by the DataNode's checksum + disk path on this machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import uuid

from asymstore.backends.base import ByteRange
from asymstore.backends.hdfs import HdfsObjectStore
from tests.minidfs import MiniDFS

MiB = 1 << 20


def _median_ms(xs: list[float]) -> str:
    slow = sum(x > 0.4 for x in xs)
    return (
        f"median {statistics.median(xs) * 1e3:.1f} ms, mean {statistics.mean(xs) * 1e3:.1f} ms, "
        f"p90 {sorted(xs)[int(len(xs) * 0.9)] * 1e3:.1f} ms, {slow}/{len(xs)} > 0.4 s (complete() retry)"
    )


def run(url: str, *, mib: int, n_small: int, repeats: int, chunk_mib: int, hsync: bool) -> None:
    store = HdfsObjectStore(f"{url}/bench-{uuid.uuid4().hex[:8]}", write_chunk=chunk_mib * MiB, hsync=hsync)
    try:
        for size in (1024, 64 * 1024):
            data = os.urandom(size)
            store.put("warm", data)
            for label, fn in (("put", store.put), ("put_atomic", store.put_atomic)):
                lat = []
                for i in range(n_small):
                    t0 = time.perf_counter()
                    fn(f"small/{label}-{size}-{i}", data)
                    lat.append(time.perf_counter() - t0)
                print(f"{label:10s} {size // 1024:4d} KiB x {n_small}: {_median_ms(lat)}")
        lat = []
        for i in range(n_small):
            t0 = time.perf_counter()
            store.get(f"small/put-1024-{i}", ByteRange(0, 1024))
            lat.append(time.perf_counter() - t0)
        print(f"get          1 KiB x {n_small}: {_median_ms(lat)}")

        # Sequential bandwidth: one object of `mib` MiB written from 8 buffers (as a batch would be).
        parts = [os.urandom(mib * MiB // 8) for _ in range(8)]
        wbw, rbw = [], []
        for r in range(repeats):
            t0 = time.perf_counter()
            store.put(f"big/{r}", parts)
            wbw.append(mib / (time.perf_counter() - t0))
            out = bytearray(mib * MiB)
            t0 = time.perf_counter()
            store.get_into(f"big/{r}", memoryview(out))
            rbw.append(mib / (time.perf_counter() - t0))
            store.delete(f"big/{r}")
        print(
            f"write {mib} MiB x {repeats}: median {statistics.median(wbw):.0f} MiB/s (all: {', '.join(f'{x:.0f}' for x in wbw)})"
        )
        print(
            f"read  {mib} MiB x {repeats}: median {statistics.median(rbw):.0f} MiB/s (all: {', '.join(f'{x:.0f}' for x in rbw)})"
        )
    finally:
        store.delete_prefix("")
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="use this HDFS instead of starting a MiniDFSCluster")
    ap.add_argument("--datanodes", type=int, default=1)
    ap.add_argument("--replication", type=int, default=1)
    ap.add_argument("--close-committed", type=int, default=0)
    ap.add_argument("--hsync", action="store_true", help="HdfsObjectStore(hsync=True): DataNodes fsync before close")
    ap.add_argument("--block-mib", type=int, default=128)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--chunk-mib", type=int, default=16)
    ap.add_argument("--n-small", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--java-opts", default=None, help="JVM options for the cluster (default: MiniDFS's)")
    a = ap.parse_args()
    kw = dict(mib=a.mib, n_small=a.n_small, repeats=a.repeats, chunk_mib=a.chunk_mib, hsync=a.hsync)
    if a.url:
        run(a.url, **kw)
        return
    with (
        tempfile.TemporaryDirectory(prefix="minidfs-bench-") as tmp,
        MiniDFS(
            datanodes=a.datanodes,
            replication=a.replication,
            close_committed=a.close_committed,
            block_size=a.block_mib * MiB,
            heap="1g",
            **({"java_opts": tuple(a.java_opts.split())} if a.java_opts is not None else {}),
        ) as dfs,
    ):
        url = dfs.start(tmp)
        print(
            f"MiniDFSCluster ({a.datanodes} DataNode(s), replication {a.replication}, block {a.block_mib} MiB, "
            f"close-committed {a.close_committed}) "
            f"started in {dfs.start_seconds:.2f} s at {url}"
        )
        run(url, **kw)


if __name__ == "__main__":
    main()
