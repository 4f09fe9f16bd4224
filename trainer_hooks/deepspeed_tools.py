"""DeepSpeed steps outside DeepSpeed: full fp32 weights, and DeepSpeed-format directories for its tools.

* :func:`fp32_state_dict` is asymstore's ``get_fp32_state_dict_from_zero_checkpoint``: the full fp32
  tensors of a step keyed by parameter names, consolidated from every rank's part, without DeepSpeed
  processes (no process group, no engine). Steps of
  :class:`~asymstore.trainer_hooks.deepspeed_hooks.DeepSpeedAsymCheckpointer` are assembled from the
  fp32 master partitions through the partition layouts saved with them; steps written through
  :class:`~asymstore.trainer_hooks.deepspeed_hooks.AsymstoreCheckpointEngine` are materialised in a
  temporary directory and read by DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint``.
* :func:`materialize_deepspeed_dir` writes a step saved through ``AsymstoreCheckpointEngine`` as the
  directory DeepSpeed itself would have written (``<dir>/<tag>/*.pt`` with torch.save, ``<dir>/latest``),
  so DeepSpeed's offline tools (``zero_to_fp32``, ``ds_to_universal``) run on it.

Command line::

    python -m asymstore.trainer_hooks.deepspeed_tools materialize URL OUT_DIR [--step N]
    python -m asymstore.trainer_hooks.deepspeed_tools fp32 URL OUT.safetensors [--step N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from asymstore import catalog
from asymstore.backends import open_object_store
from asymstore.errors import AsymstoreError, StateMismatchError, StepNotFoundError
from asymstore.interfaces import ObjectStore
from asymstore.lazy import LazyCheckpoint
from asymstore.state import unflatten
from asymstore.store import Store

from .deepspeed_elastic import check_layout

__all__ = ["fp32_state_dict", "materialize_deepspeed_dir"]

Source = str | ObjectStore | Store


def _commit_ranks(store: Store, step: int) -> int | None:
    for url in store.tier_urls.values():
        try:
            info = catalog.commit_info(open_object_store(url), step)
        except AsymstoreError:
            continue
        ranks = info.get("ranks")
        if isinstance(ranks, int):
            return ranks
    return None


def _open(source: Source, step: int | None) -> tuple[int, list[LazyCheckpoint]]:
    """``step`` (default: the newest committed) and every rank's part of it, opened lazily."""
    if isinstance(source, Store):
        s = source.latest_step() if step is None else step
        if s is None:
            raise StepNotFoundError("no complete checkpoint on any tier")
        world = _commit_ranks(source, s) or 1
        return s, [source.open_checkpoint(s, rank=r) for r in range(world)]
    backend = source if isinstance(source, ObjectStore) else open_object_store(source)
    if step is None:
        steps = catalog.committed_steps(backend)
        if not steps:
            raise StepNotFoundError(f"no committed checkpoint in {backend.url}")
        step = steps[-1]
    ranks = catalog.commit_info(backend, step).get("ranks", 1)
    world = int(ranks) if isinstance(ranks, int) else 1
    return step, [LazyCheckpoint(catalog.open_reader(backend, step, rank=r)) for r in range(world)]


def _tree(ck: LazyCheckpoint) -> Any:
    return unflatten(ck.skeleton, lambda n: ck[n])  # type: ignore[arg-type,return-value]  # lazy tensors


