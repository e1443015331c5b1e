"""A checkpoint's manifest on its store: committing it (the one atomic commit point), and
finding it again, or saying precisely why there is none."""

from __future__ import annotations

import contextlib
import os
from typing import Any

from ckptstore import knobs
from ckptstore.backends.base import ByteRange, Store
from ckptstore.backends.registry import open_store
from ckptstore.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CkptStoreError,
    IncompleteCheckpointError,
    KeyExistsError,
    KeyNotFoundError,
    ManifestError,
)
from ckptstore.format.manifest import DATA_PREFIX, MANIFEST_KEY, Manifest


def store_for(
    path: str | os.PathLike[str] | Store, storage_options: dict[str, Any] | None
) -> Store:
    return open_store(path, **(storage_options or {}))


def refuse_existing(store: Store, *, overwrite: bool) -> None:
    """Fail early, before writing any data, if ``store`` holds a committed checkpoint.

    Raises:
        CheckpointExistsError: there is one and ``overwrite`` is not set.
    """
    if not overwrite and store.exists(MANIFEST_KEY):
        raise CheckpointExistsError(
            f"{store.url}: a committed checkpoint is already there (overwrite=True, or "
            "--overwrite on the command line, replaces it)"
        )


def commit_manifest(store: Store, data: bytes, *, overwrite: bool) -> bytes | None:
    """Write the manifest last, atomically: create-if-absent, or replace with ``overwrite``.

    Returns the bytes of the manifest this commit replaced (None if there was none or it
    could not be read): the caller may delete the files only *that* manifest named, never
    files it does not know (they may belong to a save still in flight).

    A create whose response was lost (the object store committed it, the client retried
    and was told it exists) is recognised by reading the manifest back: its own bytes.

    Raises:
        CheckpointExistsError: another writer committed a checkpoint here first.
    """
    replaced = None
    if overwrite:
        with contextlib.suppress(CkptStoreError):
            replaced = read_manifest_bytes(store)
        store.write(MANIFEST_KEY, data)
        return replaced
    try:
        store.write_if_absent(MANIFEST_KEY, data)
    except KeyExistsError:
        with contextlib.suppress(CkptStoreError):
            if read_manifest_bytes(store) == data:
                return None  # our own commit: its response was lost
        raise CheckpointExistsError(
            f"{store.url}: another writer committed a checkpoint first"
        ) from None
    return None


def delete_replaced(store: Store, replaced: bytes | None, manifest: Manifest) -> int:
    """After an overwrite: delete the data files the replaced manifest named that
    ``manifest`` does not. Files of killed or concurrent saves are left to ``ckpt gc``,
    which waits for them to age. Returns how many files were deleted."""
    if replaced is None:
        return 0
    try:
        old = Manifest.from_json(replaced, where=store.url, store=store)
    except CkptStoreError:
        return 0  # a damaged old manifest names nothing we can trust
    live = set(manifest.files)
    try:
        gone = [key for key in old.files if key not in live]
    except CkptStoreError:
        return 0  # the old chunk index is gone or damaged: nothing we can trust
    for key in gone:
        store.delete(key)
    return len(gone)


def read_manifest_bytes(store: Store, prefix: str = "") -> bytes:
    """The committed manifest's bytes (of the checkpoint under ``prefix``, if given), at most
    ``knobs.max_manifest_bytes()`` of them.

    Raises:
        IncompleteCheckpointError: data files exist but no manifest was committed.
        CheckpointNotFoundError: nothing of a checkpoint is there.
    """
    key, limit = prefix + MANIFEST_KEY, knobs.max_manifest_bytes()
    try:
        size = store.size(key)
        if size > limit:
            raise ManifestError(
                f"{store.url}: {key} has {size} bytes, more than the {limit} a reader accepts "
                "(CKPTSTORE_MAX_MANIFEST_BYTES)"
            )
        # At most the bytes just measured: a file that grows meanwhile reads as truncated.
        return store.read(key, ByteRange(0, size)) if size else b""
    except KeyNotFoundError:
        pass
    if any(True for _ in store.list(prefix + DATA_PREFIX)):
        raise IncompleteCheckpointError(
            f"{store.url}: has data files but no committed {MANIFEST_KEY}: the save that wrote "
            "them did not finish, so this is not a checkpoint"
        )
    raise CheckpointNotFoundError(f"{store.url}: no checkpoint here (no {MANIFEST_KEY})")


def read_manifest_head(store: Store) -> Manifest:
    """The committed manifest without reading a chunk index (format 4): enough for its
    files, tensors and metadata (what housekeeping needs), not for reading chunks."""
    return Manifest.from_json(read_manifest_bytes(store), where=store.url, store=store)


def read_manifest(store: Store) -> Manifest:
    """The committed manifest with its whole chunk table (a chunk index read and checked)."""
    data = read_manifest_bytes(store)
    return Manifest.from_json(data, where=store.url, store=store).with_index(store)
