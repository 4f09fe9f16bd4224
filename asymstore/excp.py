"""ExCP: an opt-in lossy codec for archive tiers (residuals, pruning, quantisation of weights and Adam moments).

After ExCP (Li et al., "ExCP: Extreme LLM Checkpoint Compression via Weight-Momentum Joint Shrinking",
ICML 2024). A checkpoint of a lossy tier stores, per tensor class:

* **weights** (floating tensors outside the optimizer state): the *residual* against the tier's previous
  checkpoint as the reader reconstructs it (so errors never accumulate along a chain), pruned where
  ``|residual| <= alpha * median(|residual|) * mean(sqrt(v)) / sqrt(v_i)`` (``v`` the paired parameter's
  second moment: weights whose gradient varies much keep smaller residuals), the rest quantised;
  every ``key_every``-th checkpoint (and whenever no usable base is on the tier) the weights are stored
  exactly (a *key* checkpoint);
* **Adam moments** (``exp_avg``, ``exp_avg_sq``): the values themselves, pruned where
  ``|m| <= beta * mean(|m|)`` or where the paired weight's residual was pruned, the rest quantised;
* everything else (integers, small tensors, other optimizer state, non-finite values): exactly.

Quantisation is non-uniform: a 1-D k-means codebook of ``2**bits - 1`` levels per tensor (code 0 is a pruned
element, value 0), whose end levels are the smallest and largest surviving value, so every surviving element
is within half the largest gap between adjacent levels of its reconstruction (:func:`quantise`). The
encoded tensors (``uint8`` codes, ``float32`` codebooks, exact copies) form an ordinary asymstore stream,
stored with a lossless entropy stage (zstd) as standard zarr v3 arrays; the manifest's ``lossy`` member says
how to rebuild the original tensors, and records the reconstruction error measured at write time per tensor
and per class (docs/format.md section 15). Never a default: a tier is lossy only when its
:class:`~asymstore.store.TierSpec` says ``lossy="excp"``, and never the first tier.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import dtypes, validate
from .codecs import ZSTD3
from .errors import ConfigError, CorruptCheckpointError, StepNotFoundError
from .interfaces import StreamSource
from .layout import Layout, TensorEntry, plan_layout
from .manifest import GROUP_KEY, Manifest
from .write_plan import CheckpointContent, WritePlan, plan_write

if TYPE_CHECKING:
    from .lazy import LazyCheckpoint
    from .reader import CheckpointReader
    from .tiers import PersistentTier
    from .writer import DeltaBase, WriteReport

SCHEME = "excp"
VERSION = 1
MOMENTS = ("exp_avg", "exp_avg_sq")
#: the tensor classes errors are reported for
CLASSES = ("weight", "exp_avg", "exp_avg_sq", "exact")
_MODES = ("copy", "residual", "direct")
#: bounds of ``key_every``: a reader follows at most this many residual bases (docs/format.md section 10.1)
MAX_KEY_EVERY = 16


@dataclass(frozen=True)
class ExcpOptions:
    """Parameters of the ExCP codec of a lossy tier."""

    #: weight residual pruning strength (0: prune nothing)
    alpha: float = 1.0
    #: moment pruning strength (0: prune only where the weight's residual was pruned)
    beta: float = 1.0
    #: codebook of ``2**bits - 1`` non-zero levels per tensor (1..8)
    bits: int = 4
    #: a key checkpoint (weights stored exactly, no residual base) every ``key_every`` checkpoints (1..16)
    key_every: int = 8
    #: floating tensors with fewer elements are stored exactly
    min_numel: int = 1024

    def __post_init__(self) -> None:
        for f in ("alpha", "beta"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ConfigError(f"ExCP {f} must be a finite number >= 0, got {v!r}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise ConfigError(f"ExCP bits must be an integer in 1..8, got {self.bits!r}")
        if not isinstance(self.key_every, int) or not 1 <= self.key_every <= MAX_KEY_EVERY:
            raise ConfigError(f"ExCP key_every must be an integer in 1..{MAX_KEY_EVERY}, got {self.key_every!r}")
        if not isinstance(self.min_numel, int) or self.min_numel < 1:
            raise ConfigError(f"ExCP min_numel must be an integer >= 1, got {self.min_numel!r}")

    def to_json(self) -> dict[str, Any]:
        """The options as recorded in the manifest."""
        return dataclasses.asdict(self)


def parse_lossy(value: Any) -> ExcpOptions | None:
    """A tier's ``lossy`` option: ``None`` (lossless), ``"excp"`` (default parameters), an :class:`ExcpOptions`,
    or a dict ``{"scheme": "excp", <ExcpOptions fields>...}``."""
    if value is None:
        return None
    if isinstance(value, ExcpOptions):
        return value
    if value == SCHEME:
        return ExcpOptions()
    if isinstance(value, Mapping) and value.get("scheme") == SCHEME:
        fields = {f.name for f in dataclasses.fields(ExcpOptions)}
        extra = set(value) - fields - {"scheme"}
        if extra:
            raise ConfigError(f"unknown ExCP option(s) {sorted(extra)}; known: {sorted(fields)}")
        return ExcpOptions(**{k: v for k, v in value.items() if k != "scheme"})
    raise ConfigError(f"unknown lossy codec {value!r}: use None (lossless), 'excp' or ExcpOptions(...)")


# --- the quantiser --------------------------------------------------------------------------------------
def quantise(
    values: np.ndarray, levels: int, *, iterations: int = 8, sample: int = 1 << 16
) -> tuple[np.ndarray, np.ndarray]:
    """Non-uniform quantisation of finite ``values`` (1-D float64) to at most ``levels`` levels.

    Returns ``(codebook, codes)``: ``codebook`` float64, sorted ascending, its first and last entries the
    minimum and maximum of ``values``; ``codes`` (uint8) the index of each value's nearest level. Levels are
    refined by Lloyd's k-means on a sample, the end levels held at the extremes, so every value lies within
    ``max(diff(codebook)) / 2`` of its level (:func:`quantiser_bound`).
    """
    if not 1 <= levels <= 255:
        raise ConfigError(f"levels must be in 1..255, got {levels}")
    if values.size == 0:
        return np.zeros(1), np.zeros(0, np.uint8)
    lo, hi = float(values.min()), float(values.max())
    if levels == 1 or lo == hi:
        book = np.array([lo]) if lo == hi else np.array([(lo + hi) / 2])
        if lo != hi:  # one level: the midpoint is the best a single level can guarantee
            return book, np.zeros(values.size, np.uint8)
        return book, np.zeros(values.size, np.uint8)
    if values.size > sample:
        idx = np.linspace(0, values.size - 1, sample).astype(np.int64)
        fit = np.sort(values[idx])
    else:
        fit = np.sort(values)
    k = min(levels, max(2, fit.size))
    book = np.quantile(fit, np.linspace(0.0, 1.0, k))
    csum = np.concatenate(([0.0], np.cumsum(fit)))
    book[0], book[-1] = lo, hi
    for _ in range(iterations):
        mids = (book[1:] + book[:-1]) / 2
        # fit[edges[j]:edges[j + 1]] are nearest to level j; a level may get none (the sample need not hold the
        # extremes the end levels are pinned to)
        edges = np.concatenate(([0], np.searchsorted(fit, mids), [fit.size]))
        sums = csum[edges[1:]] - csum[edges[:-1]]
        counts = np.diff(edges)
        new = np.where(counts > 0, sums / np.maximum(counts, 1), book)
        new[0], new[-1] = lo, hi
        new = np.unique(new)
        if new.size == book.size and np.array_equal(new, book):
            break
        book = new
    codes = nearest(book, values)
    return book, codes


def nearest(book: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The index of each value's nearest level of the sorted ``book`` (ties to the lower level), uint8."""
    mids = (book[1:] + book[:-1]) / 2
    return np.searchsorted(mids, values, side="left").astype(np.uint8)


