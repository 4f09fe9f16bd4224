"""The multi-rank launcher of the tests: a hung or failed rank is reported, and no rank outlives its test."""

from __future__ import annotations

import time

import pytest

from tests.ranks import launch_ranks


def test_a_hung_rank_is_named_with_its_stack_and_killed(capfd: pytest.CaptureFixture[str]) -> None:
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match=r"ranks \[0, 1\] of 2 hung"):
        launch_ranks(2, "tests.ranks", ["hang"], timeout_s=3)
    assert time.monotonic() - t0 < 30
    err = capfd.readouterr().err
    assert "most recent call first" in err and "in main" in err, err[-2000:]  # faulthandler's stack of main()


def test_a_failed_rank_is_reported_with_its_exit_code() -> None:
    with pytest.raises(AssertionError, match=r"exited with \[3\]"):
        launch_ranks(1, "tests.ranks", ["fail"], timeout_s=60)
