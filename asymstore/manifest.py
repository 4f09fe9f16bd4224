"""The checkpoint manifest (JSON, in the step group's zarr attributes) and commit marker."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from . import validate
from .codecs import CodecSpec
from .dtypes import from_name, info
from .errors import CorruptCheckpointError
from .layout import Layout, PartitionSpan, TensorEntry
from .zarrfmt import crc32c, dumps

FORMAT = validate.FORMAT
COMMIT_KEY = "COMMIT"
GROUP_KEY = "zarr.json"
_STEP_RE = re.compile(r"^step_(\d{12})$")
_RANK_RE = re.compile(r"^r(\d{5})$")


def step_dir(step: int) -> str:
    """The step directory name of ``step``: ``step_`` and 12 digits."""
    if step < 0 or step >= 10**12:
        raise ValueError(f"step must be in [0, 1e12), got {step}")
    return f"step_{step:012d}"


def rank_dir_name(rank: int) -> str:
    """The name of a rank's directory inside a multi-rank step: ``rNNNNN``."""
    return f"r{rank:05d}"


def parse_rank_dir(name: str) -> int | None:
    """The rank of a rank directory name, or ``None`` for any other name."""
    m = _RANK_RE.match(name)
    return int(m.group(1)) if m else None


def rank_dir(step: int, rank: int, world_size: int) -> str:
    """A rank's directory of a step: the step directory itself for one rank, ``step_X/rNNNNN`` otherwise."""
    return step_dir(step) if world_size == 1 else f"{step_dir(step)}/{rank_dir_name(rank)}"


#: Deprecated alias of :func:`rank_dir`.
shard_dir = rank_dir


def global_commit_record(
    step: int,
    ranks: int,
    markers: dict[int, dict[str, Any]],
    marker_bytes: dict[int, bytes],
    *,
    index: bytes | None = None,
) -> bytes:
    """The step-level marker of a multi-rank checkpoint: written by rank 0 after every rank's marker.
    ``index``: the bytes of the step's ``INDEX`` object (docs/format.md section 9.3), when it has one."""
    bases = sorted({int(b) for m in markers.values() if isinstance(b := m.get("delta_base"), int)})
    body = {
        "format": FORMAT,
        "step": step,
        "time": time.time(),
        "ranks": ranks,
        "shards_crc32c": {str(r): crc32c(b) for r, b in sorted(marker_bytes.items())},
        "stored_bytes": sum(int(m.get("stored_bytes", 0)) for m in markers.values()),
        "raw_bytes": sum(int(m.get("raw_bytes", 0)) for m in markers.values()),
        "objects": sum(int(m.get("objects", 0)) for m in markers.values()) + 2 + (index is not None),
        # the ranks' delta bases: a retention planner reading only this marker must see every one of them
        "delta_base": bases[0] if len(bases) == 1 else None,
        "delta_bases": bases,
    }
    if index is not None:
        body["index_crc32c"] = crc32c(index)
    body["crc32c"] = crc32c(dumps(body))
    return dumps(body)


def commit_delta_bases(commit: dict[str, Any]) -> list[int]:
    """The steps a committed step is XOR-encoded against, from its commit marker (``delta_bases`` of a
    multi-rank step's global marker, else ``delta_base``); empty for a full checkpoint."""
    many = commit.get("delta_bases")
    if isinstance(many, list):
        return sorted({b for b in many if isinstance(b, int)})
    one = commit.get("delta_base")
    return [one] if isinstance(one, int) else []


def parse_step_dir(name: str) -> int | None:
    """The step of a step directory name, or ``None`` for any other name."""
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


@dataclass
class PartitionRecord:
    """One ``partitions`` entry of the manifest (docs/format.md section 4.1): a stored object and its checksums."""

    span: PartitionSpan
    label: str  # codec chain label == zarr array name
    shard: int  # shard index inside that array
    stored_bytes: int
    chunk_crcs: list[int]

    def to_json(self) -> list[Any]:
        """The positional JSON array ``[index, start, nbytes, label, shard, stored_bytes, chunk_crcs]``."""
        return [
            self.span.index,
            self.span.start,
            self.span.nbytes,
            self.label,
            self.shard,
            self.stored_bytes,
            self.chunk_crcs,
        ]

    @classmethod
    def from_json(cls, v: list[Any]) -> PartitionRecord:
        """The record from its positional JSON array."""
        i, start, n, label, shard, stored, crcs = v
        return cls(PartitionSpan(i, start, n), label, shard, stored, list(crcs))


