"""A sealed host slot's chunk checksums are reused by raw tier writes: the shard and its recorded checksums are
the ones a write that checksums the bytes itself makes, for every partition geometry."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from asymstore.codecs import RAW
from asymstore.shm import chunk_crcs
from asymstore.zarrfmt import StreamCrcs, encode_shard


@settings(max_examples=60, deadline=None)
@given(
    chunk_log=st.integers(4, 8),
    chunks_per_part=st.integers(1, 4),
    total=st.integers(1, 3000),
    seed=st.integers(0, 2**32 - 1),
)
def test_known_crcs_give_the_same_shard_as_computed_ones(
    chunk_log: int, chunks_per_part: int, total: int, seed: int
) -> None:
    c = 1 << chunk_log
    p = c * chunks_per_part
    stream = np.random.default_rng(seed).integers(0, 256, total, dtype=np.uint8)
    view = memoryview(stream.data)
    known = StreamCrcs(c, chunk_crcs(view, c))
    for start in range(0, total, p):
        end = min(start + p, total)
        span = known.span(start, end, c)
        assert span is not None
        a = encode_shard(RAW, view[start:end], c, chunks_per_part, span)
        b = encode_shard(RAW, view[start:end], c, chunks_per_part)
        assert a.chunk_crcs == b.chunk_crcs
        assert b"".join(bytes(x) for x in a.parts) == b"".join(bytes(x) for x in b.parts)


def test_crcs_of_another_geometry_are_not_offered() -> None:
    known = StreamCrcs(16, tuple(range(10)))  # a 145..160-byte stream in 16-byte pieces
    assert known.span(0, 32, 32) is None  # another chunk size
    assert known.span(8, 32, 16) is None  # not on a piece
    assert known.span(0, 24, 16) is None  # ends inside a piece that is not the last
    assert known.span(144, 150, 16) == (9,)  # the short last piece
    assert known.span(16, 48, 16) == (1, 2)


@settings(max_examples=40, deadline=None)
@given(chunk_log=st.integers(4, 8), total=st.integers(1, 5000), seed=st.integers(0, 2**32 - 1))
def test_streaming_crcs_equal_the_sealed_ones_while_computed_beside_the_reader(
    chunk_log: int, total: int, seed: int
) -> None:
    """Checksums computed on one thread are handed to a reader on another as soon as its pieces are done, equal
    to the ones computed at once, for every run of pieces the reader may ask for."""
    import threading

    from asymstore.zarrfmt import StreamingCrcs

    c = 1 << chunk_log
    view = memoryview(np.random.default_rng(seed).integers(0, 256, total, dtype=np.uint8).data)
    want = StreamCrcs(c, chunk_crcs(view, c))
    pending = StreamingCrcs(c, total)
    worker = threading.Thread(target=pending.compute, args=(view,))
    worker.start()
    n = len(want.crcs)
    for a in range(n):
        for b in (a + 1, n):
            start, end = a * c, min(b * c, total)
            assert pending.span(start, end, c) == want.span(start, end, c)
    worker.join()
    assert pending.span(0, total, c * 2) is None and pending.span(1, total, c) is None  # not its pieces


def test_streaming_crcs_waiters_get_none_when_computing_fails() -> None:
    """A writer waiting for checksums that will never come is released with None (it then checksums itself)."""
    import threading

    from asymstore.zarrfmt import StreamingCrcs

    pending = StreamingCrcs(16, 64)
    got: list[object] = []
    t = threading.Thread(target=lambda: got.append(pending.span(0, 64, 16)))
    t.start()
    pending.fail()
    t.join(10)
    assert got == [None]
