"""Tier backends, chosen by URL scheme from a lazily imported table with install hints."""

from __future__ import annotations

import importlib
from typing import Any

from asymstore.errors import BackendUnavailableError, ConfigError

from .base import ByteRange, ObjectStore

# scheme -> (module, class, install hint)
_REGISTRY: dict[str, tuple[str, str, str]] = {
    "file": ("asymstore.backends.local", "LocalObjectStore", ""),
    "memory": ("asymstore.backends.memory", "MemoryObjectStore", ""),
    "hdfs": ("asymstore.backends.hdfs", "HdfsObjectStore", "pip install 'asymstore[hdfs]'  (installs hdfs-native)"),
}


def register(scheme: str, module: str, cls: str, hint: str = "") -> None:
    """Register a backend class for a URL scheme (for third-party tiers)."""
    _REGISTRY[scheme] = (module, cls, hint)


def scheme_of(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else "file"


def open_object_store(url: str, **options: Any) -> ObjectStore:
    """Open the backend for ``url`` (a plain path means ``file://``)."""
    scheme = scheme_of(url)
    if scheme not in _REGISTRY:
        raise ConfigError(
            f"no asymstore backend for URL scheme {scheme!r} in {url!r}; known schemes: {', '.join(sorted(_REGISTRY))}"
        )
    module, cls, hint = _REGISTRY[scheme]
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise BackendUnavailableError(
            f"the {scheme}:// backend needs a missing package ({e.name}): {hint or 'see the README'}"
        ) from e
    store: ObjectStore = getattr(mod, cls)(url, **options)
    return store


__all__ = ["ByteRange", "ObjectStore", "open_object_store", "register", "scheme_of"]
