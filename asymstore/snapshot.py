"""Copying tensors into a snapshot buffer laid out by a :class:`~asymstore.layout.Layout`."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .dtypes import from_name
from .layout import Layout, TensorEntry


def dest_view(buffer: torch.Tensor, entry: TensorEntry) -> torch.Tensor:
    """The typed, shaped view of ``buffer`` where ``entry`` lives."""
    raw = buffer[entry.offset:entry.end]
    return raw.view(from_name(entry.dtype)).view(entry.shape)


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 tensor (no copy)."""
    flat = t.reshape(-1)
    if flat.dtype == torch.bool:
        return flat.view(torch.uint8)
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8, device=t.device)


def copy_all(buffer: torch.Tensor, layout: Layout, tensors: Mapping[str, torch.Tensor], *,
             non_blocking: bool = False) -> None:
    """Copy every tensor of ``layout`` into ``buffer``."""
    for e in layout.tensors:
        if e.nbytes:
            dest_view(buffer, e).copy_(tensors[e.name], non_blocking=non_blocking)


def copy_range(buffer: torch.Tensor, layout: Layout, tensors: Mapping[str, torch.Tensor], start: int, end: int,
               *, non_blocking: bool = False, first: int = 0) -> int:
    """Copy the stream bytes ``[start, end)``; tensors may be cut at ``align``-ed byte offsets.

    ``first`` is an index into ``layout.tensors`` to start scanning from; returns the index
    of the first tensor not fully copied (to resume the next range cheaply).
    """
    ts = layout.tensors
    i = first
    while i < len(ts) and ts[i].end <= start:
        i += 1
    while i < len(ts) and ts[i].offset < end:
        e = ts[i]
        lo, hi = max(e.offset, start), min(e.end, end)
        if hi > lo:
            src = tensors[e.name]
            if lo == e.offset and hi == e.end:
                dest_view(buffer, e).copy_(src, non_blocking=non_blocking)
            else:
                if not src.is_contiguous():
                    src = src.contiguous()
                buffer[lo:hi].copy_(byte_view(src)[lo - e.offset:hi - e.offset], non_blocking=non_blocking)
        if e.end > end:
            break
        i += 1
    return i
