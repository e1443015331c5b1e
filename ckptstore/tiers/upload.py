"""Replication: the local tier's checkpoint flows to the shared tier in the background.

After a save is committed on tier 0 (each node's local disk), every rank uploads the data
files it wrote -- verifying every chunk's crc32c on the way, so a byte that rotted on local
disk never reaches the shared tier -- then one gather tells the coordinator, which commits
the same manifest on the shared tier with create-if-absent. One broadcast tells every rank,
and each node records the outcome in its local ``replication.json``.

This module is the work of one replication (uploads, checks, the remote commit); the
background thread, the agreement among ranks, retries and handles are in
``ckptstore.tiers.replicator``.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from ckptstore import failpoints
from ckptstore.backends.base import Store
from ckptstore.backends.tiered import TieredStore
from ckptstore.coordination.collectives import Coordinator
from ckptstore.coordination.key_value import KeyValueExchange
from ckptstore.errors import (
    CheckpointExistsError,
    ChecksumError,
    CkptStoreError,
    ReplicationError,
)
from ckptstore.format.checksum import block_crcs
from ckptstore.format.chunk_index import IndexedChunks
from ckptstore.format.commit_point import commit_manifest
from ckptstore.format.data_files import WriteResult, writer_rank
from ckptstore.format.manifest import DATA_PREFIX, MANIFEST_KEY, Manifest
from ckptstore.format.verify import StoredRange, stored_ranges
from ckptstore.tiers.state import FAILED, REPLICATED, REPLICATING, TierState, write_tier_state

_PIECE = 16 << 20


@dataclass(frozen=True)
class ReplicationInfo:
    """What one replication did (``files``/``bytes`` are this rank's uploads)."""

    remote: str
    files: int
    bytes: int
    seconds: float


def upload_file(
    local: Store, remote: Store, key: str, ranges: list[StoredRange], block: int
) -> int:
    """Copy one data file local -> remote after verifying its ``ranges`` (every chunk and
    pickled object stored in it); returns its size."""
    view = local.map(key)
    if view is None:
        view = memoryview(local.read(key))
    for r in ranges:
        offset, nbytes = r.offset, r.nbytes
        if offset + nbytes > len(view):
            raise ReplicationError(f"{local.url}/{key}: truncated ({len(view)} bytes)")
        if block_crcs(view[offset : offset + nbytes], block) != r.crcs.tolist():
            raise ChecksumError(
                f"{local.url}/{key}: bytes {offset}..{offset + nbytes} fail their crc32c on "
                "the local tier; not uploaded",
                bad=[key],
            )
    with remote.open_writer(key) as writer:
        for lo in range(0, len(view), _PIECE):
            writer.write(view[lo : lo + _PIECE])
    return len(view)


def _uploads(
    manifest: Manifest, local: Store, written: WriteResult | None, rank: int, world: int
) -> tuple[Manifest, list[tuple[str, list[StoredRange]]]]:
    """The files this rank uploads, each with the ranges to verify first. Right after its
    own save a rank knows them from its write (``written``: its files, every item's offset,
    size and block checksums -- the numbers its manifest rows were made of), so a manifest
    with a chunk index is read no further than its head; otherwise (``replicate()`` on
    demand, perhaps by a smaller job) from the whole chunk table."""
    if written is None:
        manifest = manifest.with_index(local)
        return manifest, [
            (manifest.files[f], stored_ranges(manifest, f))
            for f in files_of_rank(manifest, rank, world)
        ]
    crc = np.array(written.crc, dtype=np.uint32)
    crc_end = np.cumsum(written.crc_count, dtype=np.int64).tolist()
    ranges: list[list[StoredRange]] = [[] for _ in written.files]
    for i, (f, offset, nbytes) in enumerate(
        zip(written.file, written.offset, written.nbytes, strict=True)
    ):
        first = crc_end[i] - written.crc_count[i]
        ranges[f].append(StoredRange(-1, None, f, offset, nbytes, crc[first : crc_end[i]]))
    out = list(zip(written.files, ranges, strict=True))
    if manifest.index is not None and rank == 0:  # the coordinator wrote the chunk index
        out.append((manifest.index.key, []))  # (its parts carry their own crc32c)
    return manifest, out


def files_of_rank(manifest: Manifest, rank: int, world: int) -> list[int]:
    """The files this rank uploads: those written by ranks ``rank``, ``rank + world``, ...
    (its own in the job that saved; a smaller job shares the saved ranks' files out)."""
    out = []
    for i, key in enumerate(manifest.files):
        writer = writer_rank(key)
        if writer is not None and writer % world == rank:
            out.append(i)
    return out


def replicate_collective(
    tiered: TieredStore,
    manifest_bytes: bytes,
    coord: Coordinator | KeyValueExchange,
    *,
    overwrite: bool = False,
    attempt: int = 1,
    streamed: Future | None = None,
    written: WriteResult | None = None,
) -> ReplicationInfo:
    """Upload this rank's files, commit the manifest on the remote tier (a gather + a broadcast).

    ``streamed``: the upload of this rank's files that an async save started from its staging
    buffer; files it delivered are not uploaded again (if it failed, they are, from tier 0).
    ``written``: this rank's write in the save being replicated (see :func:`_uploads`).
    Raises :class:`ReplicationError` on every rank if any rank's upload or the commit failed.
    """
    t = time.perf_counter()
    local, remote = tiered.local, tiered.remote
    if attempt > 1:  # the tier-0 commit recorded the first attempt
        write_tier_state(local, TierState(remote.url, REPLICATING, attempts=attempt))
    uploaded, nbytes, error = 0, 0, None
    manifest: Manifest | None = None
    try:
        manifest = Manifest.from_json(manifest_bytes, where=local.url, store=local)
        manifest, uploads = _uploads(manifest, local, written, coord.rank, coord.world_size)
        delivered: set[str] = set()
        if streamed is not None:
            try:
                delivered = set(streamed.result())
            except Exception:  # fall back to uploading from the local tier
                delivered = set()
        block = manifest.chunks.block_bytes
        for key, ranges in uploads:
            if key in delivered:
                nbytes += local.size(key)
            elif local.exists(key):
                nbytes += upload_file(local, remote, key, ranges, block)
            else:
                continue  # another node's file: the commit check says if it is missing
            uploaded += 1
    except Exception as exc:  # reported to the coordinator, which does not commit
        error = f"{type(exc).__name__}: {exc}"
    failpoints.hit("replicated")
    reports = coord.gather(error)
    outcome: Any = None
    if coord.is_coordinator:
        assert reports is not None
        outcome = _commit_remote(local, remote, manifest, manifest_bytes, reports, overwrite)
    outcome = coord.broadcast(outcome)
    if outcome is not None:
        write_tier_state(local, TierState(remote.url, FAILED, str(outcome), attempts=attempt))
        raise ReplicationError(
            f"{local.url} -> {remote.url}: replication failed (the local checkpoint is intact "
            f"and loadable): {outcome}"
        )
    write_tier_state(local, TierState(remote.url, REPLICATED, attempts=attempt))
    return ReplicationInfo(remote.url, uploaded, nbytes, time.perf_counter() - t)


def _commit_remote(
    local: Store,
    remote: Store,
    manifest: Manifest | None,
    manifest_bytes: bytes,
    reports: list[str | None],
    overwrite: bool,
) -> str | None:
    failed = [f"rank {r}: {m}" for r, m in enumerate(reports) if m is not None]
    if failed or manifest is None:
        return "; ".join(failed) or "the manifest could not be read"
    if isinstance(manifest.chunks, IndexedChunks):  # only its head was read
        try:
            manifest = manifest.with_index(local)
        except CkptStoreError as exc:
            return f"the chunk index could not be read on the local tier: {exc}"
    try:  # data first, manifest last: every file the manifest names must be there, whole
        missing = _missing_on_remote(remote, manifest)
    except Exception as exc:
        return f"could not list the shared tier: {type(exc).__name__}: {exc}"
    if missing:
        return (
            f"{len(missing)} data file(s) are not on the shared tier ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}): were they written by ranks that are not "
            "part of this job?"
        )
    try:
        commit_manifest(remote, manifest_bytes, overwrite=overwrite)
    except CheckpointExistsError:
        try:
            if remote.read(MANIFEST_KEY) == manifest_bytes:
                return None  # an earlier attempt committed this very checkpoint
        except CkptStoreError:
            pass
        return str(
            CheckpointExistsError(f"{remote.url}: a different checkpoint is committed there")
        )
    except Exception as exc:
        return f"commit of the manifest failed: {type(exc).__name__}: {exc}"
    return None


def _missing_on_remote(remote: Store, manifest: Manifest) -> list[str]:
    """Files the manifest names that the remote tier lacks or holds too short."""
    needed = manifest.file_extents()
    sizes = {o.key: o.size for o in remote.list_details(DATA_PREFIX)}
    return [key for i, key in enumerate(manifest.files) if sizes.get(key, -1) < int(needed[i])]
