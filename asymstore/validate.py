"""Validation of what asymstore reads and of what it is asked to write, as pure functions.

Reading: a manifest or commit marker is checked completely before anything uses it (docs/format.md
section 10.1): the type of every member, offsets and sizes against the stream and each other, sizes bounded by
the stored objects, the delta chain, and the nesting depth. Every failure is a
:class:`~asymstore.errors.CorruptCheckpointError` naming the object and the member, so a reader falls back
to another copy or an older step and ``asymstore verify`` reports damage: a checksum only proves that the
bytes are the ones the writer (or whoever recomputed the checksums) wrote, not that they make sense.

Writing: :func:`save_request` checks a step number and user metadata up front, before a byte is written.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import numbers
import operator
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn

import numpy as np

from .errors import ConfigError, CorruptCheckpointError, UnsupportedValueError

#: nesting levels a saved state (and user metadata) may have; its skeleton then has at most three JSON
#: levels per state level (a non-string-key dict is ``{"__dict__": [[k, v]]}``)
MAX_DEPTH = 64
#: JSON nesting levels a manifest or commit marker may have (the skeleton sits three levels down)
MAX_JSON_DEPTH = 3 * MAX_DEPTH + 8
#: delta bases followed from one step (asymstore writes bases in full: a chain of one)
MAX_DELTA_CHAIN = 16
#: bounds of the stream's chunk size, and of chunks per partition (a shard index is 16 bytes per chunk)
MIN_CHUNK_BYTES = 4096
MAX_CHUNK_BYTES = 1 << 30
MAX_CHUNKS_PER_SHARD = 1 << 20
#: stream bytes a compressed partition may decode to per stored byte (zstd's limit is ~32768: a 128 KiB
#: block of one repeated byte is stored in 4 bytes)
MAX_EXPANSION = 1 << 16
#: ranks of a multi-rank step, and dimensions of a tensor
MAX_RANKS = 1 << 20
MAX_NDIM = 64
MAX_ALIGN = 1 << 20
MAX_STEP = 10**12

FORMAT = "asymstore/1"

#: element size of every dtype name the format defines (docs/format.md section 5.2); ``False``: numpy
#: has no such type (``__ndarray__`` references cannot name it)
DTYPE_ITEMSIZE: dict[str, tuple[int, bool]] = {
    "float64": (8, True),
    "float32": (4, True),
    "float16": (2, True),
    "bfloat16": (2, False),
    "complex128": (16, True),
    "complex64": (8, True),
    "complex32": (4, False),
    "int64": (8, True),
    "int32": (4, True),
    "int16": (2, True),
    "int8": (1, True),
    "uint8": (1, True),
    "uint16": (2, True),
    "uint32": (4, True),
    "uint64": (8, True),
    "bool": (1, True),
    "float8_e4m3fn": (1, False),
    "float8_e5m2": (1, False),
    "float8_e4m3fnuz": (1, False),
    "float8_e5m2fnuz": (1, False),
    "float8_e8m0fnu": (1, False),
}

_TAGS = frozenset(
    (
        "__tensor__",
        "__ndarray__",
        "__tuple__",
        "__dict__",
        "__float__",
        "__bytes__",
        "__torch_dtype__",
        "__size__",
        "__npscalar__",
    )
)


class _Check:
    """Raises :class:`CorruptCheckpointError` naming ``where`` (the object) and the member."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, member: str, problem: str) -> NoReturn:
        raise CorruptCheckpointError(f"{self.where}: invalid {member}: {problem}", (self.where,))

    def obj(self, v: Any, member: str) -> dict[str, Any]:
        if not isinstance(v, dict):
            self.fail(member, f"expected a JSON object, got {_kind(v)}")
        return v

    def arr(self, v: Any, member: str, length: int | None = None) -> list[Any]:
        if not isinstance(v, list):
            self.fail(member, f"expected a JSON array, got {_kind(v)}")
        if length is not None and len(v) != length:
            self.fail(member, f"expected {length} elements, got {len(v)}")
        return v

    def text(self, v: Any, member: str) -> str:
        if not isinstance(v, str):
            self.fail(member, f"expected a string, got {_kind(v)}")
        return v

    def flag(self, v: Any, member: str) -> bool:
        if not isinstance(v, bool):
            self.fail(member, f"expected true or false, got {_kind(v)}")
        return v

    def integer(self, v: Any, member: str, lo: int | None = 0, hi: int | None = None) -> int:
        if type(v) is not int:
            self.fail(member, f"expected an integer, got {_kind(v)}")
        if lo is not None and v < lo:
            self.fail(member, f"{v} is below {lo}")
        if hi is not None and v > hi:
            self.fail(member, f"{v} is above {hi}")
        return v

    def number(self, v: Any, member: str) -> float:
        if type(v) not in (int, float) or not math.isfinite(v):
            self.fail(member, f"expected a finite number, got {_kind(v)}")
        return float(v)

    def crc(self, v: Any, member: str) -> int:
        return self.integer(v, member, 0, (1 << 32) - 1)

    def opt_step(self, v: Any, member: str, step: int | None) -> int | None:
        if v is None:
            return None
        b = self.integer(v, member, 0, MAX_STEP - 1)
        if step is not None and b == step:
            self.fail(member, f"step {step} names itself as its delta base")
        return b


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean {v}"
    if isinstance(v, (int, float)):
        s = repr(v)
        return f"{type(v).__name__} {s if len(s) <= 40 else s[:37] + '...'}"
    if isinstance(v, str):
        return f"string {v[:40]!r}"
    if isinstance(v, list):
        return "an array"
    return "an object" if isinstance(v, dict) else type(v).__name__


