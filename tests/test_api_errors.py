"""Typed errors of the Store API, background failures, slot policies and flat host memory."""

from __future__ import annotations

import logging
import os
import threading
import uuid

import pytest
import torch

from asymstore import (
    BackendUnavailableError,
    CheckpointFailedError,
    ConfigError,
    StateMismatchError,
    StepExistsError,
    StepNotFoundError,
    Store,
    open_store,
)
from asymstore.backends.memory import MemoryObjectStore, drop_namespace
from asymstore.testing.process import rss_bytes

from .helpers import assert_bitequal

SMALL = dict(chunk_bytes=4096, partition_bytes=16384)


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(3000, generator=g), "opt": {"m": torch.randn(10, 5, generator=g)}, "step": step}


class FlakyStore(MemoryObjectStore):
    """A memory backend whose writes fail (or block) on demand."""

    def __init__(self) -> None:
        self.name = f"flaky-{uuid.uuid4().hex}"
        super().__init__(f"memory://{self.name}")
        self.fail = False
        self.gate = threading.Event()
        self.gate.set()

    def put(self, key, data) -> None:
        self.gate.wait(30)
        if self.fail and "/c/" in key:
            raise OSError(f"injected write failure for {key}")
        super().put(key, data)


@pytest.fixture
def flaky():
    s = FlakyStore()
    yield s
    s.gate.set()
    drop_namespace(s.name)


def test_unknown_step_lists_the_steps(tmp_path) -> None:
    with Store([str(tmp_path)], **SMALL) as s:
        s.save(_state(1), 1)
        s.save(_state(5), 5)
        with pytest.raises(StepNotFoundError, match=r"step 3 .*\[1, 5\]"):
            s.restore(3)
        with pytest.raises(StepNotFoundError):
            s.delete(3)
    with Store([str(tmp_path / "empty")], **SMALL) as e:
        with pytest.raises(StepNotFoundError, match="no complete checkpoint"):
            e.restore()
        with pytest.raises(StepNotFoundError):
            e.open_checkpoint()


def test_in_place_mismatch_lists_names(tmp_path) -> None:
    with Store([str(tmp_path)], **SMALL) as s:
        s.save(_state(1), 1)
    target = {"w": torch.zeros(2999), "opt": {"m": torch.zeros(10, 5, dtype=torch.float64)}, "step": 0}
    before = [t.clone() for t in (target["w"], target["opt"]["m"])]
    with Store([str(tmp_path)], **SMALL) as s:
        with pytest.raises(StateMismatchError) as ei:
            s.restore(1, into=target)
        msg = str(ei.value)
        assert "w: target torch.float32 (2999,), checkpoint torch.float32 (3000,)" in msg
        assert "opt/m: target torch.float64 (10, 5), checkpoint torch.float32 (10, 5)" in msg
        # nothing was written into the target
        assert torch.equal(target["w"], before[0]) and torch.equal(target["opt"]["m"], before[1])
        extra = {"w": torch.zeros(3000), "opt": {"m": torch.zeros(10, 5)}, "new": torch.zeros(1)}
        with pytest.raises(StateMismatchError, match="new: not in the checkpoint"):
            s.restore(1, into=extra)
        out = s.restore(1, into=extra, strict=False)
        assert_bitequal(extra["w"], _state(1)["w"])
        assert out["step"] == 1


def test_bad_urls(tmp_path) -> None:
    with pytest.raises(ConfigError, match="nosuch"):
        Store(["nosuch://x"])
    with pytest.raises(ConfigError):
        open_store("file://otherhost/x")
    f = tmp_path / "a-file"
    f.write_bytes(b"")
    with pytest.raises(BackendUnavailableError, match="a-file"):
        open_store(str(f / "ckpt"))  # a path below a regular file can never be created
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(BackendUnavailableError):
            open_store(str(ro))
    with pytest.raises(ConfigError):
        Store([str(tmp_path)], chunk_bytes=1000)
    with pytest.raises(ConfigError):
        Store([str(tmp_path)], compression="gzip9").save(_state(0), 0)


def _tree_bytes(root) -> dict[str, bytes]:
    """Every file under ``root``, by name, with its bytes."""
    out = {}
    for dp, _, fs in os.walk(root):
        for name in fs:
            with open(os.path.join(dp, name), "rb") as f:
                out[name] = f.read()
    return out


def test_save_existing_step_refused_and_old_step_untouched(tmp_path) -> None:
    with Store([str(tmp_path)], **SMALL) as s:
        s.save(_state(1), 1)
        files = _tree_bytes(tmp_path)
        with pytest.raises(StepExistsError, match="step 1"):
            s.save(_state(99), 1)
        # neither the host copy nor the tier changed, and no stale error lingers
        assert_bitequal(s.restore(1), _state(1))
        assert s.last_restore.tier == "host"
        s.save(_state(2), 2)
        assert s.steps() == [1, 2]
    after = _tree_bytes(tmp_path)
    assert all(after[p] == files[p] for p in files)
    with Store([str(tmp_path)], **SMALL) as fresh:
        with pytest.raises(StepExistsError):
            fresh.save(_state(99), 1)  # known only from the tier
        assert_bitequal(fresh.restore(1), _state(1))


