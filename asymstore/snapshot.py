"""Copying tensors into a snapshot buffer laid out by a :class:`~asymstore.layout.Layout`."""

from __future__ import annotations

import ctypes
from collections.abc import Mapping

import torch

from .dtypes import from_name, info
from .layout import Layout, TensorEntry
from .prefault import MADV_HUGEPAGE, madvise

try:
    from . import _native
except ImportError:  # built without a C compiler: memmove it is
    _native = None  # type: ignore[assignment]

#: copies at least this long use streaming stores when :mod:`asymstore._native` is built (below it the
#: call overhead dominates and cached stores are as fast)
STREAM_MIN_BYTES = 64 << 10


def streaming_copy_available() -> bool:
    """Whether host copies beside training use non-temporal stores (the native module is built)."""
    return _native is not None and bool(_native.STREAMING)


def host_copy(dst: int, src: int, n: int) -> None:
    """Copy ``n`` bytes between host addresses on the calling thread, the GIL released.

    Large copies use non-temporal stores where :mod:`asymstore._native` is built: no read of the destination
    before it is overwritten, and the caches the training threads use are left alone (1.5x ``memmove``'s
    speed for 1-14 MiB pieces: ``benchmarks/results/hostcopy.md``). Otherwise one ``ctypes.memmove``.
    """
    if n >= STREAM_MIN_BYTES and _native is not None:
        _native.copy(dst, src, n)
    elif n:
        ctypes.memmove(dst, src, n)


def copy_crc32c(dst: int, src: int, n: int) -> int:
    """Copy ``n`` bytes between host addresses that do not overlap and return the crc32c of the bytes copied,
    the GIL released. With :mod:`asymstore._native` on a CPU with the crc32c instruction both happen in one
    pass (each source byte is read once; into new memory about a plain copy's speed). Otherwise a cached copy,
    then the checksum of the destination while it is still in cache."""
    if n <= 0:
        return 0
    if _native is not None and _native.CRC32C:
        return _native.crc32c_copy(dst, src, n)
    from .zarrfmt import crc32c

    ctypes.memmove(dst, src, n)
    return crc32c((ctypes.c_char * n).from_address(dst))


def dest_view(buffer: torch.Tensor, entry: TensorEntry) -> torch.Tensor:
    """The typed, shaped view of ``buffer`` where ``entry`` lives."""
    raw = buffer[entry.offset : entry.end]
    return raw.view(from_name(entry.dtype)).view(entry.shape)


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes as a flat uint8 tensor (no copy)."""
    flat = t.reshape(-1)
    if flat.dtype == torch.bool:
        return flat.view(torch.uint8)
    return flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8, device=t.device)


def _copy(dst: torch.Tensor, src: torch.Tensor, *, non_blocking: bool, single_threaded: bool) -> None:
    """``dst.copy_(src)``; with ``single_threaded``, plain host tensors are copied by :func:`host_copy` instead.

    On CPU, ``Tensor.copy_`` of a large tensor runs on an OpenMP team as wide as the training's intra-op
    pool. Issued from a background copy thread that team competes with the training's own threads for every
    core, and a training thread preempted inside a parallel region makes its siblings spin: the copy then
    slows training far more than its own CPU time. One single-threaded copy (the GIL released) uses one
    core at memory speed and nothing else.
    """
    if (
        single_threaded
        and dst.device.type == "cpu"
        and src.device.type == "cpu"
        and dst.is_contiguous()
        and _plain_memory(src)
        and dst.dtype == src.dtype
        and dst.shape == src.shape
    ):
        host_copy(dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size())
        return
    dst.copy_(src, non_blocking=non_blocking)


def _plain_memory(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements are its memory as it lies: contiguous, no lazy conjugate or negative bit."""
    return t.is_contiguous() and not t.is_conj() and not t.is_neg()


