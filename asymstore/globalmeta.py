"""Global tensor metadata: which part of a global tensor each stored (local) tensor holds.

A training job that shards its state (FSDP2 / DTensor, DeepSpeed ZeRO, tensor parallelism) stores on each rank
*local* tensors that are parts of *global* tensors. To restore on another world size, a rank must know, for
every global tensor, where each part lies. This module is that description, pure data and its JSON form
(docs/format.md section 8.2), plus the two functions every resharding restore needs:

* :func:`build_index` merges the ranks' descriptions of a step into a :class:`GlobalIndex` and validates that
  the parts of each global tensor cover it exactly once (replicated copies allowed, see below);
* :func:`plan_reads` lists, for a target part on the new world size, which element ranges of which stored
  local tensors of which ranks to read, and where each goes.

A part (:class:`Piece`) says: global ``name``, ``dtype`` and ``shape``; the ``region`` of the global tensor it
holds, a :class:`Box` (offsets and lengths per dimension: DTensor / ShardedTensor shards, FSDP2) or a
:class:`FlatRange` (elements ``[start, start + length)`` of the C-order flattened global tensor: ZeRO's flat
partitions); and ``local_offset``, the element of the local tensor (flattened, C-order) where the region's
elements begin, stored C-order contiguous. A local tensor holds one or more pieces (a ZeRO flat partition
holds pieces of many parameters); its dtype is the pieces' dtype.

**Replicas.** Two parts of one global tensor with *identical* regions (same box, or same flat range) are
copies of the same elements (a ``Replicate`` placement, or data-parallel replicas): coverage counts them once,
and :func:`plan_reads` reads one of them (the preferred rank's when it holds one, else the lowest rank's).
Parts whose regions overlap without being identical are refused (:class:`CorruptCheckpointError`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ConfigError, CorruptCheckpointError, UnsupportedValueError

#: the merged index of a multi-rank step: ``step_<S>/INDEX`` (docs/format.md section 9.3)
INDEX_KEY = "INDEX"
#: the most dimensions a global tensor may have (as the layout's tensors)
MAX_DIMS = 64
#: a coverage check builds a grid of at most this many cells; beyond, boxes are compared pairwise
_MAX_GRID_CELLS = 1 << 22


# --- regions ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Box:
    """The elements ``offsets[d] <= i_d < offsets[d] + lengths[d]`` of a global tensor (one per dimension)."""

    offsets: tuple[int, ...]
    lengths: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Elements in the box."""
        return math.prod(self.lengths)

    def to_json(self) -> list[Any]:
        """``["box", offsets, lengths]``."""
        return ["box", list(self.offsets), list(self.lengths)]


@dataclass(frozen=True)
class FlatRange:
    """The elements ``[start, start + length)`` of the C-order flattened global tensor."""

    start: int
    length: int

    @property
    def numel(self) -> int:
        """Elements in the range."""
        return self.length

    def to_json(self) -> list[Any]:
        """``["flat", start, length]``."""
        return ["flat", self.start, self.length]


Region = Box | FlatRange


@dataclass(frozen=True)
class Piece:
    """One part of global tensor ``name`` held by a local tensor, from its element ``local_offset`` on."""

    name: str
    dtype: str  # torch dtype name without "torch." (docs/format.md section 5.2)
    shape: tuple[int, ...]  # the global shape
    region: Region
    local_offset: int = 0

    @property
    def numel(self) -> int:
        """Elements of the global tensor this piece holds."""
        return self.region.numel

    def to_json(self) -> list[Any]:
        """``[name, dtype, shape, local_offset, kind, a, b]`` (docs/format.md section 8.2)."""
        return [self.name, self.dtype, list(self.shape), self.local_offset, *self.region.to_json()]


def box(offsets: Sequence[int], lengths: Sequence[int]) -> Box:
    """A :class:`Box` from two sequences."""
    return Box(tuple(int(x) for x in offsets), tuple(int(x) for x in lengths))


def whole(shape: Sequence[int]) -> Box:
    """The box of a whole tensor of ``shape``."""
    return Box((0,) * len(shape), tuple(int(x) for x in shape))


#: the description of one local tensor: the pieces it holds
Parts = tuple[Piece, ...]