def quantiser_bound(book: np.ndarray) -> float:
    """The largest distance of a value in ``[book[0], book[-1]]`` from its nearest level."""
    return float(np.max(np.diff(book)) / 2) if book.size > 1 else 0.0


# --- classification -----------------------------------------------------------------------------------
def _base_name(name: str) -> str:
    return name.rsplit("/", 1)[-1]


def classify(layout: Layout, options: ExcpOptions) -> list[str]:
    """Each tensor's class: ``weight``, ``exp_avg``, ``exp_avg_sq`` or ``exact`` (stored exactly)."""
    out = []
    for t in layout.tensors:
        info = dtypes.info(dtypes.from_name(t.dtype))
        numel = math.prod(t.shape)
        floating = t.dtype in ("float32", "bfloat16", "float16", "float64")
        if not floating or numel < options.min_numel or info.itemsize == 0:
            out.append("exact")
        elif _base_name(t.name) in MOMENTS:
            out.append(_base_name(t.name))
        elif "/state/" in f"/{t.name}":  # other optimizer state (max_exp_avg_sq, momentum buffers ...)
            out.append("exact")
        else:
            out.append("weight")
    return out


def pair_moments(layout: Layout, classes: list[str]) -> dict[int, int]:
    """Weight tensor index -> the index of its parameter's ``exp_avg_sq`` (a heuristic: optimizer states are
    numbered in parameter order, weights are in module order; paired in order where shapes agree)."""
    weights = [i for i, c in enumerate(classes) if c == "weight"]
    sq = []
    for i, c in enumerate(classes):
        if c == "exp_avg_sq":
            parent = layout.tensors[i].name.rsplit("/", 1)[0]
            head, _, idx = parent.rpartition("/")
            sq.append((head, int(idx) if idx.isdigit() else 1 << 62, parent, i))
    sq.sort()
    out: dict[int, int] = {}
    w = 0
    for _, _, _, i in sq:
        shape = layout.tensors[i].shape
        j = w
        while j < len(weights) and layout.tensors[weights[j]].shape != shape:
            j += 1
        if j < len(weights):
            out[weights[j]] = i
            w = j + 1
    return out


