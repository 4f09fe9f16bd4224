"""The writer's and the reader's two-stage pipelines: the writer encodes partition i+1 on a helper thread while it
writes partition i, the reader verifies partition i while it reads i+1; what lands (and what is read back) is
exactly what one-at-a-time code would produce (raw, compressed, XOR deltas, a stream read from another tier)."""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest

from asymstore import writer as writer_mod
from asymstore.backends.memory import MemoryObjectStore
from asymstore.layout import plan_layout
from asymstore.manifest import step_dir
from asymstore.reader import CheckpointReader
from asymstore.retention import DeltaState
from asymstore.write_plan import CheckpointContent, WriteOptions, parse_compression, plan_write
from asymstore.writer import CheckpointWriter, DeltaBase, ReaderSource

CHUNK = 4096
PART = 4 * CHUNK


def _layout(nbytes: int):
    return plan_layout([("w", "float32", (nbytes // 4,), nbytes)])


def _write(store, step, stream, layout, *, compression="none", delta: DeltaBase | None = None):
    """Plan ``step`` with fixed partitions of PART bytes and execute the plan."""
    options = WriteOptions(
        chunk_bytes=CHUNK, partition_bytes=PART, compression=parse_compression(compression), delta_every=4
    )
    state = DeltaState(delta.step, delta.signature, 0) if delta else DeltaState()
    plan = plan_write(
        step, layout, options, delta=state, whole_stream=isinstance(stream, memoryview), prefix=step_dir(step) + "/"
    )
    content = CheckpointContent(layout, {"__tensor__": "w"})
    return CheckpointWriter(store).write(plan, stream, content, delta_base=delta)


def _stream(nbytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(nbytes // 4).astype(np.float32).view(np.uint8)


class SlowStore(MemoryObjectStore):
    """Records when each shard write starts and ends; shard writes take ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        super().__init__(f"memory://pipeline-{uuid.uuid4().hex}")
        self.delay = delay
        self.puts: list[tuple[str, float, float]] = []

    def put(self, key, data) -> None:
        t0 = time.perf_counter()
        if "/c/" in key:
            time.sleep(self.delay)
        super().put(key, data)
        self.puts.append((key, t0, time.perf_counter()))


def _read_all(store, step: int, nbytes: int, base=None) -> bytes:
    r = CheckpointReader.open(store, step, base_reader=base)
    out = bytearray(nbytes)
    r.read_range_into(0, nbytes, memoryview(out))
    return bytes(out)


def test_next_partition_is_encoded_while_the_current_one_is_written(monkeypatch) -> None:
    encodes: list[tuple[float, float, int]] = []
    real = writer_mod.encode_shard

    def spy(*a, **k):
        t0 = time.perf_counter()
        out = real(*a, **k)
        encodes.append((t0, time.perf_counter(), threading.get_ident()))
        return out

    monkeypatch.setattr(writer_mod, "encode_shard", spy)
    n = 6 * PART
    store = SlowStore(delay=0.05)
    data = _stream(n, 1)
    rep = _write(store, 1, memoryview(data), _layout(n))
    assert rep.objects == 6
    shard_puts = [p for p in store.puts if "/c/" in p[0]]
    assert len(shard_puts) == 6 and len(encodes) == 6
    assert all(tid != threading.get_ident() for _, _, tid in encodes), "encodes run on the helper thread"
    for k in range(1, 6):  # encode k starts before write k-1 ends: the stages overlap
        assert encodes[k][0] < shard_puts[k - 1][2], k
    assert _read_all(store, 1, n) == data.tobytes()
    assert not any(t.name.startswith("asymstore-encode") for t in threading.enumerate()), "helper shut down"


@pytest.mark.parametrize("compression", ["none", "zstd1", "xor-zstd"])
def test_pipelined_output_reads_back_exactly(compression: str) -> None:
    n = 7 * PART + 3 * CHUNK + 100  # a partial last partition and a partial last chunk
    store = MemoryObjectStore(f"memory://pipeline-{uuid.uuid4().hex}")
    layout = _layout(n - n % 4)
    n = layout.total_bytes
    base = _stream(n, 2)
    _write(store, 1, memoryview(base), layout, compression=compression)
    cur = base.copy()
    cur[::97] ^= 0x11  # sparse changes: the XOR delta of each partition differs
    delta = DeltaBase(1, layout.signature, memoryview(base))
    rep = _write(store, 2, memoryview(cur), layout, compression=compression, delta=delta)
    if compression == "xor-zstd":
        assert rep.delta_base == 1 and all(label.startswith("xor-") for label in rep.codecs)
    opener = lambda s: CheckpointReader.open(store, s)  # noqa: E731
    assert _read_all(store, 2, n, base=opener) == cur.tobytes()


def test_promotion_source_keeps_the_range_being_written_intact() -> None:
    """A stream read range by range from another tier (two buffers, used in turn) is copied exactly."""
    n = 9 * PART
    src_store = MemoryObjectStore(f"memory://pipeline-{uuid.uuid4().hex}")
    data = _stream(n, 3)
    _write(src_store, 5, memoryview(data), _layout(n))
    reader = CheckpointReader.open(src_store, 5)
    dst = SlowStore(delay=0.01)
    source = ReaderSource(reader, PART)
    _write(dst, 5, source, reader.manifest.layout)
    assert _read_all(dst, 5, n) == data.tobytes()
    with pytest.raises(ValueError, match="exceeds"):
        source.read(0, PART + 1)


@pytest.mark.parametrize("compression", ["none", "zstd1"])
def test_pipelined_read_is_exact_reports_progress_in_order_and_stops_at_damage(compression: str) -> None:
    """read_all_into verifies partition i on a helper thread while it reads partition i+1: the bytes, the
    progress (in order, up to the total) and the damage report are those of a one-at-a-time reader."""
    from asymstore.errors import CorruptCheckpointError
    from asymstore.manifest import step_dir
    from asymstore.zarrfmt import shard_key

    n = 6 * PART
    store = MemoryObjectStore(f"memory://pipeline-{uuid.uuid4().hex}")
    data = _stream(n, 4)
    rep = _write(store, 3, memoryview(data), _layout(n), compression=compression)
    (label,) = rep.codecs
    seen: list[int] = []
    out = bytearray(n)
    CheckpointReader.open(store, 3).read_all_into(memoryview(out), progress=lambda done, total: seen.append(done))
    assert bytes(out) == data.tobytes()
    assert seen == [PART * (i + 1) for i in range(6)]
    key = step_dir(3) + "/" + shard_key(label, 4)
    blob = bytearray(store.get(key))
    blob[10] ^= 0xFF  # a stored byte of partition 4's first chunk
    store.put(key, bytes(blob))
    seen.clear()
    with pytest.raises(CorruptCheckpointError) as err:
        CheckpointReader.open(store, 3).read_all_into(
            memoryview(bytearray(n)), progress=lambda done, total: seen.append(done)
        )
    assert key in err.value.objects
    assert seen == [PART * (i + 1) for i in range(4)]  # partitions 0-3 verified, nothing after the damage
    assert not any(t.name.startswith("asymstore-verify") for t in threading.enumerate())
