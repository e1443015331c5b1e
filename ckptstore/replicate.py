"""Replication: the local tier's checkpoint flows to the shared tier in the background.

After a save is committed on tier 0 (each node's local disk), every rank uploads the data
files it wrote -- verifying every chunk's crc32c on the way, so a byte that rotted on local
disk never reaches the shared tier -- then one gather tells the coordinator, which commits
the same manifest on the shared tier with create-if-absent. One broadcast tells every rank,
and each node records the outcome in its local ``replication.json``.

Uploads run on one background thread per process and their collectives on a dedicated gloo
group (never the training's group, never the async-save group). Jobs run in submission
order on every rank, so their collectives line up. A failed job leaves the local checkpoint
intact; it is retried before the next job (up to ``CKPTSTORE_REPLICATION_RETRIES`` times)
or on demand with :func:`replicate`.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch.distributed as dist

from ckptstore.backends.base import Store
from ckptstore.backends.tiered import TieredStore
from ckptstore.checksum import block_crcs
from ckptstore.coordinate import Coordinator
from ckptstore.errors import (
    CheckpointExistsError,
    ChecksumError,
    CkptStoreError,
    KeyExistsError,
    ReplicationError,
)
from ckptstore.manifest import DATA_PREFIX, MANIFEST_KEY, Manifest
from ckptstore.tier_state import FAILED, REPLICATED, REPLICATING, TierState, write_tier_state
from ckptstore.write import FilePlan, WriteItem, stream_items, writer_rank

_PIECE = 16 << 20


@dataclass(frozen=True)
class ReplicationInfo:
    """What one replication did (``files``/``bytes`` are this rank's uploads)."""

    remote: str
    files: int
    bytes: int
    seconds: float


def _file_checks(manifest: Manifest, file: int) -> list[tuple[int, int, list[int]]]:
    """(offset, nbytes, block crcs) of every chunk and pickled object stored in ``file``."""
    table = manifest.chunks
    checks = []
    for c in np.flatnonzero(table.file == file).tolist():
        a, b = table.crc_range(c)
        checks.append((int(table.offset[c]), int(table.nbytes[c]), table.crc32c[a:b].tolist()))
    blobs = [o.blob for o in manifest.objects.values()] + [
        e.blob for es in manifest.per_rank.values() for e in es if hasattr(e, "blob")
    ]
    for blob in blobs:
        if blob is not None and blob.file == file:
            checks.append((blob.offset, blob.nbytes, list(blob.crc32c)))
    return checks


def upload_file(local: Store, remote: Store, manifest: Manifest, file: int) -> int:
    """Copy one data file local -> remote after verifying its chunks; returns its size."""
    key = manifest.files[file]
    view = local.map(key)
    if view is None:
        view = memoryview(local.read(key))
    block = manifest.chunks.block_bytes
    for offset, nbytes, crcs in _file_checks(manifest, file):
        if offset + nbytes > len(view):
            raise ReplicationError(f"{local.url}/{key}: truncated ({len(view)} bytes)")
        if block_crcs(view[offset : offset + nbytes], block) != crcs:
            raise ChecksumError(
                f"{local.url}/{key}: bytes {offset}..{offset + nbytes} fail their crc32c on "
                "the local tier; not uploaded",
                bad=[key],
            )
    with remote.open_writer(key) as writer:
        for lo in range(0, len(view), _PIECE):
            writer.write(view[lo : lo + _PIECE])
    return len(view)


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
    coord: Coordinator,
    *,
    overwrite: bool = False,
    attempt: int = 1,
    streamed: Future | None = None,
) -> ReplicationInfo:
    """Upload this rank's files, commit the manifest on the remote tier (a gather + a broadcast).

    ``streamed``: the upload of this rank's files that an async save started from its staging
    buffer; files it delivered are not uploaded again (if it failed, they are, from tier 0).
    Raises :class:`ReplicationError` on every rank if any rank's upload or the commit failed.
    """
    t = time.perf_counter()
    local, remote = tiered.local, tiered.remote
    if attempt > 1:  # the tier-0 commit recorded the first attempt
        write_tier_state(local, TierState(remote.url, REPLICATING, attempts=attempt))
    uploaded, nbytes, error = 0, 0, None
    try:
        manifest = Manifest.from_json(manifest_bytes, where=local.url)
        delivered: set[str] = set()
        if streamed is not None:
            try:
                delivered = set(streamed.result())
            except Exception:  # fall back to uploading from the local tier
                delivered = set()
        for f in files_of_rank(manifest, coord.rank, coord.world_size):
            key = manifest.files[f]
            if key in delivered:
                nbytes += local.size(key)
            elif local.exists(key):
                nbytes += upload_file(local, remote, manifest, f)
            else:
                continue  # another node's file: the commit check says if it is missing
            uploaded += 1
    except Exception as exc:  # reported to the coordinator, which does not commit
        error = f"{type(exc).__name__}: {exc}"
    reports = coord.gather(error)
    outcome: Any = None
    if coord.is_coordinator:
        assert reports is not None
        outcome = _commit_remote(remote, manifest_bytes, reports, overwrite)
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
    remote: Store, manifest_bytes: bytes, reports: list[str | None], overwrite: bool
) -> str | None:
    failed = [f"rank {r}: {m}" for r, m in enumerate(reports) if m is not None]
    if failed:
        return "; ".join(failed)
    try:  # data first, manifest last: every file the manifest names must be there, whole
        missing = _missing_on_remote(remote, Manifest.from_json(manifest_bytes))
    except Exception as exc:
        return f"could not list the shared tier: {type(exc).__name__}: {exc}"
    if missing:
        return (
            f"{len(missing)} data file(s) are not on the shared tier ({', '.join(missing[:3])}"
            f"{', ...' if len(missing) > 3 else ''}): were they written by ranks that are not "
            "part of this job?"
        )
    try:
        if overwrite:
            remote.write(MANIFEST_KEY, manifest_bytes)
        else:
            remote.write_if_absent(MANIFEST_KEY, manifest_bytes)
    except KeyExistsError:
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
    table = manifest.chunks
    needed = np.zeros(len(manifest.files), dtype=np.int64)
    if len(table):
        np.maximum.at(needed, table.file, table.offset + table.nbytes)
    sizes = {o.key: o.size for o in remote.list_details(DATA_PREFIX)}
    return [key for i, key in enumerate(manifest.files) if sizes.get(key, -1) < int(needed[i])]