# --- encode / decode ----------------------------------------------------------------------------------
_UNIT = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11, "float64": 2.0**-53}


_TINY = {"float32": 1.5e-45, "bfloat16": 9.2e-41, "float16": 6e-8, "float64": 5e-324}


def _raw(stream: memoryview | bytearray | bytes, t: TensorEntry) -> np.ndarray:
    """The bytes of tensor ``t`` of ``stream`` (uint8, sharing memory, read-only buffers allowed)."""
    return np.frombuffer(stream, np.uint8, count=t.nbytes, offset=t.offset) if t.nbytes else np.zeros(0, np.uint8)


def _read64(stream: memoryview | bytearray | bytes, t: TensorEntry) -> np.ndarray:
    """Floating tensor ``t`` of ``stream`` as float64, 1-D."""
    raw = _raw(stream, t)
    if t.dtype == "bfloat16":
        return (raw.view("<u2").astype(np.uint32) << 16).view("<f4").astype(np.float64)
    return raw.view({"float32": "<f4", "float16": "<f2", "float64": "<f8"}[t.dtype]).astype(np.float64)


def _write_cast(out: bytearray, t: TensorEntry, values: np.ndarray) -> None:
    """Store float64 ``values`` as tensor ``t`` (its dtype, round to nearest even) into ``out``."""
    if not t.nbytes:
        return
    cast = torch.from_numpy(np.ascontiguousarray(values)).to(dtypes.from_name(t.dtype))
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[cast.element_size()]
    out[t.offset : t.offset + t.nbytes] = cast.view(width).numpy().tobytes()


@dataclass
class Encoded:
    """One checkpoint encoded by ExCP: the stream to store and what the reader rebuilds from it."""

    layout: Layout
    stream: bytearray
    skeleton: dict[str, Any]
    lossy: dict[str, Any]
    #: the original stream as the reader will rebuild it (the next checkpoint's residual base)
    reconstruction: bytearray


