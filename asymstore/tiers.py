"""A persistent tier: an object store plus what asymstore measures and keeps about it."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass

from asymstore.backends import open_object_store, scheme_of
from asymstore.backends.base import ObjectStore

from .config import MiB, Config
from .errors import CorruptCheckpointError
from .manifest import COMMIT_KEY, parse_commit, parse_step_dir, step_dir
from .reader import CheckpointReader
from .writer import CheckpointWriter, DeltaBase, ensure_root_group

_DEFAULT_PARTITION = {"file": 64 * MiB, "memory": 64 * MiB, "hdfs": 128 * MiB}


@dataclass
class WriteStats:
    """Per-operation latency and bandwidth of a tier, from a start-up probe and real traffic."""

    latency_s: float = 0.0
    bandwidth: float = 0.0  # bytes/s
    samples: int = 0
    bytes_written: int = 0
    seconds_writing: float = 0.0

    def observe(self, nbytes: int, seconds: float) -> None:
        self.bytes_written += nbytes
        self.seconds_writing += seconds
        self.samples += 1
        if nbytes >= MiB and seconds > 0:
            bw = nbytes / max(seconds - self.latency_s, seconds * 0.5)
            self.bandwidth = bw if self.bandwidth == 0 else 0.8 * self.bandwidth + 0.2 * bw


class PersistentTier:
    """One tier below host memory (local directory, HDFS, ...)."""

    def __init__(self, url_or_store: str | ObjectStore, config: Config, *, name: str | None = None) -> None:
        if isinstance(url_or_store, ObjectStore):
            self.store = url_or_store
        else:
            opts = config.backend_options.get(scheme_of(url_or_store), {})
            self.store = open_object_store(url_or_store, **opts)
        self.url = self.store.url
        self.scheme = scheme_of(self.url)
        self.name = name or self.scheme
        self.config = config
        self.stats = WriteStats()
        self._probed = False
        self.lock = threading.Lock()  # one writer per tier at a time
        self.delta: DeltaBase | None = None
        self._delta_buf: bytearray | None = None
        self.since_base = 0
        ensure_root_group(self.store)

    # --- measurement -------------------------------------------------------------
    def probe(self) -> WriteStats:
        """Measure per-write latency and bandwidth with real writes (once, then refreshed by traffic)."""
        if self._probed:
            return self.stats
        key = f"_probe/{uuid.uuid4().hex}"
        small = bytes(4096)
        big = bytes(8 * MiB)
        t0 = time.perf_counter()
        for i in range(3):
            self.store.put(f"{key}-s{i}", small)
        lat = (time.perf_counter() - t0) / 3
        t1 = time.perf_counter()
        self.store.put(f"{key}-b", big)
        dt = time.perf_counter() - t1
        self.store.delete_prefix("_probe/")
        self.stats.latency_s = lat
        self.stats.bandwidth = len(big) / max(dt - lat, dt * 0.5, 1e-9)
        self._probed = True
        return self.stats

    def bandwidth(self) -> float:
        if not self.store.durable and self.scheme == "memory":
            return float("inf")
        return self.probe().bandwidth

    def partition_bytes(self) -> int:
        if self.config.partition_bytes:
            return self.config.partition_bytes
        p = _DEFAULT_PARTITION.get(self.scheme, 64 * MiB)
        p = min(p, max(self.config.staging_budget_bytes // 2, self.config.chunk_bytes))
        return max(p // self.config.chunk_bytes, 1) * self.config.chunk_bytes

    def writer(self) -> CheckpointWriter:
        return CheckpointWriter(self.store, partition_bytes=self.partition_bytes(),
                                chunk_bytes=self.config.chunk_bytes, compression=self.config.compression,
                                tier_bandwidth=self.bandwidth, on_write=self.stats.observe)

    # --- delta bases -------------------------------------------------------------
    def delta_for(self, signature: str) -> DeltaBase | None:
        k = self.config.delta_every
        if k <= 0 or self.delta is None or self.delta.signature != signature or self.since_base >= k - 1:
            return None
        return self.delta

    def after_write(self, step: int, stream: memoryview, signature: str, used_delta: bool) -> None:
        if self.config.delta_every <= 0:
            return
        if used_delta:
            self.since_base += 1
            return
        if self._delta_buf is None or len(self._delta_buf) != len(stream):
            self._delta_buf = bytearray(len(stream))
        self._delta_buf[:] = stream
        self.delta = DeltaBase(step, signature, memoryview(self._delta_buf))
        self.since_base = 0

    @property
    def reserved_bytes(self) -> int:
        return len(self._delta_buf) if self._delta_buf is not None else 0

    # --- catalogue ---------------------------------------------------------------
    def committed_steps(self) -> list[int]:
        out = []
        for d in self.store.list_dirs(""):
            s = parse_step_dir(d)
            if s is not None and self.store.exists(f"{d}/{COMMIT_KEY}"):
                out.append(s)
        return sorted(out)

    def has(self, step: int) -> bool:
        return self.store.exists(f"{step_dir(step)}/{COMMIT_KEY}")

    def commit_info(self, step: int) -> dict[str, object]:
        raw = self.store.get(f"{step_dir(step)}/{COMMIT_KEY}")
        if raw is None:
            return {}
        return parse_commit(raw, f"{step_dir(step)}/{COMMIT_KEY}")

    def reader(self, step: int) -> CheckpointReader:
        return CheckpointReader.open(self.store, step, base_reader=self.reader)

    def dependents(self, step: int) -> list[int]:
        out = []
        for s in self.committed_steps():
            try:
                if self.commit_info(s).get("delta_base") == step:
                    out.append(s)
            except CorruptCheckpointError:
                continue
        return out

    def delete(self, step: int) -> None:
        """Un-commit first (marker), then remove the objects."""
        prefix = step_dir(step) + "/"
        self.store.delete(prefix + COMMIT_KEY)
        self.store.delete_prefix(prefix)

    def close(self) -> None:
        self.store.close()
