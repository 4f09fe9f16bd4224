"""asymstore.prefault: new memory faulted in ahead of the reads that fill it, its bytes unchanged."""

from __future__ import annotations

import ctypes
import mmap
import sys

import numpy as np
import pytest

from asymstore.prefault import MADV_POPULATE_WRITE, Prefaulter, madvise

MiB = 1 << 20
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise/mincore: Linux")


def _resident(addr: int, n: int) -> int:
    """How many of the pages of ``[addr, addr + n)`` are in memory (``mincore``)."""
    pages = -(-n // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(n), vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec)


def _mapping(n: int) -> tuple[mmap.mmap, np.ndarray, int]:
    m = mmap.mmap(-1, n)
    arr = np.frombuffer(m, np.uint8)
    return m, arr, arr.ctypes.data


@linux
def test_pieces_are_resident_once_waited_for() -> None:
    m, arr, addr = _mapping(16 * MiB)
    if not madvise(addr, mmap.PAGESIZE, MADV_POPULATE_WRITE):
        pytest.skip("MADV_POPULATE_WRITE refused by this kernel")
    m2, arr2, addr2 = _mapping(16 * MiB)
    assert _resident(addr2, 16 * MiB) == 0  # a fresh mapping: nothing faulted in yet
    pieces = [(0, 4 * MiB), (4 * MiB, 10 * MiB), (10 * MiB, 16 * MiB)]
    with Prefaulter(addr2, pieces) as ahead:
        for i, (lo, hi) in enumerate(pieces):
            ahead.wait(i)
            assert _resident(addr2 + lo, hi - lo) == (hi - lo) // mmap.PAGESIZE
    assert not ahead._thread.is_alive()
    del arr, arr2
    m.close()
    m2.close()


@linux
def test_populating_keeps_the_bytes() -> None:
    """Memory that already holds data (a reused buffer) keeps it: populate never writes."""
    m, arr, addr = _mapping(8 * MiB)
    arr[:] = np.random.default_rng(0).integers(0, 256, arr.size, dtype=np.uint8)
    want = arr.copy()
    with Prefaulter(addr + 100, [(0, 3 * MiB), (3 * MiB, 8 * MiB - 100)]) as ahead:  # unaligned start
        ahead.wait(1)
    assert np.array_equal(arr, want)
    del arr
    m.close()


def test_refused_advice_is_false_and_waits_still_return() -> None:
    assert madvise(0, 0, MADV_POPULATE_WRITE) is False  # nothing to do
    assert madvise(1, 4096, 9999) is False  # unaligned address, unknown advice: refused, no exception
    with Prefaulter(1, [(0, 4096), (4096, 8192)]) as ahead:  # every populate refused: pieces still handed out
        ahead.wait(0)
        ahead.wait(1)


def test_leaving_early_stops_the_helper() -> None:
    m, arr, addr = _mapping(64 * MiB)
    pieces = [(lo, lo + MiB) for lo in range(0, 64 * MiB, MiB)]
    with Prefaulter(addr, pieces) as ahead:
        ahead.wait(0)
    assert not ahead._thread.is_alive()
    del arr
    m.close()


def test_pieces_it_was_not_given_are_not_waited_for() -> None:
    with Prefaulter(0, []) as ahead:  # no pieces: a no-op
        ahead.wait(0)
        ahead.wait(5)