class ReplicationHandle:
    """The background replication of one checkpoint (its latest attempt: a failed job that
    a later retry replicates becomes ``replicated``)."""

    def __init__(self, job: _Job, remote: str) -> None:
        self._job = job
        self.remote = remote

    @property
    def _future(self) -> Future:
        return self._job.future

    def done(self) -> bool:
        return self._future.done()

    @property
    def state(self) -> str:
        if not self._future.done():
            return REPLICATING
        return FAILED if self._future.exception() is not None else REPLICATED

    def wait(self, timeout: float | None = None) -> ReplicationInfo:
        """Block until replicated; raises :class:`ReplicationError` if it failed."""
        return self._future.result(timeout)

    def error(self) -> BaseException | None:
        return self._future.exception() if self._future.done() else None


@dataclass
class _Job:
    tiered: TieredStore
    manifest_bytes: bytes
    group: Any
    overwrite: bool
    future: Future
    attempts: int = 0
    streamed: Future | None = None


def _retries() -> int:
    return int(os.environ.get("CKPTSTORE_REPLICATION_RETRIES", "3"))


class Replicator:
    """One per process: a worker thread, a gloo group per process group, the failed jobs."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptstore-replicate")
        self._groups: dict[int, Any] = {}
        self._failed: list[_Job] = []
        self._lock = threading.Lock()
        self._last: Future | None = None
        atexit.register(self._finish_at_exit)

    def group_for(self, process_group: Any) -> Any:
        """A dedicated gloo group over ``process_group``'s ranks (a collective the first time)."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        key = id(process_group)
        if key not in self._groups:
            ranks = dist.get_process_group_ranks(process_group) if process_group else None
            self._groups[key] = dist.new_group(ranks=ranks, backend="gloo")
        return self._groups[key]

    def submit(
        self,
        tiered: TieredStore,
        manifest_bytes: bytes,
        group: Any,
        overwrite: bool,
        streamed: Future | None = None,
    ) -> ReplicationHandle:
        job = _Job(tiered, manifest_bytes, group, overwrite, Future(), streamed=streamed)
        with self._lock:
            self._last = self._executor.submit(self._run, job)
        return ReplicationHandle(job, tiered.remote.url)

    def _run(self, job: _Job) -> None:
        # Earlier failures first: every rank saw the same failures (the outcome was
        # broadcast), so every rank retries the same jobs in the same order.
        retry, self._failed = self._failed, []
        for old in retry:
            self._attempt(old)
        self._attempt(job)

    def _attempt(self, job: _Job) -> None:
        job.attempts += 1
        streamed, job.streamed = job.streamed, None  # a retry uploads from tier 0
        try:
            info = replicate_collective(
                job.tiered, job.manifest_bytes, Coordinator(job.group),
                overwrite=job.overwrite, attempt=job.attempts, streamed=streamed,
            )  # fmt: skip
        except BaseException as exc:
            if job.attempts <= _retries():
                self._failed.append(job)
            if not job.future.done():
                job.future.set_exception(exc)
            return
        if job.future.done():  # a retry succeeded: a fresh future tells new waiters
            job.future = Future()
        job.future.set_result(info)

    def wait_all(self, timeout: float | None = None) -> None:
        with self._lock:
            last = self._last
        if last is not None:
            last.result(timeout)

    def _finish_at_exit(self) -> None:
        from ckptstore.async_save import wait_pending_quietly

        try:
            wait_pending_quietly()
            self.wait_all(float(os.environ.get("CKPTSTORE_EXIT_WAIT_S", "600")))
        except BaseException as exc:  # an exit hook can only report
            print(f"ckptstore: replication did not finish: {exc}", file=sys.stderr)


