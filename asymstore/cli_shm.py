"""``asymstore shm ls`` / ``asymstore shm rm``: the shared-memory regions of host snapshot slots on this node."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from .shm import list_regions, regions_root, remove_region

#: the directory searched when ``--dir`` is not given: ``ASYMSTORE_SHM_DIR`` or /dev/shm (like the stores)
DEFAULT_DIR = "/dev/shm"


def _dir(args: argparse.Namespace) -> str:
    return str(args.dir or os.environ.get("ASYMSTORE_SHM_DIR") or DEFAULT_DIR)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def cmd_shm_ls(args: argparse.Namespace) -> int:
    """List the regions: job, rank, size, steps committed in them, owner pid and whether it is alive
    (``--json``: a JSON array of region rows, ``[]`` when there is none)."""
    regions = list_regions(_dir(args))
    if args.json:
        print(json.dumps([r.to_json() for r in regions], indent=2))
        return 0
    if not regions:
        print(f"no shared-memory regions under {regions_root(_dir(args))}")
        return 0
    rows = [("JOB", "RANK", "SIZE", "STEPS", "OWNER", "TIER")]
    for r in regions:
        owner = f"{r.owner_pid or '?'} ({'alive' if r.alive else 'dead'})"
        steps = ",".join(map(str, r.steps)) if r.version == 1 else f"(format version {r.version!r})"
        rank = f"{r.rank} (replica held here)" if r.replica else str(r.rank)
        rows.append((r.job, rank, _size(r.bytes), steps or "-", owner, r.url))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _error(msg: str) -> None:
    print(f"asymstore shm rm: error: {msg}", file=sys.stderr)


def cmd_shm_rm(args: argparse.Namespace) -> int:
    """Remove regions: those of ``JOB`` (one rank with ``--rank``), or every one whose owner is dead.

    With ``--json``, stdout holds one document: ``{"removed": [region rows], "errors": [{"path", "message"}]}``
    (errors are also written to stderr); exit 1 when a region could not be removed, 2 when none matched."""
    regions = list_regions(_dir(args))
    as_json = getattr(args, "json", False)
    if args.dead:
        picked = [r for r in regions if not r.alive]
    else:
        picked = [
            r
            for r in regions
            if (r.job == args.job or os.path.abspath(r.path) == os.path.abspath(args.job))
            and (args.rank is None or r.rank == args.rank)
        ]
        if not picked:
            _error(f"no region of {args.job!r} under {regions_root(_dir(args))}")
            return 2
    code = 0
    removed: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    for r in picked:
        try:
            remove_region(r.path, force=args.force)
        except OSError as e:
            msg = f"{r.path}: {e}"
        except Exception as e:  # a live owner without --force
            msg = str(e)
        else:
            removed.append(r.to_json())
            if not args.quiet and not as_json:
                print(f"removed {r.path} ({_size(r.bytes)}, steps {list(r.steps)})")
            continue
        _error(msg)
        errors.append({"path": r.path, "message": msg})
        code = 1
    if as_json:
        print(json.dumps({"removed": removed, "errors": errors}, indent=2))
    return code


def add_parser(
    sub: argparse._SubParsersAction,  # type: ignore[type-arg]
    common: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Register ``shm ls`` and ``shm rm`` under the ``asymstore`` command."""
    shm = sub.add_parser("shm", help="list or remove shared-memory regions of host snapshot slots on this node")
    shm_sub = shm.add_subparsers(dest="shm_command", metavar="ACTION", required=True)
    ls = shm_sub.add_parser("ls", help="regions: job, rank, size, steps, owner pid alive or not")
    ls.add_argument("--dir", help="the tmpfs holding them (default: $ASYMSTORE_SHM_DIR or /dev/shm)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    common(ls)
    rm = shm_sub.add_parser("rm", help="remove a job's regions (refused while the owner lives, unless --force)")
    target = rm.add_mutually_exclusive_group(required=True)
    target.add_argument("job", nargs="?", help="job id (as `shm ls` shows it) or a region's path")
    target.add_argument("--dead", action="store_true", help="every region whose owner process is gone")
    rm.add_argument("--rank", type=int, help="only this rank's region of the job")
    rm.add_argument("--force", action="store_true", help="also a live owner's (its unpersisted snapshots are lost)")
    rm.add_argument("--dir", help="the tmpfs holding them (default: $ASYMSTORE_SHM_DIR or /dev/shm)")
    rm.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    common(rm)


def cmd_shm(args: argparse.Namespace) -> int:
    """Dispatch ``asymstore shm ACTION``."""
    return cmd_shm_ls(args) if args.shm_command == "ls" else cmd_shm_rm(args)
