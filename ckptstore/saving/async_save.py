"""``async_save``: the training loop waits only for a host copy of what this rank writes.

Foreground (the caller's thread, the training's process group): flatten, the plan collectives
(one all_reduce in steady state), and the copy of this rank's chunks into a reused staging
buffer. Background (one worker thread per process): writing, checksumming, and the commit
collectives -- on a dedicated gloo group created once, never on the training's group.

At most one save is in flight: ``async_save`` first waits for the previous one to finish
(backpressure), and raises its error if it failed and nobody has seen that error yet.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ckptstore import failpoints, knobs
from ckptstore.backends.base import Store
from ckptstore.coordination.collectives import Coordinator, own_group
from ckptstore.errors import SaveError
from ckptstore.format.commit_point import store_for
from ckptstore.format.data_files import plan_files
from ckptstore.gcpause import gc_paused
from ckptstore.saving.save import (
    PlannedSave,
    SaveInfo,
    SaveOptions,
    commit_collective,
    plan_save_collective,
    prepare_commit,
    unwritable_error,
    write_planned,
)
from ckptstore.saving.staging import StagedTensors, StagingPool
from ckptstore.tiers.seam import save_target

PERSIST_MODES = ("thread", "process")


class AsyncSaveHandle:
    """The part of an :func:`async_save` that goes on in the background."""

    def __init__(
        self, future: Future, staged: StagedTensors | None, path: str, stall: float
    ) -> None:
        self._future = future
        self._staged = staged
        self.path = path
        self.stall_seconds = stall
        """How long the caller was blocked by :func:`async_save`."""
        self._reported = False

    def staged(self) -> None:
        """Wait until the device -> host copies are complete (with ``stage_async=True``).

        Call it before changing the saved tensors (e.g. before the optimizer step).
        """
        if self._staged is not None:  # None: staging failed; wait() raises why
            self._staged.wait_copies()

    def done(self) -> bool:
        """Whether the background part has finished (committed, or failed: :meth:`wait`
        says which); never blocks."""
        return self._future.done()

    def wait(self, timeout: float | None = None) -> SaveInfo:
        """The same :class:`SaveInfo` as :func:`ckptstore.save`; raises what went wrong."""
        try:
            return self._future.result(timeout)
        except BaseException:
            if self._future.done():
                self._reported = True
            raise

    def _unreported_error(self) -> BaseException | None:
        if self._reported or not self._future.done():
            return None
        exc = self._future.exception()
        if exc is not None:
            self._reported = True
        return exc


class _AsyncState:
    """Per-process machinery, created on first use."""

    def __init__(self) -> None:
        self.pool = StagingPool(slots=1)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptstore-async")
        self.last: AsyncSaveHandle | None = None
        self.lock = threading.Lock()
        atexit.register(self.finish_at_exit)
        from ckptstore.tiers.replicator import wait_before_exit

        wait_before_exit(wait_pending_quietly)  # a tiered save in flight queues a replication

    def finish_at_exit(self) -> None:
        handle = self.last
        if handle is None or handle._reported:
            self.pool.close()
            return
        try:
            handle.wait(timeout=float(os.environ.get("CKPTSTORE_EXIT_WAIT_S", "600")))
        except BaseException as exc:  # an exit hook can only report
            print(
                f"ckptstore: the asynchronous save to {handle.path} did not complete: "
                f"{type(exc).__name__}: {exc}",
                file=sys.stderr,
            )
        self.pool.close()


_STATE: _AsyncState | None = None


def _state() -> _AsyncState:
    global _STATE
    if _STATE is None:
        _STATE = _AsyncState()
    return _STATE


def raise_pending_error() -> None:
    """Raise the error of the last asynchronous save if it failed and was never reported."""
    state = _STATE
    if state is not None and state.last is not None:
        exc = state.last._unreported_error()
        if exc is not None:
            raise exc


def wait_pending(timeout: float | None = None) -> SaveInfo | None:
    """Wait for the asynchronous save in flight, if any; raises its error."""
    state = _STATE
    if state is None or state.last is None:
        return None
    return state.last.wait(timeout)


def wait_pending_quietly() -> None:
    """Wait for the save in flight without raising (exit hooks)."""
    state = _STATE
    if state is not None and state.last is not None:
        state.last._future.exception()


def async_save(
    state_dict: Any,
    path: str | os.PathLike[str] | Store,
    *,
    process_group: torch.distributed.ProcessGroup | None = None,
    persist: str = "thread",
    stage_async: bool = False,
    **options: Any,
) -> AsyncSaveHandle:
    """Start saving ``state_dict``; return once this rank's data is copied to host memory.

    A collective like :func:`ckptstore.save`, with the same ``**options`` (``overwrite``,
    ``codec``, ``allow_pickle``, ``metadata``, ``files_per_rank``, ``checksum_block_bytes``,
    ``storage_options``). After it returns the caller may
    change its tensors; the write, the checksums and the commit continue in the background.
    The first call over a set of ranks also creates a dedicated gloo group for the background
    work (over a subgroup, a collective of its ranks only: subgroups may start saving
    independently, provided their members have created the same number of process groups,
    torch's rule for such groups' names).

    Args:
        persist: ``"thread"`` (default) writes from a background thread of this process;
            ``"process"`` hands the staged bytes to a helper process (no GIL contention with
            the training loop).
        stage_async: for CUDA tensors, return as soon as the device -> host copies are
            enqueued; call ``handle.staged()`` before changing the tensors.

    Returns:
        An :class:`AsyncSaveHandle`; ``wait()`` returns the :class:`SaveInfo` or raises.
    """
    if persist not in PERSIST_MODES:
        raise ValueError(f"persist must be one of {PERSIST_MODES}, not {persist!r}")
    t0 = time.perf_counter()
    state = _state()
    with state.lock:
        previous = state.last
        if previous is not None:
            previous._future.exception()  # backpressure: wait for the save in flight
            error = previous._unreported_error()
            if error is not None:  # a failure nobody has seen yet is raised here
                raise error
        save_options = SaveOptions(**options)  # a TypeError names an unknown option
        coord = Coordinator(process_group)
        background = own_group(process_group, "background")
        target = save_target(store_for(path, save_options.storage_options))
        replication_team = target.replication_team(process_group)
        early = _EarlyStaging(state.pool, not stage_async, persist == "process")
        with gc_paused():
            try:
                planned = plan_save_collective(
                    state_dict, target, coord, save_options, id(process_group), early.stage
                )
            except BaseException:
                early.discard()
                raise
            planned.replication_team = replication_team
            failpoints.hit("planned", coord.rank)
            if early.planned is not planned:  # no cached plan here, or not on every rank
                early.discard()
                early.stage(planned)
            staged, failure = early.staged, early.failure()
            # Freed while the collector is paused: alive when it resumes, a leaf per tensor
            # would make its next pass on the training thread walk every one of them.
            planned.release_tensors()
        failpoints.hit("staged", coord.rank)
        stall = time.perf_counter() - t0
        future = state.executor.submit(
            _persist, state, planned, staged, background, persist, failure
        )
        handle = AsyncSaveHandle(future, staged, planned.store.url, stall)
        state.last = handle
        return handle


class _EarlyStaging:
    """An async save's host copy, made while the save's agreement is in flight when this
    rank holds a cached plan (``plan_save_collective``'s ``meanwhile``): the copy then
    costs no wait for the slowest rank. Kept if the plan it was made for is the one every
    rank agreed on, given back to the pool otherwise. A copy that fails is kept as the
    save's failure: the background still joins the commit, and fails it on every rank."""

    def __init__(self, pool: StagingPool, wait_device: bool, shared: bool) -> None:
        self.pool, self.wait_device, self.shared = pool, wait_device, shared
        self.planned: PlannedSave | None = None  # the plan the copy was made for
        self.staged: StagedTensors | None = None
        self.error: Exception | None = None

    def stage(self, planned: PlannedSave) -> None:
        t = time.perf_counter()
        self.planned, self.error = planned, None
        try:
            self.staged = self.pool.stage(
                planned.tensors_to_write(), wait_device=self.wait_device, shared=self.shared
            )
        except Exception as exc:
            self.error = exc
        planned.seconds["stage"] = time.perf_counter() - t

    def failure(self) -> SaveError | None:
        """The failed copy as the save's error (None when the copy was made)."""
        if self.error is None or self.planned is None:
            return None
        return unwritable_error(self.planned, self.error)

    def discard(self) -> None:
        if self.staged is not None:
            self.pool.release(self.staged.buffer)
            self.staged = None


def prepare_async_save(
    state_dict: Any,
    *,
    process_group: torch.distributed.ProcessGroup | None = None,
    persist: str = "thread",
    **options: Any,
) -> Future:
    """Make the first :func:`async_save` of ``state_dict`` as quick as the later ones.

    A collective, like ``async_save`` (same ``process_group``, ``persist`` and options; the
    path is not needed). It plans the save now and caches the plan (the first save then
    needs one ``all_reduce``, not the plan exchange), creates ckptstore's background group,
    and has a background thread allocate and fault in a staging buffer of exactly the
    bytes this rank will stage: copying into fresh memory costs a page fault per 4 KiB,
    which otherwise makes the first stall several times the steady one. Returns once the
    plan is made, with a Future that is done when the buffer is ready (a save that comes
    sooner waits for it). Call it before the first checkpoint step, e.g. after building the
    model and optimizer or after restoring; :class:`~ckptstore.CheckpointManager` calls it
    by itself. Nothing is written.
    """
    if persist not in PERSIST_MODES:
        raise ValueError(f"persist must be one of {PERSIST_MODES}, not {persist!r}")
    state = _state()
    with state.lock:
        save_options = SaveOptions(**options)
        coord = Coordinator(process_group)
        own_group(process_group, "background")
        with gc_paused():
            planned = plan_save_collective(state_dict, None, coord, save_options, id(process_group))
        return state.pool.prefault(planned.tensors_to_write(), shared=persist == "process")


def _persist(
    state: _AsyncState,
    planned: PlannedSave,
    staged: StagedTensors,
    background: Any,
    persist: str,
    failure: SaveError | None = None,
) -> SaveInfo:
    t = time.perf_counter()
    upload = None
    result, error = None, failure
    prepare_commit(planned)
    try:
        if staged is None:  # staging failed in the foreground: report it at the commit
            pass
        elif persist == "process":
            staged.wait_copies()
            from ckptstore.saving.persist_process import write_in_helper

            result, error = write_in_helper(planned, staged, state.pool.segment_name(staged.buffer))
        else:
            staged.wait_copies()
            items = planned.write_items(staged.views)
            file_plan = None
            assert planned.target is not None
            if not planned.options.codec:
                # A shared tier gets the same bytes straight from the staging buffer while
                # tier 0 is written; the buffer is released once both are done.
                file_plan = plan_files(
                    items,
                    rank=planned.rank,
                    files=planned.options.files_per_rank or knobs.files_per_rank(),
                    spread=planned.spread,
                )
                upload = planned.target.stream_upload(items, file_plan)
                planned.streamed_upload = upload
            result, error = write_planned(planned, items, file_plan)
    except Exception as exc:  # still join the commit collective, or the other ranks would hang
        error = SaveError(f"{planned.store.url}: rank {planned.rank}: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
    finally:
        if staged is None:
            pass
        elif upload is None:
            state.pool.release(staged.buffer)
        else:
            buffer = staged.buffer
            upload.add_done_callback(lambda _f: state.pool.release(buffer))
    planned.seconds["write"] = time.perf_counter() - t
    failpoints.hit("written", planned.rank)
    try:
        return commit_collective(planned, result, error, Coordinator(background, purpose=None))
    except BaseException:
        if upload is not None:  # no checkpoint: what was streamed to the shared tier goes too
            assert planned.target is not None
            planned.target.discard_streamed(upload)
        raise
