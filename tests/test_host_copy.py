"""The host copy of the snapshot copy thread (:func:`asymstore.snapshot.host_copy`): streaming stores where the
native module is built, ``memmove`` otherwise; either way the destination holds exactly the source's bytes and
nothing around it is touched."""

from __future__ import annotations

import shutil
import sysconfig

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from asymstore import snapshot
from asymstore.snapshot import STREAM_MIN_BYTES, host_copy, streaming_copy_available

GUARD = 256


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(0, 3 * STREAM_MIN_BYTES),
    src_off=st.integers(0, 127),
    dst_off=st.integers(0, 127),
    seed=st.integers(0, 2**16),
)
@example(n=STREAM_MIN_BYTES, src_off=0, dst_off=0, seed=0)
@example(n=STREAM_MIN_BYTES + 63, src_off=1, dst_off=63, seed=1)  # misaligned head, a partial last line
@example(n=2 * STREAM_MIN_BYTES + 1, src_off=64, dst_off=3, seed=2)
def test_copy_is_exact_and_stays_in_bounds(n: int, src_off: int, dst_off: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 256, n + 128, dtype=np.uint8)
    dst = np.full(n + 128 + 2 * GUARD, 0xA5, dtype=np.uint8)
    host_copy(dst.ctypes.data + GUARD + dst_off, src.ctypes.data + src_off, n)
    got = dst[GUARD + dst_off : GUARD + dst_off + n]
    assert np.array_equal(got, src[src_off : src_off + n])
    assert (dst[: GUARD + dst_off] == 0xA5).all() and (dst[GUARD + dst_off + n :] == 0xA5).all()


def test_native_copy_handles_overlap_like_memmove() -> None:
    if not streaming_copy_available():
        pytest.skip("asymstore._native is not built")
    n = 4 * STREAM_MIN_BYTES
    buf = np.arange(n + 4096, dtype=np.uint32).view(np.uint8)
    want = buf[:n].copy()
    snapshot._native.copy(buf.ctypes.data + 4096, buf.ctypes.data, n)  # dst overlaps the source's tail
    assert np.array_equal(buf[4096 : 4096 + n], want)


def test_native_copy_rejects_bad_arguments() -> None:
    if not streaming_copy_available():
        pytest.skip("asymstore._native is not built")
    a = np.zeros(16, np.uint8)
    with pytest.raises(ValueError, match="negative"):
        snapshot._native.copy(a.ctypes.data, a.ctypes.data, -1)
    with pytest.raises(ValueError, match="null"):
        snapshot._native.copy(0, a.ctypes.data, 8)
    snapshot._native.copy(0, 0, 0)  # nothing to copy: no access at all


def test_native_module_is_built_where_a_compiler_is() -> None:
    """The install builds the streaming copy wherever the interpreter's C compiler exists (it does on the
    machines the project is set up on: a silent fallback would hide a broken build)."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(cc) is None:
        pytest.skip(f"no C compiler ({cc}): asymstore copies with memmove")
    assert streaming_copy_available(), "asymstore._native was not built: re-run the install (./run.sh does it)"


LANES = 3 * 8192  # the native checksum's interleaved block


@pytest.mark.parametrize("native", [True, False], ids=["native", "fallback"])
@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 3 * LANES + 100),
    src_off=st.integers(0, 63),
    dst_off=st.integers(0, 63),
    seed=st.integers(0, 2**16),
)
@example(n=LANES, src_off=0, dst_off=0, seed=0)  # exactly one block, no tail
@example(n=2 * LANES - 1, src_off=5, dst_off=3, seed=1)  # one block and a tail one byte short of the next
def test_copy_crc32c_copies_and_checksums_like_the_crc32c_package(
    native: bool, n: int, src_off: int, dst_off: int, seed: int
) -> None:
    import crc32c

    if native and not (snapshot._native is not None and snapshot._native.CRC32C):
        pytest.skip("no native crc32c on this machine")
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 256, n + 64, dtype=np.uint8)
    dst = np.full(n + 64 + 2 * GUARD, 0xA5, dtype=np.uint8)
    with pytest.MonkeyPatch.context() as mp:
        if not native:
            mp.setattr(snapshot, "_native", None)
        got = snapshot.copy_crc32c(dst.ctypes.data + GUARD + dst_off, src.ctypes.data + src_off, n)
    want = src[src_off : src_off + n]
    assert got == crc32c.crc32c(want.tobytes())
    assert np.array_equal(dst[GUARD + dst_off : GUARD + dst_off + n], want)
    assert (dst[: GUARD + dst_off] == 0xA5).all() and (dst[GUARD + dst_off + n :] == 0xA5).all()


def test_native_crc32c_copy_continues_a_checksum_and_rejects_bad_arguments() -> None:
    import crc32c

    if snapshot._native is None or not snapshot._native.CRC32C:
        pytest.skip("no native crc32c on this machine")
    rng = np.random.default_rng(7)
    a = rng.integers(0, 256, 5 * LANES + 17, dtype=np.uint8)
    b = np.empty_like(a)
    head = snapshot._native.crc32c_copy(b.ctypes.data, a.ctypes.data, 2 * LANES + 5)
    whole = snapshot._native.crc32c_copy(
        b.ctypes.data + 2 * LANES + 5, a.ctypes.data + 2 * LANES + 5, a.size - 2 * LANES - 5, head
    )
    assert whole == crc32c.crc32c(a.tobytes()) and np.array_equal(a, b)
    assert snapshot._native.crc32c_copy(0, 0, 0, 1234) == 1234  # nothing to copy: the value, no access
    with pytest.raises(ValueError, match="negative"):
        snapshot._native.crc32c_copy(b.ctypes.data, a.ctypes.data, -1)
    with pytest.raises(ValueError, match="null"):
        snapshot._native.crc32c_copy(0, a.ctypes.data, 8)
    with pytest.raises(ValueError, match="overlap"):
        snapshot._native.crc32c_copy(a.ctypes.data + 8, a.ctypes.data, 64)