def fp32_state_dict(source: Source, step: int | None = None) -> dict[str, torch.Tensor]:
    """The full fp32 parameters of a DeepSpeed step, keyed by parameter name (``module.named_parameters()``
    names; tied aliases included, sharing one tensor), plus the module's buffers as saved.

    ``source``: a tier URL, an object store, or a :class:`~asymstore.store.Store` (then each rank's part is
    read from the fastest tier holding it); ``step``: default the newest committed. Every rank's part is
    read: the equivalent of DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``. ZeRO stage 0 steps
    return the module state dict (floating tensors as fp32).
    """
    s, cks = _open(source, step)
    tree0 = _tree(cks[0])
    if isinstance(tree0, dict) and "files" in tree0 and "deepspeed_tag" in tree0:
        with tempfile.TemporaryDirectory(prefix="asymstore-ds-") as tmp:
            materialize_deepspeed_dir(source, tmp, step=s)
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            out: dict[str, torch.Tensor] = get_fp32_state_dict_from_zero_checkpoint(tmp)
            return out
    if not isinstance(tree0, dict) or "deepspeed" not in tree0:
        raise StateMismatchError(
            f"step {s} was saved neither by DeepSpeedAsymCheckpointer nor AsymstoreCheckpointEngine"
        )
    if int(tree0["deepspeed"]["zero_stage"]) == 0:
        return {k: (v.read().float() if v.dtype.is_floating_point else v.read()) for k, v in tree0["model"].items()}
    trees = [tree0] + [_tree(ck) for ck in cks[1:]]
    layouts = [check_layout(t["zero"].get("layout"), f"step {s} rank {r}") for r, t in enumerate(trees)]
    params: dict[str, Any] = {}
    for lay in layouts:
        params.update(lay["params"])
    result: dict[str, torch.Tensor] = {}
    covered: dict[str, int] = {}
    for name, meta in params.items():
        result[name] = torch.zeros(int(torch.Size(meta["shape"]).numel()), dtype=torch.float32)
        covered[name] = 0
    for t, lay in zip(trees, layouts, strict=True):
        for g, grp in enumerate(lay["groups"]):
            src = t["zero"]["fp32"][g]
            for name, pstart, lstart, n in grp["fragments"]:
                src.read_flat_into(int(lstart), result[name].narrow(0, int(pstart), int(n)))
                covered[name] += int(n)
    for name, meta in params.items():
        if covered[name] != result[name].numel():
            raise StateMismatchError(
                f"step {s}: {covered[name]} of {result[name].numel()} elements of {name!r} found in the ranks' parts"
            )
        result[name] = result[name].view(meta["shape"])
    for alias, name in layouts[0].get("shared", {}).items():
        result[alias] = result[name]
    for name, b in tree0.get("buffers", {}).items():
        result[name] = b.read()
    return result


def materialize_deepspeed_dir(source: Source, out_dir: str | Path, step: int | None = None) -> Path:
    """Write a step saved through ``AsymstoreCheckpointEngine`` as DeepSpeed's own checkpoint directory:
    ``out_dir/<tag>/<file>`` for every file any rank saved (torch.save, DeepSpeed objects rebuilt) and
    ``out_dir/latest`` naming the tag. Returns the tag directory."""
    from .deepspeed_hooks import decode_deepspeed

    s, cks = _open(source, step)
    out = Path(out_dir)
    tag: str | None = None
    written: set[str] = set()
    for r, ck in enumerate(cks):
        sk = ck.skeleton
        if not isinstance(sk, dict) or "files" not in sk or "deepspeed_tag" not in sk:
            raise StateMismatchError(
                f"step {s} rank {r} was not saved through AsymstoreCheckpointEngine (no DeepSpeed files in it); "
                "use fp32_state_dict() for DeepSpeedAsymCheckpointer steps"
            )
        part = ck.load()
        if tag is not None and part["deepspeed_tag"] != tag:
            raise StateMismatchError(f"step {s}: rank {r} holds tag {part['deepspeed_tag']!r}, rank 0 {tag!r}")
        tag = str(part["deepspeed_tag"])
        tag_dir = out / tag
        for key, obj in part["files"].items():
            if key in written:
                continue  # a file several ranks saved (the same content): rank 0's copy
            path = (tag_dir / key).resolve()
            if tag_dir.resolve() not in path.parents:
                raise StateMismatchError(f"step {s}: file name {key!r} leaves the tag directory")
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(decode_deepspeed(obj), path)
            written.add(key)
    assert tag is not None
    (out / "latest").write_text(tag)
    return out / tag


def main(argv: Sequence[str] | None = None) -> int:
    """Command line (see the module doc)."""
    ap = argparse.ArgumentParser(prog="python -m asymstore.trainer_hooks.deepspeed_tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("materialize", help="write an AsymstoreCheckpointEngine step as a DeepSpeed directory")
    m.add_argument("url")
    m.add_argument("out_dir")
    m.add_argument("--step", type=int)
    f = sub.add_parser("fp32", help="write a DeepSpeed step's full fp32 weights as safetensors")
    f.add_argument("url")
    f.add_argument("out")
    f.add_argument("--step", type=int)
    a = ap.parse_args(argv)
    try:
        if a.cmd == "materialize":
            print(materialize_deepspeed_dir(a.url, a.out_dir, step=a.step))
        else:
            from safetensors.torch import save_file

            sd = fp32_state_dict(a.url, step=a.step)
            seen: dict[int, str] = {}
            unique = {}
            for k, v in sd.items():  # safetensors refuses shared tensors: tied aliases are stored once
                if v.data_ptr() in seen:
                    continue
                seen[v.data_ptr()] = k
                unique[k] = v.contiguous()
            save_file(unique, a.out)
            print(a.out)
    except AsymstoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
