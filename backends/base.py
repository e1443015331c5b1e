"""The storage contract: a Store moves bytes by key and knows nothing about tensors.

Call order used by ckptstore for one checkpoint (the contract backends rely on):

1. ``open_writer(key)`` for each data file, many ``write`` calls, then ``commit()`` which
   makes the file durable and visible under ``key`` (or ``abort()``, which leaves nothing).
2. ``write_if_absent(manifest_key, bytes)`` exactly once: the atomic commit point. It fails
   with :class:`KeyExistsError` if another writer committed first.
3. Readers call ``read``/``read_into`` with byte ranges, ``size``, ``exists`` and ``list``.
4. Retention and overwrite call ``delete`` (manifest first, data after).

Keys are ``/``-separated relative paths without a leading slash.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from ckptstore.errors import KeyExistsError, KeyNotFoundError


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One stored object as a listing sees it."""

    key: str
    size: int
    modified_unix: float | None
    """Last modification time; None where the backend cannot tell."""


@dataclass(frozen=True, slots=True)
class PendingUpload:
    """An unfinished write a listing does not show (see :meth:`Store.list_uploads`)."""

    key: str
    upload_id: str
    started_unix: float | None


@dataclass(frozen=True, slots=True)
class ByteRange:
    """A half-open range of bytes ``[start, end)`` inside one stored object."""

    start: int
    """First byte, counted from the start of the object."""
    end: int
    """One past the last byte."""

    @property
    def length(self) -> int:
        return self.end - self.start


