"""Reading parts of global tensors on any world size: execute :func:`asymstore.globalmeta.plan_reads` on a store.

A rank restoring a step saved by another number of ranks knows, for every global tensor, which part it
needs (its target :class:`~asymstore.globalmeta.Box` or :class:`~asymstore.globalmeta.FlatRange`). The
step's merged index (:func:`load_index`) says which ranks hold which parts; :func:`read_global` reads only
the byte ranges needed, straight into the target tensors, from the fastest copy of each rank's directory
(host memory, then the tiers in chain order: :meth:`asymstore.store.Store.open_checkpoint`). Each range is
verified (the chunk checksums of every chunk it touches) and a damaged range is read from the next copy;
with no good copy left a :class:`~asymstore.errors.CorruptCheckpointError` names the object.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from . import globalmeta as gm
from .chunkcache import cached_source
from .dtypes import info
from .errors import AsymstoreError, ConfigError, StateMismatchError, StepNotFoundError

if TYPE_CHECKING:
    from .interfaces import RangeSource
    from .lazy import LazyCheckpoint
    from .store import Store

log = logging.getLogger("asymstore.reshard")

#: a stored local tensor read by more runs than this is read once, over the span of its runs, then scattered
_COALESCE_RUNS = 8


@dataclass
class ReadStats:
    """What :func:`read_global` read: ranks opened, copy runs, and stream bytes fetched (before decoding)."""

    ranks: list[int] = field(default_factory=list)
    runs: int = 0
    bytes: int = 0


def load_index(store: Store, step: int) -> gm.GlobalIndex:
    """The merged index of ``step`` from the first tier that has it (host memory for a single-rank store that
    holds the step only there)."""
    errors: list[str] = []
    for src in store._iter_read_order(step, None):
        if src.backend is None:
            slot = store.host.find(step)
            if slot is not None and slot.content is not None and store.world_size == 1:
                return gm.build_index(step, 1, {0: dict(slot.content.global_parts)})
            continue
        try:
            return gm.load_index(src.backend, step)
        except AsymstoreError as e:
            errors.append(f"{src.name}: {e}")
            log.warning("step %s: the index on %s is unreadable (%s); trying the next tier", step, src.name, e)
    if errors:
        from .errors import CorruptCheckpointError

        raise CorruptCheckpointError(f"step {step}: no readable index ({'; '.join(errors)})")
    raise StepNotFoundError(f"step {step} is not committed on any tier")


def read_global(
    store: Store,
    step: int,
    targets: Mapping[str, tuple[gm.Region, torch.Tensor]],
    *,
    index: gm.GlobalIndex | None = None,
    prefer_rank: int | None = None,
    checkpoints: dict[int, LazyCheckpoint] | None = None,
) -> ReadStats:
    """Fill each ``targets[name] = (region, out)`` with that region of global tensor ``name`` of ``step``.

    ``out`` is a contiguous CPU tensor of the global tensor's dtype with the region's number of elements (its
    elements in C-order of the region). Only the stored byte ranges the regions need are read. Replicated
    parts are read from ``prefer_rank`` when it holds a copy (e.g. this rank on an unchanged world size).
    ``checkpoints``: rank -> opened checkpoint, reused and filled in (to open each rank once)."""
    idx = index if index is not None else load_index(store, step)
    per_rank: dict[int, list[tuple[gm.Read, torch.Tensor, int]]] = {}
    for name, (region, out) in targets.items():
        g = idx.tensors.get(name)
        if g is None:
            if region.numel == 0:
                continue
            raise StateMismatchError(f"step {step} holds no global tensor {name!r}")
        want = info(out.dtype).torch_name
        if want != g.dtype:
            raise StateMismatchError(f"{name}: step {step} holds {g.dtype}, the target is {want}")
        if out.numel() != region.numel or not out.is_contiguous() or out.device.type != "cpu":
            raise ConfigError(
                f"{name}: the target must be a contiguous CPU tensor of {region.numel} elements, "
                f"got {tuple(out.shape)} on {out.device}"
            )
        for r in gm.plan_reads(g, region, prefer_rank=prefer_rank):
            per_rank.setdefault(r.rank, []).append((r, out, info(out.dtype).itemsize))
    stats = ReadStats(ranks=sorted(per_rank))
    opened = checkpoints if checkpoints is not None else {}
    for rank in stats.ranks:
        ck = opened.get(rank)
        if ck is None:
            ck = opened[rank] = store.open_checkpoint(step, rank=rank)
        before = ck.bytes_read
        entries = ck.layout.by_name()
        by_local: dict[str, list[tuple[gm.Read, torch.Tensor, int]]] = {}
        for item in per_rank[rank]:
            by_local.setdefault(item[0].local_name, []).append(item)
        located = []
        for lname, items in by_local.items():
            e = entries.get(lname)
            if e is None:
                raise StateMismatchError(f"step {step}: rank {rank} holds no tensor {lname!r} (its index says so)")
            located.append((e.offset, items))
        # in stream order through a chunk cache: small neighbouring tensors share chunks, each fetched (and
        # verified and decoded) once instead of once per tensor
        src: RangeSource = cached_source(ck)
        for offset, items in sorted(located, key=lambda x: x[0]):
            stats.runs += len(items)
            _copy(src, offset, items)
        stats.bytes += ck.bytes_read - before
    return stats


def _copy(src: RangeSource, base: int, items: list[tuple[gm.Read, torch.Tensor, int]]) -> None:
    """Read the runs of one stored tensor (stream offset ``base``) from ``src`` into their targets."""
    if len(items) <= _COALESCE_RUNS:
        for r, out, isz in items:
            arr = out.view(-1).view(torch.uint8).numpy()
            src.read_range_into(
                base + r.src_start * isz, base + r.src_stop * isz, arr[r.dst_start * isz :][: r.numel * isz].data
            )
        return
    isz = items[0][2]
    lo = min(r.src_start for r, _, _ in items)
    hi = max(r.src_stop for r, _, _ in items)
    buf = torch.empty((hi - lo) * isz, dtype=torch.uint8)
    src.read_range_into(base + lo * isz, base + hi * isz, buf.numpy().data)
    for r, out, isz in items:
        dst = out.view(-1).view(torch.uint8)
        dst[r.dst_start * isz : (r.dst_start + r.numel) * isz] = buf[(r.src_start - lo) * isz : (r.src_stop - lo) * isz]


def region_numel(region: gm.Region) -> int:
    """Elements of a region (a convenience for allocating targets)."""
    return region.numel


def empty_for(region: gm.Region, dtype: torch.dtype, shape: Any = None) -> torch.Tensor:
    """A new CPU tensor for ``region``: shaped as the box (or ``shape``), flat for a flat range."""
    if shape is None:
        shape = region.lengths if isinstance(region, gm.Box) else (region.length,)
    return torch.empty(tuple(shape), dtype=dtype)
