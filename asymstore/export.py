"""Consolidation and export: a step's full tensors under their real names, as safetensors or a Hugging Face folder.

::

    from asymstore.export import consolidate, export_hf
    sd = consolidate("/ckpt")                        # newest step: {"model.wte.weight": tensor, ...}
    sd = consolidate("/ckpt", step=100)["model.lm_head.weight"]
    export_hf("/ckpt", "out/", config="config.json")  # model.safetensors (or shards + index) + config.json

What is consolidated (see docs/export.md):

* **one-rank steps** (``Store.save``, the trainer hooks on one rank): the tensors as stored, under every name
  the state references them by (tied weights under each of their names);
* **DCP steps** (``dcp.save`` through :class:`~asymstore.trainer_hooks.dcp.AsymStorageWriter`, any number of
  ranks): every tensor stitched from all ranks' chunks with DCP's own metadata (rank 0's manifest,
  ``user["dcp"]``), under its DCP FQN; the chunks must cover the tensor exactly;
* **steps with global tensor metadata** (DTensor / FSDP2 shards saved through ``Store``, any number of ranks):
  every global tensor read from the parts its ranks hold (the merged index of :mod:`asymstore.globalmeta`);
* **DeepSpeed steps** (ZeRO 1-3 through ``DeepSpeedAsymCheckpointer``, ``AsymstoreCheckpointEngine``): the fp32
  parameters by ``named_parameters()`` name (:func:`asymstore.trainer_hooks.deepspeed_tools.fp32_state_dict`);
* **one rank's part** of other multi-rank steps (``ranks=R``), as that rank saved it (data-parallel replicas);
* refused (:class:`ConsolidationError`): multi-rank steps without any of that metadata (asymstore cannot tell a
  sharded tensor from a replicated one), ``ranks=R`` where a rank holds parts of tensors, lossy archive copies.

Names. A tensor's export name is its *real key path* in the saved state, keys joined with ``sep`` (``"."``):
``{"model": model.state_dict(), "optim": ...}`` gives ``model.transformer.wte.weight`` and ``optim.state.0.exp_avg``;
keys are the state's own (never the escaped stored names of docs/format.md section 8.1: a key ``"a/b"`` stays
``a/b``). DCP steps use DCP's FQNs, which are the same paths joined with ``"."``.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import catalog
from .dtypes import from_name, info
from .errors import AsymstoreError, CorruptCheckpointError, StateMismatchError, StepNotFoundError
from .files import atomic_file
from .interfaces import ObjectStore
from .reader import CheckpointReader

__all__ = [
    "ConsolidationError",
    "ExportTensor",
    "NoMatchError",
    "StepContents",
    "consolidate",
    "dcp_to_torch_save",
    "export_hf",
    "export_safetensors",
    "open_step",
    "parse_size",
    "select",
    "tensor_paths",
]

#: the default ``max_shard_size`` of :func:`export_hf` (Hugging Face's long-standing default, ``"5GB"``)
DEFAULT_MAX_SHARD_SIZE = "5GB"

#: torch dtype name -> safetensors dtype
ST_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "complex64": "C64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e4m3fnuz": "F8_E4M3FNUZ",
    "float8_e5m2fnuz": "F8_E5M2FNUZ",
}
#: the header key safetensors keeps for its metadata: no tensor may be called so
ST_RESERVED = "__metadata__"
#: the largest header safetensors reads (its MAX_HEADER_SIZE)
ST_MAX_HEADER = 100_000_000
_PIECE = 64 << 20


class ConsolidationError(AsymstoreError):
    """A step (or a selection of it) that cannot be exported as full tensors; the message says what to do."""


class NoMatchError(ConsolidationError):
    """No tensor of the step matches the selection."""


# --- real key paths ------------------------------------------------------------------------------------------
Path = tuple[str, ...]


def tensor_paths(skeleton: Any) -> list[tuple[Path, str]]:
    """Every tensor reference of a skeleton (docs/format.md section 8): ``(real key path, stored name)`` in the
    state's order. A tensor referenced twice (tied weights) appears under each of its paths. Keys are the state's
    own (unescaped); list and tuple indices and non-string keys are their ``str()``."""
    out: list[tuple[Path, str]] = []
    stack: list[tuple[Any, Path]] = [(skeleton, ())]
    while stack:  # iterative: skeletons may be deep; children pushed in reverse to keep the order
        v, path = stack.pop()
        kids: list[tuple[Any, Path]] = []
        if isinstance(v, list):
            kids = [(x, (*path, str(i))) for i, x in enumerate(v)]
        elif isinstance(v, dict):
            if len(v) == 1:
                ((tag, x),) = v.items()
                if tag in ("__tensor__", "__ndarray__"):
                    out.append((path, str(x)))
                    continue
                if tag == "__tuple__" and isinstance(x, list):
                    kids = [(y, (*path, str(i))) for i, y in enumerate(x)]
                    stack.extend(reversed(kids))
                    continue
                if tag == "__dict__" and isinstance(x, list):
                    kids = [(y, (*path, _key_str(k))) for k, y in x]
                    stack.extend(reversed(kids))
                    continue
                if tag.startswith("__") and not tag.startswith("____"):
                    continue  # a tagged scalar (__float__, __bytes__ ...)
            kids = [(x, (*path, k[2:] if k.startswith("____") else k)) for k, x in v.items()]
        stack.extend(reversed(kids))
    return out


def _key_str(k: Any) -> str:
    """``str()`` of a non-string dict key as stored in a ``__dict__`` skeleton entry."""
    from .state import unflatten

    try:
        return str(unflatten(k, lambda n: torch.empty(0)))
    except Exception:  # a key form this reader does not know: its JSON
        return json.dumps(k)


def join_path(path: Sequence[str], sep: str = ".") -> str:
    """A real key path as an export name (``"<root>"`` for a tensor at the root of the state)."""
    return sep.join(path) if path else "<root>"


# --- what a step holds -----------------------------------------------------------------------------------------
@dataclass
class ExportTensor:
    """One full tensor of a step, under one of its names."""

    name: str  #: export name: the real key path joined with ``sep``
    path: Path  #: the real key path
    stored: str  #: where it comes from: the stored name (or the DCP FQN); tied names share it
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    _read: Callable[[], torch.Tensor] = field(repr=False)
    _pieces: Callable[[int], Iterator[memoryview]] | None = field(default=None, repr=False)

    def read(self) -> torch.Tensor:
        """The full tensor (a new CPU tensor)."""
        return self._read()

    def pieces(self, size: int = _PIECE) -> Iterator[memoryview]:
        """The tensor's bytes in order, at most ``size`` bytes at a time where the source allows it."""
        if self._pieces is not None:
            yield from self._pieces(size)
            return
        t = self.read().contiguous()
        if t.numel():
            yield t.reshape(-1).view(torch.uint8).numpy().data