class StoreWriter(abc.ABC):
    """Sequential writer of one object; visible under its key only after :meth:`commit`."""

    @abc.abstractmethod
    def write(self, data: memoryview | bytes) -> None:
        """Append ``data``."""

    def write_parts(self, parts: Sequence[memoryview | bytes]) -> None:
        """Append every byte buffer of ``parts`` in order (many small tensors at once).

        Note for implementers: the default writes them one by one; a backend with a
        gathering write (``os.writev``) saves the copy a caller would make to join them."""
        for part in parts:
            self.write(part)

    @abc.abstractmethod
    def commit(self) -> None:
        """Make everything written durable and visible under the key."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drop everything written; the key is left as it was."""

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class Store(abc.ABC):
    """Byte storage behind a URL. Implementations live in ``ckptstore.backends``."""

    url: str
    read_window_bytes: int | None = None
    """The read size this backend is fastest with (readers split large regions into reads
    of this size); None: the reader's default. Object stores set it so that one read keeps
    all their parallel ranged GETs busy."""

    # -- the core every backend implements ---------------------------------------------
    @abc.abstractmethod
    def read(self, key: str, byte_range: ByteRange | None = None) -> bytes:
        """Bytes of ``key`` (all, or ``byte_range``); :class:`KeyNotFoundError` if absent."""

    @abc.abstractmethod
    def open_writer(self, key: str) -> StoreWriter:
        """A writer that replaces ``key`` atomically on commit."""

    @abc.abstractmethod
    def write_if_absent(self, key: str, data: bytes) -> None:
        """Create ``key`` atomically; :class:`KeyExistsError` if it already exists."""

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """Size in bytes of ``key``; :class:`KeyNotFoundError` if absent."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key that starts with ``prefix``, in no particular order.

        Note for implementers: include the temporary objects of writes that were never
        committed, so that leftovers of a killed save can be seen and deleted.
        """

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""

    # -- derived operations, overridable for speed --------------------------------------
    def write(self, key: str, data: bytes | memoryview) -> None:
        """Replace ``key`` with ``data`` atomically."""
        with self.open_writer(key) as writer:
            writer.write(data)

    def write_volatile(self, key: str, data: bytes) -> None:
        """Replace ``key`` atomically, without the durability a checkpoint's data needs (for
        bookkeeping that may be lost in a crash: markers, state records).

        Note for implementers: the default is :meth:`write`; filesystems skip the fsync.
        """
        self.write(key, data)

    def read_into(self, key: str, offset: int, out: memoryview) -> None:
        """Fill ``out`` with the bytes of ``key`` starting at ``offset``.

        Note for implementers: the default goes through :meth:`read` (one extra copy);
        backends with a file descriptor should read straight into ``out``.
        """
        data = self.read(key, ByteRange(offset, offset + len(out)))
        if len(data) != len(out):
            raise KeyNotFoundError(
                f"{self.url}/{key}: wanted {len(out)} bytes at offset {offset}, got {len(data)}"
            )
        out[:] = data

    def map(self, key: str) -> memoryview | None:
        """A zero-copy view of the whole object, or None where the backend has none.

        Note for implementers: only return a view whose bytes cannot change while it is
        used (committed data files are never rewritten). The local store maps the file, so
        reads verify checksums straight out of the page cache without a bounce copy.
        """
        return None

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except KeyNotFoundError:
            return False
        return True

    def list_children(self, prefix: str = "") -> Iterator[str]:
        """The distinct next path components under ``prefix`` (``prefix`` ends with ``/`` or
        is empty): ``"step_00000100/"`` for a directory-like child, ``"manifest.json"`` for an
        object. Lets a catalog find its checkpoints without listing every data file.

        Note for implementers: the default lists every key; object stores should use their
        delimiter listing, file systems their directory listing.
        """
        seen = set()
        for key in self.list(prefix):
            rest = key[len(prefix) :]
            head, sep, _ = rest.partition("/")
            child = head + sep
            if child not in seen:
                seen.add(child)
                yield child

    def list_details(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Like :meth:`list`, with sizes and modification times (for garbage collection).

        Note for implementers: the default asks :meth:`size` per key and knows no times;
        backends whose listings carry both should override it.
        """
        for key in self.list(prefix):
            try:
                yield ObjectInfo(key, self.size(key), None)
            except KeyNotFoundError:
                continue

    def list_uploads(self, prefix: str = "") -> Iterator[PendingUpload]:
        """Writes under ``prefix`` that were started and never completed nor aborted, which
        a plain listing does not show (S3 multipart uploads of killed writers).

        Note for implementers: backends without such a state yield nothing (the default).
        """
        return iter(())

    def abort_upload(self, upload: PendingUpload) -> None:
        """Discard an unfinished write found by :meth:`list_uploads`."""
        raise NotImplementedError(f"{type(self).__name__} has no unfinished uploads")

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix``; returns how many were deleted."""
        keys = list(self.list(prefix))
        for key in keys:
            self.delete(key)
        return len(keys)

    # -- capabilities: what the core asks of a store instead of testing its type ---------
    reads_are_local: bool = False
    """Reads are served by this node's own disk: every rank may read a small object itself,
    where otherwise one rank reads it and broadcasts it (object stores bill per request)."""

    def is_temporary(self, key: str) -> bool:
        """``key`` is the temporary object of a write in progress (or of one that was killed):
        never part of a checkpoint, collected by ``ckpt gc`` once old enough.

        Note for implementers: backends whose writers stage into temporary keys say which."""
        return False

    def prune_empty_dirs(self, prefix: str) -> None:
        """Remove directories left empty under ``prefix`` after deletes (a no-op where
        directories do not exist: object stores)."""
        return None

    def tiers(self) -> tuple[Store, Store] | None:
        """(this node's tier, the shared tier) for a store that puts one in front of the
        other; None for a single store. The save path commits on the first and replicates
        to the second (``ckptstore.tiers.seam``)."""
        return None

    def fallback_reader(self) -> Callable[[str, int, memoryview], None] | None:
        """A second source for bytes whose copy here is missing or fails its checksum (a
        tiered store's shared tier), with :meth:`read_into`'s signature; None if there is
        none."""
        return None

    def count_mapped(self, nbytes: int) -> None:
        """Readers that use :meth:`map` report the bytes they took from it (for per-tier
        accounting; a no-op by default)."""
        return None

    def bytes_by_tier(self) -> dict[str, int] | None:
        """Bytes served so far by each tier, for stores with tiers; None otherwise."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


__all__ = [
    "ByteRange",
    "KeyExistsError",
    "KeyNotFoundError",
    "ObjectInfo",
    "PendingUpload",
    "Store",
    "StoreWriter",
]
