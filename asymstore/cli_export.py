"""``asymstore export``: write a step's tensors to a safetensors file."""

from __future__ import annotations

import argparse
import json
import struct
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .files import atomic_file

_ST_DTYPES = {
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
_PIECE = 64 << 20


def safetensors_metadata(step: int, skeleton: Any, user: dict[str, Any]) -> dict[str, str]:
    """String metadata: ``format``, each non-tensor value as JSON, the step, user metadata, the skeleton."""
    from . import cli  # not at import time: cli imports this module

    meta = {"format": "pt"}
    for k, v in cli._skeleton_values(skeleton).items():
        meta[k] = json.dumps(v)
    meta["asymstore.step"] = json.dumps(step)
    meta["asymstore.user"] = json.dumps(user)
    meta["asymstore.skeleton"] = json.dumps(skeleton, separators=(",", ":"))
    return meta


#: the header key safetensors keeps for its metadata: no tensor may be called so
_ST_RESERVED = "__metadata__"
#: the largest header safetensors reads (its MAX_HEADER_SIZE)
_ST_MAX_HEADER = 100_000_000


def _export_names(names: Sequence[str], renames: Sequence[str]) -> dict[str, str]:
    """Tensor name -> its key in the safetensors file, after ``--rename OLD=NEW`` options; ``UsageError`` for a
    name safetensors cannot store (``__metadata__``) left as it is, or a rename that clashes."""
    from . import cli  # not at import time: cli imports this module

    out = {n: n for n in names}
    for r in renames:
        old, sep, new = r.partition("=")
        if not sep or not old or not new:
            raise cli.UsageError(f"--rename takes OLD=NEW, got {r!r}")
        if old not in out:
            raise cli.UsageError(f"--rename {r!r}: no tensor named {old!r} is exported")
        out[old] = new
    keys = list(out.values())
    if _ST_RESERVED in keys:
        raise cli.UsageError(
            f"a tensor is called {_ST_RESERVED!r}, the key safetensors reserves for its metadata, so a safetensors "
            f"file cannot hold it; export it under another name with --rename {_ST_RESERVED}=NEW_NAME, or leave it "
            "out with --filter"
        )
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise cli.UsageError(f"--rename: two tensors would be exported as {dup[0]!r}")
    return out


def cmd_export(args: argparse.Namespace) -> int:
    """``asymstore export``: write a step's tensors to a safetensors file (atomically)."""
    from . import cli  # not at import time: cli imports this module

    st = cli._open_store(args.url)
    step = cli._pick_step(st, args.url, args.step)
    r = cli._reader(st, step)
    m = r.manifest
    tensors = [t for t in m.layout.tensors if cli._match(t.name, args.filter)]
    if not tensors:
        raise cli.UsageError(
            f"no tensor of step {step} matches {args.filter!r}"
            if args.filter
            else f"step {step} has no tensors to export"
        )
    unsupported = [f"{t.name} ({t.dtype})" for t in tensors if t.dtype not in _ST_DTYPES]
    if unsupported:
        raise cli.UsageError(
            "safetensors has no dtype for: " + ", ".join(unsupported[:10]) + "; leave them out with --filter"
        )
    try:
        names = _export_names([t.name for t in tensors], args.rename or [])
    except cli.UsageError as e:
        print(f"asymstore export: error: {e}", file=sys.stderr)
        return cli.EXIT_DAMAGED
    # safetensors' own order: larger element sizes first, then by name, so every tensor is aligned
    from .dtypes import from_name, info

    order = sorted(tensors, key=lambda t: (-info(from_name(t.dtype)).itemsize, names[t.name]))
    header: dict[str, Any] = {}
    off = 0
    for t in order:
        header[names[t.name]] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [off, off + t.nbytes],
        }
        off += t.nbytes
    header["__metadata__"] = safetensors_metadata(step, m.skeleton, m.user)
    if any(names[n] != n for n in names):
        header["__metadata__"]["asymstore.renamed"] = json.dumps({n: v for n, v in names.items() if v != n})
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    if len(hb) > _ST_MAX_HEADER:
        print(
            f"asymstore export: error: the safetensors header would be {len(hb)} bytes; safetensors reads at most "
            f"{_ST_MAX_HEADER} (export fewer tensors with --filter)",
            file=sys.stderr,
        )
        return cli.EXIT_DAMAGED
    out_path = args.out
    total = off
    buf = bytearray(min(max((t.nbytes for t in order), default=0), _PIECE))
    mv = memoryview(buf)
    with atomic_file(out_path) as f, cli._progress(args, f"export step {step}", total) as bar:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        done = 0
        for t in order:  # tensor by tensor, in pieces: memory stays at one piece
            pos = t.offset
            while pos < t.end:
                n = min(_PIECE, t.end - pos)
                r.read_range_into(pos, pos + n, mv[:n])
                f.write(mv[:n])
                pos += n
                done += n
                bar(done)
    if not args.quiet:
        cli._console(args).print(f"wrote {len(order)} tensors ({cli.human_bytes(total)}) of step {step} to {out_path}")
    return cli.EXIT_OK


def add_parser(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Register ``export`` under the ``asymstore`` command."""
    ex = sub.add_parser("export", help="write a step's tensors to a .safetensors file")
    ex.add_argument("url", metavar="URL")
    ex.add_argument("out", metavar="OUT.safetensors")
    ex.add_argument("--step", type=int, help="step to export (default: newest committed)")
    ex.add_argument("--filter", metavar="GLOB", help="only tensors whose name matches")
    ex.add_argument(
        "--rename",
        action="append",
        metavar="OLD=NEW",
        help="export tensor OLD as NEW (repeatable; e.g. for a tensor called __metadata__, which safetensors reserves)",
    )
    common(ex)