@dataclass
class StepContents:
    """The full tensors of one step (:func:`open_step`)."""

    url: str
    step: int
    kind: str  #: "single" (one rank), "rank" (one rank's part of a multi-rank step), "dcp", "global", "deepspeed"
    ranks: int  #: rank directories of the step
    tensors: list[ExportTensor]
    skeleton: Any = None  #: rank 0's skeleton (one-rank kinds)
    user: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  #: non-tensor items left out (DCP's pickled values)

    def by_name(self) -> dict[str, ExportTensor]:
        """Export name -> tensor."""
        return {t.name: t for t in self.tensors}


def _backend(url: str | ObjectStore) -> ObjectStore:
    if isinstance(url, ObjectStore):
        return url
    from .backends import open_object_store, scheme_of

    if scheme_of(url) == "file":  # read only: never create the directory a local tier would get
        from .backends.local import path_from_url

        if not os.path.isdir(path_from_url(url)):
            raise StepNotFoundError(f"{url}: no such directory (give a tier root, the directory of step_<N>/)")
    return open_object_store(url)


def pick_step(backend: ObjectStore, step: int | None) -> int:
    """``step`` if committed, else the newest committed one when ``step`` is None (``StepNotFoundError``)."""
    steps = catalog.committed_steps(backend)
    if not steps:
        raise StepNotFoundError(f"no committed checkpoint in {backend.url}")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise StepNotFoundError(f"step {step} is not committed in {backend.url}; committed steps: {steps[-10:]}")
    return step


def _deepspeed_stage(skeleton: Any) -> int | None:
    ds = skeleton.get("deepspeed") if isinstance(skeleton, dict) else None
    stage = ds.get("zero_stage") if isinstance(ds, dict) else None
    return stage if isinstance(stage, int) and not isinstance(stage, bool) else None