@dataclass
class Manifest:
    """A checkpoint's manifest (docs/format.md section 4): layout, skeleton, partitions, codecs, delta base."""

    step: int
    layout: Layout
    skeleton: Any
    numpy_names: list[str]
    partition_bytes: int
    chunk_bytes: int
    partitions: list[PartitionRecord]
    codecs: dict[str, CodecSpec]
    delta_base: int | None = None
    user: dict[str, Any] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    #: tensor name -> the parts of global tensors it holds (docs/format.md section 8.2); empty: none
    global_parts: dict[str, Any] = field(default_factory=dict)
    #: a lossy checkpoint's decoding (docs/format.md section 15); ``None``: the stream is the state's
    lossy: dict[str, Any] | None = None

    @property
    def chunks_per_shard(self) -> int:
        """Chunks per partition: ``partition_bytes // chunk_bytes``."""
        return self.partition_bytes // self.chunk_bytes

    @property
    def stored_bytes(self) -> int:
        """Bytes stored over all partitions."""
        return sum(p.stored_bytes for p in self.partitions)

    def array_nbytes(self, label: str) -> int:
        """The length of codec array ``label`` (its partitions back to back)."""
        parts = [p for p in self.partitions if p.label == label]
        return (len(parts) - 1) * self.partition_bytes + parts[-1].span.nbytes if parts else 0

    def to_json(self) -> dict[str, Any]:
        """The manifest as the JSON object stored in the step group's attributes."""
        d = {
            "format": FORMAT,
            "step": self.step,
            "created": self.created,
            "layout": {
                "align": self.layout.align,
                "total_bytes": self.layout.total_bytes,
                "signature": self.layout.signature,
                "tensors": [[t.name, t.dtype, list(t.shape), t.offset, t.nbytes] for t in self.layout.tensors],
            },
            "numpy_view_dtypes": {t.dtype: info(from_name(t.dtype)).view_dtype for t in self.layout.tensors},
            "skeleton": self.skeleton,
            "numpy_names": self.numpy_names,
            "partition_bytes": self.partition_bytes,
            "chunk_bytes": self.chunk_bytes,
            "codecs": {k: v.to_json() for k, v in self.codecs.items()},
            "partitions": [p.to_json() for p in self.partitions],
            "delta_base": self.delta_base,
            "user": self.user,
            **({"lossy": self.lossy} if self.lossy is not None else {}),
        }
        if self.global_parts:  # only then: manifests of states without global tensors are unchanged
            from .globalmeta import parts_to_json

            d["global_parts"] = parts_to_json(self.global_parts)
        return d

    @classmethod
    def from_json(cls, d: Any, where: str = "manifest", *, step: int | None = None) -> Manifest:
        """The manifest from its JSON object, checked completely first (:func:`asymstore.validate.manifest`:
        an unknown ``format`` (docs/format.md section 12), a member of the wrong type, offsets and sizes that
        disagree ...); every problem is a ``CorruptCheckpointError`` naming ``where`` and the member.
        ``step``: the step of the directory it was read from."""
        validate.manifest(d, where, step=step)
        lay = d["layout"]
        layout = Layout(
            tuple(TensorEntry(n, dt, tuple(s), o, nb) for n, dt, s, o, nb in lay["tensors"]),
            int(lay["total_bytes"]),
            int(lay["align"]),
        )
        return cls(
            step=int(d["step"]),
            layout=layout,
            skeleton=d["skeleton"],
            numpy_names=list(d.get("numpy_names", [])),
            partition_bytes=int(d["partition_bytes"]),
            chunk_bytes=int(d["chunk_bytes"]),
            partitions=[PartitionRecord.from_json(p) for p in d["partitions"]],
            codecs={k: CodecSpec.from_json(v) for k, v in d["codecs"].items()},
            delta_base=d.get("delta_base"),
            user=dict(d.get("user", {})),
            created=float(d.get("created", 0.0)),
            global_parts=_global_parts(d, where),
            lossy=d.get("lossy"),
        )


def _global_parts(d: dict[str, Any], where: str) -> dict[str, Any]:
    """The manifest's ``global_parts`` (already checked by :func:`asymstore.validate.manifest`), parsed."""
    if "global_parts" not in d:
        return {}
    from .globalmeta import parts_from_json

    return dict(parts_from_json(d["global_parts"], where))


def commit_record(
    step: int,
    group_bytes: bytes,
    array_meta: dict[str, bytes],
    stored_bytes: int,
    n_objects: int,
    raw_bytes: int,
    delta_base: int | None,
    *,
    world_size: int | None = None,
) -> bytes:
    """The commit marker of a checkpoint directory (docs/format.md section 9.1), checksum last.
    ``world_size``: a rank directory's, the ranks of the job that wrote it."""
    body = {
        "format": FORMAT,
        "step": step,
        "time": time.time(),
        "group_crc32c": crc32c(group_bytes),
        "arrays_crc32c": {k: crc32c(v) for k, v in array_meta.items()},
        "stored_bytes": stored_bytes,
        "raw_bytes": raw_bytes,
        "objects": n_objects,
        "delta_base": delta_base,
    }
    if world_size is not None:
        body["world_size"] = world_size
    body["crc32c"] = crc32c(dumps(body))
    return dumps(body)


def parse_commit(raw: bytes, where: str, *, step: int | None = None) -> dict[str, Any]:
    """A commit marker's members (without ``crc32c``), its checksum verified and every member checked
    (:func:`asymstore.validate.commit`; ``step``: the step of the directory it was read from)."""
    body = validate.load_json(raw, where)
    if not isinstance(body, dict) or "crc32c" not in body:
        raise CorruptCheckpointError(f"{where}: unreadable commit marker (no crc32c member)", (where,))
    crc = body.pop("crc32c")
    if crc32c(dumps(body)) != crc:
        raise CorruptCheckpointError(f"{where}: commit marker checksum mismatch", (where,))
    validate.commit(body, where, step=step)
    return dict(body)
