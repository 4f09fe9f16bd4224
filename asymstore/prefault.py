"""Faulting in new host memory ahead of the I/O that fills it.

A direct (``O_DIRECT``) read into memory that was never touched pins its pages inside the read call: the kernel
faults in and zeroes every page there, one call at a time, while the disk waits. On a virtual machine whose
free memory is handed back to the host, a fault can cost far more than zeroing (the host backs the page
again). :class:`Prefaulter` does that work on a helper thread, piece by piece, ahead of the reads: the faults
of piece ``i+1`` overlap the disk transfer of piece ``i``. ``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14+)
populates a range without changing its bytes; where it is refused, nothing is done (the reads then fault as
before).
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Sequence

MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23

_libc: ctypes.CDLL | None = None


def madvise(addr: int, nbytes: int, advice: int) -> bool:
    """``madvise(addr, nbytes, advice)``; whether it succeeded (False off Linux or where the advice is refused).
    The call releases the GIL (``ctypes``)."""
    global _libc
    if not sys.platform.startswith("linux") or nbytes <= 0:
        return False
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        return int(_libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(nbytes), ctypes.c_int(advice))) == 0
    except (OSError, AttributeError):
        return False


_PAGE = 4096


def address(buf: memoryview) -> int:
    """The memory address of a buffer's first byte (0 for an empty one)."""
    import numpy as np

    return int(np.frombuffer(buf, dtype=np.uint8).ctypes.data) if len(buf) else 0


class Prefaulter:
    """Populate the pieces ``[(lo, hi), ...]`` (byte offsets from ``addr``, in order) on a helper thread;
    :meth:`wait` (i) returns once piece ``i`` is populated (or populating gave up: the caller faults it itself).
    Use as a context manager: leaving it stops the helper after its current piece."""

    def __init__(self, addr: int, pieces: Sequence[tuple[int, int]]) -> None:
        self.addr = addr
        self.pieces = list(pieces)
        self._done = 0  # pieces handled (populated or given up)
        self._stop = False
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="asymstore-prefault", daemon=True)

    def __enter__(self) -> Prefaulter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cv:
            self._stop = True
        self._thread.join()

    def _run(self) -> None:
        ok = True
        for lo, hi in self.pieces:
            if self._stop:
                break
            # page-aligned inside the piece: the kernel refuses an unaligned start
            a = (self.addr + lo + _PAGE - 1) // _PAGE * _PAGE
            b = (self.addr + hi) // _PAGE * _PAGE
            if ok and b > a:
                ok = madvise(a, b - a, MADV_POPULATE_WRITE)
            with self._cv:
                self._done += 1
                self._cv.notify_all()
        with self._cv:
            self._done = len(self.pieces)
            self._cv.notify_all()

    def wait(self, i: int) -> None:
        """Block until piece ``i`` has been populated (or will not be); returns at once for a piece it was not
        given (``i`` past its list)."""
        if i >= len(self.pieces):
            return
        with self._cv:
            self._cv.wait_for(lambda: self._done > i)


__all__ = ["MADV_HUGEPAGE", "MADV_POPULATE_WRITE", "Prefaulter", "address", "madvise"]