def open_step(
    url: str | ObjectStore, step: int | None = None, *, ranks: str | int = "all", sep: str = "."
) -> StepContents:
    """What :func:`consolidate` would return, lazily: every full tensor of ``step`` (newest committed by default)
    with its export name, dtype and shape, read on demand.

    ``ranks``: ``"all"`` consolidates every rank's parts (a DCP step, or a one-rank step); an ``int`` takes that
    rank's part of a multi-rank step alone, as that rank saved it (e.g. a data-parallel replica). Raises
    :class:`ConsolidationError` for what cannot be consolidated.
    """
    backend = _backend(url)
    step = pick_step(backend, step)
    n = int(catalog.commit_info(backend, step).get("ranks", 1))  # type: ignore[call-overload]
    if ranks != "all" and (isinstance(ranks, bool) or not isinstance(ranks, int)):
        raise ConsolidationError(f'ranks must be "all" or a rank number, got {ranks!r}')
    if isinstance(ranks, int) and not 0 <= ranks < n:
        raise ConsolidationError(f"step {step} of {backend.url} has ranks 0..{n - 1}; there is no rank {ranks}")
    r0 = catalog.open_reader(backend, step, rank=0)
    if getattr(r0.manifest, "lossy", None) is not None:
        raise ConsolidationError(
            f"step {step} of {backend.url} is a lossy archive copy (its tensors are approximations); export it from "
            "a tier that holds the lossless copy"
        )
    if "dcp" in (r0.manifest.user or {}):
        if ranks != "all":
            raise ConsolidationError(
                f"step {step} of {backend.url} was saved through DCP: its tensors are stitched from every rank's "
                "chunks (a rank holds parts of tensors only); leave --rank out"
            )
        return _dcp_contents(backend, step, n, r0, sep)
    stage = _deepspeed_stage(r0.manifest.skeleton)
    sk = r0.manifest.skeleton
    engine_files = isinstance(sk, dict) and "deepspeed_tag" in sk and "files" in sk  # AsymstoreCheckpointEngine
    if (stage is not None and stage > 0) or engine_files:
        what = f"DeepSpeed ZeRO-{stage} flat partitions" if not engine_files else "DeepSpeed checkpoint files"
        if ranks != "all":
            raise ConsolidationError(
                f"step {step} of {backend.url} holds {what}: its parameters are consolidated from every rank; "
                "leave --rank out"
            )
        return _deepspeed_contents(backend, step, n, r0, what)
    # after the DeepSpeed case: a ZeRO step's index describes its flat partitions (zero/fp32/<param> ...), its
    # export is the fp32 parameters by name
    index = _global_index(backend, step)
    if index is not None:
        if ranks != "all" and n > 1:
            raise ConsolidationError(
                f"step {step} of {backend.url} records global tensors its ranks hold parts of: they are "
                "consolidated from every rank (a rank alone holds parts of them only); leave --rank out"
            )
        return _global_contents(backend, step, n, r0, index, sep)
    if isinstance(ranks, int) and ranks != 0:
        r0 = catalog.open_reader(backend, step, rank=ranks)
    m = r0.manifest
    if n > 1 and ranks == "all":
        raise ConsolidationError(
            f"step {step} of {backend.url} was saved by {n} ranks without global tensor metadata, so asymstore "
            "cannot tell a tensor sharded over the ranks from one replicated on each: export one rank's part with "
            "--rank R (ranks=R) when every rank holds the full tensors (data parallel), or save through DCP "
            "(asymstore.trainer_hooks.dcp) to export full tensors of sharded models"
        )
    kind = "single" if n == 1 else "rank"
    return StepContents(
        url=backend.url,
        step=step,
        kind=kind,
        ranks=n,
        tensors=_part_tensors(r0, sep),
        skeleton=m.skeleton,
        user=dict(m.user or {}),
    )


def _part_tensors(reader: CheckpointReader, sep: str) -> list[ExportTensor]:
    """The tensors of one rank's part, under every path the skeleton references them by."""
    entries = reader.manifest.layout.by_name()
    out: list[ExportTensor] = []
    for path, stored in tensor_paths(reader.manifest.skeleton):
        e = entries.get(stored)
        if e is None:
            raise CorruptCheckpointError(f"the skeleton names a tensor {stored!r} the layout lacks")
        dtype = from_name(e.dtype)

        def read(e: Any = e, dtype: torch.dtype = dtype) -> torch.Tensor:
            buf = torch.empty(max(e.nbytes, 1), dtype=torch.uint8)
            if e.nbytes:
                reader.read_range_into(e.offset, e.end, buf.numpy().data)
            return buf[: e.nbytes].view(dtype).reshape(e.shape) if e.nbytes else torch.empty(e.shape, dtype=dtype)

        def pieces(size: int, e: Any = e) -> Iterator[memoryview]:
            buf = bytearray(min(max(e.nbytes, 1), size))
            mv = memoryview(buf)
            pos = e.offset
            while pos < e.end:
                k = min(size, e.end - pos)
                reader.read_range_into(pos, pos + k, mv[:k])
                yield mv[:k]
                pos += k

        out.append(ExportTensor(join_path(path, sep), path, stored, dtype, tuple(e.shape), e.nbytes, read, pieces))
    return out


def _deepspeed_contents(backend: ObjectStore, step: int, n: int, r0: CheckpointReader, what: str) -> StepContents:
    """A DeepSpeed step's full fp32 parameters (and the module's buffers), by parameter name: DeepSpeed's
    ``get_fp32_state_dict_from_zero_checkpoint`` for asymstore steps
    (:func:`asymstore.trainer_hooks.deepspeed_tools.fp32_state_dict`)."""
    try:
        from .trainer_hooks.deepspeed_tools import fp32_state_dict
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConsolidationError(f"step {step} of {backend.url} holds {what}; consolidating them needs {e}") from None
    try:
        sd = fp32_state_dict(backend, step)
    except ImportError as e:
        raise ConsolidationError(f"step {step} of {backend.url} holds {what}; consolidating them needs {e}") from None
    except (StateMismatchError, CorruptCheckpointError) as e:
        raise ConsolidationError(
            f"step {step} of {backend.url} holds {what} that cannot be consolidated: {e}"
        ) from None
    first: dict[int, str] = {}
    tensors: list[ExportTensor] = []
    for name, t in sd.items():
        stored = first.setdefault(id(t), name)  # tied parameters: one tensor under each name

        def read(t: torch.Tensor = t) -> torch.Tensor:
            return t

        tensors.append(ExportTensor(name, (name,), stored, t.dtype, tuple(t.shape), t.numel() * t.element_size(), read))
    return StepContents(
        url=backend.url,
        step=step,
        kind="deepspeed",
        ranks=n,
        tensors=tensors,
        skeleton=r0.manifest.skeleton,
        user=dict(r0.manifest.user or {}),
    )


