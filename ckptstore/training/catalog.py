"""The checkpoints under a root: ``<root>/step_<NNNNNNNN>/``, committed or not."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ckptstore.backends.base import Store
from ckptstore.backends.registry import open_store
from ckptstore.errors import CkptStoreError, StoreAccessError
from ckptstore.format.commit_point import read_manifest_bytes
from ckptstore.format.manifest import MANIFEST_KEY, Manifest

_STEP_DIR = re.compile(r"^step_(\d+)/")


def step_dir(step: int) -> str:
    return f"step_{step:08d}"


def join(root: str, child: str) -> str:
    return f"{root.rstrip('/')}/{child}"


@dataclass(frozen=True)
class CheckpointEntry:
    step: int
    path: str
    state: str
    """``committed`` (a manifest exists) or ``incomplete`` (data without a manifest)."""
    created_unix: float | None = None
    bytes: int | None = None
    world_size: int | None = None


def scan(root: str | Store, *, details: bool = False) -> list[CheckpointEntry]:
    """Every step directory under ``root``, ascending; ``details`` reads each manifest.

    Lists the root's children and each step's children (delimiter listings on object
    stores), never every data file: a root of 16k-rank checkpoints costs a few requests.
    """
    store = open_store(root)
    base = store.url
    entries = []
    steps = sorted(
        int(m.group(1)) for child in store.list_children("") if (m := _STEP_DIR.match(child))
    )
    for step in steps:
        path = join(base, step_dir(step))
        prefix = f"{step_dir(step)}/"
        if MANIFEST_KEY not in set(store.list_children(prefix)):
            if any(True for _ in store.list(prefix)):  # an empty directory is nothing
                entries.append(CheckpointEntry(step, path, "incomplete"))
            continue
        if not details:
            entries.append(CheckpointEntry(step, path, "committed"))
            continue
        try:
            manifest = Manifest.from_json(read_manifest_bytes(store, prefix), where=path)
            entries.append(
                CheckpointEntry(
                    step,
                    path,
                    "committed",
                    manifest.created_unix,
                    manifest.stored_bytes(),
                    manifest.world_size,
                )
            )
        except StoreAccessError:  # not the checkpoint's fault: say so, once
            raise
        except CkptStoreError:
            entries.append(CheckpointEntry(step, path, "corrupt"))
    return entries


def committed_steps(root: str | Store) -> list[int]:
    """The steps under ``root`` whose manifest is committed, ascending."""
    return [e.step for e in scan(root) if e.state == "committed"]


def delete_checkpoint(root: str | Store, step: int) -> None:
    """Remove one checkpoint: the manifest first (it stops existing), then its data in
    batches where the store has them (S3: ``DeleteObjects``, 1,000 keys a request, instead
    of one DELETE per data file -- a 16k-rank checkpoint has as many files)."""
    store = open_store(root)
    prefix = f"{step_dir(step)}/"
    store.delete(prefix + MANIFEST_KEY)
    store.delete_prefix(prefix)
    store.prune_empty_dirs(step_dir(step))


@dataclass(frozen=True)
class TieredEntry:
    """One step's state on each tier (see ``ckptstore.tiers.state``)."""

    step: int
    local: str
    """``committed``, ``writing`` (data without a manifest) or ``absent``."""
    remote: str
    """``replicated``, ``replicating``, ``failed``, ``writing`` or ``absent``."""
    created_unix: float | None = None
    bytes: int | None = None
    world_size: int | None = None
    error: str | None = None


_LOCAL_STATE = {"committed": "committed", "incomplete": "writing", "corrupt": "corrupt"}


def scan_tiers(remote_root: str | Store, local_root: str | Store | None) -> list[TieredEntry]:
    """Every step under either root, with its state per tier (reads each manifest once)."""
    from ckptstore.tiers.state import read_tier_state

    remote = {e.step: e for e in scan(remote_root, details=True)}
    local = {e.step: e for e in scan(local_root, details=True)} if local_root is not None else {}
    local_store = open_store(local_root) if local_root is not None else None
    out = []
    for step in sorted(set(remote) | set(local)):
        r, lo = remote.get(step), local.get(step)
        recorded = None
        if lo is not None and local_store is not None:
            recorded = read_tier_state(step_store(local_store, step))
        if r is not None and r.state == "committed":
            remote_state = "replicated"
        elif recorded is not None and recorded.state in ("replicating", "failed"):
            remote_state = recorded.state
        elif r is not None:
            remote_state = "writing"
        else:
            remote_state = "absent"
        best = r if r is not None and r.state == "committed" else lo
        out.append(
            TieredEntry(
                step,
                _LOCAL_STATE.get(lo.state, lo.state) if lo is not None else "absent",
                remote_state,
                best.created_unix if best else None,
                best.bytes if best else None,
                best.world_size if best else None,
                recorded.error if recorded is not None and remote_state == "failed" else None,
            )
        )
    return out


def step_store(root: str | Store, step: int) -> Store:
    """The Store of checkpoint ``step`` under a local root (a path or a local Store)."""
    base = root.url if isinstance(root, Store) else root
    return open_store(join(base, step_dir(step)))