def _enc_name(i: int, part: str) -> str:
    return f"excp/{i}/{part}"


def encode(
    layout: Layout,
    stream: memoryview,
    options: ExcpOptions,
    *,
    base: tuple[int, memoryview] | None,
    skeleton: Any,
    numpy_names: tuple[str, ...] = (),
) -> Encoded:
    """Encode ``stream`` (laid out as ``layout``); ``base``: the previous checkpoint's step and its stream as
    rebuilt (weights become residuals against it; ``None``: a key checkpoint, weights exact)."""
    classes = classify(layout, options)
    pairs = pair_moments(layout, classes)
    levels = (1 << options.bits) - 1
    recon = bytearray(layout.total_bytes)
    weight_masks: dict[int, np.ndarray] = {}
    # per tensor: mode, encoded pieces (name, dtype, shape, bytes), [bound, pruned fraction, max_abs, rel_l2]
    results: dict[int, tuple[str, list[tuple[str, str, tuple[int, ...], np.ndarray]], list[float]]] = {}
    for i in sorted(range(len(layout.tensors)), key=lambda i: classes[i] != "weight"):  # weight masks first
        t = layout.tensors[i]
        cls = classes[i]
        mode = "copy"
        x = _read64(stream, t) if cls != "exact" else np.zeros(0)
        if cls != "exact" and np.isfinite(x).all():
            if cls == "weight" and base is not None:
                mode = "residual"
            elif cls in MOMENTS:
                mode = "direct"
        if mode == "copy":
            raw = _raw(stream, t)
            recon[t.offset : t.offset + t.nbytes] = raw.tobytes()
            results[i] = ("copy", [(_enc_name(i, "copy"), t.dtype, t.shape, raw)], [0.0, 0.0, 0.0, 0.0])
            continue
        prev = _read64(base[1], t) if mode == "residual" and base is not None else None
        r = x - prev if prev is not None else x
        a = np.abs(r)
        if cls == "weight":
            thr = options.alpha * float(np.median(a))
            j = pairs.get(i)
            thr_e: np.ndarray | float = thr
            if j is not None and thr > 0:
                sq = np.sqrt(np.maximum(_read64(stream, layout.tensors[j]), 0.0))
                ms = float(sq.mean()) if np.isfinite(sq).all() else 0.0
                if ms > 0:
                    thr_e = thr * ms / np.maximum(sq, ms * 1e-3)
            keep = a > thr_e
            weight_masks[i] = keep
        else:
            keep = a > options.beta * float(a.mean())
            w = next((wi for wi, mj in pairs.items() if mj == i or _sibling(layout, mj, i)), None)
            if w is not None and w in weight_masks:
                keep &= weight_masks[w]
        vals = r[keep]
        book, codes = quantise(vals, levels)
        full_codes = np.zeros(r.size, np.uint8)
        full_codes[keep] = codes + 1
        book32 = np.zeros(levels + 1, np.float32)
        book32[1 : 1 + book.size] = book.astype(np.float32)
        rhat = book32.astype(np.float64)[full_codes]
        rebuilt = prev + rhat if prev is not None else rhat
        _write_cast(recon, t, rebuilt)
        # the bound: pruned elements are off by at most the largest pruned magnitude, kept ones by at most
        # half the largest gap of the (float32) levels (the actual largest distance, when larger); then the
        # rounding to the tensor's dtype
        prune_bound = float(a[~keep].max()) if (~keep).any() else 0.0
        qb = 0.0
        if vals.size:
            levels64 = book32[1 : 1 + book.size].astype(np.float64)
            qb = max(quantiser_bound(levels64), float(np.abs(vals - levels64[codes]).max()))
        big = float(np.abs(rebuilt).max(initial=0.0))
        bound = max(prune_bound, qb) * (1 + 2.0**-40) + _UNIT[t.dtype] * big * 1.001 + _TINY[t.dtype]
        bound += 2.0**-50 * float(np.abs(x).max(initial=0.0))
        enc: list[tuple[str, str, tuple[int, ...], np.ndarray]] = [
            (_enc_name(i, "codes"), "uint8", (int(r.size),), full_codes),
            (_enc_name(i, "codebook"), "float32", (levels + 1,), book32.view(np.uint8)),
        ]
        results[i] = (mode, enc, [bound, float(1.0 - keep.mean()) if keep.size else 0.0, 0.0, 0.0])

    modes = [results[i][0] for i in range(len(layout.tensors))]
    pieces = [p for i in range(len(layout.tensors)) for p in results[i][1]]
    per_tensor = [results[i][2] for i in range(len(layout.tensors))]
    # errors measured on the reconstruction exactly as the reader rebuilds it
    acc: dict[str, list[float]] = {}
    for i, t in enumerate(layout.tensors):
        cls = classes[i] if modes[i] != "copy" else "exact"
        c = acc.setdefault(cls, [0.0, 0.0, 0.0, 0.0, 0.0])
        c[4] += math.prod(t.shape)
        if modes[i] == "copy":
            continue
        x, xh = _read64(stream, t), _read64(recon, t)
        d = np.abs(x - xh)
        max_abs = float(d.max(initial=0.0))
        num, den = float(np.dot(d, d)), float(np.dot(x, x))
        per_tensor[i][2] = max_abs
        per_tensor[i][3] = math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else 1.0)
        c[0] = max(c[0], max_abs)
        c[1] += num
        c[2] += den
        c[3] = max(c[3], per_tensor[i][0])
    errors = {
        cls: {"max_abs": mx, "rel_l2": math.sqrt(num / den) if den > 0 else 0.0, "bound": bd, "elements": int(n)}
        for cls, (mx, num, den, bd, n) in acc.items()
    }
    enc_layout = plan_layout((n, dt, shape, math.prod(shape) * _itemsize(dt)) for n, dt, shape, _ in pieces)
    enc_stream = bytearray(enc_layout.total_bytes)
    enc_skel: dict[str, Any] = {"excp": {}}
    for (n, _, _, raw_bytes), e in zip(pieces, enc_layout.tensors, strict=True):
        enc_stream[e.offset : e.offset + e.nbytes] = raw_bytes.tobytes()
        _, idx, part = n.split("/")
        enc_skel["excp"].setdefault(idx, {})[part] = {"__tensor__": n}
    lossy = {
        "scheme": SCHEME,
        "version": VERSION,
        "base": base[0] if base is not None else None,
        "options": options.to_json(),
        "layout": _layout_json(layout),
        "skeleton": skeleton,
        "numpy_names": list(numpy_names),
        # per original tensor: [mode, class, bound, pruned fraction, max_abs, rel_l2]
        "tensors": [[modes[i], classes[i], *per_tensor[i]] for i in range(len(layout.tensors))],
        "errors": errors,
    }
    return Encoded(enc_layout, enc_stream, enc_skel, lossy, recon)