# --- checks ---------------------------------------------------------------------------------------------------
def check_piece(p: Piece, where: str, *, error: type[Exception] = CorruptCheckpointError) -> None:
    """``p``'s region lies inside its global shape; every number is a non-negative integer."""

    def fail(problem: str) -> None:
        msg = f"{where}: {problem}"
        raise CorruptCheckpointError(msg, (where,)) if error is CorruptCheckpointError else error(msg)

    from .validate import DTYPE_ITEMSIZE

    if p.dtype not in DTYPE_ITEMSIZE:
        fail(f"dtype {p.dtype[:40]!r} is not a dtype of the format")
    if len(p.shape) > MAX_DIMS or any(type(n) is not int or n < 0 for n in p.shape):
        fail(f"global shape {list(p.shape)[:8]} is not a list of at most {MAX_DIMS} non-negative integers")
    if type(p.local_offset) is not int or p.local_offset < 0:
        fail(f"local_offset {p.local_offset!r} is not a non-negative integer")
    r = p.region
    if isinstance(r, Box):
        if len(r.offsets) != len(p.shape) or len(r.lengths) != len(p.shape):
            fail(f"the box has {len(r.offsets)} offsets and {len(r.lengths)} lengths for a {len(p.shape)}-d tensor")
        for d, (o, n, s) in enumerate(zip(r.offsets, r.lengths, p.shape, strict=True)):
            if type(o) is not int or type(n) is not int or o < 0 or n < 0 or o + n > s:
                fail(f"box dimension {d}: [{o}, {o}+{n}) is not inside [0, {s})")
    else:
        total = math.prod(p.shape)
        if type(r.start) is not int or type(r.length) is not int or r.start < 0 or r.length < 0:
            fail(f"flat range {r.start!r}+{r.length!r} is not two non-negative integers")
        if r.start + r.length > total:
            fail(f"flat range [{r.start}, {r.start + r.length}) is not inside the {total} elements of {list(p.shape)}")


def check_parts(
    parts: Mapping[str, Sequence[Piece]],
    local: Mapping[str, tuple[str, tuple[int, ...]]],
    where: str,
    *,
    error: type[Exception] = CorruptCheckpointError,
) -> None:
    """Check a rank's descriptions against its local tensors (``local``: name -> (dtype, shape)): each
    described tensor exists and has its pieces' dtype, each piece is valid and inside the local tensor, and
    the pieces of one local tensor do not overlap."""

    def fail(member: str, problem: str) -> None:
        msg = f"{where}: invalid global_parts[{member[:80]!r}]: {problem}"
        raise CorruptCheckpointError(msg, (where,)) if error is CorruptCheckpointError else error(msg)

    for name, pieces in parts.items():
        if name not in local:
            fail(name, "no tensor of that name is stored")
        dt, shape = local[name]
        n = math.prod(shape)
        spans: list[tuple[int, int]] = []
        for i, p in enumerate(pieces):
            check_piece(p, f"{where}: global_parts[{name[:80]!r}][{i}]", error=error)
            if p.dtype != dt:
                fail(name, f"piece {i} is {p.dtype}, the stored tensor {dt}")
            if p.local_offset + p.numel > n:
                fail(name, f"piece {i} needs elements [{p.local_offset}, {p.local_offset + p.numel}), it has {n}")
            if p.numel:
                spans.append((p.local_offset, p.local_offset + p.numel))
        spans.sort()
        for (_, e0), (s1, _) in itertools.pairwise(spans):
            if s1 < e0:
                fail(name, f"two pieces overlap at local element {s1}")


def merge_parts(auto: Mapping[str, Sequence[Piece]], given: Mapping[str, Any], layout: Any) -> dict[str, Parts]:
    """The descriptions of a save: those of its DTensors (``auto``) and those given by the caller (tensor name ->
    a :class:`Piece` or a sequence of them; they replace an automatic one of the same name), checked against
    ``layout`` (:class:`~asymstore.layout.Layout`): :class:`ConfigError` names a bad one."""
    out: dict[str, Parts] = {n: tuple(v) for n, v in auto.items()}
    for name, v in given.items():
        pieces = (v,) if isinstance(v, Piece) else tuple(v)
        if not all(isinstance(p, Piece) for p in pieces):
            raise ConfigError(f"global_parts[{name!r}]: expected a globalmeta.Piece or a list of them")
        out[name] = pieces
    check_parts(out, {e.name: (e.dtype, e.shape) for e in layout.tensors}, "global_parts", error=ConfigError)
    return out


