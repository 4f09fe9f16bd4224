"""The multi-rank launcher of the tests: a hung or failed rank is reported with its output, and no rank outlives
its test."""

from __future__ import annotations

import time

import pytest

from tests.ranks import launch_ranks


def test_a_hung_rank_is_named_with_its_stack_and_killed() -> None:
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match=r"ranks \[0, 1\] of 2 hung") as e:
        launch_ranks(2, "tests.ranks", ["hang"], timeout_s=3)
    assert time.monotonic() - t0 < 30
    msg = str(e.value)
    for r in (0, 1):  # faulthandler's stack of each rank's main(), from its own log
        stacks = msg.split(f"--- rank {r} ")[1]
        assert "most recent call first" in stacks and "in main" in stacks, msg


def test_a_failed_rank_is_reported_with_its_exit_code_and_output() -> None:
    with pytest.raises(AssertionError, match=r"exited with \[3\]") as e:
        launch_ranks(1, "tests.ranks", ["fail"], timeout_s=60)
    assert "rank 0 fails on purpose" in str(e.value)
