"""In-memory store, shared by every Store opened on the same ``memory://name`` in a process.

Useful for tests and for single-process staging; it does not span processes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from ckptstore.backends.base import ByteRange, Store, StoreWriter
from ckptstore.errors import KeyExistsError, KeyNotFoundError

_SPACES: dict[str, dict[str, bytes]] = {}
_LOCK = threading.Lock()


class _MemoryWriter(StoreWriter):
    def __init__(self, store: MemoryStore, key: str) -> None:
        self._store, self._key, self._parts = store, key, bytearray()

    def write(self, data: memoryview | bytes) -> None:
        self._parts += memoryview(data).cast("B")

    def commit(self) -> None:
        with _LOCK:
            self._store._data[self._key] = bytes(self._parts)

    def abort(self) -> None:
        self._parts = bytearray()


class MemoryStore(Store):
    def __init__(self, name: str = "") -> None:
        self.name = name.strip("/")
        self.url = f"memory://{self.name}"
        with _LOCK:
            self._data = _SPACES.setdefault(self.name, {})

    def read(self, key: str, byte_range: ByteRange | None = None) -> bytes:
        try:
            blob = self._data[key]
        except KeyError:
            raise KeyNotFoundError(f"{self.url}: no such key {key!r}") from None
        if byte_range is None:
            return blob
        return blob[byte_range.start : byte_range.end]

    def open_writer(self, key: str) -> StoreWriter:
        return _MemoryWriter(self, key)

    def write_if_absent(self, key: str, data: bytes) -> None:
        with _LOCK:
            if key in self._data:
                raise KeyExistsError(f"{self.url}: {key!r} already exists")
            self._data[key] = bytes(data)

    def size(self, key: str) -> int:
        try:
            return len(self._data[key])
        except KeyError:
            raise KeyNotFoundError(f"{self.url}: no such key {key!r}") from None

    def list(self, prefix: str = "") -> Iterator[str]:
        with _LOCK:
            keys = [k for k in self._data if k.startswith(prefix)]
        yield from keys

    def delete(self, key: str) -> None:
        with _LOCK:
            self._data.pop(key, None)
