"""Two tiers behind one Store: node-local disk first, shared object storage behind it.

Writes go to the local tier (the fast, node-private one); reads take each object from the
local tier when it holds it and from the remote tier otherwise. A byte range whose local
copy fails its checksum is read again from the remote tier (:meth:`TieredStore.fallback`).
Bytes served by each tier are counted, so a restore can say where its data came from.

Replication (local -> remote) and the per-tier state of a checkpoint live in
``ckptstore.tiers.upload``: a Store moves bytes and knows nothing about checkpoints.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

from ckptstore.backends.base import ByteRange, Store, StoreWriter
from ckptstore.errors import KeyNotFoundError, StoreError

LOCAL, REMOTE = "local", "remote"


class TieredStore(Store):
    """``local`` (tier 0, private to a node) in front of ``remote`` (shared).

    Args:
        local: a path/URL or Store for this node's tier (e.g. ``/local/nvme/ckpt/step100``).
        remote: a URL or Store for the shared tier (e.g. ``s3://bucket/run42/step100``).
        local_options / remote_options: backend options for each (e.g. the S3 endpoint,
            ``max_concurrent_uploads`` and ``max_upload_bytes_per_second`` for burst control).
    """

    def __init__(
        self,
        local: str | os.PathLike[str] | Store,
        remote: str | os.PathLike[str] | Store,
        *,
        local_options: dict[str, Any] | None = None,
        remote_options: dict[str, Any] | None = None,
    ) -> None:
        from ckptstore.backends.registry import open_store

        self.local = open_store(local, **(local_options or {}))
        self.remote = open_store(remote, **(remote_options or {}))
        self.url = f"tiered(local={self.local.url}, remote={self.remote.url})"
        self.read_window_bytes = self.remote.read_window_bytes or self.local.read_window_bytes
        self._lock = threading.Lock()
        self.bytes_read: dict[str, int] = {LOCAL: 0, REMOTE: 0}

    def _count(self, tier: str, n: int) -> None:
        with self._lock:
            self.bytes_read[tier] += n

    # -- reads: local first -------------------------------------------------------------
    def read(self, key: str, byte_range: ByteRange | None = None) -> bytes:
        try:
            data = self.local.read(key, byte_range)
            tier = LOCAL
        except KeyNotFoundError:
            data = self.remote.read(key, byte_range)
            tier = REMOTE
        self._count(tier, len(data))
        return data

    def read_into(self, key: str, offset: int, out: memoryview) -> None:
        try:
            self.local.read_into(key, offset, out)
            tier = LOCAL
        except KeyNotFoundError:
            self.remote.read_into(key, offset, out)
            tier = REMOTE
        self._count(tier, len(out))

    def fallback(self, key: str, offset: int, out: memoryview) -> None:
        """Fill ``out`` from the remote tier (the local copy was missing or failed its crc)."""
        self.remote.read_into(key, offset, out)
        self._count(REMOTE, len(out))

    def map(self, key: str) -> memoryview | None:
        try:
            return self.local.map(key)
        except StoreError:  # missing, or not a regular file: read_into falls back
            return None

    def count_mapped(self, nbytes: int) -> None:
        self._count(LOCAL, nbytes)

    def fallback_reader(self) -> Callable[[str, int, memoryview], None]:
        return self.fallback

    def bytes_by_tier(self) -> dict[str, int]:
        with self._lock:
            return dict(self.bytes_read)

    def tiers(self) -> tuple[Store, Store]:
        return self.local, self.remote

    def is_temporary(self, key: str) -> bool:
        return self.local.is_temporary(key) or self.remote.is_temporary(key)

    def prune_empty_dirs(self, prefix: str) -> None:
        self.local.prune_empty_dirs(prefix)

    def size(self, key: str) -> int:
        try:
            return self.local.size(key)
        except KeyNotFoundError:
            return self.remote.size(key)

    def exists(self, key: str) -> bool:
        return self.local.exists(key) or self.remote.exists(key)

    def list(self, prefix: str = "") -> Iterator[str]:
        seen = set()
        for key in self.local.list(prefix):
            seen.add(key)
            yield key
        for key in self.remote.list(prefix):
            if key not in seen:
                yield key

    # -- writes: local tier only --------------------------------------------------------
    def open_writer(self, key: str) -> StoreWriter:
        return self.local.open_writer(key)

    def write_if_absent(self, key: str, data: bytes) -> None:
        self.local.write_if_absent(key, data)

    def delete(self, key: str) -> None:
        """Deletes from the local tier only; the remote tier has its own retention."""
        self.local.delete(key)