def _sibling(layout: Layout, a: int, b: int) -> bool:
    """Whether tensors ``a`` and ``b`` are moments of the same optimizer state entry."""
    return layout.tensors[a].name.rsplit("/", 1)[0] == layout.tensors[b].name.rsplit("/", 1)[0]


def _itemsize(dt: str) -> int:
    return dtypes.info(dtypes.from_name(dt)).itemsize


def _layout_json(layout: Layout) -> dict[str, Any]:
    return {
        "align": layout.align,
        "total_bytes": layout.total_bytes,
        "signature": layout.signature,
        "tensors": [[t.name, t.dtype, list(t.shape), t.offset, t.nbytes] for t in layout.tensors],
    }


def _checked(manifest: Manifest, where: str) -> tuple[Layout, Any, list[Any]]:
    """The original layout, skeleton and per-tensor records of a lossy manifest, checked."""
    d = manifest.lossy
    c = validate._Check(where)
    if not isinstance(d, dict) or d.get("scheme") != SCHEME:
        c.fail("lossy.scheme", f"unknown lossy scheme {str(d.get('scheme') if isinstance(d, dict) else d)[:40]!r}")
    assert isinstance(d, dict)
    if d.get("version") != VERSION:
        c.fail("lossy.version", f"unknown ExCP version {d.get('version')!r}")
    lay = c.obj(d.get("layout"), "lossy.layout")
    names = validate._layout(c, lay)
    validate.skeleton(d.get("skeleton"), names, where + " (lossy.skeleton)")
    layout = Layout(
        tuple(TensorEntry(n, dt, tuple(s), o, nb) for n, dt, s, o, nb in lay["tensors"]),
        int(lay["total_bytes"]),
        int(lay["align"]),
    )
    recs = c.arr(d.get("tensors"), "lossy.tensors")
    if len(recs) != len(layout.tensors):
        c.fail("lossy.tensors", f"{len(recs)} entries for {len(layout.tensors)} tensors")
    enc = manifest.layout.by_name()
    base = d.get("base")
    if base != manifest.delta_base:
        c.fail("lossy.base", f"{base!r} is not the manifest's delta_base {manifest.delta_base!r}")
    for i, rec in enumerate(recs):
        m = f"lossy.tensors[{i}]"
        mode = c.arr(rec, m)[0] if isinstance(rec, list) and rec else None
        if mode not in _MODES:
            c.fail(m, f"unknown mode {str(mode)[:20]!r}")
        t = layout.tensors[i]
        n = math.prod(t.shape)
        want = {"copy": (t.dtype, n)} if mode == "copy" else {"codes": ("uint8", n), "codebook": ("float32", None)}
        for part, (dt, numel) in want.items():
            e = enc.get(_enc_name(i, part))
            if e is None or e.dtype != dt or (numel is not None and math.prod(e.shape) != numel):
                c.fail(m, f"the stream has no {dt} tensor {_enc_name(i, part)!r} of {numel} elements")
        if mode == "residual" and base is None:
            c.fail(m, "a residual without a base")
        if mode != "copy" and t.dtype not in _UNIT:
            c.fail(m, f"a quantised {t.dtype} tensor")
    return layout, d.get("skeleton"), recs