def test_background_failure_raised_on_next_call(flaky) -> None:
    s = Store([flaky], **SMALL)
    flaky.fail = True
    h = s.save_async(_state(1), 1)
    with pytest.raises(OSError):
        h.result(30)
    with pytest.raises(CheckpointFailedError, match="injected write failure"):
        s.save(_state(2), 2)
    assert s.failures == 1
    flaky.fail = False
    s.save(_state(3), 3)  # raised once, then the store works again
    assert s.tiers[0].committed_steps() == [3]
    flaky.fail = True
    with pytest.raises(OSError):
        s.save(_state(4), 4)  # a blocking save raises the failure itself ...
    flaky.fail = False
    s.save(_state(4), 4)  # ... once: not again on the next call; and the failed step can be retried
    assert s.tiers[0].committed_steps() == [3, 4]
    assert s.failures == 2
    s.close()


def test_background_failure_raised_by_wait_and_close(flaky) -> None:
    s = Store([flaky], **SMALL)
    flaky.fail = True
    s.save_async(_state(1), 1)
    with pytest.raises(CheckpointFailedError):
        s.wait(30)
    s.save_async(_state(2), 2)
    with pytest.raises(CheckpointFailedError):
        s.close()


def test_non_fatal_counts_instead(flaky, caplog) -> None:
    with Store([flaky], **SMALL, non_fatal=True) as s:
        flaky.fail = True
        with caplog.at_level(logging.ERROR, logger="asymstore"):
            for step in range(3):
                h = s.save_async(_state(step), step)
                with pytest.raises(OSError):
                    h.result(30)
            h = s.save(_state(10), 10)  # a blocking save does not raise either
            with pytest.raises(OSError):
                h.result()
        s.wait(30)  # no CheckpointFailedError
        assert s.failures == 4
        assert sum("non-fatal" in r.getMessage() for r in caplog.records) == 4
        flaky.fail = False
        s.save(_state(11), 11)
        assert s.tiers[0].committed_steps() == [11]


def test_slot_policy_skip(flaky, caplog) -> None:
    with Store([flaky], **SMALL, host_slots=1, slot_policy="skip") as s:
        flaky.gate.clear()  # persistence of step 1 blocks
        h1 = s.save_async(_state(1), 1)
        with caplog.at_level(logging.WARNING, logger="asymstore"):
            h2 = s.save_async(_state(2), 2)
        assert h2.done() and h2.skipped and h2.result().skipped
        assert any("skipped" in r.getMessage() and "step 2" in r.getMessage() for r in caplog.records)
        assert s.host.skips == 1
        flaky.gate.set()
        assert not h1.result(30).skipped
        h3 = s.save(_state(3), 3)
        assert not h3.skipped
        assert s.steps() == [1, 3]


def test_slot_policy_wait(flaky) -> None:
    with Store([flaky], **SMALL, host_slots=1, slot_policy="wait") as s:
        flaky.gate.clear()
        h1 = s.save_async(_state(1), 1)
        t = threading.Timer(0.3, flaky.gate.set)
        t.start()
        h2 = s.save_async(_state(2), 2)  # waits for the slot, then goes on
        assert not h2.result(30).skipped and not h1.result(30).skipped
        assert s.host.waits == 1
        assert s.tiers[0].committed_steps() == [1, 2]


@pytest.mark.slow
def test_host_memory_flat_over_200_checkpoints(tmp_path) -> None:
    state = {"w": torch.randn(256 * 1024), "m": torch.randn(64, 1024), "step": 0}  # 1.25 MiB
    with Store(
        [str(tmp_path)], chunk_bytes=1 << 18, partition_bytes=1 << 20, compression="none", host_slots=2, delta_every=0
    ) as s:
        for step in range(20):  # warm up allocators
            state["w"][step] = step
            s.save(state, step, blocking=step % 2 == 0)
            if step >= 3:
                s.delete(step - 3)
        s.wait()
        report0 = s.memory_report()
        rss0 = rss_bytes()
        for step in range(20, 220):
            state["w"][step] = step
            state["step"] = step
            s.save(state, step, blocking=step % 2 == 0)
            if step >= 3 and step - 3 in s.steps():
                s.delete(step - 3)
            now = s.memory_report()
            # the slots' records (one page each) are rewritten while a save is sealed: only they may come and go
            shm_drift = abs(now.pop("shared_memory") - report0["shared_memory"])
            assert now == {k: v for k, v in report0.items() if k != "shared_memory"}, f"step {step}: {now}"
            assert shm_drift <= 2 * 4096, f"step {step}: shared memory moved by {shm_drift} bytes"
        s.wait()
        growth = rss_bytes() - rss0
        assert report0["host_slots"] <= 2 * 2 * (1 << 21)
        assert growth < 24 * (1 << 20), f"RSS grew by {growth / 2**20:.1f} MiB over 200 checkpoints"
        got = s.restore(219)
        assert got["step"] == 219 and float(got["w"][219]) == 219.0
        assert len(os.listdir(tmp_path)) <= 6  # retention kept the directory small


def test_a_stream_larger_than_host_memory_is_a_clear_error() -> None:
    """A (consistent, perhaps hostile) manifest may claim a stream larger than the machine's memory: the
    restore says how many bytes it needs and how to read the step instead, not a raw allocator error."""
    from asymstore.errors import HostMemoryError
    from asymstore.store import _stream_buffer

    with pytest.raises(HostMemoryError, match=r"step 4 needs 1000000000000000 bytes.*open_checkpoint"):
        _stream_buffer(10**15, 4)
    assert _stream_buffer(0, 1).numel() == 1
