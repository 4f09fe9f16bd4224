"""A persistent tier: a backend plus what asymstore measures and keeps about it.

The tier measures its write costs (:class:`WriteStats`), holds its delta base and retention policies, and
asks the planners for every decision: :mod:`.write_plan` for how a checkpoint is written (B*, codecs) and
:mod:`.retention` for deltas and deletions.
"""

from __future__ import annotations

import threading
import time
import uuid
import warnings
from collections.abc import Collection
from dataclasses import dataclass, field

from asymstore.backends import open_object_store, scheme_of
from asymstore.backends.base import ObjectStore

from . import catalog, claims, cleanup, globalmeta
from .batch_plan import LatencyBandwidthModel
from .compression import CodecDecisions
from .config import Config, MiB
from .errors import CheckpointFailedError, StepExistsError
from .excp import ExcpOptions, LossyState, LossyWriter
from .interfaces import RetentionPolicy
from .layout import Layout
from .manifest import COMMIT_KEY, GROUP_KEY, global_commit_record, parse_commit, rank_dir, step_dir
from .reader import CheckpointReader
from .retention import DeltaState, next_delta_state, parse_keep
from .retry import Backoff, poll
from .write_plan import WriteModel, WriteOptions, WritePlan, batch_bytes, parse_compression, plan_write
from .writer import CheckpointWriter, DeltaBase, WriteReport, ensure_root_group
from .zarrfmt import dumps, group_metadata


@dataclass
class WriteStats:
    """Per-write latency and bandwidth of a tier: a start-up probe, then refreshed by real traffic."""

    model: LatencyBandwidthModel = field(default_factory=lambda: LatencyBandwidthModel(max_samples=64))
    stage_bandwidth: float = float("inf")  # bytes/s at which a batch is produced (checksum + encode)
    writes: int = 0
    bytes_written: int = 0
    seconds_writing: float = 0.0
    #: Median time of the probe's small writes: a direct measurement of the per-write cost, and a
    #: floor under the fitted intercept (a least-squares fit over large writes can put it at ~0)
    small_write_s: float = 0.0

    def observe(self, nbytes: int, seconds: float) -> None:
        """Record one real write of ``nbytes`` that took ``seconds``."""
        self.writes += 1
        self.bytes_written += nbytes
        self.seconds_writing += seconds
        if seconds > 0:
            self.model.add(nbytes, seconds)

    @property
    def latency_s(self) -> float:
        """Per-write latency: the fitted intercept, at least the probe's small-write time."""
        fitted = self.model.latency_s if len(self.model) else 0.0
        return max(fitted, self.small_write_s)

    @property
    def bandwidth(self) -> float:
        """Fitted write bandwidth (bytes/s; 0 before any measurement)."""
        return self.model.bandwidth if len(self.model) else 0.0

    def write_model(self) -> WriteModel:
        """The measured costs as the write planner takes them."""
        return WriteModel(self.latency_s, self.bandwidth, self.stage_bandwidth)

    @property
    def throughput(self) -> float:
        """Average bytes/s of all writes so far (including per-write latency)."""
        return self.bytes_written / self.seconds_writing if self.seconds_writing else 0.0


