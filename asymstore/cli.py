"""The ``asymstore`` command: inspect, verify and export checkpoints on any tier.

::

    asymstore ls URL [URL ...] [--json]                  steps: ranks, sizes, codecs, where each is complete
    asymstore show URL [--step N] [--rank R] [--filter G] [--json]   tensors and partitions of every rank,
                                                         global tensors, metadata
    asymstore verify URL [--step N | --all] [--json]     read and check every object of every rank
    asymstore export URL OUT                             full tensors to safetensors (asymstore.cli_export)
    asymstore shm ls | rm                                shared-memory regions (asymstore.cli_shm)

Multi-rank steps are handled as a whole: ``ls`` sums every rank, ``show`` lists each rank's tensors,
``verify`` reads every rank, reports every problem with its rank and object, and exits 1 on damage in any.
``--json`` prints one document on stdout (schemas: docs/cli.md). The CLI only reads: it never creates
directories or writes to a tier. Exit codes: 0 ok, 1 a checkpoint is damaged (``verify``, or a read that
failed its checksums), 2 usage errors, bad URLs and missing steps; errors go to stderr. ``--debug`` shows
tracebacks for user errors.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fnmatch
import functools
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from . import cli_shm
from .cli_export import add_parser as _add_export_parser
from .cli_export import cmd_export
from .errors import AsymstoreError, ConfigError, CorruptCheckpointError, StepNotFoundError

EXIT_OK, EXIT_DAMAGED, EXIT_USAGE = 0, 1, 2


class UsageError(AsymstoreError):
    """A user error reported with exit code 2 (bad URL, missing step, bad option)."""


# --- opening tiers (read-only) ------------------------------------------------------
def _open_store(url: str) -> Any:
    """Open a tier's object store without creating or writing anything."""
    from asymstore.backends import open_object_store, scheme_of

    if scheme_of(url) == "file":
        from asymstore.backends.local import path_from_url

        path = path_from_url(url)
        if not os.path.exists(path):
            raise UsageError(f"{url}: no such directory")
        if not os.path.isdir(path):
            raise UsageError(
                f"{url}: not a directory (give the checkpoint root, the directory that holds step_<N>/ directories)"
            )
    return open_object_store(url)


def _committed(backend: Any) -> list[int]:
    from .catalog import committed_steps

    return committed_steps(backend)


def _partial_steps(backend: Any) -> list[int]:
    """Step directories without a commit marker (interrupted or in-flight saves)."""
    from .catalog import partial_steps

    return partial_steps(backend)


def _reader(backend: Any, step: int) -> Any:
    from .catalog import open_reader

    return open_reader(backend, step)


def _source_reader(source: Any, *, step: int) -> Any:
    return _reader(source.backend, step)


def _rank_count(backend: Any, step: int) -> int:
    """How many ranks wrote ``step``: the global marker's ``ranks``, 1 for a single-rank step."""
    from .catalog import commit_info

    ranks = commit_info(backend, step).get("ranks", 1)
    return ranks if isinstance(ranks, int) and not isinstance(ranks, bool) and ranks >= 1 else 1


def _rank_reader(backend: Any, step: int, rank: int, ranks: int) -> Any:
    """The reader of one rank's part of ``step`` (the step itself when single-rank)."""
    from .catalog import open_reader

    return open_reader(backend, step, rank=rank if ranks > 1 else None)


def _all_rank_readers(source: Any, *, step: int) -> list[Any]:
    """Every rank's reader of ``step`` on ``source``; the first damaged rank raises."""
    ranks = _rank_count(source.backend, step)
    return [_rank_reader(source.backend, step, r, ranks) for r in range(ranks)]


def _rank_of(reader: Any) -> int:
    """The rank a reader reads: ``r<N>/`` at the end of its prefix, else 0 (a single-rank step)."""
    from .manifest import parse_rank_dir

    last = reader.prefix.rstrip("/").rsplit("/", 1)[-1]
    r = parse_rank_dir(last)
    return 0 if r is None else int(r)


