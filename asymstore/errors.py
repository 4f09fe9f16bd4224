"""Typed exceptions. Every error asymstore raises derives from :class:`AsymstoreError`."""

from __future__ import annotations


class AsymstoreError(Exception):
    """Base class of all asymstore errors."""


class ConfigError(AsymstoreError, ValueError):
    """A configuration value or URL is invalid; the message says what to change."""


class InvalidKeyError(ConfigError):
    """An object key is not a relative '/'-separated path of plain components (see ``check_key``)."""


class BackendUnavailableError(AsymstoreError):
    """A tier backend cannot be used (missing optional dependency, unreachable service)."""


class StepNotFoundError(AsymstoreError, KeyError):
    """The requested step is not complete on any tier."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "step not found"


class StepExistsError(AsymstoreError):
    """A checkpoint for this step is already committed; saving again would overwrite it."""


class CorruptCheckpointError(AsymstoreError):
    """Stored bytes fail their checksum or the metadata is inconsistent.

    ``objects`` names the stored objects that failed, relative to the tier root.
    """

    def __init__(self, message: str, objects: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.objects = objects


class StateMismatchError(AsymstoreError, ValueError):
    """An in-place restore target does not match the checkpoint (names, shapes or dtypes)."""


class UnsupportedValueError(AsymstoreError, TypeError):
    """A value in the training state cannot be stored without pickle."""


class HostMemoryError(AsymstoreError, MemoryError):
    """A restore needs more host memory than the machine has; the message names the bytes and the way out."""


class CheckpointFailedError(AsymstoreError):
    """A background checkpoint failed; raised on the next call so the failure is never lost."""


class TierFullError(CheckpointFailedError, OSError):
    """A tier ran out of space for a checkpoint even after retention made room; the message names the tier,
    the path, the step and the bytes it needs. An ``OSError`` too: ``errno`` is ``ENOSPC`` (or ``EDQUOT``)."""

    def __init__(self, message: str, *, errno: int = 28) -> None:
        super().__init__(errno, message)

    def __str__(self) -> str:
        return str(self.strerror)


class SnapshotSlotsBusyError(AsymstoreError):
    """All host snapshot slots hold checkpoints whose persistence has not finished."""
