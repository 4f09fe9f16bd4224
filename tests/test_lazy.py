"""Lazy reads: metadata without data, and row slices that touch only the chunks they need."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from asymstore import Store, open_checkpoint
from asymstore.backends.base import ByteRange
from asymstore.backends.local import LocalObjectStore
from asymstore.zarrfmt import index_nbytes

from .helpers import assert_bitequal, random_tensor

CHUNK, PART = 4096, 16384


class CountingStore(LocalObjectStore):
    """Records every data read (key, bytes) so tests can see what lazy access touches."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.reads: list[tuple[str, int]] = []

    def get(self, key, byte_range=None):
        out = super().get(key, byte_range)
        self.reads.append((key, len(out) if out is not None else 0))
        return out

    def get_into(self, key, out, offset=0):
        self.reads.append((key, len(out)))
        return super().get_into(key, out, offset)


STATE = {
    "emb": torch.randn(500, 64),  # 128 000 B: ~8 partitions of 16 KiB
    "bf": random_tensor(torch.bfloat16, (300, 33), 3),  # odd row size: rows straddle chunks
    "small": torch.arange(10),
    "scalar": torch.tensor(2.5),
    "meta": {"lr": 0.1},
}


@pytest.fixture(scope="module", params=["none", "zstd3", "blosc-shuffle"])
def saved(request, tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp(f"lazy-{request.param}"))
    with Store([root], chunk_bytes=CHUNK, partition_bytes=PART, compression=request.param) as s:
        s.save(STATE, 7)
    return root


def test_metadata_without_data(saved) -> None:
    store = CountingStore(saved)
    ck = open_checkpoint(store)
    assert ck.step == 7
    assert sorted(ck) == ["bf", "emb", "scalar", "small"]
    assert ck["emb"].shape == torch.Size([500, 64]) and ck["emb"].dtype == torch.float32
    assert ck["bf"].shape == (300, 33) and ck["bf"].dtype == torch.bfloat16
    assert ck["scalar"].shape == () and len(ck["small"]) == 10
    assert ck.skeleton["meta"] == {"lr": 0.1}
    assert ck.bytes_read == 0
    assert not any("/c/" in k for k, _ in store.reads), store.reads  # no shard was touched


def _touched_stored_bytes(root: str, ck, start: int, end: int) -> int:
    """Stored bytes of the chunks holding stream bytes [start, end) plus their shards' indexes."""
    m = ck.reader.manifest
    cps = m.chunks_per_shard
    C = m.chunk_bytes
    total = 0
    plain = LocalObjectStore(root)
    for rec in m.partitions:
        lo, hi = max(start, rec.span.start), min(end, rec.span.end)
        if hi <= lo:
            continue
        key = f"step_{m.step:012d}/{rec.label}/c/{rec.shard}"
        idx = np.frombuffer(plain.get(key, ByteRange(-index_nbytes(cps), index_nbytes(cps)))[:-4], "<u8").reshape(
            cps, 2
        )
        k0, k1 = (lo - rec.span.start) // C, (hi - 1 - rec.span.start) // C
        total += int(sum(idx[k, 1] for k in range(k0, k1 + 1))) + index_nbytes(cps)
    return total


@pytest.mark.parametrize(
    "name, rows",
    [
        ("emb", slice(100, 103)),
        ("emb", slice(0, 1)),
        ("emb", slice(499, 500)),
        ("emb", slice(250, 330)),
        ("bf", slice(123, 125)),
        ("bf", 77),
        ("emb", slice(10, 40, 3)),
        ("emb", -1),
    ],
)
def test_row_slices_read_only_needed_chunks(saved, name, rows) -> None:
    ck = open_checkpoint(saved)
    lt = ck[name]
    got = lt[rows]
    assert_bitequal(got, STATE[name][rows].contiguous())
    n = lt.shape[0]
    idx = range(n)[rows] if isinstance(rows, slice) else [rows % n]
    row_bytes = lt.nbytes // n
    start = lt.entry.offset + min(idx) * row_bytes
    end = lt.entry.offset + (max(idx) + 1) * row_bytes
    need = _touched_stored_bytes(saved, ck, start, end)
    assert 0 < ck.bytes_read <= 2 * need, f"read {ck.bytes_read} B for {need} B of touched chunks"
    whole = sum(r.stored_bytes for r in ck.reader.manifest.partitions)
    assert ck.bytes_read < whole / 3  # far from reading everything


def test_full_reads_and_load(saved) -> None:
    ck = open_checkpoint(saved)
    for name in ("emb", "bf", "small", "scalar"):
        assert_bitequal(ck[name].read(), STATE[name])
    assert ck["emb"][:, 3].shape == (500,)
    assert_bitequal(ck["emb"][5, 2:4], STATE["emb"][5, 2:4].contiguous())
    assert np.array_equal(ck["bf"].numpy(), STATE["bf"].view(torch.uint16).numpy())  # plain view dtype
    assert_bitequal(ck.load(), STATE)
    with pytest.raises(IndexError):
        ck["small"][10]
    with pytest.raises(KeyError, match="nope"):
        ck["nope"]


def test_lazy_reads_of_a_delta_step(tmp_path) -> None:
    root = str(tmp_path)
    base = {"w": torch.randn(400, 64)}
    nxt = {"w": base["w"].clone()}
    nxt["w"][::9] += 1
    with Store([root], chunk_bytes=CHUNK, partition_bytes=PART, compression="xor-zstd", delta_every=4) as s:
        s.save(base, 1)
        s.save(nxt, 2)
    ck = open_checkpoint(root)
    assert ck.step == 2 and ck.reader.manifest.delta_base == 1
    assert_bitequal(ck["w"][200:203], nxt["w"][200:203].contiguous())
    assert_bitequal(ck["w"].read(), nxt["w"])


def test_store_partial_restore(saved) -> None:
    with Store([saved], chunk_bytes=CHUNK, partition_bytes=PART) as s:
        got = s.restore_tensors(["small", "scalar"])
        assert sorted(got) == ["scalar", "small"]
        assert_bitequal(got["small"], STATE["small"])
        got2 = s.restore_tensors(lambda n: n.startswith("e"))
        assert list(got2) == ["emb"]
    assert os.path.isdir(saved)