def _global_index(backend: Any, step: int, readers: Sequence[Any]) -> Any:
    """The step's global tensor index: its ``INDEX`` object (multi-rank steps), else merged from the ranks'
    manifests' ``global_parts`` (``readers``: every rank's); ``None`` when the step has no global metadata."""
    from . import globalmeta, validate
    from .catalog import commit_info
    from .manifest import step_dir
    from .zarrfmt import crc32c

    key = f"{step_dir(step)}/INDEX"
    raw = backend.get(key)
    if raw is not None:
        want = commit_info(backend, step).get("index_crc32c")
        if want is not None and crc32c(raw) != want:
            raise CorruptCheckpointError(f"{key}: checksum mismatch", (key,))
        return globalmeta.GlobalIndex.from_json(validate.load_json(raw, key), key, step=step)
    described = {_rank_of(r): dict(getattr(r.manifest, "global_parts", None) or {}) for r in readers}
    if not any(described.values()):
        return None
    return globalmeta.build_index(step, len(readers), described)


def _region_json(region: Any) -> dict[str, Any]:
    if hasattr(region, "offsets"):
        return {"kind": "box", "offsets": list(region.offsets), "lengths": list(region.lengths)}
    return {"kind": "flat", "start": int(region.start), "length": int(region.length)}


def _region_str(region: Any) -> str:
    if hasattr(region, "offsets"):
        return "[" + ", ".join(f"{o}:{o + n}" for o, n in zip(region.offsets, region.lengths, strict=True)) + "]"
    return f"flat [{region.start}:{region.start + region.length}]"


def _pick_step(store: Any, url: str, step: int | None) -> int:
    steps = _committed(store)
    if not steps:
        partial = _partial_steps(store)
        extra = f" (uncommitted step directories: {partial})" if partial else ""
        raise StepNotFoundError(f"no committed checkpoint in {url}{extra}")
    if step is None:
        return steps[-1]
    if step not in steps:
        near = ", ".join(map(str, steps[-10:]))
        raise StepNotFoundError(
            f"step {step} is not committed in {url}; committed steps: {near}"
            + (" (last 10)" if len(steps) > 10 else "")
        )
    return step


# --- formatting helpers -------------------------------------------------------------
def human_bytes(n: float) -> str:
    """``1536`` -> ``'1.50 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def _time_str(t: float | None) -> str:
    if not t:
        return "-"
    return _dt.datetime.fromtimestamp(t).isoformat(sep=" ", timespec="seconds")


def _console(args: argparse.Namespace) -> Any:
    from rich.console import Console

    # a pipe or a file gets wide tables (not rich's 80 columns) and no colour codes
    width = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200
    return Console(highlight=False, soft_wrap=False, width=width)


def _err_console() -> Any:
    from rich.console import Console

    return Console(stderr=True, highlight=False)


@contextmanager
def _progress(args: argparse.Namespace, description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A bytes progress bar on stderr; a no-op when quiet or stderr is not a terminal."""
    if args.quiet or not sys.stderr.isatty() or total <= 0:
        yield lambda done: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=_err_console(),
        transient=True,
    ) as p:
        task = p.add_task(description, total=total)
        yield lambda done: p.update(task, completed=done)


