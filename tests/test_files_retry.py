"""The one atomic local writer (asymstore.files) and the one retry helper (asymstore.retry)."""

from __future__ import annotations

import os
import time

import pytest

from asymstore.files import atomic_file, atomic_write
from asymstore.retry import Backoff, poll, retry


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path) -> None:
    path = str(tmp_path / "sub" / "f.json")
    with atomic_file(path) as f:
        f.write(b"old")
    with pytest.raises(RuntimeError), atomic_file(path) as f:
        f.write(b"half of the new")
        raise RuntimeError("crash mid-write")
    with open(path, "rb") as f:
        assert f.read() == b"old"
    assert os.listdir(tmp_path / "sub") == ["f.json"]  # no temporary file left
    with atomic_file(path, fsync=False) as f:
        f.write(b"new")
    with open(path, "rb") as f:
        assert f.read() == b"new"


def test_atomic_write_gives_the_writer_a_path(tmp_path) -> None:
    path = str(tmp_path / "obj")

    def write(tmp: str) -> None:
        assert tmp != path and os.path.dirname(tmp) == str(tmp_path)
        with open(tmp, "wb") as f:
            f.write(b"x" * 10)

    atomic_write(path, write)
    assert os.path.getsize(path) == 10

    def fail(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert os.path.getsize(path) == 10 and os.listdir(tmp_path) == ["obj"]


def test_backoff_doubles_up_to_its_cap_and_resets() -> None:
    b = Backoff(initial_s=0.1, max_s=0.35)
    assert [b.next() for _ in range(4)] == [0.1, 0.2, 0.35, 0.35]
    b.reset()
    assert b.next() == 0.1
    with pytest.raises(ValueError):
        Backoff(factor=0.5)


def test_retry_retries_transient_errors_then_gives_up() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("try again")
        return "ok"

    fast = Backoff(initial_s=0.0, max_s=0.0)
    assert retry(flaky, retries=5, transient=lambda e: isinstance(e, ConnectionError), backoff=fast) == "ok"
    assert len(calls) == 3

    def down() -> None:
        raise ConnectionError("gone")

    with pytest.raises(TimeoutError, match="3 attempts") as ei:
        retry(
            down,
            retries=2,
            transient=lambda e: isinstance(e, ConnectionError),
            backoff=Backoff(initial_s=0.0, max_s=0.0),
            give_up=lambda e, n, s: TimeoutError(f"{n} attempts in {s:.1f} s"),
        )
    assert isinstance(ei.value.__cause__, ConnectionError)
    with pytest.raises(KeyError):  # not transient: at once
        retry(lambda: {}["k"], retries=9, transient=lambda e: False, backoff=fast)


def test_poll_returns_the_value_or_none_at_the_deadline() -> None:
    t0 = time.monotonic()
    values = iter([None, None, 7])
    assert poll(lambda: next(values), timeout_s=5, backoff=Backoff(initial_s=0.001)) == 7
    assert poll(lambda: None, timeout_s=0.05, backoff=Backoff(initial_s=0.01)) is None
    assert time.monotonic() - t0 < 2
