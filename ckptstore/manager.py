"""CheckpointManager: the training-loop hook (cadence, retention, resume, RNG, Stateful).

    mgr = cs.CheckpointManager("/ckpt/run42", every_n_steps=100, keep=3)
    step = mgr.restore(state) or 0          # latest committed checkpoint, resharded as needed
    for step in range(step + 1, total):
        train_step()
        mgr.maybe_save(step, state)         # cheap unless the policy says "now"
    mgr.close()

``state`` maps names to tensors, DTensors, plain values, nn.Modules, optimizers and any
*Stateful* object (``state_dict()`` / ``load_state_dict()``). Modules and optimizers go
through ``torch.distributed.checkpoint.state_dict`` (FSDP2 / DTensor aware), so that an
optimizer restored on another world size is correct.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch

from ckptstore import catalog, rng
from ckptstore.async_save import AsyncSaveHandle, async_save, raise_pending_error
from ckptstore.coordinate import Coordinator
from ckptstore.errors import CheckpointNotFoundError
from ckptstore.load import load
from ckptstore.policies import (
    EveryNSeconds,
    EveryNSteps,
    KeepAll,
    KeepLast,
    RetentionPolicy,
    SavePolicy,
)
from ckptstore.save import SaveInfo, save

RESERVED = "_ckptstore"


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
        **save_options: Any,
    ) -> None:
        self.root = str(root)
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

    # -- saving -------------------------------------------------------------------------
    def maybe_save(self, step: int, state: dict[str, Any]) -> bool:
        """Save if the policy says so; returns whether a save started. Cheap otherwise."""
        now = time.monotonic()
        wanted = self.save_policy.should_save(step, now, self._last_step, self._last_time)
        if not self.save_policy.agreed:  # e.g. time-based: every rank must decide the same
            wanted = bool(self._coord.max_ints([int(wanted)])[0])
        if wanted:
            self.save(step, state)
        return wanted

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Save ``state`` as checkpoint ``step`` now (asynchronously if configured)."""
        self._finish_pending()
        raise_pending_error()
        sd = self._state_dict(state, step, for_load=False)
        path = catalog.join(self.root, catalog.step_dir(step))
        t = time.perf_counter()
        if self.async_save:
            handle = async_save(sd, path, process_group=self.process_group, **self.save_options)
            self._pending = (step, handle)
        else:
            info = save(sd, path, process_group=self.process_group, **self.save_options)
            self._record(step, time.perf_counter() - t, info)
            self._apply_retention()
        self._last_step, self._last_time = step, time.monotonic()

    def wait(self) -> None:
        """Wait for the save in flight (raises its error) and apply retention."""
        self._finish_pending()

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
        background = info.seconds.get("write", 0.0) + info.seconds.get("commit", 0.0)
        self.history.append(
            {
                "step": step,
                "stall_s": stall,
                "background_s": background,
                "bytes": info.rank_bytes_written,
            }
        )

    def _apply_retention(self) -> None:
        if not self._coord.is_coordinator:
            return
        committed = self.steps()
        if not committed:
            return
        keep = self.retention.keep(committed) | {committed[-1]}  # never the newest
        for step in committed:
            if step not in keep:
                catalog.delete_checkpoint(self.root, step)

    # -- listing ------------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Committed steps, ascending (a checkpoint being written is not among them)."""
        return [e.step for e in catalog.scan(self.root) if e.state == "committed"]

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    # -- restoring ------------------------------------------------------------------------
    def restore(
        self, state: dict[str, Any], step: int | None = None, **load_options: Any
    ) -> int | None:
        """Load the latest committed checkpoint (or ``step``) into ``state``; its step, or None.

        Tensors are filled in place and resharded as needed; modules, optimizers and Stateful
        objects get ``load_state_dict``; plain values in ``state`` are replaced. RNG states
        are restored when the world size is unchanged.
        """
        self._finish_pending()
        if step is None:
            step = self.latest_step()
            if step is None:
                return None
        elif step not in self.steps():
            raise CheckpointNotFoundError(f"{self.root}: no committed checkpoint for step {step}")
        path = catalog.join(self.root, catalog.step_dir(step))
        sd = self._state_dict(state, step, for_load=True)
        load_options.setdefault("per_rank", "keep")
        info = load(sd, path, process_group=self.process_group, **load_options)
        self._apply(state, sd)
        if info.saved_world_size == self._coord.world_size:
            rng.restore(sd[RESERVED]["rng"])
        self._last_step, self._last_time = step, time.monotonic()
        return step

    def close(self) -> None:
        self._finish_pending()

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
            elif isinstance(obj, torch.optim.Optimizer):
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
            elif isinstance(obj, torch.optim.Optimizer):
                set_optimizer_state_dict(models[0], obj, sd[name])
            elif _is_stateful(obj):
                obj.load_state_dict(sd[name])
            elif not isinstance(obj, torch.Tensor) and not _is_tensor_tree(obj):
                state[name] = sd[name]


def _is_tensor_tree(obj: Any) -> bool:
    """Dicts/lists are filled in place by load; only top-level plain values need replacing."""
    return isinstance(obj, (dict, list))
