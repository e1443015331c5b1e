"""Storage backends: a Store moves bytes and never sees a tensor.

``open_store(url)`` picks the backend from the URL scheme: plain paths and ``file://`` go
to :class:`LocalStore`, ``memory://`` to :class:`MemoryStore`, any other fsspec scheme to
:class:`FsspecStore`.
"""

from ckptstore.backends.base import ByteRange, Store, StoreWriter
from ckptstore.backends.fsspec_store import FsspecStore
from ckptstore.backends.local import LocalStore
from ckptstore.backends.memory import MemoryStore
from ckptstore.backends.registry import KNOWN_BACKENDS, open_store

__all__ = [
    "KNOWN_BACKENDS",
    "ByteRange",
    "FsspecStore",
    "LocalStore",
    "MemoryStore",
    "Store",
    "StoreWriter",
    "open_store",
]