class PersistentTier:
    """One tier below host memory (local directory, HDFS, ...)."""

    def __init__(
        self,
        url_or_store: str | ObjectStore,
        config: Config,
        *,
        name: str | None = None,
        keep: int | RetentionPolicy | list[RetentionPolicy] | None = None,
        partition_bytes: int | None = None,
        lossy: ExcpOptions | None = None,
    ) -> None:
        if isinstance(url_or_store, ObjectStore):
            self.backend = url_or_store
        else:
            opts = config.backend_options.get(scheme_of(url_or_store), {})
            self.backend = open_object_store(url_or_store, **opts)
        self.url = self.backend.url
        self.scheme = scheme_of(self.url)
        self.name = name or self.scheme
        self.config = config
        self.policies = parse_keep(keep)
        self.fixed_partition_bytes = partition_bytes or config.partition_bytes
        #: written only from host snapshot slots (the first persistent tier): its writer stages no source
        #: ranges, so raw partitions hold no staging memory at all (set by the :class:`~asymstore.Store`)
        self.writes_from_slots_only = False
        self.stats = WriteStats()
        self.codec_decisions = CodecDecisions(reuse=config.codec_reuse)
        self._probed = False
        self.lock = threading.Lock()  # one writer per tier at a time
        #: what :mod:`.retention` decides deltas from; ``delta`` holds the base's stream
        self.delta_state = DeltaState()
        self.delta: DeltaBase | None = None
        self._delta_buf: bytearray | None = None
        #: the lossy codec of an archive tier (never the first tier: :class:`~asymstore.store.Store` refuses it)
        self.lossy = lossy
        self.lossy_state = LossyState()
        ensure_root_group(self.backend, create=getattr(config, "create", True))

    @property
    def store(self) -> ObjectStore:
        """Deprecated alias of :attr:`backend` (the tier's object store)."""
        warnings.warn("PersistentTier.store is deprecated; use .backend", DeprecationWarning, stacklevel=2)
        return self.backend

    # --- measurement -------------------------------------------------------------
    def probe(self) -> WriteStats:
        """Measure per-write latency and bandwidth with real writes (once, then refreshed by traffic)."""
        if self._probed:
            return self.stats
        import os

        from .zarrfmt import crc32c

        # a prefix of its own: other ranks (or processes) sharing this tier probe it at the same time; its
        # claim tells a later clean-up whether the prober is still alive (a killed probe's objects are removed)
        prefix = f"{cleanup.PROBE_DIR}/{uuid.uuid4().hex}/"
        big = os.urandom(8 * MiB)
        small: list[float] = []
        token, record = claims.new_claim("probe")
        try:
            self.backend.create_exclusive(prefix + claims.CLAIM_KEY, record)
            for i, n in enumerate((4096, 4096, 4096, 2 * MiB, 8 * MiB)):
                t0 = time.perf_counter()
                self.backend.put(f"{prefix}{i}", memoryview(big)[:n])
                dt = time.perf_counter() - t0
                self.stats.model.add(n, dt)
                if n == 4096:
                    small.append(dt)
            self.stats.small_write_s = sorted(small)[len(small) // 2]
            t0 = time.perf_counter()
            crc32c(big)
            self.stats.stage_bandwidth = len(big) / max(time.perf_counter() - t0, 1e-9)
        finally:
            try:
                self.backend.delete_prefix(prefix)
            finally:
                claims.release(token)
        self._probed = True
        return self.stats

    def bandwidth(self) -> float:
        """Current write bandwidth (bytes/s); ``inf`` for a volatile backend (a memory copy)."""
        if self.backend.capabilities.volatile:
            return float("inf")
        return self.probe().bandwidth or float("inf")

    # --- planning and writing ----------------------------------------------------
    def write_options(self) -> WriteOptions:
        """How this tier is written: the configuration, its role and its backend's capabilities."""
        c = self.config
        return WriteOptions(
            chunk_bytes=c.chunk_bytes,
            compression=parse_compression(c.compression),
            partition_bytes=self.fixed_partition_bytes,
            delta_every=c.delta_every,
            staging_budget_bytes=c.staging_budget_bytes,
            from_slots_only=self.writes_from_slots_only,
            volatile=self.backend.capabilities.volatile,
        )

    def _model(self, options: WriteOptions) -> WriteModel | None:
        return self.probe().write_model() if options.needs_model else None

    def partition_bytes(self, checkpoint_bytes: int) -> int:
        """B* of a checkpoint of ``checkpoint_bytes`` on this tier (asks :func:`.write_plan.batch_bytes`)."""
        options = self.write_options()
        return batch_bytes(checkpoint_bytes, options, self._model(options))

    def plan(self, step: int, layout: Layout, *, whole_stream: bool) -> WritePlan:
        """The write plan of ``step`` on this tier (probes the tier first when B* needs its write model)."""
        options = self.write_options()
        return plan_write(
            step,
            layout,
            options,
            model=self._model(options),
            delta=self.delta_state,
            whole_stream=whole_stream,
            prefix=self.rank_prefix(step),
            world_size=self.config.world_size,
        )

    def writer(self) -> CheckpointWriter | LossyWriter:
        """A writer executing plans on this tier's backend (through ExCP on a lossy tier)."""
        if self.lossy is not None:
            return LossyWriter(self, self.lossy, self.lossy_state)
        return self.plain_writer()

    def plain_writer(self) -> CheckpointWriter:
        """A writer executing plans on this tier's backend, feeding its measurements and codec memory."""
        return CheckpointWriter(
            self.backend,
            tier_bandwidth=self.bandwidth,
            on_write=self.stats.observe,
            decisions=self.codec_decisions,
        )

    # --- delta bases -------------------------------------------------------------
    def delta_base(self, plan: WritePlan) -> DeltaBase | None:
        """The stream of the base ``plan`` offers (``None`` when it offers none)."""
        if plan.delta_base is None:
            return None
        assert self.delta is not None and self.delta.step == plan.delta_base
        return self.delta

    def after_write(self, plan: WritePlan, stream: memoryview, signature: str, report: WriteReport) -> None:
        """Update the delta state after ``plan`` was written from the whole ``stream``; keep a new base."""
        used = report.delta_base is not None
        c = self.config
        if self.lossy is not None:  # ExCP keeps its own base (excp.LossyState), never an XOR one
            return
        self.delta_state, new_base = next_delta_state(
            self.delta_state, plan.step, signature, delta_every=c.delta_every, used_delta=used
        )
        if not new_base:
            return
        if self._delta_buf is None or len(self._delta_buf) != len(stream):
            self._delta_buf = bytearray(len(stream))
        self._delta_buf[:] = stream
        self.delta = DeltaBase(plan.step, signature, memoryview(self._delta_buf))

    @property
    def reserved_bytes(self) -> int:
        """Host memory held for the delta base (bytes)."""
        return len(self._delta_buf) if self._delta_buf is not None else 0

    # --- catalogue ---------------------------------------------------------------
    def committed_steps(self) -> list[int]:
        """Steps committed on this tier, oldest first (:func:`asymstore.catalog.committed_steps`)."""
        return catalog.committed_steps(self.backend)

    def has(self, step: int) -> bool:
        """Whether ``step`` is committed on this tier."""
        return catalog.is_committed(self.backend, step)

    # --- multi-rank ----------------------------------------------------------------
    @property
    def multi_rank(self) -> bool:
        """Whether several ranks write each checkpoint (each its own rank directory)."""
        return self.config.world_size > 1

    def rank_prefix(self, step: int) -> str:
        """Where this rank writes ``step``: the step's directory, or its rank directory in a multi-rank run."""
        return rank_dir(step, self.config.rank, self.config.world_size) + "/"

    def rank_committed(self, step: int) -> bool:
        """Whether this rank's part of ``step`` is committed (its rank directory's marker)."""
        return catalog.rank_committed(self.backend, step, rank=self.config.rank, world_size=self.config.world_size)

    def finalize(self, step: int, *, timeout: float | None = None) -> None:
        """Rank 0: once every rank's directory marker is durable, write the step's global marker."""
        n = self.config.world_size
        wait_s = self.config.commit_timeout_s if timeout is None else timeout
        keys = {r: f"{rank_dir(step, r, n)}/{COMMIT_KEY}" for r in range(n)}
        raw: dict[int, bytes] = {}

        def all_markers() -> dict[int, bytes] | None:
            for r, k in keys.items():
                if r not in raw and (b := self.backend.get(k)) is not None:
                    raw[r] = b
            return raw if len(raw) == n else None

        if poll(all_markers, timeout_s=wait_s, backoff=Backoff(initial_s=0.01, max_s=0.5)) is None:
            missing = sorted(set(keys) - set(raw))
            raise CheckpointFailedError(
                f"step {step} not committed on {self.name}: ranks {missing} did not "
                f"finish their rank directories within {wait_s:.0f} s"
            )
        markers = {r: parse_commit(b, keys[r]) for r, b in raw.items()}
        other = {r: m["world_size"] for r, m in markers.items() if m.get("world_size", n) != n}
        if other:  # parts of another job's step under the same rank names: never one step of n ranks
            raise CheckpointFailedError(
                f"step {step} not committed on {self.name}: the parts of ranks {sorted(other)} were written by a "
                f"job of {sorted(set(other.values()))} ranks, this one has {n}"
            )
        prefix = step_dir(step) + "/"
        for r in range(n):  # every rank's part is committed: their claims go before the step's marker counts them
            self.backend.delete(f"{rank_dir(step, r, n)}/{claims.CLAIM_KEY}")
        index = globalmeta.step_index_bytes(self.backend, step, n, markers)  # the merged index, if described
        self.backend.put(prefix + GROUP_KEY, dumps(group_metadata({"asymstore": {"step": step, "ranks": n}})))
        if index is not None:
            self.backend.put(prefix + globalmeta.INDEX_KEY, index)
        self.backend.barrier(prefix)
        marker = global_commit_record(step, n, markers, raw, index=index)
        if not self.backend.create_exclusive(prefix + COMMIT_KEY, marker):
            raise StepExistsError(f"step {step} is already committed on {self.name} ({self.url}/{prefix}{COMMIT_KEY})")

    def commit_info(self, step: int) -> dict[str, object]:
        """The step's parsed commit marker on this tier (``{}`` when not committed)."""
        return catalog.commit_info(self.backend, step)

    def reader(self, step: int, rank: int | None = None) -> CheckpointReader:
        """A reader of ``step``; multi-rank steps open ``rank``'s directory (default: this store's rank)."""
        return catalog.open_reader(self.backend, step, rank=self.config.rank if rank is None else rank)

    def dependents(self, step: int) -> list[int]:
        """Committed steps on this tier stored as XOR deltas of ``step``."""
        return catalog.dependents(self.backend, step)

    def discard_uncommitted(self, *, after: int | None = None, keep: Collection[int] = ()) -> list[int]:
        """Remove this rank's objects of steps that were never committed (crashed attempts), only those newer
        than ``after`` if given, never those in ``keep`` (steps being persisted from host memory), and killed
        probes and stale temporaries (:func:`asymstore.cleanup.clean_leftovers` with ``force``).

        The caller states that no other writer of this rank runs, so claims made on other machines are removed
        at once; a live writer on this machine (another process saving into this root) keeps its step. Safe
        whenever this process is not saving, e.g. when a job starts or resumes. Returns the steps cleaned.
        """
        rep = cleanup.clean_leftovers(
            self.backend, rank=self.config.rank, world_size=self.config.world_size, force=True, after=after, keep=keep
        )
        return rep.steps

    def clean_leftovers(self) -> cleanup.CleanReport:
        """Remove this rank's crash leftovers whose writers are dead (:func:`asymstore.cleanup.clean_leftovers`):
        killed probes, uncommitted steps, stale temporaries. Safe while other processes write the tier."""
        rep = cleanup.clean_leftovers(self.backend, rank=self.config.rank, world_size=self.config.world_size)
        if rep:
            catalog.log.info(
                "tier %s: removed crash leftovers: %d probe directories, steps %s, %d temporaries",
                self.name,
                rep.probes,
                rep.steps,
                rep.temporaries,
            )
        return rep

    def delete(self, step: int) -> None:
        """Un-commit first (the marker, made durable), then remove the objects (a rank > 0 removes only its rank
        directory). A kill in between leaves an uncommitted step directory, never a listed step missing data;
        the next clean-up removes it."""
        prefix = step_dir(step) + "/"
        if self.config.rank == 0:
            self.backend.delete(prefix + COMMIT_KEY)
            self.backend.barrier(prefix)
            self.backend.delete_prefix(prefix if not self.multi_rank else self.rank_prefix(step))
            if self.multi_rank:  # the step's merged index is rank 0's (docs/format.md section 9.3)
                self.backend.delete(prefix + globalmeta.INDEX_KEY)
        else:
            self.backend.delete_prefix(self.rank_prefix(step))

    def close(self) -> None:
        """Release the backend."""
        self.backend.close()