# --- JSON --------------------------------------------------------------------------------------------------
def _region_from_json(kind: Any, a: Any, b: Any, c: Any) -> Region:
    if kind == "box":
        offs = tuple(c.integer(x, f"offsets[{i}]") for i, x in enumerate(c.arr(a, "offsets")))
        lens = tuple(c.integer(x, f"lengths[{i}]") for i, x in enumerate(c.arr(b, "lengths")))
        return Box(offs, lens)
    if kind == "flat":
        return FlatRange(c.integer(a, "start"), c.integer(b, "length"))
    c.fail("kind", f"{str(kind)[:20]!r} is not 'box' or 'flat'")
    raise AssertionError  # pragma: no cover


def piece_from_json(v: Any, where: str) -> Piece:
    """A piece from its JSON array ``[name, dtype, shape, local_offset, kind, a, b]``, checked."""
    from .validate import _Check

    c = _Check(where)
    name, dtype, shape, off, kind, a, b = c.arr(v, "piece", 7)
    c.text(name, "name")
    c.text(dtype, "dtype")
    shp = tuple(c.integer(x, f"shape[{i}]") for i, x in enumerate(c.arr(shape, "shape")))
    if len(shp) > MAX_DIMS:
        c.fail("shape", f"{len(shp)} dimensions, at most {MAX_DIMS}")
    p = Piece(name, dtype, shp, _region_from_json(kind, a, b, c), c.integer(off, "local_offset"))
    check_piece(p, where)
    return p


def parts_to_json(parts: Mapping[str, Sequence[Piece]]) -> dict[str, list[list[Any]]]:
    """The manifest member ``global_parts``: local tensor name -> its pieces (sorted by name)."""
    return {n: [p.to_json() for p in parts[n]] for n in sorted(parts)}


def parts_from_json(d: Any, where: str) -> dict[str, Parts]:
    """``global_parts`` from JSON, each piece checked (not yet against the layout: :func:`check_parts`)."""
    from .validate import _Check

    c = _Check(where)
    out: dict[str, Parts] = {}
    for name, pieces in c.obj(d, "global_parts").items():
        out[name] = tuple(
            piece_from_json(v, f"{where}: global_parts[{name[:80]!r}][{i}]")
            for i, v in enumerate(c.arr(pieces, f"global_parts[{name[:80]!r}]"))
        )
    return out


# --- DTensors ---------------------------------------------------------------------------------------------
def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (without importing it when unused)."""
    cls = type(t)
    return cls.__name__ == "DTensor" and cls.__module__.startswith("torch.distributed")


def describe_dtensor(t: Any, name: str) -> tuple[Any, Piece]:
    """This rank's local tensor of DTensor ``t`` and the box of the global tensor it holds.

    Placements ``Shard(d)`` (even or uneven: torch's chunking, possibly several mesh dimensions on one
    tensor dimension) and ``Replicate()`` over any device mesh are described; ``Partial`` (unreduced values)
    and strided shards are refused with :class:`UnsupportedValueError`. A rank outside the mesh holds an
    empty box."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for p in t.placements:
        if isinstance(p, Replicate) or type(p) is Shard:
            continue
        raise UnsupportedValueError(
            f"{name}: a DTensor placed {p} cannot be described as a part of a global tensor; "
            "redistribute it to Shard/Replicate placements first (e.g. t.redistribute(placements=[Replicate()]))"
        )
    local = t.to_local()
    shape = tuple(int(x) for x in t.shape)
    lshape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    lshape = tuple(int(x) for x in lshape)
    if tuple(local.shape) != lshape:
        raise UnsupportedValueError(
            f"{name}: the DTensor's local tensor is {tuple(local.shape)}, its placements give {lshape} "
            "(a padded local shard?); store t.full_tensor() or an unpadded shard"
        )
    from .dtypes import info

    dtype = info(local.dtype).torch_name
    return local, Piece(name, dtype, shape, Box(tuple(int(x) for x in offset), lshape))