# --- JSON ----------------------------------------------------------------------------------------------------
def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise ValueError(f"{text[:40]} is not a finite number")
    return x


def load_json(raw: bytes | str, where: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse a stored JSON object: finite numbers only (no ``NaN``/``Infinity`` literals, no ``1e999``),
    nesting at most ``max_depth`` deep."""
    try:
        doc = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except (ValueError, RecursionError, UnicodeDecodeError, TypeError) as e:
        msg = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
        raise CorruptCheckpointError(f"{where}: not valid JSON ({msg})", (where,)) from None
    depth = json_depth(doc, max_depth)
    if depth > max_depth:
        raise CorruptCheckpointError(f"{where}: JSON nested more than {max_depth} levels deep", (where,))
    return doc


def json_depth(doc: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), level by level without recursion; stops
    counting past ``limit``."""
    level = [doc] if type(doc) in (list, dict) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return depth
        nxt: list[Any] = []
        for v in level:
            nxt += [x for x in (v.values() if type(v) is dict else v) if type(x) in (list, dict)]
        level = nxt
    return depth


# --- the manifest --------------------------------------------------------------------------------------------
def index_nbytes(chunks_per_shard: int) -> int:
    """Size of a shard index (docs/format.md section 7)."""
    return chunks_per_shard * 16 + 4


def manifest(d: Any, where: str, *, step: int | None = None) -> None:
    """Check a manifest (``attributes.asymstore`` of a checkpoint directory's ``zarr.json``) completely.

    ``step``: the step its directory names (the manifest must agree). Raises ``CorruptCheckpointError``.
    """
    c = _Check(where)
    d = c.obj(d, "manifest")
    if d.get("format") != FORMAT:
        raise CorruptCheckpointError(
            f"{where}: unknown checkpoint format {str(d.get('format'))[:40]!r} (expected {FORMAT})", (where,)
        )
    s = c.integer(d.get("step"), "step", 0, MAX_STEP - 1)
    if step is not None and s != step:
        c.fail("step", f"the manifest says step {s} but lies in the directory of step {step}")
    if "created" in d:
        c.number(d["created"], "created")
    names = _layout(c, c.obj(d.get("layout"), "layout"))
    total = d["layout"]["total_bytes"]
    if "numpy_view_dtypes" in d:
        c.obj(d["numpy_view_dtypes"], "numpy_view_dtypes")
    numpy_names = c.arr(d.get("numpy_names", []), "numpy_names")
    for i, n in enumerate(numpy_names):
        if c.text(n, f"numpy_names[{i}]") not in names:
            c.fail(f"numpy_names[{i}]", f"no tensor named {n[:80]!r} in the layout")
    skeleton(d.get("skeleton"), names, where)
    if "user" in d and json_depth(c.obj(d["user"], "user"), MAX_DEPTH + 1) > MAX_DEPTH + 1:
        c.fail("user", f"nested more than {MAX_DEPTH} levels deep")
    if "global_parts" in d:  # docs/format.md section 8.2
        from .globalmeta import check_parts, parts_from_json

        local = {e[0]: (e[1], tuple(e[2])) for e in d["layout"]["tensors"]}
        check_parts(parts_from_json(d["global_parts"], where), local, where)
    if "lossy" in d:  # its content is checked when it is decoded (asymstore/excp.py)
        c.obj(d["lossy"], "lossy")
    C = c.integer(d.get("chunk_bytes"), "chunk_bytes", MIN_CHUNK_BYTES, MAX_CHUNK_BYTES)
    if C & (C - 1):
        c.fail("chunk_bytes", f"{C} is not a power of two")
    P = c.integer(d.get("partition_bytes"), "partition_bytes", C, C * MAX_CHUNKS_PER_SHARD)
    if P % C:
        c.fail("partition_bytes", f"{P} is not a multiple of chunk_bytes ({C})")
    base = c.opt_step(d.get("delta_base"), "delta_base", s)
    codecs = _codecs(c, c.obj(d.get("codecs"), "codecs"), base)
    _partitions(c, c.arr(d.get("partitions"), "partitions"), total, P, C, codecs)


def _layout(c: _Check, lay: dict[str, Any]) -> dict[str, str]:
    """Check ``layout``; returns tensor name -> dtype name."""
    align = c.integer(lay.get("align"), "layout.align", 1, MAX_ALIGN)
    if align & (align - 1):
        c.fail("layout.align", f"{align} is not a power of two")
    total = c.integer(lay.get("total_bytes"), "layout.total_bytes")
    if "signature" in lay:
        c.text(lay["signature"], "layout.signature")
    names: dict[str, str] = {}
    end = 0
    for i, e in enumerate(c.arr(lay.get("tensors"), "layout.tensors")):
        ok = _tensor_fast(e, names, end, align, total)  # the common case, without building a message
        if ok is not None:
            names[e[0]] = e[1]
            end = ok
            continue
        m = f"layout.tensors[{i}]"
        name, dt, shape, off, nb = c.arr(e, m, 5)
        c.text(name, f"{m}.name")
        if name in names:
            c.fail(f"{m}.name", f"tensor name {name[:80]!r} appears twice")
        size = DTYPE_ITEMSIZE.get(c.text(dt, f"{m}.dtype"))
        if size is None:
            c.fail(f"{m}.dtype", f"{dt[:40]!r} is not a dtype of the format")
        itemsize = size[0]
        c.arr(shape, f"{m}.shape")
        if len(shape) > MAX_NDIM:
            c.fail(f"{m}.shape", f"{len(shape)} dimensions (at most {MAX_NDIM})")
        numel = 1
        for j, n in enumerate(shape):
            numel *= c.integer(n, f"{m}.shape[{j}]", 0, total)
        c.integer(off, f"{m}.offset")
        c.integer(nb, f"{m}.nbytes")
        if nb != numel * itemsize:
            c.fail(f"{m}.nbytes", f"{nb} != shape {shape} x itemsize {itemsize} of {dt}")
        if off % itemsize:
            c.fail(f"{m}.offset", f"{off} is not a multiple of the itemsize {itemsize} of {dt}")
        if off != -(-end // align) * align:  # back to back, each aligned (docs/format.md section 5)
            c.fail(f"{m}.offset", f"{off} is not the previous tensor's end ({end}) rounded up to align {align}")
        end = off + nb
        if end > total:
            c.fail(f"{m}.offset", f"[{off}, {end}) lies past the stream's end ({total} bytes)")
        names[name] = dt
        raise AssertionError(f"{m}: refused by the fast check only")  # pragma: no cover - the checks agree
    if end != total:
        c.fail("layout.total_bytes", f"{total} != the end of the last tensor ({end})")
    return names


def _tensor_fast(e: Any, names: dict[str, str], end: int, align: int, total: int) -> int | None:
    """A well-formed ``tensors`` entry placed at ``end`` rounded up to ``align``: its end; else ``None`` (the
    caller then names the problem)."""
    if type(e) is not list or len(e) != 5:
        return None
    name, dt, shape, off, nb = e
    if type(name) is not str or name in names or type(dt) is not str or type(shape) is not list:
        return None
    size = DTYPE_ITEMSIZE.get(dt)
    if size is None or len(shape) > MAX_NDIM or type(off) is not int or type(nb) is not int:
        return None
    numel = 1
    for n in shape:
        if type(n) is not int or not 0 <= n <= total:
            return None
        numel *= n
    itemsize = size[0]
    if nb != numel * itemsize or off % itemsize or off != -(-end // align) * align or off + nb > total:
        return None
    return off + nb


def _codecs(c: _Check, codecs: dict[str, Any], base: int | None) -> dict[str, tuple[bool, bool]]:
    """Check ``codecs``; returns label -> (compresses, delta)."""
    from .codecs import CodecSpec

    out: dict[str, tuple[bool, bool]] = {}
    for label, v in codecs.items():
        m = f"codecs[{label[:40]!r}]"
        v = c.obj(v, m)
        kind = c.text(v.get("kind"), f"{m}.kind")
        try:
            spec = CodecSpec(
                kind=kind,  # type: ignore[arg-type]
                level=c.integer(v.get("level"), f"{m}.level", -(1 << 20), 1 << 20),
                cname=c.text(v.get("cname", ""), f"{m}.cname"),
                shuffle=c.text(v.get("shuffle"), f"{m}.shuffle"),  # type: ignore[arg-type]
                typesize=c.integer(v.get("typesize"), f"{m}.typesize"),
                delta=c.flag(v.get("delta"), f"{m}.delta"),
            )
        except ConfigError as e:
            c.fail(m, str(e))
        if spec.label != label:
            c.fail(m, f"the chain's label is {spec.label!r}, not {label[:40]!r}")
        if spec.delta and base is None:
            c.fail(m, "an XOR delta chain in a checkpoint without delta_base")
        out[label] = (spec.compresses, spec.delta)
    return out


def _partitions(c: _Check, parts: list[Any], total: int, P: int, C: int, codecs: dict[str, tuple[bool, bool]]) -> None:
    want = -(-total // P)
    if len(parts) != want:
        c.fail("partitions", f"{len(parts)} entries, but {total} stream bytes in partitions of {P} make {want}")
    cps = P // C
    ib = index_nbytes(cps)
    shards: dict[str, int] = {}
    for i, p in enumerate(parts):
        m = f"partitions[{i}]"
        index, start, n, label, shard, stored, crcs = c.arr(p, m, 7)
        if c.integer(index, f"{m}.index") != i:
            c.fail(f"{m}.index", f"{index} is not its position {i}")
        if c.integer(start, f"{m}.start") != i * P:
            c.fail(f"{m}.start", f"{start} != {i} x partition_bytes {P}")
        if c.integer(n, f"{m}.nbytes") != min(P, total - i * P):
            c.fail(f"{m}.nbytes", f"{n} != {min(P, total - i * P)} (the partition's share of the stream)")
        if c.text(label, f"{m}.label") not in codecs:
            c.fail(f"{m}.label", f"{label[:40]!r} is not in codecs")
        k = shards.get(label, 0)
        if c.integer(shard, f"{m}.shard") != k:
            c.fail(f"{m}.shard", f"{shard} is not {k} (partitions of {label!r} are shards 0, 1, ... in order)")
        shards[label] = k + 1
        nchunks = -(-n // C)
        c.integer(stored, f"{m}.stored_bytes")
        compresses, _delta = codecs[label]
        if not compresses and stored != nchunks * C + ib:
            c.fail(f"{m}.stored_bytes", f"{stored} != {nchunks * C + ib} (raw: {nchunks} chunks of {C} and the index)")
        if compresses and (stored < ib + nchunks or n > (stored - ib) * MAX_EXPANSION):
            c.fail(f"{m}.stored_bytes", f"{stored} cannot hold {n} stream bytes compressed and a {ib}-byte index")
        c.arr(crcs, f"{m}.chunk_crcs", nchunks)
        for j, x in enumerate(crcs):
            c.crc(x, f"{m}.chunk_crcs[{j}]")


# --- the skeleton --------------------------------------------------------------------------------------------
def _render(path: tuple[Any, ...]) -> str:
    """A skeleton path kept as nested ``(parent, label)`` pairs, as text: ``skeleton.opt.betas[1]``."""
    parts: list[str] = []
    while path:
        path, label = path
        parts.append(label)
    return "".join(reversed(parts))


def skeleton(skel: Any, names: Mapping[str, str], where: str) -> None:
    """Check a skeleton (docs/format.md section 8): every tagged form well formed, every tensor reference a
    tensor of the layout (``names``: name -> dtype name), dict keys hashable; iterative, depth-bounded."""
    c = _Check(where)
    # (value, path, depth, is a dict key); paths are built only for a message
    stack: list[tuple[Any, tuple[Any, ...], int, bool]] = [(skel, ((), "skeleton"), 0, False)]
    while stack:
        v, path, depth, key = stack.pop()
        t = type(v)
        if t is list:
            if depth >= MAX_JSON_DEPTH:
                c.fail(_render(path), f"nested more than {MAX_JSON_DEPTH} levels deep")
            if key:
                c.fail(_render(path), "a dict key cannot be a list")
            stack.extend((x, (path, f"[{i}]"), depth + 1, False) for i, x in enumerate(v) if type(x) in (list, dict))
            continue
        if t is not dict:
            continue
        if depth >= MAX_JSON_DEPTH:
            c.fail(_render(path), f"nested more than {MAX_JSON_DEPTH} levels deep")
        if len(v) == 1:
            tag = next(iter(v))
            if tag in _TAGS:
                _tagged(c, tag, v[tag], path, depth, key, names, stack)
                continue
        if key:
            c.fail(_render(path), "a dict key cannot be a dict")
        stack.extend((x, (path, f".{k[:40]}"), depth + 1, False) for k, x in v.items() if type(x) in (list, dict))


def _tagged(
    c: _Check,
    tag: str,
    x: Any,
    path: tuple[Any, ...],
    depth: int,
    key: bool,
    names: Mapping[str, str],
    stack: list[tuple[Any, tuple[Any, ...], int, bool]],
) -> None:
    """One tagged form of the skeleton; its members that hold further values go on ``stack``."""
    if tag in ("__tensor__", "__ndarray__"):
        dt = names.get(x) if type(x) is str else None
        if dt is None:
            p = f"{_render(path)}.{tag}"
            c.fail(p, f"no tensor named {c.text(x, p)[:80]!r} in the layout")
        if tag == "__ndarray__" and not DTYPE_ITEMSIZE[dt][1]:
            c.fail(f"{_render(path)}.{tag}", f"a numpy array cannot have dtype {dt}")
        return
    p = f"{_render(path)}.{tag}"
    if tag == "__tuple__":
        for i, y in enumerate(c.arr(x, p)):
            if type(y) in (list, dict):
                stack.append((y, (path, f".{tag}[{i}]"), depth + 2, key))
    elif tag == "__dict__":
        if key:
            c.fail(_render(path), "a dict key cannot be a dict")
        for i, kv in enumerate(c.arr(x, p)):
            k, y = c.arr(kv, f"{p}[{i}]", 2)
            stack.append((k, (path, f".{tag}[{i}][0]"), depth + 3, True))
            stack.append((y, (path, f".{tag}[{i}][1]"), depth + 3, False))
    elif tag == "__float__":
        if c.text(x, p) not in ("nan", "inf", "-inf"):
            c.fail(p, f"{x[:20]!r} is not nan, inf or -inf")
    elif tag == "__bytes__":
        try:
            base64.b64decode(c.text(x, p), validate=True)
        except (binascii.Error, ValueError):
            c.fail(p, "not standard base64")
    elif tag == "__torch_dtype__":
        if c.text(x, p) not in DTYPE_ITEMSIZE:
            c.fail(p, f"{x[:40]!r} is not a dtype of the format")
    elif tag == "__size__":
        for i, n in enumerate(c.arr(x, p)):
            c.integer(n, f"{p}[{i}]")
    else:  # __npscalar__
        from .state import decode_npscalar

        try:
            decode_npscalar(x)
        except (TypeError, ValueError, OverflowError, KeyError) as e:
            c.fail(p, f"not a numpy scalar ({str(e)[:80]})")


# --- commit markers ------------------------------------------------------------------------------------------
def commit(body: Any, where: str, *, step: int | None = None) -> None:
    """Check a parsed commit marker (without its ``crc32c``): a checkpoint directory's (section 9.1) or a
    multi-rank step's global marker (section 9.2). ``step``: the step its directory names."""
    c = _Check(where)
    body = c.obj(body, "commit marker")
    if body.get("format") != FORMAT:
        c.fail("format", f"{str(body.get('format'))[:40]!r} is not {FORMAT!r}")
    s = c.integer(body.get("step"), "step", 0, MAX_STEP - 1)
    if step is not None and s != step:
        c.fail("step", f"the marker says step {s} but lies in the directory of step {step}")
    if "time" in body:
        c.number(body["time"], "time")
    for k in ("stored_bytes", "raw_bytes", "objects"):
        if k in body:
            c.integer(body[k], k)
    c.opt_step(body.get("delta_base"), "delta_base", s)
    if "ranks" in body:
        n = c.integer(body["ranks"], "ranks", 1, MAX_RANKS)
        crcs = c.obj(body.get("shards_crc32c"), "shards_crc32c")
        if set(crcs) != {str(r) for r in range(n)}:
            c.fail("shards_crc32c", f"its keys are not the ranks 0..{n - 1}")
        for r, v in crcs.items():
            c.crc(v, f"shards_crc32c[{r}]")
        if "index_crc32c" in body:  # the step's INDEX object (section 9.3)
            c.crc(body["index_crc32c"], "index_crc32c")
        if "delta_bases" in body:
            for i, b in enumerate(c.arr(body["delta_bases"], "delta_bases")):
                c.opt_step(b, f"delta_bases[{i}]", s)
                if b is None:
                    c.fail(f"delta_bases[{i}]", "null")
        return
    if "world_size" in body:  # a rank directory's marker: the ranks of the job that wrote it
        c.integer(body["world_size"], "world_size", 2, MAX_RANKS)
    c.crc(body.get("group_crc32c"), "group_crc32c")
    for label, v in c.obj(body.get("arrays_crc32c"), "arrays_crc32c").items():
        c.crc(v, f"arrays_crc32c[{label[:40]!r}]")


def commit_matches_manifest(body: Mapping[str, Any], m: Any, where: str) -> None:
    """A checkpoint directory's marker and its manifest agree on step, delta base and sizes."""
    c = _Check(where)
    if body.get("delta_base") != m.delta_base:
        c.fail("delta_base", f"the marker says {body.get('delta_base')}, the manifest {m.delta_base}")
    if "raw_bytes" in body and body["raw_bytes"] != m.layout.total_bytes:
        c.fail("raw_bytes", f"the marker says {body['raw_bytes']}, the manifest {m.layout.total_bytes}")
    if "stored_bytes" in body and body["stored_bytes"] != m.stored_bytes:
        c.fail("stored_bytes", f"the marker says {body['stored_bytes']}, the partitions {m.stored_bytes}")
    if set(body.get("arrays_crc32c", {})) != set(m.codecs):
        c.fail("arrays_crc32c", "its labels are not the manifest's codecs")


def delta_chain(chain: Iterable[int], base: int, where: str) -> None:
    """Opening delta base ``base`` after the steps ``chain`` (the step first): no cycle, bounded length."""
    seen = list(chain)
    if base in seen:
        path = " -> ".join(map(str, [*seen, base]))
        raise CorruptCheckpointError(f"{where}: delta bases form a cycle ({path})", (where,))
    if len(seen) >= MAX_DELTA_CHAIN:
        raise CorruptCheckpointError(f"{where}: delta chain longer than {MAX_DELTA_CHAIN} steps", (where,))


# --- what a save is asked to write ---------------------------------------------------------------------------
def step_number(step: Any) -> int:
    """A step number as a plain ``int`` in ``[0, 10^12)``: ints, numpy integers, 0-d integer tensors and any
    ``__index__`` object are accepted; bools, floats and anything else are refused with ``ConfigError``."""
    if isinstance(step, (bool, np.bool_)):
        raise ConfigError(f"step must be an integer, got the bool {step!r}")
    if type(step).__module__.startswith("torch") and hasattr(step, "dim"):
        if step.dim() != 0 or step.dtype.is_floating_point or step.dtype.is_complex or str(step.dtype) == "torch.bool":
            raise ConfigError(f"step must be an integer, got a tensor of shape {tuple(step.shape)}, {step.dtype}")
        step = int(step.item())
    try:
        s = operator.index(step)
    except TypeError:
        raise ConfigError(
            f"step must be an integer, got {type(step).__name__} {step!r}"
            + ("; pass int(step) if it is whole" if isinstance(step, numbers.Real) else "")
        ) from None
    if not 0 <= s < MAX_STEP:
        raise ConfigError(f"step must be in [0, 10^12), got {s}")
    return int(s)


def user_metadata(user: Any) -> dict[str, Any]:
    """User metadata as it will be stored: a JSON object (string keys, at most ``MAX_DEPTH`` levels), numpy
    scalars and 0-d tensors converted to Python numbers; ``UnsupportedValueError`` naming the key for anything else
    (NaN and infinities included: JSON has none, store them as strings)."""
    if user is None:
        return {}
    if not isinstance(user, Mapping):
        raise UnsupportedValueError(f"user metadata must be a dict, got {type(user).__name__}")

    def conv(v: Any, path: str, depth: int, active: set[int]) -> Any:
        if v is None or isinstance(v, (str, bool)):
            return str(v) if isinstance(v, str) else v
        if isinstance(v, np.generic) or (type(v).__module__.startswith("torch") and hasattr(v, "dim")):
            if not isinstance(v, np.generic) and (v.dim() != 0 or v.is_complex()):
                raise UnsupportedValueError(f"{path}: a tensor of shape {tuple(v.shape)}; store numbers")
            if isinstance(v, np.generic) and v.dtype.kind not in "biuf":
                raise UnsupportedValueError(f"{path}: numpy {v.dtype} scalars are not JSON; convert it")
            v = v.item()
            return conv(v, path, depth, active)
        if isinstance(v, int):
            return int(v)
        if isinstance(v, float):
            if not math.isfinite(v):
                raise UnsupportedValueError(f"{path} is {v!r}, which JSON cannot hold; store str({v!r}) or None")
            return float(v)
        if isinstance(v, (Mapping, list, tuple)):
            if depth > MAX_DEPTH:
                raise UnsupportedValueError(f"{path[:80]}...: nested more than {MAX_DEPTH} levels deep")
            if id(v) in active:
                raise UnsupportedValueError(f"{path}: a circular reference (the value contains itself)")
            active.add(id(v))
            try:
                if isinstance(v, Mapping):
                    out = {}
                    for k, x in v.items():
                        if not isinstance(k, str):
                            raise UnsupportedValueError(f"{path}: key {k!r} is not a string (JSON keys are)")
                        out[k] = conv(x, f"{path}[{k!r}]", depth + 1, active)
                    return out
                return [conv(x, f"{path}[{i}]", depth + 1, active) for i, x in enumerate(v)]
            finally:
                active.discard(id(v))
        raise UnsupportedValueError(
            f"{path}: {type(v).__module__}.{type(v).__qualname__} is not JSON "
            "(use str, int, float, bool, None, lists and dicts)"
        )

    return conv(dict(user), "user", 0, set())  # type: ignore[no-any-return]


def save_request(step: Any, user: Any) -> tuple[int, dict[str, Any]]:
    """The step and user metadata of a save, checked and normalised before a byte is written
    (:func:`step_number`, :func:`user_metadata`)."""
    return step_number(step), user_metadata(user)
