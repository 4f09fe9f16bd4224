"""``asymstore export``: a step's full tensors, under their real names, as a safetensors file or (``--hf``) a
Hugging Face model folder. The library side is :mod:`asymstore.export`; docs/export.md explains what is
consolidated and what is refused."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from .errors import CorruptCheckpointError
from .export import (
    DEFAULT_MAX_SHARD_SIZE,
    ST_RESERVED,
    ConsolidationError,
    NoMatchError,
    export_hf,
    open_step,
    select,
    summary,
    write_safetensors,
)


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


def _fail(args: argparse.Namespace, msg: str) -> int:
    from . import cli

    print(f"asymstore export: error: {msg}", file=sys.stderr)
    if args.json:
        print(json.dumps({"ok": False, "error": msg}))
    return cli.EXIT_DAMAGED


def cmd_export(args: argparse.Namespace) -> int:
    """``asymstore export``: write a step's full tensors to a safetensors file or a Hugging Face folder."""
    from . import cli  # not at import time: cli imports this module

    if not args.hf:
        for opt in ("config", "generation_config", "max_shard_size"):
            if getattr(args, opt) is not None:
                raise cli.UsageError(f"--{opt.replace('_', '-')} needs --hf")
        if args.force:
            raise cli.UsageError("--force needs --hf (a safetensors file is always replaced atomically)")
    if args.hf and args.sep != ".":
        raise cli.UsageError("--hf names tensors as state_dict() does: leave --sep out")
    st = cli._open_store(args.url)
    step = cli._pick_step(st, args.url, args.step)
    try:
        contents = open_step(st, step, ranks="all" if args.rank is None else args.rank, sep=args.sep)
    except ConsolidationError as e:
        return _fail(args, str(e))
    filters = list(args.filter or [])
    out = args.out
    try:
        with cli._progress(args, f"export step {step}", sum(t.nbytes for t in contents.tensors)) as bar:
            if args.hf:
                result = export_hf(
                    st,
                    out,
                    step,
                    ranks="all" if args.rank is None else args.rank,
                    filters=filters or None,
                    strip_prefix=args.strip_prefix,
                    renames=args.rename or [],
                    config=args.config,
                    generation_config=args.generation_config,
                    max_shard_size=args.max_shard_size or DEFAULT_MAX_SHARD_SIZE,
                    force=args.force,
                    progress=bar,
                    contents=contents,
                )
            else:
                items = select(
                    contents.tensors, filters=filters, strip_prefix=args.strip_prefix, renames=args.rename or []
                )
                meta = (
                    safetensors_metadata(step, contents.skeleton, contents.user)
                    if contents.kind != "dcp"
                    else {"asymstore.step": json.dumps(step)}
                )
                renamed = {t.name: n for n, t in items if n != t.name}
                if renamed:
                    meta["asymstore.renamed"] = json.dumps(renamed)
                nbytes = write_safetensors(out, items, meta, progress=bar)
                result = summary(contents, items, {out: [n for n, _ in items]}, nbytes)
    except NoMatchError as e:
        raise cli.UsageError(str(e)) from None
    except ConsolidationError as e:
        return _fail(args, str(e))
    except CorruptCheckpointError as e:  # exit 1 from the command's handler; the JSON reader still gets a document
        if args.json:
            print(json.dumps({"ok": False, "error": str(e)}))
        raise
    if args.json:
        print(json.dumps({"ok": True, **result}, indent=2))
    elif not args.quiet:
        extra = f", {len(result['tied'])} tied" if result["tied"] else ""
        skipped = f"; left out {len(result['skipped'])} non-tensor DCP items" if result["skipped"] else ""
        cli._console(args).print(
            f"wrote {len(result['tensors'])} tensors{extra} ({cli.human_bytes(result['bytes'])}) of step {step} "
            f"({result['kind']}, {result['ranks']} rank{'s' if result['ranks'] != 1 else ''}) to {out}{skipped}"
        )
    return cli.EXIT_OK


def add_parser(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Register ``export`` under the ``asymstore`` command."""
    ex = sub.add_parser(
        "export",
        help="write a step's full tensors to a .safetensors file, or a Hugging Face model folder (--hf)",
        description="Consolidate every rank's parts of a step into full tensors under their real key paths "
        "(keys joined with '.', e.g. model.wte.weight) and write them to a safetensors file, or with --hf to a "
        "folder from_pretrained loads. Exit 1 when the step cannot be consolidated (the message says why).",
    )
    ex.add_argument("url", metavar="URL")
    ex.add_argument("out", metavar="OUT", help="the .safetensors file to write (with --hf: the folder)")
    ex.add_argument("--step", type=int, help="step to export (default: newest committed)")
    ex.add_argument(
        "--rank", type=int, help="export only this rank's part of a multi-rank step, as it saved it (data parallel)"
    )
    ex.add_argument(
        "--filter",
        "--select",
        action="append",
        metavar="GLOB",
        help="only tensors whose name matches (repeatable; e.g. 'model.*'); stored names ('model/*') match too",
    )
    ex.add_argument("--strip-prefix", metavar="PREFIX", help="remove PREFIX from the names starting with it")
    ex.add_argument(
        "--rename",
        action="append",
        metavar="OLD=NEW",
        help=f"export tensor OLD as NEW (repeatable; e.g. for a tensor called {ST_RESERVED}, which safetensors reserves)",
    )
    ex.add_argument("--sep", default=".", help="joins the keys of a tensor's path into its name (default: '.')")
    ex.add_argument(
        "--hf",
        action="store_true",
        help="write a Hugging Face folder: model.safetensors (or shards + index) with the model's state dict "
        "(the tensors under a top-level 'model' key, without the prefix, unless --filter/--strip-prefix say otherwise)",
    )
    ex.add_argument("--config", metavar="config.json", help="with --hf: the model's config.json to copy")
    ex.add_argument("--generation-config", metavar="FILE", help="with --hf: a generation_config.json to copy")
    ex.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        help=f"with --hf: shard above this size (default {DEFAULT_MAX_SHARD_SIZE}; e.g. 500MB, 2GiB)",
    )
    ex.add_argument("--force", action="store_true", help="with --hf: replace weight files already in OUT")
    ex.add_argument("--json", action="store_true", help="print a JSON summary of what was written")
    common(ex)
