"""The object-store interface of tier backends (defined in :mod:`asymstore.interfaces`, re-exported here)."""

from asymstore.interfaces import (
    Buffer,
    ByteRange,
    Capabilities,
    ObjectStore,
    as_buffers,
    check_key,
    check_prefix,
    dir_prefix,
)

__all__ = [
    "Buffer",
    "ByteRange",
    "Capabilities",
    "ObjectStore",
    "as_buffers",
    "check_key",
    "check_prefix",
    "dir_prefix",
]