_UPLOADER: ThreadPoolExecutor | None = None


def start_streamed_upload(tiered: TieredStore, items: list[WriteItem], plan: FilePlan) -> Future:
    """Upload ``plan``'s files to the shared tier from ``items`` (the staging buffer's bytes)
    on this process's upload thread; a Future of the keys written."""
    global _UPLOADER
    with _REPLICATOR_LOCK:
        if _UPLOADER is None:
            _UPLOADER = ThreadPoolExecutor(1, thread_name_prefix="ckptstore-stream-upload")
    return _UPLOADER.submit(stream_items, tiered.remote, items, plan)


_REPLICATOR: Replicator | None = None
_REPLICATOR_LOCK = threading.Lock()


def replicator() -> Replicator:
    global _REPLICATOR
    with _REPLICATOR_LOCK:
        if _REPLICATOR is None:
            _REPLICATOR = Replicator()
        return _REPLICATOR


def replicate(
    path: TieredStore,
    *,
    process_group: Any = None,
    overwrite: bool = False,
) -> ReplicationInfo:
    """Replicate a tier-0 checkpoint to its remote tier now (a collective; on demand).

    Every rank uploads the files it wrote (it must run on the ranks -- or at least the
    nodes -- that saved it); already replicated checkpoints return at once.
    """
    coord = Coordinator(process_group)
    error: BaseException | None = None
    data = b""
    try:
        data = path.local.read(MANIFEST_KEY)
    except CkptStoreError as exc:
        error = ReplicationError(f"{path.local.url}: no committed local checkpoint: {exc}")
    coord.agree(error)
    done = 0
    if coord.is_coordinator and not overwrite:
        try:
            done = int(path.remote.read(MANIFEST_KEY) == data)
        except CkptStoreError:
            done = 0
    if coord.max_ints([done])[0]:
        write_tier_state(path.local, TierState(path.remote.url, REPLICATED))
        return ReplicationInfo(path.remote.url, 0, 0, 0.0)
    group = replicator().group_for(process_group)
    # Run on the replication thread so that it queues behind background jobs in flight.
    job = _Job(path, data, group, overwrite, Future())
    replicator()._executor.submit(replicator()._attempt, job).result()
    return job.future.result()