def chunk_box(shape: Sequence[int], mesh: Sequence[int], coord: Sequence[int], placements: Sequence[Any]) -> Box:
    """The box of mesh coordinate ``coord`` for placements given as ``("shard", dim)`` or ``("replicate",)``
    per mesh dimension, with torch's chunking (``ceil(n / k)`` per chunk, trailing chunks short or empty).
    Pure: the same as DTensor's ``compute_local_shape_and_global_offset``, for any rank."""
    offs = [0] * len(shape)
    lens = [int(s) for s in shape]
    for k, c, p in zip(mesh, coord, placements, strict=True):
        if p[0] == "replicate":
            continue
        d = p[1]
        size = lens[d]
        chunk = -(-size // k) if k else 0
        lo = min(chunk * c, size)
        hi = min(chunk * (c + 1), size)
        offs[d] += lo
        lens[d] = hi - lo
    return Box(tuple(offs), tuple(lens))


# --- flat ranges as boxes -------------------------------------------------------------------------------------
def flat_boxes(start: int, length: int, shape: Sequence[int]) -> list[tuple[int, Box]]:
    """Flat range ``[start, start + length)`` of a C-order tensor of ``shape`` as at most ``2 * ndim - 1``
    boxes, each C-order contiguous in the range: ``(element offset within the range, box)`` in order."""
    shape = tuple(shape)
    out: list[tuple[int, Box]] = []

    def rec(a: int, b: int, dims: tuple[int, ...], prefix: tuple[int, ...]) -> None:
        if a >= b:
            return
        k = len(prefix)
        if not dims:
            out.append((0, Box(prefix, (1,) * k)))
            return
        inner = math.prod(dims[1:])
        if inner == 0:
            return
        i0, r0 = divmod(a, inner)
        i1, r1 = divmod(b, inner)
        if r0:
            end = inner if i1 > i0 else r1
            rec(r0, end, dims[1:], (*prefix, i0))
            if i1 == i0:
                return
            i0 += 1
        if i1 > i0:
            out.append((0, Box((*prefix, i0) + (0,) * (len(dims) - 1), (1,) * k + (i1 - i0, *dims[1:]))))
        if r1:
            rec(0, r1, dims[1:], (*prefix, i1))

    rec(start, start + length, shape, ())
    res: list[tuple[int, Box]] = []
    pos = 0
    for _, b in out:
        res.append((pos, b))
        pos += b.numel
    return res


def region_boxes(region: Region, shape: Sequence[int]) -> list[tuple[int, Box]]:
    """A region as C-order contiguous boxes with their element offsets within the region."""
    if isinstance(region, Box):
        return [(0, region)] if region.numel else []
    return flat_boxes(region.start, region.length, shape)


# --- the merged index ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PartRef:
    """One stored part of a global tensor: ``rank``'s local tensor ``local_name``, from ``local_offset``."""

    rank: int
    local_name: str
    local_offset: int
    region: Region

    def to_json(self) -> list[Any]:
        """``[rank, local_name, local_offset, kind, a, b]``."""
        return [self.rank, self.local_name, self.local_offset, *self.region.to_json()]


@dataclass
class GlobalTensor:
    """A global tensor of a step: dtype, shape and the stored parts (replicas included)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    parts: list[PartRef] = field(default_factory=list)

    @property
    def numel(self) -> int:
        """Elements of the global tensor."""
        return math.prod(self.shape)


@dataclass
class GlobalIndex:
    """The merged index of a step (``step_<S>/INDEX``, docs/format.md section 9.3): global name -> tensor."""

    step: int
    ranks: int
    tensors: dict[str, GlobalTensor] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON object (without the format's ``crc32c``, which lives in the global marker)."""
        from .validate import FORMAT

        return {
            "format": FORMAT,
            "step": self.step,
            "ranks": self.ranks,
            "tensors": {
                n: {"dtype": g.dtype, "shape": list(g.shape), "parts": [p.to_json() for p in g.parts]}
                for n, g in sorted(self.tensors.items())
            },
        }

    @classmethod
    def from_json(cls, d: Any, where: str, *, step: int | None = None) -> GlobalIndex:
        """The index from JSON, every member and the coverage of every tensor checked."""
        from .validate import FORMAT, MAX_RANKS, MAX_STEP, _Check

        c = _Check(where)
        d = c.obj(d, "index")
        if d.get("format") != FORMAT:
            c.fail("format", f"{str(d.get('format'))[:40]!r} is not {FORMAT!r}")
        s = c.integer(d.get("step"), "step", 0, MAX_STEP - 1)
        if step is not None and s != step:
            c.fail("step", f"the index says step {s} but lies in the directory of step {step}")
        n = c.integer(d.get("ranks"), "ranks", 1, MAX_RANKS)
        idx = cls(s, n)
        for name, t in c.obj(d.get("tensors"), "tensors").items():
            m = f"tensors[{name[:80]!r}]"
            t = c.obj(t, m)
            dt = c.text(t.get("dtype"), f"{m}.dtype")
            shp = tuple(c.integer(x, f"{m}.shape[{i}]") for i, x in enumerate(c.arr(t.get("shape"), f"{m}.shape")))
            g = GlobalTensor(name, dt, shp)
            for i, v in enumerate(c.arr(t.get("parts"), f"{m}.parts")):
                pm = f"{m}.parts[{i}]"
                rank, lname, off, kind, a, b = c.arr(v, pm, 6)
                c.integer(rank, f"{pm}.rank", 0, n - 1)
                c.text(lname, f"{pm}.local_name")
                c.integer(off, f"{pm}.local_offset")
                region = _region_from_json(kind, a, b, _Check(f"{where}: {pm}"))
                check_piece(Piece(name, dt, shp, region, off), f"{where}: {pm}")
                g.parts.append(PartRef(rank, lname, off, region))
            check_coverage(g, where)
            idx.tensors[name] = g
        return idx


def build_index(step: int, ranks: int, described: Mapping[int, Mapping[str, Sequence[Piece]]]) -> GlobalIndex:
    """Merge the ranks' descriptions (rank -> local name -> pieces) into the step's index, validated: one
    dtype and shape per global name, and each global tensor covered exactly once (replicas allowed).
    Raises :class:`CorruptCheckpointError` naming the tensor otherwise."""
    idx = GlobalIndex(step, ranks)
    for rank in sorted(described):
        for lname in sorted(described[rank]):
            for p in described[rank][lname]:
                g = idx.tensors.get(p.name)
                if g is None:
                    g = idx.tensors[p.name] = GlobalTensor(p.name, p.dtype, p.shape)
                elif (g.dtype, g.shape) != (p.dtype, p.shape):
                    where = f"step {step}: global tensor {p.name!r}"
                    raise CorruptCheckpointError(
                        f"{where}: rank {rank} says {p.dtype} {list(p.shape)}, another rank {g.dtype} {list(g.shape)}",
                        (where,),
                    )
                g.parts.append(PartRef(rank, lname, p.local_offset, p.region))
    for g in idx.tensors.values():
        check_coverage(g, f"step {step}")
    return idx


def unique_regions(parts: Iterable[PartRef]) -> dict[Region, list[PartRef]]:
    """The distinct regions of ``parts``, each with its copies (replicas) in rank order; empty ones left out."""
    out: dict[Region, list[PartRef]] = {}
    for p in sorted(parts, key=lambda p: (p.rank, p.local_name)):
        if p.region.numel:
            out.setdefault(p.region, []).append(p)
    return out


def check_coverage(g: GlobalTensor, where: str) -> None:
    """The distinct regions of ``g``'s parts cover every element exactly once."""
    w = f"{where}: global tensor {g.name[:80]!r}"

    def fail(problem: str) -> None:
        raise CorruptCheckpointError(f"{w}: {problem}", (w,))

    boxes = [b for r in unique_regions(g.parts) for _, b in region_boxes(r, g.shape)]
    total = sum(b.numel for b in boxes)
    if total != g.numel:
        fail(f"its parts hold {total} elements (replicas counted once), the tensor has {g.numel}")
    if not boxes or g.numel == 0:
        return
    nd = len(g.shape)
    if nd == 0:
        return  # one element, one distinct region
    cuts = [
        sorted({0, g.shape[d]} | {b.offsets[d] for b in boxes} | {b.offsets[d] + b.lengths[d] for b in boxes})
        for d in range(nd)
    ]
    cells = math.prod(len(c) - 1 for c in cuts)
    if cells <= _MAX_GRID_CELLS:
        count = np.zeros([len(c) - 1 for c in cuts], dtype=np.int32)
        pos = [{v: i for i, v in enumerate(c)} for c in cuts]
        for b in boxes:
            sl = tuple(slice(pos[d][b.offsets[d]], pos[d][b.offsets[d] + b.lengths[d]]) for d in range(nd))
            count[sl] += 1
        if count.max() > 1:
            fail("two of its parts overlap without being identical copies")
        return
    for i, a in enumerate(boxes):  # as many elements as the tensor: disjoint boxes cover it
        for b in boxes[i + 1 :]:
            if _intersect(a, b) is not None:
                fail("two of its parts overlap without being identical copies")


def _intersect(a: Box, b: Box) -> Box | None:
    offs, lens = [], []
    for oa, la, ob, lb in zip(a.offsets, a.lengths, b.offsets, b.lengths, strict=True):
        lo, hi = max(oa, ob), min(oa + la, ob + lb)
        if hi <= lo:
            return None
        offs.append(lo)
        lens.append(hi - lo)
    return Box(tuple(offs), tuple(lens))


# --- the planner ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Read:
    """Copy elements ``[src_start, src_stop)`` of ``rank``'s stored local tensor ``local_name`` to elements
    ``[dst_start, dst_start + (src_stop - src_start))`` of the target (its region's elements, C-order)."""

    rank: int
    local_name: str
    src_start: int
    src_stop: int
    dst_start: int

    @property
    def numel(self) -> int:
        """Elements copied."""
        return self.src_stop - self.src_start


def _runs(inter: Box, src: Box, dst: Box) -> tuple[np.ndarray, np.ndarray, int]:
    """Element offsets (in ``src``'s and ``dst``'s C-order) of the runs that copy ``inter``, and the run length."""
    nd = len(inter.lengths)
    k = nd - 1
    while k > 0 and inter.lengths[k] == src.lengths[k] == dst.lengths[k]:
        k -= 1
    run = math.prod(inter.lengths[k:])
    outer = inter.lengths[:k]
    grids = np.indices(outer, dtype=np.int64).reshape(k, -1) if k else np.zeros((0, 1), dtype=np.int64)

    def flat(b: Box) -> np.ndarray:
        strides = [math.prod(b.lengths[d + 1 :]) for d in range(nd)]
        base = sum((inter.offsets[d] - b.offsets[d]) * strides[d] for d in range(nd))
        off = np.full(grids.shape[1], base, dtype=np.int64)
        for d in range(k):
            off += grids[d] * strides[d]
        return off

    return flat(src), flat(dst), run


def plan_reads(g: GlobalTensor, target: Region, *, prefer_rank: int | None = None) -> list[Read]:
    """The reads that fill ``target`` (a region of global tensor ``g``) from the stored parts, sorted by
    (rank, local name, source offset), adjacent runs merged. Each target element is written exactly once;
    of replicated parts, ``prefer_rank``'s copy is read when it holds one, else the lowest rank's."""
    check_piece(Piece(g.name, g.dtype, g.shape, target), f"target of {g.name[:80]!r}", error=ConfigError)
    tboxes = region_boxes(target, g.shape)
    reads: list[tuple[int, str, int, int, int]] = []
    for region, copies in unique_regions(g.parts).items():
        src = next((p for p in copies if p.rank == prefer_rank), copies[0])
        for s_off, sb in region_boxes(region, g.shape):
            for d_off, tb in tboxes:
                inter = _intersect(sb, tb)
                if inter is None:
                    continue
                if not inter.lengths:  # a 0-d tensor: one element
                    reads.append((src.rank, src.local_name, src.local_offset + s_off, 1, d_off))
                    continue
                so, do, run = _runs(inter, sb, tb)
                base_s = src.local_offset + s_off
                for a, b in zip(so.tolist(), do.tolist(), strict=True):
                    reads.append((src.rank, src.local_name, base_s + a, run, d_off + b))
    reads.sort()
    out: list[Read] = []
    for rank, lname, s, n, d in reads:
        if (
            out
            and (o := out[-1]).rank == rank
            and o.local_name == lname
            and o.src_stop == s
            and (o.dst_start + o.numel == d)
        ):
            out[-1] = Read(rank, lname, o.src_start, s + n, o.dst_start)
        else:
            out.append(Read(rank, lname, s, s + n, d))
    return out


# --- the step's INDEX object -------------------------------------------------------------------------------
def step_index_bytes(backend: Any, step: int, ranks: int, markers: Mapping[int, Mapping[str, Any]]) -> bytes | None:
    """The ``INDEX`` object of a multi-rank step whose ranks describe global tensors, or ``None`` when rank 0's
    manifest has no ``global_parts``. Reads every rank's manifest (checked against its verified marker's
    ``group_crc32c``); raises :class:`CorruptCheckpointError` when the parts do not cover their tensors."""
    described = rank_parts(backend, step, ranks, markers, first_only=True)
    if not described.get(0):
        return None
    described.update(rank_parts(backend, step, ranks, markers, skip=(0,)))
    from .zarrfmt import dumps

    return bytes(dumps(build_index(step, ranks, described).to_json()))


def rank_parts(
    backend: Any,
    step: int,
    ranks: int,
    markers: Mapping[int, Mapping[str, Any]] | None = None,
    *,
    first_only: bool = False,
    skip: Iterable[int] = (),
) -> dict[int, dict[str, Parts]]:
    """Rank -> its manifest's ``global_parts`` (``first_only``: rank 0 alone). ``markers``: the ranks' parsed
    markers (read and verified here when not given)."""
    from .manifest import GROUP_KEY, Manifest, parse_commit, rank_dir
    from .validate import load_json
    from .zarrfmt import crc32c

    out: dict[int, dict[str, Parts]] = {}
    skipped = set(skip)
    for r in range(1 if first_only else ranks):
        if r in skipped:
            continue
        d = rank_dir(step, r, ranks)
        if markers is not None and r in markers:
            marker = markers[r]
        else:
            raw_marker = backend.get(f"{d}/COMMIT")
            if raw_marker is None:
                raise CorruptCheckpointError(f"{d}/COMMIT: missing", (f"{d}/COMMIT",))
            marker = parse_commit(raw_marker, f"{d}/COMMIT", step=step)
        where = f"{d}/{GROUP_KEY}"
        raw = backend.get(where)
        if raw is None:
            raise CorruptCheckpointError(f"{where}: missing", (where,))
        if crc32c(raw) != marker.get("group_crc32c"):
            raise CorruptCheckpointError(f"{where}: checksum mismatch (group_crc32c)", (where,))
        m = Manifest.from_json(load_json(raw, where).get("attributes", {}).get("asymstore"), where, step=step)
        out[r] = dict(m.global_parts)
    return out


def load_index(backend: Any, step: int) -> GlobalIndex:
    """The merged index of committed ``step`` on ``backend``: its verified ``INDEX`` object when the global
    marker names one, else built from every rank's manifest (a single-rank step: its own manifest)."""
    from .manifest import COMMIT_KEY, parse_commit, step_dir
    from .zarrfmt import crc32c

    key = f"{step_dir(step)}/{COMMIT_KEY}"
    raw = backend.get(key)
    if raw is None:
        from .errors import StepNotFoundError

        raise StepNotFoundError(f"step {step} is not committed on {getattr(backend, 'url', backend)}")
    commit = parse_commit(raw, key, step=step)
    ranks = int(commit.get("ranks", 1))
    if "index_crc32c" in commit:
        ikey = f"{step_dir(step)}/{INDEX_KEY}"
        body = backend.get(ikey)
        if body is None:
            raise CorruptCheckpointError(f"{ikey}: missing (the step's marker names it)", (ikey,))
        if crc32c(body) != commit["index_crc32c"]:
            raise CorruptCheckpointError(f"{ikey}: checksum mismatch (index_crc32c)", (ikey,))
        from .validate import load_json

        idx = GlobalIndex.from_json(load_json(body, ikey), ikey, step=step)
        if idx.ranks != ranks:
            raise CorruptCheckpointError(f"{ikey}: invalid ranks: {idx.ranks}, the step has {ranks}", (ikey,))
        return idx
    if ranks == 1:
        return build_index(step, 1, {0: rank_parts(backend, step, 1, {0: commit})[0]})
    return build_index(step, ranks, rank_parts(backend, step, ranks))