def decode(
    manifest: Manifest, stored: memoryview | bytearray, base: memoryview | bytearray | None, where: str
) -> bytearray:
    """Rebuild the original stream of a lossy checkpoint from its stored stream and its base's rebuilt stream."""
    layout, _, recs = _checked(manifest, where)
    enc = manifest.layout.by_name()
    out = bytearray(layout.total_bytes)
    for i, t in enumerate(layout.tensors):
        mode = recs[i][0]
        if mode == "copy":
            out[t.offset : t.offset + t.nbytes] = _raw(stored, enc[_enc_name(i, "copy")]).tobytes()
            continue
        codes = _raw(stored, enc[_enc_name(i, "codes")])
        book = _raw(stored, enc[_enc_name(i, "codebook")]).view("<f4").astype(np.float64)
        if codes.size and int(codes.max()) >= book.size:
            raise CorruptCheckpointError(f"{where}: lossy tensor {i} has a code past its codebook", (where,))
        rhat = book[codes]
        if mode == "residual":
            if base is None:
                raise CorruptCheckpointError(f"{where}: a residual without its base's stream", (where,))
            rhat = _read64(base, t) + rhat
        _write_cast(out, t, rhat)
    return out


# --- reading ------------------------------------------------------------------------------------------
def is_lossy(manifest: Manifest) -> bool:
    """Whether a checkpoint is stored lossy (its manifest has a ``lossy`` member)."""
    return manifest.lossy is not None


