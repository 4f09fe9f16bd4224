"""ZeRO partition layouts: which flat ranges of which parameters each rank's partitions hold.

A DeepSpeed ZeRO optimizer keeps, per rank, flat 1-D *partitions*: at stage 1/2 one per parameter
group (a slice of the group's flat buffer, parameters concatenated with alignment padding), at
stage 3 one per sub-group (the concatenated ``ds_tensor`` partitions of its parameters, each
parameter split in equal, padded pieces over the ranks). The fp32 master partition, every
partition-shaped optimizer state tensor (Adam's ``exp_avg``, ``exp_avg_sq``, ...) and the
low-precision parameter partition of one group share one layout.

:func:`zero_layout` describes that layout for the rank that calls it, as plain JSON (saved with
every step by :class:`~asymstore.trainer_hooks.deepspeed_hooks.DeepSpeedAsymCheckpointer`)::

    {"format": "asymstore-zero-layout/1", "stage": 2, "world_size": 2, "rank": 0,
     "params": {"blocks.0.lin.weight": {"shape": [32, 32], "dtype": "float32"}, ...},
     "shared": {"lm_head.weight": "wte.weight"},            # tied aliases -> stored name
     "groups": [{"numel": 1232,                              # partition length (with padding)
                 "fragments": [[name, param_start, local_start, numel], ...]}]}

A fragment says: elements ``[param_start, param_start + numel)`` of the flattened parameter
``name`` lie at ``[local_start, local_start + numel)`` of this partition. Elements of a partition
covered by no fragment are padding (zeros).

:func:`plan_reads` maps a new rank's layout onto the saved ranks' layouts (any world sizes): the
list of ``(saved rank, saved group, source start, destination start, numel)`` copies, adjacent
ones merged, which :func:`fill_partition` executes with ranged reads of the saved partitions.

:func:`layout_global_parts` turns a rank's layout into the global tensor metadata of its step
(docs/format.md section 8.2): one flat piece per fragment of every partition-shaped tensor, under the
global names ``zero/lp/<param>``, ``zero/fp32/<param>`` and ``zero/optimizer_state/<key>/<param>``, so
the step's ``INDEX`` lists every parameter's low-precision value, fp32 master and optimizer moments.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from asymstore.errors import StateMismatchError
from asymstore.globalmeta import FlatRange, Piece

LAYOUT_FORMAT = "asymstore-zero-layout/1"

__all__ = ["LAYOUT_FORMAT", "Copy", "fill_partition", "layout_global_parts", "plan_reads", "zero_layout"]


def _dist() -> Any:
    import torch.distributed as td

    return td if td.is_available() and td.is_initialized() else None


def _group_rank(group: Any) -> tuple[int, int]:
    d = _dist()
    if d is None:
        return 0, 1
    return int(d.get_rank(group=group)), int(d.get_world_size(group=group))


def _offset_in(t: torch.Tensor, flat: torch.Tensor) -> int:
    """Element offset of ``t``'s first element inside ``flat`` (``t`` a view of ``flat``'s storage)."""
    off_bytes = t.data_ptr() - flat.data_ptr()
    es = flat.element_size()
    if off_bytes % es or not 0 <= off_bytes // es <= flat.numel():
        raise StateMismatchError("a ZeRO parameter is not a view of its group's flat buffer")
    return off_bytes // es


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def zero_layout(engine: Any) -> dict[str, Any]:
    """The partition layout of this rank of a ZeRO stage 1, 2 or 3 ``engine`` (see the module doc)."""
    stage = int(engine.zero_optimization_stage())
    eo = engine.optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    shared: dict[str, str] = {}
    for n, p in engine.module.named_parameters(remove_duplicate=False):
        if names.get(id(p), n) != n:
            shared[n] = names[id(p)]
    params: dict[str, dict[str, Any]] = {}
    groups: list[dict[str, Any]] = []
    rank, world = 0, 1
    if stage in (1, 2):
        for i, flat in enumerate(eo.bit16_groups_flat):
            pid, world = _group_rank(eo.real_dp_process_group[i])
            rank = pid
            ps = flat.numel() // world
            lo, hi = pid * ps, (pid + 1) * ps
            frags: list[list[Any]] = []
            for p in eo.bit16_groups[i]:
                name = names[id(p)]
                params[name] = {"shape": list(p.shape), "dtype": _dtype_name(p.dtype)}
                off, n = _offset_in(p.data, flat), p.numel()
                a, b = max(off, lo), min(off + n, hi)
                if b > a:
                    frags.append([name, a - off, a - lo, b - a])
            frags.sort(key=lambda f: f[2])
            groups.append({"numel": ps, "fragments": frags})
    elif stage == 3:
        for i, flat in enumerate(eo.fp16_partitioned_groups_flat):
            frags = []
            for p in eo.fp16_groups[i]:
                name = names[id(p)]
                params[name] = {"shape": list(p.ds_shape), "dtype": _dtype_name(p.ds_tensor.dtype)}
                pid, world = _group_rank(getattr(p, "ds_process_group", eo.dp_process_group))
                rank = pid
                pn = int(p.ds_tensor.ds_numel)
                start = pid * pn
                n = max(0, min(pn, int(p.ds_numel) - start))
                if n:
                    frags.append([name, start, _offset_in(p.ds_tensor, flat), n])
            frags.sort(key=lambda f: f[2])
            groups.append({"numel": int(flat.numel()), "fragments": frags})
    else:
        raise StateMismatchError(f"ZeRO stage {stage} has no partitions")
    return {
        "format": LAYOUT_FORMAT,
        "stage": stage,
        "world_size": world,
        "rank": rank,
        "params": params,
        "shared": shared,
        "groups": groups,
    }


_LOCAL_LP_FP32 = re.compile(r"^zero/(lp|fp32)/(\d+)$")
_LOCAL_OPT_STATE = re.compile(r"^zero/optimizer_state/(\d+)/([^/]+)$")


def layout_global_parts(layout: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict[str, list[Piece]]:
    """The global tensor metadata (docs/format.md section 8.2) of a rank's ZeRO partitions.

    ``layout``: the rank's :func:`zero_layout`; ``tensors``: its stored tensors by name (a flattened state:
    ``zero/lp/<i>``, ``zero/fp32/<i>``, ``zero/optimizer_state/<i>/<key>``). Every partition-shaped tensor
    (1-D, the partition's length) of partition ``i`` gets one flat piece per fragment of group ``i``: global
    tensor ``zero/lp/<param>``, ``zero/fp32/<param>`` or ``zero/optimizer_state/<key>/<param>`` (``key`` as in
    the local name, e.g. ``exp_avg``), of the parameter's full shape and the local tensor's dtype,
    ``FlatRange(start in the parameter, numel)`` at ``local_offset`` = the start in the partition. Padding is
    not described; tied aliases are described under the parameter's first name only (the layout's names);
    rank 0 describes each parameter without elements by an empty range, so that it is listed. Tensors of
    another shape (the optimizer's ``step``) are local to the rank."""
    groups = layout["groups"]
    params = layout["params"]
    out: dict[str, list[Piece]] = {}
    first_of: dict[str, tuple[int, str, torch.dtype]] = {}  # class -> (group, local tensor, dtype): its lowest group
    for name in sorted(tensors, key=lambda n: (len(n), n)):
        m = _LOCAL_LP_FP32.match(name)
        mo = None if m is not None else _LOCAL_OPT_STATE.match(name)
        if m is not None:
            cls, i = f"zero/{m.group(1)}", int(m.group(2))
        elif mo is not None:
            cls, i = f"zero/optimizer_state/{mo.group(2)}", int(mo.group(1))
        else:
            continue
        t = tensors[name]
        if i >= len(groups) or t.dim() != 1 or t.numel() != int(groups[i]["numel"]):
            continue  # not a partition (an optimizer's scalar state, or another length)
        dtype = _dtype_name(t.dtype)
        pieces = [
            Piece(f"{cls}/{p}", dtype, tuple(int(x) for x in params[p]["shape"]), FlatRange(int(a), int(n)), int(o))
            for p, a, o, n in groups[i]["fragments"]
            if int(n) > 0
        ]
        if pieces:
            out[name] = pieces
        if cls not in first_of or i < first_of[cls][0]:
            first_of[cls] = (i, name, t.dtype)
    if int(layout.get("rank", 0)) == 0:
        empty = [p for p, v in params.items() if math.prod(int(x) for x in v["shape"]) == 0]
        for cls, (_, name, dt) in sorted(first_of.items()) if empty else ():
            out.setdefault(name, []).extend(
                Piece(f"{cls}/{p}", _dtype_name(dt), tuple(int(x) for x in params[p]["shape"]), FlatRange(0, 0), 0)
                for p in empty
            )
    return out


@dataclass(frozen=True)
class Copy:
    """Copy ``numel`` elements from saved rank ``rank``'s partition ``group`` at ``src`` to ``dst``."""

    rank: int
    group: int
    src: int
    dst: int
    numel: int


def check_layout(layout: Any, what: str) -> dict[str, Any]:
    """``layout`` if it is a ZeRO partition layout, else a clear error naming ``what``."""
    if not isinstance(layout, dict) or layout.get("format") != LAYOUT_FORMAT:
        raise StateMismatchError(
            f"{what} holds no ZeRO partition layout ({LAYOUT_FORMAT}): it was saved by an older "
            "version and restores on the same world size only"
        )
    return layout


def plan_reads(dest: Mapping[str, Any], saved: Sequence[Mapping[str, Any]], *, what: str = "step") -> list[list[Copy]]:
    """For each partition of ``dest`` (a new rank's layout), the copies from the ``saved`` ranks'
    partitions (``saved[r]``: rank r's layout) that fill it; adjacent copies are merged.

    Raises :class:`StateMismatchError` when a parameter is missing, has another shape, or is not
    fully covered by the saved fragments (another model, or an incomplete step).
    """
    index: dict[str, list[tuple[int, int, int, int, int]]] = defaultdict(list)
    for r, lay in enumerate(saved):
        for g, grp in enumerate(lay["groups"]):
            for name, pstart, lstart, n in grp["fragments"]:
                index[name].append((int(pstart), int(pstart) + int(n), r, g, int(lstart)))
    for frs in index.values():
        frs.sort()
    saved_params: dict[str, Any] = {}
    for lay in saved:
        saved_params.update(lay["params"])
    out: list[list[Copy]] = []
    for grp in dest["groups"]:
        copies: list[Copy] = []
        for name, pstart, lstart, n in grp["fragments"]:
            if name not in saved_params:
                raise StateMismatchError(f"{what}: parameter {name!r} was not saved")
            want, have = dest["params"][name], saved_params[name]
            if list(want["shape"]) != list(have["shape"]):
                raise StateMismatchError(f"{what}: parameter {name!r} saved as {have['shape']}, is {want['shape']}")
            a, b = int(pstart), int(pstart) + int(n)
            covered = 0
            for s0, s1, r, g, l0 in index[name]:
                lo, hi = max(a, s0), min(b, s1)
                if hi <= lo:
                    continue
                copies.append(Copy(r, g, l0 + lo - s0, int(lstart) + lo - a, hi - lo))
                covered += hi - lo
            if covered != b - a:
                raise StateMismatchError(
                    f"{what}: elements [{a}, {b}) of {name!r} are covered by {covered} saved elements, not {b - a}"
                )
        copies.sort(key=lambda c: c.dst)
        merged: list[Copy] = []
        for c in copies:
            m = merged[-1] if merged else None
            contiguous = m is not None and m.src + m.numel == c.src and m.dst + m.numel == c.dst
            if m is not None and contiguous and (m.rank, m.group) == (c.rank, c.group):
                merged[-1] = Copy(m.rank, m.group, m.src, m.dst, m.numel + c.numel)
                continue
            merged.append(c)
        out.append(merged)
    return out


def fill_partition(dst: torch.Tensor, copies: Sequence[Copy], source: Any, *, what: str, gap: int = 0) -> None:
    """Zero ``dst`` (a 1-D partition) and fill it by ``copies``; ``source(rank, group)`` returns the saved
    partition as a lazy tensor (:class:`~asymstore.lazy.LazyTensor`), read only in the copied ranges.

    Copies from one saved partition whose source ranges are at most ``gap`` elements apart are read as one
    span and scattered (a ranged read fetches whole chunks: with ``gap`` about two chunks, no chunk is
    fetched twice by neighbouring copies); others are read one by one, straight into ``dst``."""
    flat = dst.detach().view(-1)
    ends = max((c.dst + c.numel for c in copies), default=0)
    if ends > flat.numel():
        raise StateMismatchError(f"{what}: a copy ends at {ends}, the partition holds {flat.numel()}")
    flat.zero_()
    by_source: dict[tuple[int, int], list[Copy]] = defaultdict(list)
    for c in copies:
        by_source[(c.rank, c.group)].append(c)
    for (rank, group), cs in by_source.items():
        src = source(rank, group)
        if src.dtype != flat.dtype:
            raise StateMismatchError(f"{what}: saved as {src.dtype}, the engine holds {flat.dtype}")
        cs.sort(key=lambda c: c.src)
        runs: list[list[Copy]] = []
        for c in cs:
            if runs and c.src - (runs[-1][-1].src + runs[-1][-1].numel) <= gap:
                runs[-1].append(c)
            else:
                runs.append([c])
        for run in runs:
            if len(run) == 1:
                c = run[0]
                src.read_flat_into(c.src, flat.narrow(0, c.dst, c.numel))
                continue
            lo, hi = run[0].src, max(c.src + c.numel for c in run)
            span = torch.empty(hi - lo, dtype=flat.dtype)
            src.read_flat_into(lo, span)
            for c in run:
                flat.narrow(0, c.dst, c.numel).copy_(span.narrow(0, c.src - lo, c.numel))
