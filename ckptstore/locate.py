"""A checkpoint's manifest on its store: committing it (the one atomic commit point), and
finding it again, or saying precisely why there is none."""

from __future__ import annotations

import os
from typing import Any

from ckptstore.backends.base import Store
from ckptstore.backends.registry import open_store
from ckptstore.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    IncompleteCheckpointError,
    KeyExistsError,
    KeyNotFoundError,
)
from ckptstore.manifest import DATA_PREFIX, MANIFEST_KEY, Manifest


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
        raise CheckpointExistsError(f"{store.url}: a committed checkpoint is already there")


def commit_manifest(store: Store, data: bytes, *, overwrite: bool) -> None:
    """Write the manifest last, atomically: create-if-absent, or replace with ``overwrite``.

    Raises:
        CheckpointExistsError: another writer committed a checkpoint here first.
    """
    try:
        if overwrite:
            store.write(MANIFEST_KEY, data)
        else:
            store.write_if_absent(MANIFEST_KEY, data)
    except KeyExistsError:
        raise CheckpointExistsError(
            f"{store.url}: another writer committed a checkpoint first"
        ) from None


def read_manifest_bytes(store: Store) -> bytes:
    """The committed manifest's bytes.

    Raises:
        IncompleteCheckpointError: data files exist but no manifest was committed.
        CheckpointNotFoundError: nothing of a checkpoint is there.
    """
    try:
        return store.read(MANIFEST_KEY)
    except KeyNotFoundError:
        pass
    if any(True for _ in store.list(DATA_PREFIX)):
        raise IncompleteCheckpointError(
            f"{store.url}: has data files but no committed {MANIFEST_KEY}: the save that wrote "
            "them did not finish, so this is not a checkpoint"
        )
    raise CheckpointNotFoundError(f"{store.url}: no checkpoint here (no {MANIFEST_KEY})")


def read_manifest(store: Store) -> Manifest:
    return Manifest.from_json(read_manifest_bytes(store), where=store.url)