def rebuild(reader: CheckpointReader) -> tuple[bytearray, CheckpointContent]:
    """The original stream and content of a lossy checkpoint: its residual bases are rebuilt first (opened
    through the reader's own base factory, which refuses cycles and chains longer than 16 steps)."""
    where = reader.prefix + GROUP_KEY
    chain = [reader]
    signature = _checked(reader.manifest, where)[0].signature
    while (b := chain[-1].manifest.delta_base) is not None:
        factory = chain[-1]._base_factory
        if factory is None:
            raise CorruptCheckpointError(f"{where}: the residual base {b} cannot be opened", (where,))
        try:
            base = factory(b)
        except StepNotFoundError as e:
            raise CorruptCheckpointError(f"{where}: the residual base {b} is not readable here ({e})", (where,)) from e
        if not is_lossy(base.manifest) or _checked(base.manifest, base.prefix + GROUP_KEY)[0].signature != signature:
            raise CorruptCheckpointError(f"{where}: the residual base {b} is not a lossy copy of this layout", (where,))
        chain.append(base)
    prev: bytearray | None = None
    for r in reversed(chain):
        stored = bytearray(r.manifest.layout.total_bytes)
        r.read_all_into(memoryview(stored))
        prev = decode(r.manifest, stored, prev, r.prefix + GROUP_KEY)
    assert prev is not None
    layout, skeleton, _ = _checked(reader.manifest, reader.prefix + GROUP_KEY)
    lossy = reader.manifest.lossy or {}
    content = CheckpointContent(
        layout, skeleton, tuple(lossy.get("numpy_names", ())), dict(reader.manifest.user), lossy=lossy
    )
    return prev, content


# --- writing ------------------------------------------------------------------------------------------
@dataclass
class LossyState:
    """What a lossy tier remembers: its last checkpoint as rebuilt (the next residual base)."""

    step: int | None = None
    signature: str | None = None
    stream: bytearray | None = None
    since_key: int = 0


class LossyWriter:
    """Writes a tier's checkpoints through ExCP: the plan's stream is encoded, then the encoded stream is
    written by the tier's ordinary writer with zstd as the entropy stage (same interface as
    :class:`~asymstore.writer.CheckpointWriter`)."""

    def __init__(self, tier: PersistentTier, options: ExcpOptions, state: LossyState) -> None:
        self.tier = tier
        self.options = options
        self.state = state

    def _base(self, step: int, signature: str) -> tuple[int, memoryview] | None:
        st = self.state
        if st.step is None or st.stream is None or st.signature != signature or st.step == step:
            return None
        if st.since_key + 1 >= self.options.key_every or not self.tier.has(st.step):
            return None
        return st.step, memoryview(st.stream)

    def write(
        self,
        plan: WritePlan,
        stream: memoryview | StreamSource,
        content: CheckpointContent,
        *,
        delta_base: DeltaBase | None = None,
        progress: Callable[[int, int], None] | None = None,
        crcs: object = None,
    ) -> WriteReport:
        """Encode ``plan``'s step and write it (``delta_base`` and ``crcs`` are ignored: ExCP keeps its own base
        and writes an encoded stream)."""
        total = content.layout.total_bytes
        if isinstance(stream, memoryview):
            whole = stream.cast("B") if stream.format != "B" or stream.ndim != 1 else stream
        else:
            buf = bytearray(total)
            step_n = max(plan.partition_bytes, 1)
            for a in range(0, total, step_n):
                b = min(a + step_n, total)
                buf[a:b] = stream.read(a, b)
            whole = memoryview(buf)
        sig = content.layout.signature
        base = self._base(plan.step, sig)
        enc = encode(
            content.layout,
            whole[:total],
            self.options,
            base=base,
            skeleton=content.skeleton,
            numpy_names=content.numpy_names,
        )
        enc_content = CheckpointContent(enc.layout, enc.skeleton, (), dict(content.user), lossy=enc.lossy)
        options = dataclasses.replace(self.tier.write_options(), compression=ZSTD3, delta_every=0)
        model = self.tier.probe().write_model() if options.needs_model else None
        plan2 = plan_write(plan.step, enc.layout, options, model=model, prefix=plan.prefix, world_size=plan.world_size)
        report = self.tier.plain_writer().write(plan2, memoryview(enc.stream), enc_content, progress=progress)
        st = self.state
        st.step, st.signature, st.stream = plan.step, sig, enc.reconstruction
        st.since_key = 0 if base is None else st.since_key + 1
        report.raw_bytes = total
        return report


