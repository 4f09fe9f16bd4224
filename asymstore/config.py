"""All tunables in one place; every field can be overridden by ``ASYMSTORE_<FIELD>``."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError
from .validate import MAX_CHUNK_BYTES, MAX_CHUNKS_PER_SHARD, MIN_CHUNK_BYTES
from .write_plan import parse_compression

MiB = 1 << 20


@dataclass(frozen=True)
class Config:
    """Store configuration (keyword-only; see the README's configuration table)."""

    #: K: host snapshot slots. A slot whose persistence has not finished is never overwritten.
    host_slots: int = 2
    #: What a save does when every slot is still persisting: wait for one, or skip this checkpoint.
    slot_policy: Literal["wait", "skip"] = "wait"
    #: Pin host slots (page-locked memory for async GPU copies). ``None``: only when CUDA is present.
    pin_memory: bool | None = None
    #: Where the host slots live: "shared" (files in ``shm_dir`` that outlive the process: a restarted process
    #: restores from them and persists what had not reached the tiers), "private" (this process's memory), or
    #: "auto": shared on Linux when the store has a persistent tier (its URL names the job), else private.
    host_memory: Literal["auto", "shared", "private"] = "auto"
    #: The tmpfs directory of the shared slots (a region per job and rank under ``<shm_dir>/asymstore/``).
    shm_dir: str = "/dev/shm"
    #: The job id naming the shared region; ``None``: derived from the first persistent tier's URL.
    shm_job: str | None = None
    #: Leave the shared region in place at a clean ``close()`` (default: removed once everything is durable).
    keep_shm: bool = False
    #: Peer replicas (0 or 1): each committed host slot is also copied into the shared memory of a rank on
    #: another node (ring by node), so the rank replacing a lost node restores from it. Needs shared host
    #: memory and an initialised ``torch.distributed`` (its store is the rendezvous).
    peer_replicas: int = 0
    #: Upper bound of the replication traffic (bytes/s per rank), so that training's own traffic keeps the link.
    replica_bandwidth: float = 1e9
    #: This rank's node name for replica placement; ``None``: the host name.
    node_id: str | None = None
    #: Stored object size per partition. ``None``: chosen per tier from measured latency/bandwidth.
    partition_bytes: int | None = None
    #: Chunk size inside a partition: the unit of compression and of partial (lazy) reads.
    chunk_bytes: int = 1 * MiB
    #: "auto" (selective, measured), "none", or a forced chain ("zstd3", "lz4", "blosc-shuffle", "xor-zstd").
    compression: str = "auto"
    #: A partition's measured codec choice ("auto") is reused for this many checkpoints, then measured
    #: again; a tier bandwidth that moved by more than 25% meanwhile has the choice made again from the
    #: measured ratios and speeds (nothing encoded). 1 measures every checkpoint.
    codec_reuse: int = 8
    #: Exact XOR deltas against a full base written every ``delta_every`` checkpoints (0: off).
    delta_every: int = 0
    #: Host memory allowed for encode staging (caps partition sizes).
    staging_budget_bytes: int = 512 * MiB
    #: Background checkpoint failures are logged and counted instead of raised on the next call.
    non_fatal: bool = False
    #: This process's rank and the number of ranks writing each checkpoint (each writes its rank directory;
    #: rank 0 commits the step once every rank's directory is durable).
    rank: int = 0
    world_size: int = 1
    #: How long rank 0 waits for the other ranks' directories before giving the step up (seconds).
    commit_timeout_s: float = 300.0
    #: How long ``close()`` waits for pending promotions down the tier chain (seconds).
    close_timeout_s: float = 120.0
    #: Nice increment of asymstore's background threads (snapshot copy, persistence) on Linux: a smaller
    #: share of contended cores; 0 leaves their nice value alone.
    background_nice: int = 0
    #: Linux: run asymstore's background threads (snapshot copy, persistence, promotion) under ``SCHED_IDLE``,
    #: on cores training leaves idle only; they never preempt a training thread (see ``threads.py``).
    background_idle: bool = True
    #: A checkpoint not durable on the first tier this long after its snapshot is late: it is reported (logged,
    #: counted in ``status()``) and persistence runs at normal priority until no checkpoint is late.
    durable_within_s: float = 60.0
    #: How long listing a lower tier (``steps()``, ``restore()`` without a step) waits for its answer before
    #: it goes on with what the store already knows of that tier (a frozen NameNode never blocks a restore
    #: that the first tier can serve); the tier is reported as not answering in ``status()``.
    tier_answer_s: float = 5.0
    #: Options passed to backends, per URL scheme (e.g. {"hdfs": {"retries": 3}}).
    backend_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Make a tier root that is missing or empty a new store (False: open existing stores only). A directory
    #: that holds anything but an asymstore store is refused either way.
    create: bool = True

    def __post_init__(self) -> None:
        _check_types(self)
        if self.host_slots < 1:
            raise ConfigError(f"host_slots must be >= 1, got {self.host_slots}")
        if self.slot_policy not in ("wait", "skip"):
            raise ConfigError(f"slot_policy must be 'wait' or 'skip', got {self.slot_policy!r}")
        if not MIN_CHUNK_BYTES <= self.chunk_bytes <= MAX_CHUNK_BYTES or self.chunk_bytes & (self.chunk_bytes - 1):
            raise ConfigError(f"chunk_bytes must be a power of two in [4 KiB, 1 GiB], got {self.chunk_bytes}")
        if self.partition_bytes is not None and self.partition_bytes > self.chunk_bytes * MAX_CHUNKS_PER_SHARD:
            raise ConfigError(
                f"partition_bytes ({self.partition_bytes}) may hold at most {MAX_CHUNKS_PER_SHARD} chunks of "
                f"chunk_bytes ({self.chunk_bytes}); raise chunk_bytes or lower partition_bytes"
            )
        if self.partition_bytes is not None and (
            self.partition_bytes < self.chunk_bytes or self.partition_bytes % self.chunk_bytes
        ):
            raise ConfigError(
                f"partition_bytes ({self.partition_bytes}) must be a multiple of chunk_bytes ({self.chunk_bytes})"
            )
        parse_compression(self.compression)  # an unknown chain fails here, not at the first write
        if self.codec_reuse < 1:
            raise ConfigError(f"codec_reuse must be >= 1 (checkpoints), got {self.codec_reuse}")
        if self.delta_every < 0:
            raise ConfigError("delta_every must be >= 0")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"need 0 <= rank < world_size, got rank={self.rank}, world_size={self.world_size}")
        if not self.tier_answer_s > 0:
            raise ConfigError(f"tier_answer_s must be > 0 seconds, got {self.tier_answer_s!r}")
        if not self.durable_within_s > 0:
            raise ConfigError(f"durable_within_s must be > 0 seconds, got {self.durable_within_s!r}")
        if self.peer_replicas not in (0, 1):
            raise ConfigError(f"peer_replicas must be 0 or 1, got {self.peer_replicas!r}")
        if self.replica_bandwidth <= 0:
            raise ConfigError(f"replica_bandwidth must be > 0 bytes/s, got {self.replica_bandwidth!r}")
        if self.host_memory not in ("auto", "shared", "private"):
            raise ConfigError(f"host_memory must be 'auto', 'shared' or 'private', got {self.host_memory!r}")
        if not 0 <= self.background_nice <= 19:
            raise ConfigError(f"background_nice must be in 0..19, got {self.background_nice}")

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, base: Config | None = None, environ: dict[str, str] | None = None, **overrides: Any) -> Config:
        """``base`` (or defaults), then ``ASYMSTORE_*`` variables, then explicit ``overrides``."""
        env = os.environ if environ is None else environ
        cfg = base or cls()
        changes: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get("ASYMSTORE_" + f.name.upper())
            if raw is None or f.name == "backend_options":
                continue
            cur = getattr(cfg, f.name)
            try:
                if isinstance(cur, bool) or f.name in ("pin_memory", "non_fatal", "keep_shm"):
                    changes[f.name] = raw.lower() in ("1", "true", "yes", "on")
                elif isinstance(cur, float):
                    changes[f.name] = float(raw)
                elif isinstance(cur, int) or f.name == "partition_bytes":
                    changes[f.name] = int(raw)
                else:
                    changes[f.name] = raw
            except ValueError:
                raise ConfigError(f"ASYMSTORE_{f.name.upper()}={raw!r} is not a valid {f.name}") from None
        changes.update(overrides)
        return dataclasses.replace(cfg, **changes)


_TYPE_NAMES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "None": (type(None),)}


def _check_types(cfg: Config) -> None:
    """Every field has its annotated type (a bool is no int, a float may be an int), with a clear
    :class:`ConfigError` naming the field: options are checked when the store is made, not at the first save."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        ann = str(f.type).replace(" ", "")
        allowed: tuple[type, ...] = ()
        for part in ann.split("|"):
            if part.startswith("Literal["):
                allowed += (str,)
            elif part.startswith("dict["):
                allowed += (dict,)
            else:
                allowed += _TYPE_NAMES.get(part, (object,))
        if object in allowed or f.name == "compression":  # compression: a label or a CodecSpec (checked below)
            continue
        bad = not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed)
        if not bad and isinstance(v, float) and not math.isfinite(v):
            bad = True
        if bad:
            raise ConfigError(f"{f.name} must be {ann.replace('|', ' or ')}, got {type(v).__name__} {v!r}")
    if not all(isinstance(k, str) and isinstance(o, dict) for k, o in cfg.backend_options.items()):
        raise ConfigError('backend_options must map URL schemes to dicts of options, e.g. {"hdfs": {"retries": 3}}')
