"""The shipped Store state machine on a local directory tier (latest 3 kept) above a memory:// tier (latest 5).

A bounded run by default; ``ASYMSTORE_STATEMACHINE_EXAMPLES=500`` (and ``ASYMSTORE_STATEMACHINE_STEPS``) runs
more examples, longer ones.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

import asymstore
from asymstore import Store, TierSpec
from asymstore.backends.local import LocalObjectStore
from asymstore.backends.memory import drop_namespace
from asymstore.testing.statemachine import CrashableBackend, CrashPoint, StoreMachine, TierUnderTest, crashable

EXAMPLES = int(os.environ.get("ASYMSTORE_STATEMACHINE_EXAMPLES", "25"))
STEPS = int(os.environ.get("ASYMSTORE_STATEMACHINE_STEPS", "20"))


class LocalOverMemory(StoreMachine):
    """A local directory first (durable), a memory:// tier below it (wiped by a crash)."""

    def make_tiers(self) -> Sequence[TierUnderTest]:
        self.root = tempfile.mkdtemp(prefix="asym-sm-")
        self.namespace = f"asym-sm-{uuid.uuid4().hex}"
        return [
            TierUnderTest(os.path.join(self.root, "local"), keep=3),
            TierUnderTest(f"memory://{self.namespace}", keep=5),
        ]

    def cleanup_tiers(self, tiers: Sequence[TierUnderTest]) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        drop_namespace(self.namespace)


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        stateful_step_count=STEPS,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


class TestLocalOverMemory(LocalOverMemory.TestCase):  # type: ignore[name-defined,misc]
    """The bounded run of the whole suite (CI)."""

    pytestmark = pytest.mark.slow
    settings = _settings(EXAMPLES)


class TestLocalOverMemoryQuick(LocalOverMemory.TestCase):  # type: ignore[name-defined,misc]
    """A few examples for ``./run.sh test-quick``; the slow run above explores more."""

    settings = _settings(min(EXAMPLES, 6))


def test_crashable_backend_cuts_storage_after_the_crash_point(tmp_path: Path) -> None:
    """Operations before the crash point reach storage; later ones only the dead process's own view."""
    inner = LocalObjectStore(str(tmp_path))
    point = CrashPoint()
    b = crashable(inner, point)
    assert isinstance(b, CrashableBackend) and b.capabilities == inner.capabilities
    b.put("a/1", b"one")
    point.crash(after_ops=1)
    b.put("a/2", b"two")  # the last operation that lands
    b.put("a/3", b"three")
    b.delete("a/1")
    assert b.get("a/3") == b"three" and b.get("a/1") is None and b.list("a/") == ["a/2", "a/3"]
    assert b.get("a/3", None) == b"three" and b.size("a/3") == 5
    assert sorted(inner.list("a/")) == ["a/1", "a/2"] and inner.get("a/3") is None
    assert b.delete_prefix("a/") == 2 and b.list("") == [] and sorted(inner.list("")) != []


@pytest.mark.parametrize("after_ops", [0, 3])
def test_a_crash_before_the_commit_leaves_no_step(tmp_path: Path, after_ops: int) -> None:
    """A save cut off before its COMMIT is not listed by a new store, and leaves only leftovers to discard."""
    point = CrashPoint()
    root = str(tmp_path)
    store = Store([TierSpec(crashable(LocalObjectStore(root), point))], **StoreMachine.store_options)
    store.save({"w": torch.arange(3000.0)}, 1)
    point.crash(after_ops=after_ops)
    store.save({"w": torch.arange(3000.0)}, 2, blocking=False)
    store.close()
    with asymstore.open_store(root) as fresh:
        assert fresh.steps() == [1]
        fresh.discard_uncommitted()
        assert fresh.steps() == [1]