__all__ = [
    "ExcpOptions",
    "LossyState",
    "LossyWriter",
    "RebuiltSource",
    "check_lossy_chain",
    "decode",
    "encode",
    "is_lossy",
    "lazy_checkpoint",
    "parse_lossy",
    "quantise",
    "quantiser_bound",
    "range_source",
    "rebuild",
    "summary",
]


class RebuiltSource:
    """A lossy checkpoint's rebuilt stream as a range source (lazy reads of an ExCP copy)."""

    def __init__(self, stream: bytearray, stored_bytes: int) -> None:
        self.stream = stream
        self._stored = stored_bytes
        self._read = 0

    @property
    def bytes_read(self) -> int:
        """Stored bytes fetched to rebuild the stream (all of them, once)."""
        return self._stored

    def read_range_into(self, start: int, end: int, out: memoryview) -> None:
        """Rebuilt stream bytes ``[start, end)`` into ``out``."""
        if not 0 <= start <= end <= len(self.stream):
            raise ValueError(f"range [{start}, {end}) outside the stream of {len(self.stream)} bytes")
        out[: end - start] = memoryview(self.stream)[start:end]


def range_source(reader: CheckpointReader) -> Any:
    """``reader`` itself, or for a lossy checkpoint its rebuilt stream (:class:`RebuiltSource`)."""
    if not is_lossy(reader.manifest):
        return reader
    stream, _ = rebuild(reader)
    return RebuiltSource(stream, reader.manifest.stored_bytes)


def summary(lossy: Mapping[str, Any]) -> str:
    """A lossy checkpoint's recorded reconstruction errors, in words."""
    errs = lossy.get("errors", {})
    parts = [
        f"{k} max abs {v.get('max_abs', 0):.3g} (bound {v.get('bound', 0):.3g}), rel L2 {v.get('rel_l2', 0):.3g}"
        for k, v in (errs.items() if isinstance(errs, Mapping) else ())
        if isinstance(v, Mapping) and k != "exact"
    ]
    return "; ".join(parts) or "no tensor stored lossy"


def lazy_checkpoint(reader: CheckpointReader) -> LazyCheckpoint:
    """A lazy view of a lossy checkpoint (rebuilt whole when opened: residuals need every byte)."""
    from .lazy import LazyCheckpoint

    stream, content = rebuild(reader)
    ck = LazyCheckpoint.__new__(LazyCheckpoint)
    ck.reader = None
    ck._init(
        RebuiltSource(stream, reader.manifest.stored_bytes),
        (),
        step=reader.step,
        layout=content.layout,
        skeleton=content.skeleton,
        user=dict(content.user),
    )
    return ck


def check_lossy_chain(tiers: Sequence[Any]) -> list[ExcpOptions | None]:
    """Each tier's lossy codec (``TierSpec.lossy``), refused where resuming must stay exact: on the first tier
    (what a restart reads first), on a tier in this process's memory, and on any tier but the last."""
    out = [parse_lossy(getattr(t, "lossy", None)) for t in tiers]
    for k, (t, opt) in enumerate(zip(tiers, out, strict=True)):
        if opt is None:
            continue
        url = getattr(t, "url", t)
        name = getattr(url, "url", url)
        if k == 0:
            raise ConfigError(
                f"lossy={SCHEME!r} on the first tier ({name}) is refused: restores read the first tier first "
                "and must resume bit-exact; put the lossy codec on an archive tier below a lossless one, e.g. "
                f"[TierSpec('/fast'), TierSpec('hdfs://.../archive', lossy={SCHEME!r})]"
            )
        caps = getattr(url, "capabilities", None)
        if str(name).startswith("memory://") or (caps is not None and getattr(caps, "volatile", False)):
            raise ConfigError(f"lossy={SCHEME!r} on a host-memory tier ({name}) is refused: it is for archive tiers")
        if k != len(tiers) - 1:
            raise ConfigError(
                f"lossy={SCHEME!r} on tier {k} ({name}) is refused: only the last tier of the chain may be lossy "
                "(a tier below would copy the lossy checkpoints as if they were exact)"
            )
    return out