def _plain_host(src: torch.Tensor, e: TensorEntry) -> bool:
    """Whether ``src`` is host memory holding exactly ``e``'s bytes in order (copyable by address)."""
    return (
        src.device.type == "cpu"
        and _plain_memory(src)
        and src.numel() * src.element_size() == e.nbytes
        and info(src.dtype).torch_name == e.dtype
    )


def copy_all(
    buffer: torch.Tensor, layout: Layout, tensors: Mapping[str, torch.Tensor], *, non_blocking: bool = False
) -> None:
    """Copy every tensor of ``layout`` into ``buffer``."""
    for e in layout.tensors:
        if e.nbytes:
            dest_view(buffer, e).copy_(tensors[e.name], non_blocking=non_blocking)


def copy_range(
    buffer: torch.Tensor,
    layout: Layout,
    tensors: Mapping[str, torch.Tensor],
    start: int,
    end: int,
    *,
    non_blocking: bool = False,
    first: int = 0,
    single_threaded: bool = False,
) -> int:
    """Copy the stream bytes ``[start, end)``; tensors may be cut at ``align``-ed byte offsets.

    ``first`` is an index into ``layout.tensors`` to start scanning from; returns the index
    of the first tensor not fully copied (to resume the next range cheaply). ``single_threaded``: host
    copies use one core (for copies that run beside training, see :func:`_copy`).
    """
    ts = layout.tensors
    i = first
    on_host = buffer.device.type == "cpu"
    base = buffer.data_ptr() if on_host else 0
    while i < len(ts) and ts[i].end <= start:
        i += 1
    while i < len(ts) and ts[i].offset < end:
        e = ts[i]
        lo, hi = max(e.offset, start), min(e.end, end)
        if hi > lo:
            src = tensors[e.name]
            if on_host and (single_threaded or hi - lo < STREAM_MIN_BYTES) and _plain_host(src, e):
                # straight from the tensor's memory: no view tensors to build (most of a state's tensors are
                # small, and this runs on the training thread for the volatile ones)
                host_copy(base + lo, src.data_ptr() + (lo - e.offset), hi - lo)
            elif lo == e.offset and hi == e.end:
                _copy(dest_view(buffer, e), src, non_blocking=non_blocking, single_threaded=single_threaded)
            else:
                if not _plain_memory(src):  # a byte view needs plain memory
                    src = src.resolve_conj().resolve_neg().contiguous()
                _copy(
                    buffer[lo:hi],
                    byte_view(src)[lo - e.offset : hi - e.offset],
                    non_blocking=non_blocking,
                    single_threaded=single_threaded,
                )
        if e.end > end:
            break
        i += 1
    return i


#: transparent huge pages: a large new host buffer is mapped in 2 MiB pages (512x fewer page faults when it is
#: first written) where the kernel allows it (``/sys/kernel/mm/transparent_hugepage/enabled``: always/madvise)
HUGE_PAGE = 2 << 20
_PAGE = 4096


def new_host_buffer(nbytes: int, *, page_aligned: bool = False) -> torch.Tensor:
    """A new uint8 host buffer of ``nbytes`` (a restore's, a private host slot's): 2 MiB-aligned and advised to
    use huge pages when it is large (the kernel fills it with far fewer faults, and a direct write from it is a
    few large device requests rather than one per scattered 4 KiB page), a plain ``torch.empty`` otherwise or
    where the advice is not available; ``page_aligned``: a small one starts on a 4 KiB page too (direct I/O)."""
    huge = nbytes >= 8 * HUGE_PAGE
    if not huge and not page_aligned:
        return torch.empty(max(nbytes, 1), dtype=torch.uint8)
    align = HUGE_PAGE if huge else _PAGE
    raw = torch.empty(max(nbytes, 1) + align, dtype=torch.uint8)
    skip = -raw.data_ptr() % align
    buf = raw[skip : skip + max(nbytes, 1)]
    if huge:
        madvise(buf.data_ptr(), nbytes - nbytes % HUGE_PAGE, MADV_HUGEPAGE)
    return buf
