"""Read an asymstore checkpoint with nothing but zarr-python, numpy and the standard library.

This is the reference reader of docs/format.md: each function implements one section of the specification
(cited as "spec §N") and uses only what the specification says, never asymstore (nor torch). The bytes are
read through zarr-python; the checksums the format carries are verified on the stored objects themselves.

Usage: ``python plain_zarr_reader.py ROOT [STEP [RANK]]`` prints, as JSON, the committed steps, the step
read, its tensors ``{name: [numpy_view_dtype, torch_dtype, shape, sha256]}`` and the decoded state
(``tree``: tensors as ``"tensor:<sha256>"``, see :func:`render`) of the newest (or the given) step.
It exits with status 2 and a message on stderr for a checkpoint it must refuse (spec §12).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import struct
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import zarr

FORMAT = "asymstore/1"  # the one version this reader implements (spec §12)
KNOWN_KINDS = ("raw", "zstd", "blosc")
STEP_RE = re.compile(r"^step_(\d{12})$")
MISSING = (1 << 64) - 1


class Refused(Exception):
    """The checkpoint is damaged, or of a version / feature this reader does not implement."""


# --- conventions: crc32c (Castagnoli, reflected 0x82F63B78) --------------------------------------------
def _table() -> list[int]:
    out = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        out.append(c)
    return out


_TABLE = _table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    t = _TABLE
    for b in data:
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


assert crc32c(b"123456789") == 0xE3069283


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# --- spec §1, §2: tier root and step directories -------------------------------------------------------
def step_path(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:012d}")


def committed_steps(root: str) -> list[int]:
    """Step directories (``step_`` + 12 digits) holding a COMMIT, oldest first; other names are ignored."""
    out = []
    for name in os.listdir(root):
        m = STEP_RE.match(name)
        if m and os.path.isfile(os.path.join(root, name, "COMMIT")):
            out.append(int(m.group(1)))
    return sorted(out)


# --- spec §9: commit markers ---------------------------------------------------------------------------
def read_marker(path: str) -> dict[str, Any]:
    """A commit marker, its checksum verified: crc32c of the bytes before the last ``,"crc32c":`` plus ``}``."""
    raw = _read(path)
    i = raw.rfind(b',"crc32c":')
    body = json.loads(raw)
    if i < 0 or crc32c(raw[:i] + b"}") != body.get("crc32c"):
        raise Refused(f"{path}: commit marker checksum mismatch")
    return dict(body)


# --- spec §2, §10 steps 1-2: which checkpoint directory to read ------------------------------------------
def checkpoint_dir(root: str, step: int, rank: int = 0) -> tuple[str, dict[str, Any]]:
    """The checkpoint directory of ``step`` (``rank``'s rank directory for a multi-rank step) and its marker."""
    d = step_path(root, step)
    marker = read_marker(os.path.join(d, "COMMIT"))
    if "ranks" not in marker:  # single-rank: the step directory is the checkpoint directory
        return d, marker
    if not 0 <= rank < int(marker["ranks"]):
        raise Refused(f"step {step} has ranks 0..{marker['ranks'] - 1}, not {rank}")
    rd = os.path.join(d, f"r{rank:05d}")
    raw = _read(os.path.join(rd, "COMMIT"))
    if crc32c(raw) != marker["shards_crc32c"][str(rank)]:
        raise Refused(f"{rd}/COMMIT does not match the step's global marker")
    return rd, read_marker(os.path.join(rd, "COMMIT"))


# --- spec §4, §10 step 3, §12: the manifest and its version --------------------------------------------
def manifest(root: str, step: int, rank: int = 0) -> dict[str, Any]:
    """The manifest (the step group's ``attributes.asymstore``), checksum and version checked."""
    d, marker = checkpoint_dir(root, step, rank)
    if crc32c(_read(os.path.join(d, "zarr.json"))) != marker["group_crc32c"]:
        raise Refused(f"{d}/zarr.json: checksum mismatch")
    m = dict(zarr.open_group(d, mode="r").attrs["asymstore"])
    if m.get("format") != FORMAT:
        raise Refused(f"{d}: unknown checkpoint format {m.get('format')!r}; this reader implements {FORMAT}")
    for label, chain in m["codecs"].items():  # spec §6, §12: refuse what this reader does not implement
        if chain["kind"] not in KNOWN_KINDS:
            raise Refused(f"{d}/{label}: unknown codec kind {chain['kind']!r}")
        if crc32c(_read(os.path.join(d, label, "zarr.json"))) != marker["arrays_crc32c"][label]:
            raise Refused(f"{d}/{label}/zarr.json: checksum mismatch")
    return m


# --- spec §7: a partition's shard object, verified -----------------------------------------------------
def check_shard(path: str, nbytes: int, stored_bytes: int, chunk_crcs: list[int], P: int, C: int) -> None:
    """Size, index checksum and every stored chunk's crc32c of one partition object."""
    blob = _read(path)
    if len(blob) != stored_bytes:
        raise Refused(f"{path}: {len(blob)} bytes, manifest says {stored_bytes}")
    per_shard = P // C
    index_len = 16 * per_shard
    index, (crc,) = blob[-index_len - 4 : -4], struct.unpack("<I", blob[-4:])
    if crc32c(index) != crc:
        raise Refused(f"{path}: shard index checksum mismatch")
    pairs = np.frombuffer(index, dtype="<u8").reshape(per_shard, 2)
    n = math.ceil(nbytes / C)
    if len(chunk_crcs) != n or any(int(o) != MISSING for o in pairs[n:, 0]):
        raise Refused(f"{path}: index does not match the partition's {n} chunks")
    for j in range(n):
        off, size = int(pairs[j, 0]), int(pairs[j, 1])
        if crc32c(blob[off : off + size]) != chunk_crcs[j]:
            raise Refused(f"{path}: chunk {j} checksum mismatch")


# --- spec §4.1, §6, §10 step 5, §11: the stream ---------------------------------------------------------
def read_stream(root: str, step: int, rank: int = 0) -> np.ndarray:
    """The checkpoint's whole byte stream (uint8), every checksum verified, deltas resolved."""
    m = manifest(root, step, rank)
    d, _ = checkpoint_dir(root, step, rank)
    group = zarr.open_group(d, mode="r")
    P, C = m["partition_bytes"], m["chunk_bytes"]
    stream = np.zeros(m["layout"]["total_bytes"], dtype=np.uint8)
    base_stream: np.ndarray | None = None
    for position, (index, start, nbytes, label, shard, stored, crcs) in enumerate(m["partitions"]):
        assert index == position and start == index * P, "partitions are in stream order (spec §4.1)"
        check_shard(os.path.join(d, label, "c", str(shard)), nbytes, stored, crcs, P, C)
        arr = group[label]
        stream[start : start + nbytes] = arr[shard * P : shard * P + nbytes]
        transform = arr.attrs["asymstore"]["transform"]
        if transform is not None:  # spec §11: XOR with the same bytes of the base, same tier and rank
            if set(transform) != {"xor_with_step"}:
                raise Refused(f"{d}/{label}: unknown transform {transform!r}")
            if base_stream is None:
                base_stream = read_stream(root, int(transform["xor_with_step"]), rank)
            stream[start : start + nbytes] ^= base_stream[start : start + nbytes]
    return stream


# --- spec §5, §5.2: tensors ------------------------------------------------------------------------------
def read_tensors(root: str, step: int, rank: int = 0) -> dict[str, np.ndarray]:
    """name -> numpy array (bfloat16/float8/complex32 as same-width unsigned int views)."""
    m = manifest(root, step, rank)
    stream = read_stream(root, step, rank)
    views = m["numpy_view_dtypes"]
    align = m["layout"]["align"]
    out = {}
    for name, dtype, shape, offset, nbytes in m["layout"]["tensors"]:
        assert offset % align == 0, "tensors sit at aligned offsets (spec §5)"
        out[name] = stream[offset : offset + nbytes].view(np.dtype(views[dtype])).reshape(shape)
    return out


# --- spec §8.2, §9.3: global tensors from the parts every rank holds ------------------------------------
def global_index(root: str, step: int) -> dict[str, Any]:
    """The step's merged index: ``INDEX`` (crc32c in the global marker) or, without one, every rank's
    ``global_parts`` merged (same JSON form: name -> {dtype, shape, parts: [[rank, local, off, kind, a, b]]})."""
    d = step_path(root, step)
    marker = read_marker(os.path.join(d, "COMMIT"))
    if "index_crc32c" in marker:
        raw = _read(os.path.join(d, "INDEX"))
        if crc32c(raw) != marker["index_crc32c"]:
            raise Refused(f"{d}/INDEX: checksum mismatch")
        return dict(json.loads(raw)["tensors"])
    tensors: dict[str, Any] = {}
    for rank in range(int(marker.get("ranks", 1))):
        for local, pieces in manifest(root, step, rank).get("global_parts", {}).items():
            for name, dtype, shape, off, kind, a, b in pieces:
                t = tensors.setdefault(name, {"dtype": dtype, "shape": shape, "parts": []})
                t["parts"].append([rank, local, off, kind, a, b])
    return tensors


def read_global(root: str, step: int, name: str) -> np.ndarray:
    """Global tensor ``name`` reassembled from the parts of every rank (replicas: the first copy wins)."""
    t = global_index(root, step)[name]
    shape = tuple(t["shape"])
    out = np.zeros(shape, dtype=np.uint8)  # typed by the first part read (an empty tensor may have none)
    cache: dict[int, dict[str, np.ndarray]] = {}
    for i, (rank, local, off, kind, a, b) in enumerate(t["parts"]):
        if rank not in cache:
            cache[rank] = read_tensors(root, step, rank)
        src = cache[rank][local].reshape(-1)
        if i == 0:
            out = out.astype(src.dtype)
        if kind == "box":  # a box of the global tensor, stored C-order from element `off`
            n = math.prod(b)
            out[tuple(slice(o, o + k) for o, k in zip(a, b, strict=True))] = src[off : off + n].reshape(b)
        elif kind == "flat":  # elements [a, a + b) of the flattened global tensor
            out.reshape(-1)[a : a + b] = src[off : off + b]
        else:
            raise Refused(f"step {step}: unknown part kind {kind!r} of {name!r}")
    return out


# --- spec §8: the skeleton ---------------------------------------------------------------------------------


def decode_skeleton(v: Any, tensor: Callable[[str], Any]) -> Any:
    """The saved state: tagged forms decoded, ``tensor(name)`` for each tensor reference."""
    if isinstance(v, list):
        return [decode_skeleton(x, tensor) for x in v]
    if not isinstance(v, dict):
        return v
    if len(v) == 1:
        ((tag, x),) = v.items()
        if tag in ("__tensor__", "__ndarray__"):
            return tensor(x)
        if tag == "__tuple__":
            return tuple(decode_skeleton(y, tensor) for y in x)
        if tag == "__dict__":
            return {_hashable(decode_skeleton(k, tensor)): decode_skeleton(y, tensor) for k, y in x}
        if tag == "__float__":
            return float(x)
        if tag == "__bytes__":
            return base64.b64decode(x)
        if tag in ("__torch_dtype__", "__size__"):
            return {tag: x}
        if tag == "__npscalar__":
            dt, val = x
            if dt == "bool":
                return np.bool_(val)
            if isinstance(val, list):
                return np.dtype(dt).type(complex(float(val[0]), float(val[1])))
            return np.dtype(dt).type(float(val) if isinstance(val, str) and np.dtype(dt).kind == "f" else val)
    return {(k[2:] if k.startswith("____") else k): decode_skeleton(x, tensor) for k, x in v.items()}


def _hashable(k: Any) -> Any:
    return tuple(_hashable(x) for x in k) if isinstance(k, (list, tuple)) else k


def render(v: Any) -> Any:
    """A decoded state as comparable JSON: tuples as lists, floats by repr, bytes as hex, dict keys by repr."""
    if isinstance(v, dict):
        return {k if isinstance(k, str) else repr(k): render(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [render(x) for x in v]
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, bytes):
        return "bytes:" + v.hex()
    if isinstance(v, np.generic):
        return f"np:{v.dtype.str}:{v.item()!r}"
    return v


# --- output ------------------------------------------------------------------------------------------------
def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def digests(root: str, step: int, rank: int = 0) -> dict[str, list[Any]]:
    m = manifest(root, step, rank)
    views = m["numpy_view_dtypes"]
    tensors = read_tensors(root, step, rank)
    return {
        name: [views[dtype], dtype, list(shape), sha(tensors[name])]
        for name, dtype, shape, _o, _n in m["layout"]["tensors"]
    }


def tree(root: str, step: int, rank: int = 0) -> Any:
    tensors = read_tensors(root, step, rank)
    return render(decode_skeleton(manifest(root, step, rank)["skeleton"], lambda n: "tensor:" + sha(tensors[n])))


def main(argv: list[str]) -> int:
    root = argv[1]
    steps = committed_steps(root)
    step = int(argv[2]) if len(argv) > 2 else steps[-1]
    rank = int(argv[3]) if len(argv) > 3 else 0
    try:
        out = {"steps": steps, "step": step, "tensors": digests(root, step, rank), "tree": tree(root, step, rank)}
    except Refused as e:
        print(f"refused: {e}", file=sys.stderr)
        return 2
    json.dump(out, sys.stdout)
    assert "asymstore" not in sys.modules and "torch" not in sys.modules, "the plain reader imported asymstore/torch"
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