def _global_index(backend: ObjectStore, step: int) -> Any:
    """The step's merged index of global tensors (:mod:`asymstore.globalmeta`), or None when no rank described
    any (steps written before global metadata existed, or states without sharded tensors)."""
    from . import globalmeta

    load = getattr(globalmeta, "load_index", None)
    if load is None:
        return None
    index = load(backend, step)
    return index if getattr(index, "tensors", None) else None


def _unescape_path(name: str) -> Path:
    """A stored name's key path (docs/format.md 8.1: split at ``/``, then ``%2F`` -> ``/`` and ``%25`` -> ``%``)."""
    return tuple(part.replace("%2F", "/").replace("%25", "%") for part in name.split("/"))


def _global_contents(
    backend: ObjectStore, step: int, n: int, r0: CheckpointReader, index: Any, sep: str
) -> StepContents:
    """The full tensors of a step with global tensor metadata: every global tensor read from the parts its
    ranks hold (replicas once), plus rank 0's tensors that are no part of a global tensor (replicated values
    such as buffers and counters, as rank 0 saved them)."""
    from . import globalmeta as gm

    readers: dict[int, CheckpointReader] = {0: r0}
    layouts: dict[int, dict[str, Any]] = {}

    def part(rank: int) -> tuple[CheckpointReader, dict[str, Any]]:
        if rank not in readers:
            readers[rank] = catalog.open_reader(backend, step, rank=rank)
        if rank not in layouts:
            layouts[rank] = readers[rank].manifest.layout.by_name()
        return readers[rank], layouts[rank]

    paths0: dict[str, list[Path]] = {}
    for path, stored in tensor_paths(r0.manifest.skeleton):
        paths0.setdefault(stored, []).append(path)
    described = set(getattr(r0.manifest, "global_parts", None) or {})
    tensors: list[ExportTensor] = []
    for name, g in index.tensors.items():
        shape, dtype = tuple(int(x) for x in g.shape), from_name(g.dtype)
        itemsize = info(dtype).itemsize

        def read(
            g: Any = g, shape: tuple[int, ...] = shape, dtype: torch.dtype = dtype, isz: int = itemsize
        ) -> torch.Tensor:
            out = torch.empty(shape, dtype=dtype)
            flat = out.reshape(-1).view(torch.uint8)
            for r in gm.plan_reads(g, gm.whole(shape)):
                rd, entries = part(r.rank)
                e = entries.get(r.local_name)
                if e is None:
                    raise CorruptCheckpointError(f"step {step}: rank {r.rank} holds no tensor {r.local_name!r}")
                seg = flat[r.dst_start * isz : (r.dst_start + r.numel) * isz]
                rd.read_range_into(e.offset + r.src_start * isz, e.offset + r.src_stop * isz, seg.numpy().data)
            return out

        nbytes = math.prod(shape) * itemsize
        for path in paths0.get(name) or [_unescape_path(name)]:
            tensors.append(ExportTensor(join_path(path, sep), path, name, dtype, shape, nbytes, read))
    rest = [t for t in _part_tensors(r0, sep) if t.stored not in described and t.stored not in index.tensors]
    order = {path: i for i, (path, _) in enumerate(tensor_paths(r0.manifest.skeleton))}
    everything = sorted(tensors + rest, key=lambda t: order.get(t.path, len(order)))  # the state's order
    return StepContents(
        url=backend.url,
        step=step,
        kind="global",
        ranks=n,
        tensors=everything,
        skeleton=r0.manifest.skeleton,
        user=dict(r0.manifest.user or {}),
    )