def _codec_summary(manifest: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in manifest.partitions:
        out[p.label] = out.get(p.label, 0) + 1
    return out


def _tier_headers(urls: Sequence[str]) -> list[str]:
    """Short, unique column names for tier URLs: the last path component, numbered on clashes."""
    heads = []
    for i, u in enumerate(urls, 1):
        base = u.rstrip("/").rsplit("/", 1)[-1] or u
        h = base if len(base) <= 20 else base[:19] + "…"
        heads.append(h if h not in heads else f"{h} ({i})")
    return heads


# --- ls -----------------------------------------------------------------------------
def cmd_ls(args: argparse.Namespace) -> int:
    """``asymstore ls``: steps, sizes, codecs, and the tiers each is complete on."""
    from .catalog import Source, try_in_order

    stores = [(u, _open_store(u)) for u in args.urls]
    status: dict[str, dict[int, str]] = {}
    for url, st in stores:
        s: dict[int, str] = {}
        for step in _partial_steps(st):
            s[step] = "partial"
        for step in _committed(st):
            s[step] = "complete"
        status[url] = s
    all_steps = sorted({s for d in status.values() for s in d})
    rows = []
    for step in all_steps:
        row: dict[str, Any] = {
            "step": step,
            "raw_bytes": None,
            "stored_bytes": None,
            "ratio": None,
            "codecs": {},
            "time": None,
            "delta_base": None,
            "delta_bases": [],
            "ranks": None,
            "tensors": None,
            "tiers": {u: status[u].get(step, "absent") for u, _ in stores},
        }
        # details from the first tier (in the given order) where every rank of the step is readable
        sources = [Source(url, st) for url, st in stores if status[url].get(step) == "complete"]
        outcome, failures = try_in_order(sources, functools.partial(_all_rank_readers, step=step))
        for f in failures:
            if isinstance(f.error, CorruptCheckpointError):
                row["tiers"][f.source.name] = "damaged"
                row.setdefault("problems", []).append(str(f))
        if outcome is not None:
            readers = outcome.value
            merged: dict[str, int] = {}
            for r in readers:
                for k, v in _codec_summary(r.manifest).items():
                    merged[k] = merged.get(k, 0) + v
            raw = sum(r.manifest.layout.total_bytes for r in readers)
            stored = sum(r.manifest.stored_bytes for r in readers)
            bases = sorted({r.manifest.delta_base for r in readers if r.manifest.delta_base is not None})
            r0 = readers[0]
            row.update(
                ranks=len(readers),
                raw_bytes=raw,
                stored_bytes=stored,
                ratio=(stored / raw if raw else 1.0),
                codecs=merged,
                time=float(r0.commit.get("time") or r0.manifest.created),
                delta_base=bases[0] if len(bases) == 1 else None,
                delta_bases=bases,
                tensors=sum(len(r.manifest.layout.tensors) for r in readers),
            )
        rows.append(row)

    if args.json:
        for row in rows:
            row.setdefault("problems", [])
        print(json.dumps({"tiers": list(args.urls), "steps": rows}, indent=2))
        return EXIT_OK

    from rich.table import Table

    con = _console(args)
    if not rows:
        con.print(f"no checkpoints in {', '.join(args.urls)}")
        return EXIT_OK
    table = Table(title="checkpoints", title_justify="left")
    table.add_column("step", justify="right")
    table.add_column("ranks", justify="right")
    table.add_column("tensors", justify="right")
    table.add_column("raw", justify="right")
    table.add_column("stored", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("codecs (partitions)")
    table.add_column("time")
    marks = {
        "complete": "[green]yes[/]",
        "partial": "[yellow]partial[/]",
        "absent": "[dim]-[/]",
        "damaged": "[red]damaged[/]",
    }
    heads = _tier_headers([u for u, _ in stores])
    for h in heads:
        table.add_column(h, justify="center")
    for r in rows:
        codecs = ", ".join(f"{k} ({v})" for k, v in r["codecs"].items())
        if r["delta_base"] is not None:
            codecs += f" [dim]delta of {r['delta_base']}[/]"
        table.add_row(
            str(r["step"]),
            str(r["ranks"] or "-"),
            str(r["tensors"] if r["tensors"] is not None else "-"),
            human_bytes(r["raw_bytes"]) if r["raw_bytes"] is not None else "-",
            human_bytes(r["stored_bytes"]) if r["stored_bytes"] is not None else "-",
            f"{r['ratio']:.3f}" if r["ratio"] is not None else "-",
            codecs or "-",
            _time_str(r["time"]),
            *(marks[r["tiers"][u]] for u, _ in stores),
        )
    con.print(table)
    for h, (url, _) in zip(heads, stores, strict=True):
        con.print(f"  {h} = {url}", soft_wrap=True)
    for r in rows:
        for p in r.get("problems", []):
            con.print(f"[red]step {r['step']}: {p}[/]")
    return EXIT_OK


# --- show ---------------------------------------------------------------------------
def _skeleton_values(skeleton: Any) -> dict[str, Any]:
    """Non-tensor leaves of a skeleton, by '/'-joined path, in their stored JSON form."""
    out: dict[str, Any] = {}

    def has_tensor(v: Any) -> bool:
        if isinstance(v, list):
            return any(has_tensor(x) for x in v)
        if isinstance(v, dict):
            if len(v) == 1 and next(iter(v)) in ("__tensor__", "__ndarray__"):
                return True
            return any(has_tensor(x) for x in v.values())
        return False

    def walk(v: Any, path: str) -> None:
        if not has_tensor(v):
            out[path or "<root>"] = v
            return
        if isinstance(v, list):
            for i, x in enumerate(v):
                walk(x, f"{path}/{i}" if path else str(i))
        elif isinstance(v, dict):
            if len(v) == 1 and next(iter(v)) in ("__tensor__", "__ndarray__"):
                return
            if len(v) == 1 and next(iter(v)) in ("__tuple__", "__dict__"):
                tag, x = next(iter(v.items()))
                items = enumerate(x) if tag == "__tuple__" else ((json.dumps(k), y) for k, y in x)
                for k, y in items:
                    walk(y, f"{path}/{k}" if path else str(k))
                return
            for k, x in v.items():
                k = k[2:] if k.startswith("____") else k
                walk(x, f"{path}/{k}" if path else k)

    walk(skeleton, "")
    return out


def _match(name: str, pattern: str | None) -> bool:
    return pattern is None or fnmatch.fnmatchcase(name, pattern)


def _partition_rows(r: Any, rank: int, pattern: str | None) -> list[dict[str, Any]]:
    m = r.manifest
    parts = []
    for p in m.partitions:
        spec = m.codecs[p.label]
        names = [
            t.name
            for t in m.layout.tensors
            if t.offset < p.span.end and t.end > p.span.start and _match(t.name, pattern)
        ]
        parts.append(
            {
                "rank": rank,
                "index": p.span.index,
                "start": p.span.start,
                "raw_bytes": p.span.nbytes,
                "stored_bytes": p.stored_bytes,
                "ratio": p.stored_bytes / p.span.nbytes if p.span.nbytes else 1.0,
                "codec": p.label,
                "chain": [c["name"] for c in spec.zarr_chunk_codecs()],
                "object": f"{r.prefix}{p.label}/c/{p.shard}",
                "tensors": len(names),
            }
        )
    return [p for p in parts if p["tensors"]] if pattern else parts


def _global_rows(index: Any, pattern: str | None) -> list[dict[str, Any]]:
    out = []
    for name in sorted(index.tensors):
        g = index.tensors[name]
        if not _match(name, pattern):
            continue
        out.append(
            {
                "name": name,
                "dtype": g.dtype,
                "shape": list(g.shape),
                "parts": [
                    {
                        "rank": int(pr.rank),
                        "local_name": pr.local_name,
                        "local_offset": int(pr.local_offset),
                        "region": _region_json(pr.region),
                    }
                    for pr in g.parts
                ],
            }
        )
    return out


def cmd_show(args: argparse.Namespace) -> int:
    """``asymstore show``: tensors, partitions with their codecs, and metadata of one step (every rank, or
    ``--rank``), and the global tensors when the step records them."""
    from rich.table import Table

    from .dtypes import from_name

    st = _open_store(args.url)
    step = _pick_step(st, args.url, args.step)
    ranks = _rank_count(st, step)
    if args.rank is not None and not 0 <= args.rank < ranks:
        raise UsageError(f"step {step} has {ranks} rank(s) (0..{ranks - 1}), not rank {args.rank}")
    shown = [args.rank] if args.rank is not None else list(range(ranks))
    every = [_rank_reader(st, step, r, ranks) for r in range(ranks)]
    readers = {r: every[r] for r in shown}
    tensors = [(rk, t) for rk, rd in readers.items() for t in rd.manifest.layout.tensors if _match(t.name, args.filter)]
    index = _global_index(st, step, every)
    global_rows = _global_rows(index, args.filter) if index is not None else None
    if args.filter and not tensors and not global_rows:
        raise UsageError(f"no tensor of step {step} matches {args.filter!r}")
    parts = [p for rk, rd in readers.items() for p in _partition_rows(rd, rk, args.filter)]
    first = readers[shown[0]]
    m = first.manifest
    values = _skeleton_values(m.skeleton)
    raw = sum(rd.manifest.layout.total_bytes for rd in readers.values())
    stored = sum(rd.manifest.stored_bytes for rd in readers.values())
    if args.json:
        print(
            json.dumps(
                {
                    "step": step,
                    "url": args.url,
                    "time": first.commit.get("time"),
                    "ranks": ranks,
                    "shown_ranks": shown,
                    "raw_bytes": raw,
                    "stored_bytes": stored,
                    "delta_base": m.delta_base,
                    "chunk_bytes": m.chunk_bytes,
                    "partition_bytes": m.partition_bytes,
                    "tensors": [
                        {
                            "rank": rk,
                            "name": t.name,
                            "dtype": t.dtype,
                            "shape": list(t.shape),
                            "bytes": t.nbytes,
                            "offset": t.offset,
                        }
                        for rk, t in tensors
                    ],
                    "partitions": parts,
                    "global_tensors": global_rows,
                    "user": m.user,
                    "values": values,
                },
                indent=2,
            )
        )
        return EXIT_OK

    con = _console(args)
    multi = ranks > 1
    where = (f", rank {args.rank} of {ranks}" if args.rank is not None else f", {ranks} ranks") if multi else ""
    con.print(f"[bold]step {step}[/] in {args.url}{where}  ({_time_str(float(first.commit.get('time') or m.created))})")
    n_tensors = sum(len(rd.manifest.layout.tensors) for rd in readers.values())
    con.print(
        f"{n_tensors} tensors, raw {human_bytes(raw)}, stored {human_bytes(stored)} "
        f"(ratio {stored / raw if raw else 1.0:.3f}), {sum(len(rd.manifest.partitions) for rd in readers.values())} "
        f"partitions of {human_bytes(m.partition_bytes)} in chunks of {human_bytes(m.chunk_bytes)}"
        + (f", XOR delta of step {m.delta_base}" if m.delta_base is not None else "")
    )
    tt = Table(
        title=f"tensors ({len(tensors)}" + (f" matching {args.filter!r}" if args.filter else "") + ")",
        title_justify="left",
    )
    if multi:
        tt.add_column("rank", justify="right")
    tt.add_column("name", overflow="fold")
    tt.add_column("dtype")
    tt.add_column("shape")
    tt.add_column("bytes", justify="right")
    for rk, t in tensors:
        dt = t.dtype
        try:
            from_name(dt)
        except AsymstoreError:
            dt += " (unknown to this torch)"
        tt.add_row(*([str(rk)] if multi else []), t.name, dt, _shape_str(t.shape), human_bytes(t.nbytes))
    con.print(tt)
    if global_rows is not None:
        gt = Table(title=f"global tensors ({len(global_rows)})", title_justify="left")
        gt.add_column("name", overflow="fold")
        gt.add_column("dtype")
        gt.add_column("shape")
        gt.add_column("parts (rank: local tensor region)", overflow="fold")
        for g in global_rows:
            assert index is not None
            refs = index.tensors[g["name"]].parts
            gt.add_row(
                g["name"],
                g["dtype"],
                _shape_str(g["shape"]),
                "; ".join(f"{pr.rank}: {pr.local_name} {_region_str(pr.region)}" for pr in refs),
            )
        con.print(gt)
    pt = Table(title="partitions", title_justify="left")
    cols = [("#", "right"), ("stream offset", "right"), ("raw", "right"), ("stored", "right"), ("ratio", "right")]
    for c, j in ([("rank", "right")] if multi else []) + cols + [("codec chain", "left"), ("tensors", "right")]:
        pt.add_column(c, justify=j)  # type: ignore[arg-type]
    for p in parts:
        pt.add_row(
            *([str(p["rank"])] if multi else []),
            str(p["index"]),
            str(p["start"]),
            human_bytes(p["raw_bytes"]),
            human_bytes(p["stored_bytes"]),
            f"{p['ratio']:.3f}",
            f"{p['codec']}: " + " -> ".join(p["chain"]),
            str(p["tensors"]),
        )
    con.print(pt)
    who = f" (rank {shown[0]})" if multi else ""
    con.print(f"[bold]user metadata{who}[/]: " + (json.dumps(m.user, indent=2) if m.user else "(none)"))
    if values:
        vt = Table(title=f"non-tensor values{who}", title_justify="left")
        vt.add_column("path", overflow="fold")
        vt.add_column("value (JSON)", overflow="fold")
        for k, v in values.items():
            s = json.dumps(v)
            vt.add_row(k, s if len(s) <= 200 else s[:197] + "...")
        con.print(vt)
    return EXIT_OK


def _shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


# --- verify -------------------------------------------------------------------------
def _verify_step(args: argparse.Namespace, st: Any, step: int) -> dict[str, Any]:
    """Read and check every object of every rank of ``step``; damage is reported, never raised."""
    from .zarrfmt import crc32c

    res: dict[str, Any] = {"step": step, "ok": True, "ranks": None, "objects": 0, "bytes": 0, "problems": []}

    def problem(rank: int | None, obj: str, msg: str) -> None:
        msg = msg[len(obj) + 2 :] if msg.startswith(obj + ": ") else msg  # the object is named apart
        res["problems"].append({"rank": rank, "object": obj, "message": msg})

    try:
        ranks = _rank_count(st, step)
    except (CorruptCheckpointError, StepNotFoundError) as e:
        obj = e.objects[0] if isinstance(e, CorruptCheckpointError) and e.objects else f"step {step}"
        problem(None, obj, str(e))
        res["ok"] = False
        return res
    res["ranks"] = ranks
    readers: dict[int, Any] = {}
    for r in range(ranks):  # open every rank first: their sizes make the progress total
        try:
            readers[r] = _rank_reader(st, step, r, ranks)
        except (CorruptCheckpointError, StepNotFoundError) as e:
            obj = e.objects[0] if isinstance(e, CorruptCheckpointError) and e.objects else f"step {step} rank {r}"
            problem(r, obj, str(e))
        except (AsymstoreError, OSError) as e:
            if args.debug:
                raise
            problem(r, f"step {step} rank {r}", f"{type(e).__name__}: {e}")
    res["objects"] += 1 + (ranks > 1)  # the step's marker (and a multi-rank step's group)
    if ranks > 1:
        res["objects"] += _verify_index(st, step, problem, crc32c)
    total = sum(rd.manifest.layout.total_bytes for rd in readers.values())
    label = f"verify step {step}" + (f" ({ranks} ranks)" if ranks > 1 else "")
    with _progress(args, label, total) as bar:
        done = 0
        for r, rd in readers.items():
            try:
                rep = rd.verify(progress=lambda d, _t, base=done: bar(base + d))
                for key, msg in rep.problems:
                    problem(r, key, msg)
                res["objects"] += rep.checked_objects + 2  # + the rank's marker and group
                res["bytes"] += rep.checked_bytes
            except (CorruptCheckpointError, StepNotFoundError) as e:  # e.g. gone since it was listed
                problem(r, e.objects[0] if isinstance(e, CorruptCheckpointError) and e.objects else f"rank {r}", str(e))
            except (AsymstoreError, OSError) as e:  # e.g. an I/O error reading one object
                if args.debug:
                    raise
                problem(r, f"step {step} rank {r}", f"{type(e).__name__}: {e}")
            done += rd.manifest.layout.total_bytes
            bar(done)
    if ranks == 1:
        res["objects"] -= 1  # a single-rank step's marker and group are the rank's own
        for p in res["problems"]:
            p["rank"] = 0 if p["rank"] is not None else None
    res["ok"] = not res["problems"]
    return res


def _verify_index(st: Any, step: int, problem: Callable[[int | None, str, str], None], crc32c: Any) -> int:
    """Check a multi-rank step's ``INDEX`` against the global marker's ``index_crc32c``; objects checked."""
    from .catalog import commit_info
    from .manifest import step_dir

    want = commit_info(st, step).get("index_crc32c")
    if want is None:
        return 0
    key = f"{step_dir(step)}/INDEX"
    raw = st.get(key)
    if raw is None:
        problem(None, key, f"{key} is missing although the step's marker records it")
    elif crc32c(raw) != want:
        problem(None, key, f"{key}: checksum mismatch")
    return 1


def cmd_verify(args: argparse.Namespace) -> int:
    """``asymstore verify``: read and check every stored object of every rank of one step or all (exit 1 on
    damage in any rank; every problem is reported, naming its rank and object)."""
    st = _open_store(args.url)
    if args.all:
        steps = _committed(st)
        if not steps:
            raise StepNotFoundError(f"no committed checkpoint in {args.url}")
    else:
        steps = [_pick_step(st, args.url, args.step)]
    con = _console(args)
    results = []
    for step in steps:  # every step is reported, whatever an earlier one held
        res = _verify_step(args, st, step)
        results.append(res)
        if args.json:
            continue
        ranks = f"{res['ranks']} ranks, " if (res["ranks"] or 1) > 1 else ""
        if res["problems"]:
            con.print(f"[red]step {step}: {len(res['problems'])} problem(s)[/]")
            for p in res["problems"]:
                who = f"rank {p['rank']}: " if (res["ranks"] or 1) > 1 and p["rank"] is not None else ""
                con.print(f"  [red]{who}{p['object']}[/]: {p['message']}", soft_wrap=True)
        elif not args.quiet:
            con.print(
                f"[green]step {step}: ok[/] ({ranks}{res['objects']} objects, {human_bytes(res['bytes'])} checked)"
            )
    bad = sum(1 for r in results if not r["ok"])
    if args.json:
        print(json.dumps({"url": args.url, "ok": not bad, "steps": results}, indent=2))
    elif len(steps) > 1 and not args.quiet:
        con.print(f"{len(steps) - bad} of {len(steps)} steps ok")
    return EXIT_DAMAGED if bad else EXIT_OK


# --- entry point --------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``asymstore`` command."""
    p = argparse.ArgumentParser(
        prog="asymstore",
        description="Inspect, verify and export asymstore checkpoints. "
        "URLs are tier roots: a directory, file:///path, memory://name or hdfs://host:port/path.",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summaries")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def common(sp: argparse.ArgumentParser) -> None:  # also accepted after the subcommand
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        sp.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    ls = sub.add_parser("ls", help="list steps and the tiers each is complete on")
    ls.add_argument("urls", nargs="+", metavar="URL", help="tier roots, fastest first (one column each)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    common(ls)

    sh = sub.add_parser("show", help="tensors, partitions with their codecs, and metadata of one step")
    sh.add_argument("url", metavar="URL")
    sh.add_argument("--step", type=int, help="step to show (default: newest committed)")
    sh.add_argument("--rank", type=int, help="only this rank of a multi-rank step (default: every rank)")
    sh.add_argument("--filter", metavar="GLOB", help="only tensors whose name matches, e.g. 'model/*'")
    sh.add_argument("--json", action="store_true", help="machine-readable output")
    common(sh)

    ve = sub.add_parser("verify", help="read every stored object and check its checksum (exit 1 on damage)")
    ve.add_argument("url", metavar="URL")
    g = ve.add_mutually_exclusive_group()
    g.add_argument("--step", type=int, help="step to verify (default: newest committed)")
    g.add_argument("--all", action="store_true", help="verify every committed step")
    ve.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    common(ve)

    _add_export_parser(sub, common)
    cli_shm.add_parser(sub, common)
    return p


_COMMANDS = {"ls": cmd_ls, "show": cmd_show, "verify": cmd_verify, "export": cmd_export, "shm": cli_shm.cmd_shm}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``asymstore`` command; returns its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: 0 for --help, 2 for usage errors
        return int(e.code or 0)
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("asymstore: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `asymstore ls ... | head`
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        except OSError:
            pass
        return EXIT_OK
    except (AsymstoreError, OSError) as e:
        if args.debug:
            raise
        code = EXIT_DAMAGED if isinstance(e, CorruptCheckpointError) else EXIT_USAGE
        if isinstance(e, OSError) and not isinstance(e, (ConfigError,)):
            msg = f"{e.strerror or e}" + (f": {e.filename}" if getattr(e, "filename", None) else "")
        else:
            msg = str(e)
        print(f"asymstore {args.command}: error: {msg}", file=sys.stderr)
        if code == EXIT_DAMAGED:
            print("  (run `asymstore verify` for a full report)", file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
