"""Where a private host slot's memory comes from: page-aligned always (direct I/O from the slot), and for a large
unpinned slot 2 MiB-aligned and advised to use transparent huge pages, so a direct write from it is a few large
requests rather than one per scattered 4 KiB page."""

from __future__ import annotations

import sys

import pytest

from asymstore.hostpool import HostPool
from asymstore.snapshot import HUGE_PAGE

MiB = 1 << 20


def _anon_huge_kib(addr: int) -> int:
    """``AnonHugePages`` of the mapping of this process that holds ``addr`` (kB)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                inside = lo <= addr < hi
            elif inside and head[0] == "AnonHugePages:":
                return int(head[1])
    raise AssertionError(f"no mapping holds {addr:#x}")


def _thp_mode() -> str | None:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return None
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else None


@pytest.mark.parametrize("nbytes", [4096, 5 * MiB + 123, 64 * MiB + 7])
def test_private_slot_is_page_aligned_and_sized(nbytes: int) -> None:
    pool = HostPool(1, pin_memory=False)
    slot = pool.acquire(nbytes, 1)
    assert slot.buffer is not None
    assert slot.buffer.data_ptr() % 4096 == 0
    assert slot.capacity >= nbytes
    assert pool.reserved_bytes == slot.capacity
    if nbytes >= 8 * HUGE_PAGE:
        assert slot.buffer.data_ptr() % HUGE_PAGE == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="transparent huge pages are a Linux feature")
def test_large_private_slot_is_backed_by_huge_pages() -> None:
    mode = _thp_mode()
    if mode not in ("always", "madvise"):
        pytest.skip(f"transparent huge pages are {mode!r} on this kernel (need always or madvise)")
    pool = HostPool(1, pin_memory=False)
    slot = pool.acquire(64 * MiB, 1)
    assert slot.buffer is not None
    slot.buffer.fill_(1)  # first touch: the kernel backs the advised range now
    huge = _anon_huge_kib(slot.buffer.data_ptr())
    # khugepaged or a fragmented machine may leave a few 4 KiB pages; most of the slot is in 2 MiB pages
    assert huge >= 32 * 1024, f"only {huge} kB of the 64 MiB slot in huge pages"


def test_slot_reused_without_a_new_allocation() -> None:
    pool = HostPool(1, pin_memory=False)
    slot = pool.acquire(32 * MiB, 1)
    assert slot.buffer is not None
    ptr = slot.buffer.data_ptr()
    pool.release(slot)
    again = pool.acquire(30 * MiB, 2)
    assert again.buffer is not None and again.buffer.data_ptr() == ptr