def _dcp_contents(backend: ObjectStore, step: int, n: int, r0: CheckpointReader, sep: str) -> StepContents:
    """The full tensors of a DCP step, stitched from every rank's chunks with DCP's metadata."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from .trainer_hooks.dcp import metadata_from_json

    try:
        md = metadata_from_json(r0.manifest.user["dcp"])
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise CorruptCheckpointError(
            f"step {step} of {backend.url}: the DCP metadata in rank 0's manifest is malformed ({type(e).__name__}: {e})"
        ) from None
    storage: Mapping[Any, Any] = md.storage_data or {}
    planner: Mapping[str, Any] = md.planner_data or {}
    readers: dict[int, CheckpointReader] = {0: r0}
    layouts: dict[int, dict[str, Any]] = {}

    def part(rank: int) -> tuple[CheckpointReader, dict[str, Any]]:
        if rank not in readers:
            if not 0 <= rank < n:
                raise CorruptCheckpointError(f"step {step}: DCP metadata names rank {rank} of {n}")
            readers[rank] = catalog.open_reader(backend, step, rank=rank)
        if rank not in layouts:
            layouts[rank] = readers[rank].manifest.layout.by_name()
        return readers[rank], layouts[rank]

    from torch.distributed.checkpoint.metadata import MetadataIndex

    tensors: list[ExportTensor] = []
    skipped: list[str] = []
    for fqn, meta in md.state_dict_metadata.items():
        p = planner.get(fqn)
        path: Path = tuple(str(x) for x in p) if isinstance(p, (tuple, list)) and p else (fqn,)
        name = join_path(path, sep)
        if not isinstance(meta, TensorStorageMetadata):
            skipped.append(name)
            continue
        shape = tuple(int(s) for s in meta.size)
        dtype = meta.properties.dtype
        chunks: list[tuple[tuple[int, ...], tuple[int, ...], int, str]] = []
        for c in meta.chunks:
            off, size = tuple(int(o) for o in c.offsets), tuple(int(s) for s in c.sizes)
            where = storage.get(MetadataIndex(fqn, torch.Size(off)))
            if where is None:
                raise ConsolidationError(f"step {step}: DCP chunk {fqn}@{off} has no storage entry")
            chunks.append((off, size, int(where["rank"]), str(where["name"])))
        _check_cover(name, shape, [(o, s) for o, s, _, _ in chunks], step)

        def read(
            chunks: list[tuple[tuple[int, ...], tuple[int, ...], int, str]] = chunks,
            shape: tuple[int, ...] = shape,
            dtype: torch.dtype = dtype,
            name: str = name,
        ) -> torch.Tensor:
            full = torch.empty(shape, dtype=dtype)
            for off, size, rank, stored in chunks:
                rd, entries = part(rank)
                e = entries.get(stored)
                if e is None or tuple(e.shape) != tuple(size) or from_name(e.dtype) != dtype:
                    raise CorruptCheckpointError(
                        f"step {step}: rank {rank} holds no chunk {stored!r} of shape {size} and dtype {dtype} "
                        f"for {name}"
                    )
                buf = torch.empty(max(e.nbytes, 1), dtype=torch.uint8)
                if e.nbytes:
                    rd.read_range_into(e.offset, e.end, buf.numpy().data)
                piece = buf[: e.nbytes].view(dtype).reshape(size) if e.nbytes else torch.empty(size, dtype=dtype)
                idx = tuple(slice(int(o), int(o) + int(s)) for o, s in zip(off, size, strict=True))
                full[idx].copy_(piece)
            return full

        nbytes = math.prod(shape) * info(dtype).itemsize
        tensors.append(ExportTensor(name, path, fqn, dtype, shape, nbytes, read))
    return StepContents(
        url=backend.url, step=step, kind="dcp", ranks=n, tensors=tensors, user=dict(r0.manifest.user), skipped=skipped
    )


def _check_cover(
    name: str, shape: tuple[int, ...], boxes: list[tuple[tuple[int, ...], tuple[int, ...]]], step: int
) -> None:
    """Refuse chunks that leave part of a tensor uncovered, overlap, or lie outside it."""
    total = math.prod(shape)
    vol = 0
    for off, size in boxes:
        if len(off) != len(shape) or len(size) != len(shape):
            raise ConsolidationError(f"step {step}: a DCP chunk of {name} has {len(off)} dimensions, not {len(shape)}")
        if any(o < 0 or s < 0 or o + s > d for o, s, d in zip(off, size, shape, strict=True)):
            raise ConsolidationError(f"step {step}: a DCP chunk of {name} at {off} size {size} lies outside {shape}")
        vol += math.prod(size)
    for i, (o1, s1) in enumerate(boxes):
        for o2, s2 in boxes[i + 1 :]:
            if (
                math.prod(s1)
                and math.prod(s2)
                and all(a < c + t and c < a + s for a, s, c, t in zip(o1, s1, o2, s2, strict=True))
            ):
                raise ConsolidationError(f"step {step}: DCP chunks of {name} at {o1} and {o2} overlap")
    if vol != total:
        raise ConsolidationError(
            f"step {step}: the DCP chunks of {name} cover {vol} of its {total} elements; the step holds part of the "
            "tensor only, so it cannot be exported whole"
        )


# --- selecting and naming -----------------------------------------------------------------------------------
def select(
    tensors: Iterable[ExportTensor],
    *,
    filters: Sequence[str] = (),
    strip_prefix: str | None = None,
    renames: Sequence[str] | Mapping[str, str] = (),
) -> list[tuple[str, ExportTensor]]:
    """``(output name, tensor)`` pairs, in order: tensors whose export name (or stored name) matches any glob of
    ``filters`` (all when empty); ``strip_prefix`` removed from the names that start with it; then ``renames``
    (``"OLD=NEW"`` strings or a mapping; OLD is an output name, an export name or a stored name).

    Raises :class:`ConsolidationError` when nothing matches, a rename names no tensor, or two tensors would get
    the same output name.
    """
    tensors = list(tensors)
    picked = [
        t
        for t in tensors
        if not filters or any(fnmatch.fnmatchcase(t.name, g) or fnmatch.fnmatchcase(t.stored, g) for g in filters)
    ]
    if not picked:
        raise NoMatchError(
            f"no tensor matches {', '.join(map(repr, filters))}" if filters else "the step has no tensors to export"
        )
    out = [
        (t.name[len(strip_prefix) :] if strip_prefix and t.name.startswith(strip_prefix) else t.name, t) for t in picked
    ]
    if strip_prefix and not any(t.name.startswith(strip_prefix) for t in picked):
        raise ConsolidationError(f"no exported tensor name starts with {strip_prefix!r}")
    pairs: list[tuple[str, str]] = []
    if isinstance(renames, Mapping):
        pairs = list(renames.items())
    else:
        for r in renames:
            old, sep, new = r.partition("=")
            if not sep or not old or not new:
                raise ConsolidationError(f"--rename takes OLD=NEW, got {r!r}")
            pairs.append((old, new))
    for old, new in pairs:
        hits = [i for i, (n, _) in enumerate(out) if n == old]
        hits = hits or [i for i, (_, t) in enumerate(out) if old in (t.name, t.stored)]
        if not hits:
            raise ConsolidationError(f"--rename {old}={new}: no tensor named {old!r} is exported")
        for i in hits:
            out[i] = (new, out[i][1])
    seen: dict[str, ExportTensor] = {}
    for n, t in out:
        if n in seen:
            raise ConsolidationError(
                f"two tensors would be exported as {n!r} ({seen[n].stored!r} and {t.stored!r}); give one another "
                "name with --rename, or join keys with another separator (--sep /)"
            )
        seen[n] = t
    return out


def consolidate(
    url: str | ObjectStore,
    step: int | None = None,
    ranks: str | int = "all",
    *,
    sep: str = ".",
    filters: Sequence[str] = (),
    strip_prefix: str | None = None,
) -> dict[str, torch.Tensor]:
    """Every full tensor of ``step`` (newest committed by default), by export name (:func:`open_step`).

    The asymstore counterpart of DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` and DCP's
    ``dcp_to_torch_save``: a flat ``{name: tensor}`` of CPU tensors in their saved dtypes; tied weights are the same
    tensor object under each name. ``filters`` (globs) and ``strip_prefix`` as in :func:`select`, e.g.
    ``consolidate(url, filters=["model.*"], strip_prefix="model.")`` for a model's own state dict.
    """
    contents = open_step(url, step, ranks=ranks, sep=sep)
    cache: dict[str, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in select(contents.tensors, filters=filters, strip_prefix=strip_prefix):
        if t.stored not in cache:
            cache[t.stored] = t.read()
        out[name] = cache[t.stored]
    return out


# --- writing safetensors --------------------------------------------------------------------------------------
def _check_dtypes(items: Sequence[tuple[str, ExportTensor]]) -> None:
    bad = [
        f"{n} ({str(t.dtype).removeprefix('torch.')})" for n, t in items if info(t.dtype).torch_name not in ST_DTYPES
    ]
    if bad:
        raise ConsolidationError(
            "safetensors has no dtype for: " + ", ".join(bad[:10]) + "; leave them out with --filter"
        )
    if any(n == ST_RESERVED for n, _ in items):
        raise ConsolidationError(
            f"a tensor is called {ST_RESERVED!r}, the key safetensors reserves for its metadata, so a safetensors "
            f"file cannot hold it; export it under another name with --rename {ST_RESERVED}=NEW_NAME, or leave it "
            "out with --filter"
        )


def _header(
    items: Sequence[tuple[str, ExportTensor]], metadata: Mapping[str, str]
) -> tuple[bytes, list[tuple[str, ExportTensor]]]:
    # safetensors' own order: larger element sizes first, then by name, so every tensor is aligned
    order = sorted(items, key=lambda it: (-info(it[1].dtype).itemsize, it[0]))
    header: dict[str, Any] = {}
    off = 0
    for n, t in order:
        header[n] = {
            "dtype": ST_DTYPES[info(t.dtype).torch_name],
            "shape": list(t.shape),
            "data_offsets": [off, off + t.nbytes],
        }
        off += t.nbytes
    header[ST_RESERVED] = dict(metadata)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    if len(hb) > ST_MAX_HEADER:
        raise ConsolidationError(
            f"the safetensors header would be {len(hb)} bytes; safetensors reads at most {ST_MAX_HEADER} "
            "(export fewer tensors with --filter, or shards with --hf)"
        )
    return hb, order


def write_safetensors(
    path: str | os.PathLike[str],
    items: Sequence[tuple[str, ExportTensor]],
    metadata: Mapping[str, str] | None = None,
    *,
    progress: Callable[[int], None] | None = None,
    done: int = 0,
) -> int:
    """Write ``items`` (``(name, tensor)``) to a safetensors file, atomically, one tensor (or 64 MiB piece) in
    memory at a time; tied tensors are written under each name. Returns the bytes of tensor data written."""
    _check_dtypes(items)
    hb, order = _header(items, {"format": "pt", **(metadata or {})})
    written = 0
    with atomic_file(os.fspath(path)) as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for _, t in order:
            got = 0
            for piece in t.pieces():
                f.write(piece)
                got += len(piece)
                if progress is not None:
                    progress(done + written + got)
            if got != t.nbytes:
                raise CorruptCheckpointError(f"{t.name}: read {got} bytes, expected {t.nbytes}")
            written += got
    return written


def export_safetensors(
    url: str | ObjectStore,
    out: str | os.PathLike[str],
    step: int | None = None,
    *,
    ranks: str | int = "all",
    sep: str = ".",
    filters: Sequence[str] = (),
    strip_prefix: str | None = None,
    renames: Sequence[str] | Mapping[str, str] = (),
    metadata: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Export a step's full tensors to one safetensors file; returns the summary :func:`export_hf` also returns."""
    contents = open_step(url, step, ranks=ranks, sep=sep)
    items = select(contents.tensors, filters=filters, strip_prefix=strip_prefix, renames=renames)
    meta = {"asymstore.step": json.dumps(contents.step), **(metadata or {})}
    nbytes = write_safetensors(out, items, meta)
    return summary(contents, items, {os.fspath(out): [n for n, _ in items]}, nbytes)


def summary(
    contents: StepContents, items: Sequence[tuple[str, ExportTensor]], files: Mapping[str, Sequence[str]], nbytes: int
) -> dict[str, Any]:
    """The JSON summary of an export: step, kind, files and their tensors, tied names, skipped items."""
    file_of = {n: f for f, names in files.items() for n in names}
    groups: dict[str, list[str]] = {}
    for n, t in items:
        groups.setdefault(t.stored, []).append(n)
    return {
        "url": contents.url,
        "step": contents.step,
        "kind": contents.kind,
        "ranks": contents.ranks,
        "files": [{"path": f, "tensors": len(ns)} for f, ns in files.items()],
        "tensors": [
            {"name": n, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "file": file_of.get(n)}
            for n, t in items
        ],
        "bytes": nbytes,
        "tied": [g for g in groups.values() if len(g) > 1],
        "skipped": list(contents.skipped),
    }


# --- Hugging Face folders ----------------------------------------------------------------------------------------
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*$", re.IGNORECASE)


def parse_size(s: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"500MiB"`` -> 524_288_000, ``1024`` -> 1024 (decimal units like Hugging
    Face's ``max_shard_size``; ``KiB``/``MiB``/``GiB`` binary)."""
    if isinstance(s, int) and not isinstance(s, bool):
        if s <= 0:
            raise ConsolidationError(f"a size must be positive, got {s}")
        return s
    m = _SIZE_RE.match(str(s))
    if m is None:
        raise ConsolidationError(f"not a size: {s!r} (e.g. 5GB, 500MB, 2GiB, 1000000)")
    num, unit = float(m.group(1)), m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    exp = {"": 0, "B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.replace("I", "").replace("B", "") or ""]
    n = int(num * base**exp)
    if n <= 0:
        raise ConsolidationError(f"a size must be positive, got {s!r}")
    return n


def hf_default_selection(contents: StepContents) -> tuple[list[str], str | None]:
    """The (filters, strip prefix) ``--hf`` uses when none are given: the model's own state dict.

    A state with a top-level ``model`` key (the trainer hooks', ``{"model": sd, "optim": ...}``, DCP's
    ``model.``-prefixed FQNs) exports the tensors under it without the prefix; any other state exports as it is.
    """
    if any(t.path[:1] == ("model",) and len(t.path) > 1 for t in contents.tensors):
        return ["model.*"], "model."
    return [], None


HF_FILES = ("model.safetensors", "model.safetensors.index.json")


def _shards(items: Sequence[tuple[str, ExportTensor]], max_bytes: int) -> list[list[tuple[str, ExportTensor]]]:
    """Hugging Face's split: tensors in order, a new shard when the next would pass ``max_bytes`` (a larger
    tensor gets a shard of its own)."""
    shards: list[list[tuple[str, ExportTensor]]] = [[]]
    size = 0
    for it in items:
        if shards[-1] and size + it[1].nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += it[1].nbytes
    return shards


def export_hf(
    url: str | ObjectStore,
    out_dir: str | os.PathLike[str],
    step: int | None = None,
    *,
    ranks: str | int = "all",
    filters: Sequence[str] | None = None,
    strip_prefix: str | None = None,
    renames: Sequence[str] | Mapping[str, str] = (),
    config: str | os.PathLike[str] | None = None,
    generation_config: str | os.PathLike[str] | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    progress: Callable[[int], None] | None = None,
    contents: StepContents | None = None,
) -> dict[str, Any]:
    """Write a Hugging Face model folder: ``model.safetensors``, or over ``max_shard_size``
    ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``, and a copy of ``config`` (as
    ``config.json``) and ``generation_config`` (as ``generation_config.json``), so
    ``AutoModel*.from_pretrained(out_dir)`` loads it.

    Without ``filters``/``strip_prefix`` the model's own state dict is taken (:func:`hf_default_selection`). Names
    are joined with ``"."``; tied weights are written under each name (as ``state_dict()`` lists them).
    ``out_dir`` may exist; weight files already in it are refused unless ``force`` (they are then removed).
    ``contents``: the step as :func:`open_step` gave it (``sep="."``), to open it once. Returns the summary
    (``summary()``)."""
    if contents is None:
        contents = open_step(url, step, ranks=ranks, sep=".")
    if filters is None and strip_prefix is None:
        filters, strip_prefix = hf_default_selection(contents)
    items = select(contents.tensors, filters=filters or (), strip_prefix=strip_prefix, renames=renames)
    _check_dtypes(items)
    max_bytes = parse_size(max_shard_size)
    for p, what in ((config, "config"), (generation_config, "generation config")):
        if p is not None:
            try:
                with open(p, encoding="utf-8") as f:
                    json.load(f)
            except (OSError, ValueError) as e:
                raise ConsolidationError(f"the {what} {os.fspath(p)!r} is not a readable JSON file ({e})") from None
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    old = [n for n in os.listdir(out) if n in HF_FILES or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", n)]
    if old and not force:
        raise ConsolidationError(
            f"{out} already holds weights ({', '.join(sorted(old)[:3])}); pass --force to replace them"
        )
    for n in old:
        os.remove(os.path.join(out, n))
    shards = _shards(items, max_bytes)
    meta = {"asymstore.step": json.dumps(contents.step)}
    files: dict[str, list[str]] = {}
    written = 0
    if len(shards) == 1:
        written = write_safetensors(os.path.join(out, HF_FILES[0]), shards[0], meta, progress=progress)
        files[os.path.join(out, HF_FILES[0])] = [n for n, _ in shards[0]]
    else:
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            written += write_safetensors(os.path.join(out, fname), shard, meta, progress=progress, done=written)
            files[os.path.join(out, fname)] = [n for n, _ in shard]
            weight_map.update({n: fname for n, _ in shard})
        index = {"metadata": {"total_size": written}, "weight_map": dict(sorted(weight_map.items()))}
        with atomic_file(os.path.join(out, HF_FILES[1])) as f:
            f.write(json.dumps(index, indent=2).encode() + b"\n")
    for p, dest in ((config, "config.json"), (generation_config, "generation_config.json")):
        if p is not None and os.path.abspath(p) != os.path.abspath(os.path.join(out, dest)):
            with open(p, "rb") as src, atomic_file(os.path.join(out, dest)) as f:
                shutil.copyfileobj(src, f)
    return summary(contents, items, files, written)


# --- DCP bridge -----------------------------------------------------------------------------------------------
def dcp_to_torch_save(
    checkpoint: str | os.PathLike[str], torch_save_path: str | os.PathLike[str], step: int | None = None
) -> None:
    """``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` for asymstore DCP steps.

    ``checkpoint``: a DCP checkpoint id ``"<tier url>/step_<N>"`` or a tier URL (then ``step``, default the
    newest). Loads the whole state on this process, with DCP's own planner as torch's function does (tensors
    full, under the state's structure; non-tensor values unpickled by DCP's default planner, so only convert
    checkpoints you trust) and writes it with ``torch.save``. torch's function itself cannot read asymstore
    steps: it opens ``FileSystemReader`` on a directory of ``.metadata`` + ``.distcp`` files unconditionally.
    """
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    from .trainer_hooks.dcp import AsymStorageReader, parse_checkpoint_id

    cid = os.fspath(checkpoint)
    if AsymStorageReader.validate_checkpoint_id(cid):
        if step is not None:
            raise ConsolidationError(f"{cid!r} names its step; leave step out")
        url, step = parse_checkpoint_id(cid)
    else:
        url = cid
    backend = _backend(url)
    step = pick_step(backend, step)
    if "dcp" not in (catalog.open_reader(backend, step, rank=0).manifest.user or {}):
        raise ConsolidationError(
            f"step {step} of {url} was not written through DCP; use asymstore.export.consolidate() or Store.restore()"
        )
    reader = AsymStorageReader(url, step=step)
    try:
        sd: dict[str, Any] = {}
        planner = _EmptyStateDictLoadPlanner()  # type: ignore[no-untyped-call]
        _load_state_dict(sd, storage_reader=reader, planner=planner, no_dist=True)
    finally:
        reader.close()
    torch.save(sd, os.fspath(torch_save_path))
