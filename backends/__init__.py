"""Tier backends, chosen by URL scheme from a table of lazily imported classes with install hints.

A plain path means ``file://``. Third-party backends add themselves with :func:`register`; their tests run the
conformance kit, :mod:`asymstore.testing.conformance`.
"""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple

from asymstore.errors import BackendUnavailableError, ConfigError

from .base import ByteRange, ObjectStore


class BackendEntry(NamedTuple):
    """Where a scheme's backend class lives, imported only when a URL of that scheme is opened."""

    #: the module holding the class (imported on first use)
    module: str
    #: the class name, an :class:`~asymstore.interfaces.ObjectStore` subclass taking ``(url, **options)``
    cls: str
    #: what to install when importing the module fails (``''``: nothing beyond asymstore)
    hint: str = ""


_REGISTRY: dict[str, BackendEntry] = {
    "file": BackendEntry("asymstore.backends.local", "LocalObjectStore"),
    "memory": BackendEntry("asymstore.backends.memory", "MemoryObjectStore"),
    "hdfs": BackendEntry(
        "asymstore.backends.hdfs", "HdfsObjectStore", "pip install 'asymstore[hdfs]'  (installs hdfs-native)"
    ),
    "s3": BackendEntry("asymstore.backends.s3", "S3ObjectStore", "pip install 'asymstore[s3]'  (installs pyarrow)"),
}


def register(scheme: str, module: str, cls: str, hint: str = "") -> None:
    """Register the backend class ``module.cls`` for URLs of ``scheme`` (for third-party tiers).

    ``hint`` says what to install when the module cannot be imported.
    """
    _REGISTRY[scheme.lower()] = BackendEntry(module, cls, hint)


def scheme_of(url: str) -> str:
    """The URL's scheme, lower-cased; ``'file'`` for a plain path."""
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def open_object_store(url: str, **options: Any) -> ObjectStore:
    """Open the backend for ``url`` (a plain path means ``file://``) with backend-specific ``options``.

    Raises :class:`~asymstore.errors.ConfigError` for an unknown scheme and
    :class:`~asymstore.errors.BackendUnavailableError` (with the install hint) when the backend's package is
    missing.
    """
    scheme = scheme_of(url)
    entry = _REGISTRY.get(scheme)
    if entry is None:
        raise ConfigError(
            f"no asymstore backend for URL scheme {scheme!r} in {url!r}; known schemes: {', '.join(sorted(_REGISTRY))}"
        )
    try:
        mod = importlib.import_module(entry.module)
    except ImportError as e:
        raise BackendUnavailableError(
            f"the {scheme}:// backend needs a missing package ({e.name}): {entry.hint or 'see the README'}"
        ) from e
    cls = getattr(mod, entry.cls)
    if not (isinstance(cls, type) and issubclass(cls, ObjectStore)):
        raise ConfigError(f"{entry.module}.{entry.cls}, registered for {scheme}://, is not an ObjectStore")
    backend: ObjectStore = cls(url, **options)
    return backend


__all__ = ["BackendEntry", "ByteRange", "ObjectStore", "open_object_store", "register", "scheme_of"]
