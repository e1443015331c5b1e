"""The replication machinery: one background thread per process runs the jobs in submission
order on every rank; the ranks of a job agree on its outcome through the job's key-value
store (:mod:`ckptstore.coordination.key_value`: no process group of its own, so subgroups may
start replicating independently); failed jobs are retried before the next job; handles
report each job's latest state.
Also the on-demand entry point :func:`replicate` and the streamed upload an async save starts
from its staging buffer.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ckptstore.backends.base import Store
from ckptstore.backends.tiered import TieredStore
from ckptstore.coordination.collectives import Coordinator
from ckptstore.coordination.key_value import Team
from ckptstore.errors import CkptStoreError, ReplicationError
from ckptstore.format.data_files import FilePlan, WriteItem, WriteResult, stream_items
from ckptstore.format.manifest import MANIFEST_KEY
from ckptstore.tiers.state import FAILED, REPLICATED, REPLICATING, TierState, write_tier_state
from ckptstore.tiers.upload import ReplicationInfo, replicate_collective


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
        """Whether the copy has finished (replicated or failed); never blocks."""
        return self._future.done()

    @property
    def state(self) -> str:
        """``replicating``, ``replicated`` or ``failed``."""
        if not self._future.done():
            return REPLICATING
        return FAILED if self._future.exception() is not None else REPLICATED

    def wait(self, timeout: float | None = None) -> ReplicationInfo:
        """Block until replicated; raises :class:`ReplicationError` if it failed."""
        return self._future.result(timeout)

    def error(self) -> BaseException | None:
        """Why the copy failed (None while it runs, or when it succeeded)."""
        return self._future.exception() if self._future.done() else None


@dataclass
class _Job:
    tiered: TieredStore
    manifest_bytes: bytes
    team: Team
    overwrite: bool
    future: Future
    attempts: int = 0
    streamed: Future | None = None
    written: WriteResult | None = None  # this rank's write in the save (kept for retries)


def _retries() -> int:
    return int(os.environ.get("CKPTSTORE_REPLICATION_RETRIES", "3"))


class Replicator:
    """One per process: a worker thread, a gloo group per process group, the failed jobs."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptstore-replicate")
        self._teams: dict[tuple[int, ...], Team] = {}
        self._team_of: dict[int, Team] = {}  # by id(process_group)
        self._failed: list[_Job] = []
        self._lock = threading.Lock()
        self._last: Future | None = None
        atexit.register(self._finish_at_exit)

    def team_for(self, process_group: Any) -> Team:
        """The ranks of ``process_group`` with their exchange counter (no collective: the
        same ranks share one team, whichever group object names them)."""
        with self._lock:
            known = self._team_of.get(id(process_group))  # the usual case: no rank list
            if known is None:
                team = Team(process_group)
                known = self._team_of[id(process_group)] = self._teams.setdefault(team.ranks, team)
            return known

    def submit(
        self,
        tiered: TieredStore,
        manifest_bytes: bytes,
        team: Team,
        overwrite: bool,
        streamed: Future | None = None,
        written: WriteResult | None = None,
    ) -> ReplicationHandle:
        job = _Job(
            tiered, manifest_bytes, team, overwrite, Future(), streamed=streamed, written=written
        )
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
                job.tiered,
                job.manifest_bytes,
                job.team.next_exchange("replicate"),
                overwrite=job.overwrite,
                attempt=job.attempts,
                streamed=streamed,
                written=job.written,
            )
        except BaseException as exc:
            if job.attempts <= _retries():
                self._failed.append(job)
            if isinstance(exc, Exception) and not isinstance(exc, CkptStoreError):  # typed
                typed = ReplicationError(f"{job.tiered.remote.url}: {type(exc).__name__}: {exc}")
                typed.__cause__ = exc
                exc = typed
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
        try:
            for wait in list(_BEFORE_EXIT):  # saves still in flight may queue a replication
                wait()
            self.wait_all(float(os.environ.get("CKPTSTORE_EXIT_WAIT_S", "600")))
        except BaseException as exc:  # an exit hook can only report
            print(f"ckptstore: replication did not finish: {exc}", file=sys.stderr)


_UPLOADER: ThreadPoolExecutor | None = None
_BEFORE_EXIT: list[Callable[[], None]] = []


def wait_before_exit(wait: Callable[[], None]) -> None:
    """Have the exit hook call ``wait`` (once, without raising) before it waits for the
    replications queued: a save still in flight when the process exits queues one more."""
    if wait not in _BEFORE_EXIT:
        _BEFORE_EXIT.append(wait)


def start_streamed_upload(shared: Store, items: list[WriteItem], plan: FilePlan) -> Future:
    """Upload ``plan``'s files to the shared tier from ``items`` (the staging buffer's bytes)
    on this process's upload thread; a Future of the keys written."""
    global _UPLOADER
    with _REPLICATOR_LOCK:
        if _UPLOADER is None:
            _UPLOADER = ThreadPoolExecutor(1, thread_name_prefix="ckptstore-stream-upload")
    return _UPLOADER.submit(stream_items, shared, items, plan)


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
    team = replicator().team_for(process_group)
    # Run on the replication thread so that it queues behind background jobs in flight.
    job = _Job(path, data, team, overwrite, Future())
    replicator()._executor.submit(replicator()._attempt, job).result()
    return job.future.result()
