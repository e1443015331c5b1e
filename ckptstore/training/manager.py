"""CheckpointManager: the training-loop hook (cadence, retention, resume, RNG, Stateful).

    mgr = cs.CheckpointManager("/ckpt/run42", every_n_steps=100, keep=3)
    step = mgr.restore(state) or 0          # latest committed checkpoint, resharded as needed
    for step in range(step + 1, total):
        train_step()
        mgr.maybe_save(step, state)         # cheap unless the policy says "now"
    mgr.close()

With ``local_dir`` the manager saves through the tiered store: each checkpoint is committed
on the node-local directory first (the loop's exposure to failure is short), then copied to
``root`` (e.g. ``s3://bucket/run42``) in the background; restores read every byte from the
fastest tier that holds it. Retention applies per tier (``keep`` for ``root``, ``keep_local``
for the local directory, which never drops a checkpoint that is not yet replicated).

``state`` maps names to tensors, DTensors, plain values, nn.Modules, optimizers and any
*Stateful* object (``state_dict()`` / ``load_state_dict()``). Modules and optimizers go
through ``torch.distributed.checkpoint.state_dict`` (FSDP2 / DTensor aware), so that an
optimizer restored on another world size is correct.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from typing import Any

import torch

from ckptstore import failpoints
from ckptstore.backends.base import Store
from ckptstore.backends.registry import open_store
from ckptstore.backends.tiered import TieredStore
from ckptstore.coordination.collectives import CollectiveError, Coordinator
from ckptstore.errors import (
    DAMAGED_CONTENT,
    CheckpointNotFoundError,
    CkptStoreError,
    IncompleteCheckpointError,
    KeyNotFoundError,
    NotARegularFileError,
    TruncatedFileError,
)
from ckptstore.format.manifest import DATA_PREFIX
from ckptstore.loading.load import LoadInfo, load
from ckptstore.saving.async_save import (
    AsyncSaveHandle,
    async_save,
    prepare_async_save,
    raise_pending_error,
)
from ckptstore.saving.save import SaveInfo, prepare_save, save
from ckptstore.tiers.replicator import ReplicationHandle, replicate
from ckptstore.tiers.state import REPLICATED, read_tier_state
from ckptstore.training import catalog, rng
from ckptstore.training.background import BackgroundWorker
from ckptstore.training.policies import (
    EveryNSeconds,
    EveryNSteps,
    KeepAll,
    KeepLast,
    RetentionPolicy,
    SavePolicy,
)

RESERVED = "_ckptstore"
_log = logging.getLogger(__name__)


_RESTORE_TRIES = 16  # checkpoints one restore tries before it gives up

DAMAGED = (
    *DAMAGED_CONTENT,
    KeyNotFoundError,
    IncompleteCheckpointError,
    TruncatedFileError,
    NotARegularFileError,
)
"""Load failures that mean the checkpoint is damaged (its content, or its files missing,
short or not regular): ``restore`` tries the one before."""


def _is_stateful(obj: Any) -> bool:
    return (
        hasattr(obj, "state_dict")
        and hasattr(obj, "load_state_dict")
        and not isinstance(obj, torch.Tensor)
    )


class CheckpointManager:
    """Periodic asynchronous checkpoints under ``root`` and resume from the latest one.

    Args:
        root: a directory or URL; checkpoint ``s`` lives in ``<root>/step_<s:08d>``.
        every_n_steps / every_n_seconds / save_policy: when :meth:`maybe_save` saves.
        keep: an int (keep the newest N) or a retention policy (``KeepAny((KeepLast(3),
            KeepEvery(1000)))``); default: keep everything. Retention deletes only committed
            checkpoints, manifest first, and never the newest one.
        async_save: save in the background (the loop waits only for a host copy).
        process_group: the group the saves and loads are collective over.
        local_dir: this node's local directory (tier 0); ``root`` becomes the shared tier.
        keep_local: retention on ``local_dir`` (an int or a policy; default: the newest 2).
        storage_options: backend options for ``root`` (e.g. the S3 endpoint, and
            ``max_concurrent_uploads`` / ``max_upload_bytes_per_second`` for burst control).
        **save_options: passed to :func:`ckptstore.save` / :func:`ckptstore.async_save`.
    """

    def __init__(
        self,
        root: str,
        *,
        every_n_steps: int | None = None,
        every_n_seconds: float | None = None,
        save_policy: SavePolicy | None = None,
        keep: int | RetentionPolicy | None = None,
        async_save: bool = True,
        process_group: torch.distributed.ProcessGroup | None = None,
        local_dir: str | None = None,
        keep_local: int | RetentionPolicy | None = 2,
        storage_options: dict[str, Any] | None = None,
        **save_options: Any,
    ) -> None:
        self.root = str(root)
        self.local_dir = None if local_dir is None else str(local_dir)
        self.storage_options = dict(storage_options or {})
        self.local_retention: RetentionPolicy = (
            KeepLast(keep_local) if isinstance(keep_local, int) else (keep_local or KeepAll())
        )
        if save_policy is None:
            if every_n_seconds is not None:
                save_policy = EveryNSeconds(every_n_seconds)
            else:
                save_policy = EveryNSteps(every_n_steps or 1)
        self.save_policy = save_policy
        self.retention: RetentionPolicy = (
            KeepLast(keep) if isinstance(keep, int) else (keep or KeepAll())
        )
        self.async_save = async_save
        self.process_group = process_group
        self.save_options = save_options
        self._coord = Coordinator(process_group)
        self._pending: tuple[int, AsyncSaveHandle] | None = None
        self._last_step: int | None = None
        self._last_time: float | None = None
        self.history: list[dict[str, float]] = []
        """One record per finished save: step, stall (s), background (s), bytes."""
        self.replications: dict[int, ReplicationHandle] = {}
        """Background copies to ``root`` (with ``local_dir``), by step."""
        self.replication_errors: list[tuple[int, str]] = []
        """(step, message) of every replication that failed (the local copy stays usable)."""
        self.skipped_on_restore: list[tuple[int, str]] = []
        """(step, why) of damaged checkpoints ``restore`` passed over for an older one."""
        self.last_load: LoadInfo | None = None
        """What the last :meth:`restore` read (``bytes_by_tier`` with ``local_dir``)."""
        self._root_store_cache: Store | None = None
        self._prepared = False
        self._retention = BackgroundWorker(self._retire, "ckptstore-retention")

    @property
    def tiered(self) -> bool:
        """Whether checkpoints go to ``local_dir`` first, then ``root`` in the background."""
        return self.local_dir is not None

    def _root_store(self) -> Store:
        if self._root_store_cache is None:
            self._root_store_cache = open_store(self.root, **self.storage_options)
        return self._root_store_cache

    def _path(self, step: int) -> str | TieredStore:
        if self.local_dir is None:
            return catalog.join(self.root, catalog.step_dir(step))
        return self._tiered_path(step)

    def _tiered_path(self, step: int) -> TieredStore:
        assert self.local_dir is not None
        return TieredStore(
            catalog.join(self.local_dir, catalog.step_dir(step)),
            catalog.join(self.root, catalog.step_dir(step)),
            remote_options=self.storage_options,
        )

    def _path_options(self) -> dict[str, Any]:
        if self.tiered or not self.storage_options:
            return {}
        return {"storage_options": self.storage_options}

    # -- saving -------------------------------------------------------------------------
    def maybe_save(self, step: int, state: dict[str, Any]) -> bool:
        """Save if the policy says so; returns whether a save started. Cheap otherwise."""
        now = time.monotonic()
        wanted = self.save_policy.should_save(step, now, self._last_step, self._last_time)
        if not self.save_policy.agreed:  # e.g. time-based: every rank must decide the same
            wanted = bool(self._coord.max_ints([int(wanted)])[0])
        if wanted:
            self.save(step, state)
        elif not self._prepared:
            self._prepare(step, state)
        return wanted

    def _prepare(self, step: int, state: dict[str, Any]) -> None:
        """Once, before the first save (at the first step that does not save, or at restore):
        plan it (:func:`ckptstore.prepare_save`) and, for async saves, fault in its staging
        buffer (:func:`ckptstore.prepare_async_save`), so that the first save (or stall) is
        as quick as the later ones. A collective, as every call that leads here is. A
        failure is the first save's to report, not this step's."""
        self._prepared = True
        sd = self._state_dict(state, step, for_load=False)
        options = {**self.save_options, **self._path_options()}
        try:
            # Every rank opens the shared tier now (for S3: boto3's import and a client, most
            # of a second), not inside the first save's stall.
            self._root_store()
            if self.async_save:
                prepare_async_save(sd, process_group=self.process_group, **options)
            else:
                prepare_save(sd, process_group=self.process_group, **options)
        except CkptStoreError as exc:  # every rank gets it (the plan agrees on failures)
            warnings.warn(f"preparing the first save failed: {exc}", stacklevel=3)

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Save ``state`` as checkpoint ``step`` now (asynchronously if configured)."""
        self._finish_pending()
        raise_pending_error()
        self._collect_replications()
        sd = self._state_dict(state, step, for_load=False)
        path = self._path(step)
        options = {**self.save_options, **self._path_options()}
        self._prepared = True
        t = time.perf_counter()
        if self.async_save:
            handle = async_save(sd, path, process_group=self.process_group, **options)
            self._pending = (step, handle)
        else:
            info = save(sd, path, process_group=self.process_group, **options)
            self._record(step, time.perf_counter() - t, info)
            self._apply_retention()
        self._last_step, self._last_time = step, time.monotonic()

    def wait(self) -> None:
        """Wait for the save in flight (raises its error) and apply retention (waiting for
        it too: retention of ``root`` runs in a thread of its own on the coordinator)."""
        self._finish_pending()
        self._wait_retention()

    def poll(self) -> bool:
        """Finish the save in flight if it is done (record it, apply retention); never blocks.

        Returns whether a save is still in flight.
        """
        if self._pending is not None and self._pending[1].done():
            self._finish_pending()
        return self._pending is not None

    def _finish_pending(self) -> None:
        if self._pending is None:
            return
        step, handle = self._pending
        self._pending = None
        info = handle.wait()
        self._record(step, handle.stall_seconds, info)
        self._apply_retention()

    def _record(self, step: int, stall: float, info: SaveInfo) -> None:
        if info.replication is not None:
            self.replications[step] = info.replication
        background = info.seconds.get("write", 0.0) + info.seconds.get("commit", 0.0)
        self.history.append(
            {
                "step": step,
                "stall_s": stall,
                "background_s": background,
                "bytes": info.rank_bytes_written,
            }
        )

    def _collect_replications(self) -> None:
        """Note replications that finished since the last call (errors become warnings)."""
        for step, handle in list(self.replications.items()):
            if not handle.done():
                continue
            error = handle.error()
            if error is not None:
                self.replication_errors.append((step, str(error)))
                warnings.warn(f"checkpoint {step}: {error}", stacklevel=3)
            del self.replications[step]

    def wait_replicated(self, timeout: float | None = None) -> dict[int, str]:
        """Wait for the save in flight and every background copy to ``root``.

        Returns the final state per step that was replicating (``replicated`` or ``failed``);
        failures are also in :attr:`replication_errors`. Applies retention afterwards.
        """
        self._finish_pending()
        states = {}
        for step, handle in list(self.replications.items()):
            with contextlib.suppress(CkptStoreError):
                handle.wait(timeout)
            states[step] = handle.state
        self._collect_replications()
        self._apply_retention()
        self._wait_retention()
        return states

    def replicate(self) -> list[int]:
        """Copy every local checkpoint that is not yet on ``root`` there now (a collective).

        For retrying failed uploads on demand. Returns the steps replicated.
        """
        if self.local_dir is None:
            return []
        self.wait_replicated()
        mine = [
            e.step for e in self.checkpoints() if e.local == "committed" and e.remote != REPLICATED
        ]
        everyone = self._coord.gather(mine)
        common = None
        if self._coord.is_coordinator:
            assert everyone is not None
            common = sorted(set.intersection(*(set(x) for x in everyone)))
        steps: list[int] = self._coord.broadcast(common)
        for step in steps:
            replicate(self._tiered_path(step), process_group=self.process_group)
        self._apply_retention()
        return steps

    def _apply_retention(self) -> None:
        """Trim the local tier (every rank, here) and ask the coordinator's retention thread
        to trim ``root``: listing it and deleting a retired checkpoint's files (batches of
        deletes, seconds at 16k ranks) never hold up the training loop or the other ranks."""
        if self.local_dir is not None:
            self._apply_local_retention()
        if not self._coord.is_coordinator:
            return
        self._warn_retention()
        self._retention.request()

    def _retire(self) -> list[str]:
        """Delete the checkpoints of ``root`` that the policy does not keep (in the retention
        thread); returns warnings for the training thread."""
        failpoints.hit("retention")
        root = self._root_store()
        try:
            committed = catalog.committed_steps(root)
            keep = self.retention.keep(committed) | set(committed[-1:])  # never the newest
            for step in committed:
                if step not in keep:
                    catalog.delete_checkpoint(root, step)
        except CkptStoreError as exc:  # an unreachable shared tier: retried at the next save
            return [f"{root.url}: retention skipped: {exc}"]
        return []

    def _wait_retention(self) -> None:
        self._retention.wait()
        self._warn_retention()

    def _warn_retention(self) -> None:
        for message in self._retention.take_messages():
            warnings.warn(message, stacklevel=4)

    def _apply_local_retention(self) -> None:
        """Every rank trims its node's directory (idempotent when ranks share a node); a
        checkpoint that is not replicated yet is never deleted from the local tier."""
        assert self.local_dir is not None
        local = catalog.committed_steps(self.local_dir)
        if not local:
            return
        keep = self.local_retention.keep(local) | {local[-1]}
        for step in local:
            if step in keep:
                continue
            record = read_tier_state(catalog.step_store(self.local_dir, step))
            if record is not None and record.state == REPLICATED:
                with contextlib.suppress(OSError, CkptStoreError):
                    catalog.delete_checkpoint(self.local_dir, step)

    # -- listing ------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Restorable steps, ascending: committed on ``root`` or (tiered) on this node's
        local directory. A checkpoint being written is not among them."""
        steps = set(catalog.committed_steps(self._root_store()))
        if self.local_dir is not None:
            steps |= set(catalog.committed_steps(self.local_dir))
        return sorted(steps)

    def latest_step(self) -> int | None:
        """The newest restorable step (see :meth:`steps`), or None."""
        steps = self.steps()
        return steps[-1] if steps else None

    def checkpoints(self) -> list[catalog.TieredEntry]:
        """Every step with its state per tier (``local`` is ``absent`` without local_dir)."""
        return catalog.scan_tiers(self._root_store(), self.local_dir)

    def _agreed_steps(self) -> list[int]:
        """Steps every rank can restore: committed on ``root``, or complete (manifest and
        every data file) in the local tier of every rank -- a node's local tier holds only
        its own ranks' files, so a multi-node job restores local-only checkpoints once they
        are replicated (the usual case a few seconds after the save)."""
        if self.local_dir is None:  # listed once, so that every rank sees the same steps
            return self._coord.from_coordinator(
                lambda: catalog.committed_steps(self._root_store()), self.root
            )
        complete = [s for s in catalog.committed_steps(self.local_dir) if self._complete_locally(s)]
        everyone = self._coord.gather(complete)
        agreed = None
        if self._coord.is_coordinator:  # one listing of the shared tier, not one per rank
            assert everyone is not None
            try:
                remote = set(catalog.committed_steps(self._root_store()))
            except CkptStoreError as exc:  # the local tier alone still restores
                warnings.warn(f"{self.root}: the shared tier is unreachable: {exc}", stacklevel=3)
                remote = set()
            agreed = sorted(remote | set.intersection(*(set(x) for x in everyone)))
        return self._coord.broadcast(agreed)

    def _complete_locally(self, step: int) -> bool:
        from ckptstore.format.commit_point import read_manifest_head

        assert self.local_dir is not None
        store = catalog.step_store(self.local_dir, step)
        try:
            files = read_manifest_head(store).files
        except CkptStoreError:
            return False
        present = set(store.list(DATA_PREFIX))
        return all(f in present for f in files)

    # -- restoring ------------------------------------------------------------------------
    def restore(
        self, state: dict[str, Any], step: int | None = None, **load_options: Any
    ) -> int | None:
        """Load the latest committed checkpoint (or ``step``) into ``state``; its step, or None.

        Tensors are filled in place and resharded as needed; modules, optimizers and Stateful
        objects get ``load_state_dict``; plain values in ``state`` are replaced. RNG states
        are restored when the world size is unchanged.

        ``load_options`` go to :func:`ckptstore.load`; ``partial=True`` restores only what
        ``state`` holds -- ``restore({"model": model}, partial=True)`` loads the weights of a
        training checkpoint for evaluation, and still fails if any of them is missing. A
        checkpoint without the manager's own entries (written by ``ckptstore.save``,
        ``ckpt import`` or ``ckpt reshard``) restores too, RNG states left as they are.
        """
        self._finish_pending()
        available = self._agreed_steps()
        if step is not None and step not in available:
            raise CheckpointNotFoundError(f"{self.root}: no committed checkpoint for step {step}")
        # The newest first; a damaged one (its manifest or its data) is skipped, and said so.
        # Every rank sees the same failure (load agrees on it), so all skip together.
        if not available:
            return None
        load_options.setdefault("per_rank", "keep")
        load_options["optional"] = (*load_options.get("optional", ()), RESERVED)
        options = {**self._path_options(), **load_options}
        tried: list[int] = []
        candidate = step if step is not None else available[-1]
        while True:
            tried.append(candidate)
            sd = self._state_dict(state, candidate, for_load=True)
            try:
                info = load(sd, self._path(candidate), process_group=self.process_group, **options)
                break
            except CkptStoreError as exc:
                candidate = self._after_failed_restore(candidate, exc, step is not None, tried)
        step = tried[-1]
        self.last_load = info
        self._apply(state, sd)
        if f"{RESERVED}.step" in info.missing:
            _log.warning(
                "checkpoint %s under %s has no RNG states of ckptstore's manager (it was "
                "written by ckptstore.save, ckpt import or ckpt reshard): RNG left as it is",
                step,
                self.root,
            )
        elif info.saved_world_size == self._coord.world_size:
            rng.restore(sd[RESERVED]["rng"])  # a generator saved without a state keeps its own
        self._last_step, self._last_time = step, time.monotonic()
        if not self._prepared:  # the next save will hold what was just restored
            self._prepare(step, state)
        return step

    def _after_failed_restore(
        self, failed: int, exc: CkptStoreError, pinned: bool, tried: list[int]
    ) -> int:
        """The step to try after ``failed`` could not be loaded (a collective: every rank
        decides the same), or raise ``exc``. A damaged checkpoint is skipped for the one
        before it; one deleted while it was read (retention of another process) for the
        newest one committed now. A caller's mismatch, or a ``step`` asked for, raises."""
        other = not isinstance(exc, (*DAMAGED, CheckpointNotFoundError, CollectiveError))
        if pinned or len(tried) >= _RESTORE_TRIES or self._coord.max_ints([int(other)])[0]:
            raise exc
        now = self._agreed_steps()
        vanished = failed not in now
        left = [s for s in now if s not in tried and (vanished or s < failed)]
        if not left:
            raise exc
        self.skipped_on_restore.append((failed, str(exc)))
        how = "was deleted while it was read" if vanished else "is damaged"
        warnings.warn(
            f"checkpoint {failed} under {self.root} {how} ({type(exc).__name__}: {exc}); "
            f"restoring checkpoint {left[-1]}",
            stacklevel=3,
        )
        return left[-1]

    def close(self) -> None:
        """Finish the save in flight, (with ``local_dir``) its copy to ``root``, and
        retention."""
        self._finish_pending()
        if self.local_dir is not None:
            self.wait_replicated()
        self._wait_retention()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._pending is not None:  # do not mask the original error
            with contextlib.suppress(Exception):
                self.close()

    # -- state <-> state_dict --------------------------------------------------------------
    def _state_dict(self, state: dict[str, Any], step: int, for_load: bool) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        models = [v for v in state.values() if isinstance(v, torch.nn.Module)]
        sd: dict[str, Any] = {}
        for name, obj in state.items():
            if name == RESERVED:
                raise ValueError(f"{RESERVED!r} is reserved for ckptstore's own entries")
            if isinstance(obj, torch.nn.Module):
                sd[name] = get_model_state_dict(obj)
            elif _is_plain_optimizer(obj):
                if len(models) != 1:
                    raise ValueError(
                        f"{name}: an optimizer is saved through its model; put exactly one nn.Module "
                        f"in the state (found {len(models)}) or wrap the pair in a Stateful object"
                    )
                sd[name] = get_optimizer_state_dict(models[0], obj)
            elif _is_stateful(obj):
                sd[name] = obj.state_dict()
            else:
                sd[name] = obj
        captured = rng.capture()
        sd[RESERVED] = {"step": step, "rng": rng.template(captured) if for_load else captured}
        return sd

    def _apply(self, state: dict[str, Any], sd: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        models = [v for v in state.values() if isinstance(v, torch.nn.Module)]
        for name, obj in state.items():
            if isinstance(obj, torch.nn.Module):
                set_model_state_dict(obj, sd[name])
            elif _is_plain_optimizer(obj):
                set_optimizer_state_dict(models[0], obj, sd[name])
            elif _is_stateful(obj):
                obj.load_state_dict(sd[name])
            elif not isinstance(obj, torch.Tensor) and not _is_tensor_tree(obj):
                state[name] = sd[name]


def _is_plain_optimizer(obj: Any) -> bool:
    """An optimizer whose state dict is torch's own (saved through its model, FSDP2 and
    reshard aware). One that defines its own ``state_dict`` -- torchtitan's
    ``OptimizersContainer``, which is an Optimizer *and* Stateful -- is Stateful: its
    ``state_dict()`` / ``load_state_dict()`` are used as they are."""
    cls = type(obj)
    return isinstance(obj, torch.optim.Optimizer) and (
        cls.state_dict is torch.optim.Optimizer.state_dict
        and cls.load_state_dict is torch.optim.Optimizer.load_state_dict
    )


def _is_tensor_tree(obj: Any) -> bool:
    """Dicts/lists are filled in place by load; only top-level plain values need replacing."""
    return isinstance(obj, (dict, list))
