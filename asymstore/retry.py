"""One retry/backoff helper for everything that waits on something outside this process.

:class:`Backoff` is the delay schedule (exponential, capped); :func:`retry` runs a call with bounded retries of
the errors a caller calls transient; :func:`poll` waits for a condition until a deadline. Backends, the tier
manager's promotion threads and multi-rank commits all use these, so "how long do we wait, how often do we try"
is decided in one place.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass
class Backoff:
    """Exponential delays: ``initial_s``, doubling (``factor``), never below ``floor_s`` nor above ``max_s``."""

    initial_s: float = 0.01
    max_s: float = 0.5
    factor: float = 2.0
    floor_s: float = 0.0

    def __post_init__(self) -> None:
        if self.initial_s < 0 or self.max_s < 0 or self.factor < 1 or self.floor_s < 0:
            raise ValueError(f"invalid backoff schedule {self!r}: delays must be >= 0 and factor >= 1")
        self._next = self.initial_s

    def next(self) -> float:
        """The delay to wait now; the following one grows by ``factor``."""
        d = self._next
        self._next = min(max(d * self.factor, self.floor_s), self.max_s)
        return d

    def reset(self) -> None:
        """Start the schedule again (after a success)."""
        self._next = self.initial_s

    def sleep(self) -> float:
        """Sleep for :meth:`next`; returns the seconds slept."""
        d = self.next()
        time.sleep(d)
        return d


def retry(
    fn: Callable[[], T],
    *,
    retries: int,
    transient: Callable[[BaseException], bool],
    backoff: Backoff,
    give_up: Callable[[BaseException, int, float], BaseException] | None = None,
) -> T:
    """Call ``fn``; retry up to ``retries`` times when it raises an error ``transient`` accepts.

    Other errors propagate at once. When the retries are spent, ``give_up(error, attempts, elapsed_s)`` builds
    the error to raise (chained to the last one); without it the last error propagates.
    """
    attempt = 0
    t0 = time.monotonic()
    while True:
        try:
            return fn()
        except Exception as e:
            if not transient(e):
                raise
            if attempt >= retries:
                if give_up is None:
                    raise
                raise give_up(e, attempt + 1, time.monotonic() - t0) from e
            backoff.sleep()
            attempt += 1


def poll(ready: Callable[[], T | None], *, timeout_s: float, backoff: Backoff | None = None) -> T | None:
    """Call ``ready()`` until it returns something other than ``None`` or ``timeout_s`` passes.

    Returns that value, or ``None`` at the deadline (the caller says what timed out). ``ready`` is called at
    least once, and once more at the deadline.
    """
    delays = backoff or Backoff()
    deadline = time.monotonic() + timeout_s
    while True:
        value = ready()
        if value is not None:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        time.sleep(min(delays.next(), left))


# --- what storage clients' errors mean ------------------------------------------------------------------------
_NOT_TRANSIENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_transient_error(exc: BaseException, markers: Sequence[str], *, kinds: tuple[type, ...] = (OSError,)) -> bool:
    """Whether a storage client's error is worth retrying: connection and timeout errors always; a missing or
    existing path, a permission or a directory never; any other error of ``kinds`` when its message names one
    of ``markers`` (lower case)."""
    if isinstance(exc, _NOT_TRANSIENT):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if not isinstance(exc, kinds):
        return False
    msg = str(exc).lower()
    return any(m in msg for m in markers)


def is_unreachable_error(exc: BaseException, markers: Sequence[str]) -> bool:
    """Whether a storage client's error says the service is not there at all (refused, unresolvable, ...)."""
    if isinstance(exc, ConnectionRefusedError):
        return True
    msg = str(exc).lower()
    return any(m in msg for m in markers)
