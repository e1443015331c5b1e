"""The few collectives a save or load needs. Nothing else in ckptstore calls torch.distributed.

Every method is a collective over ``group``: all ranks call it in the same order. Without
an initialized process group (or with world size 1) each is a local no-op, so the same
code path serves a single process.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ckptstore.errors import CkptStoreError

COORDINATOR = 0


class Coordinator:
    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.distributed = dist.is_available() and dist.is_initialized()
        self.group = group
        if self.distributed:
            self.rank = dist.get_rank(group)
            self.world_size = dist.get_world_size(group)
            self._global_coordinator = (
                dist.get_global_rank(group, COORDINATOR) if group else COORDINATOR
            )
        else:
            self.rank, self.world_size, self._global_coordinator = 0, 1, 0

    @property
    def is_coordinator(self) -> bool:
        return self.rank == COORDINATOR

    @property
    def active(self) -> bool:
        return self.distributed and self.world_size > 1

    def max_ints(self, values: list[int]) -> list[int]:
        """Element-wise maximum of ``values`` over all ranks (one all_reduce)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return [int(v) for v in t.tolist()]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on the coordinator (None elsewhere)."""
        if not self.active:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_coordinator else None
        dist.gather_object(obj, out, dst=self._global_coordinator, group=self.group)
        return out

    def scatter(self, objs: list[Any] | None) -> Any:
        """Rank r receives ``objs[r]`` from the coordinator."""
        if not self.active:
            assert objs is not None
            return objs[0]
        out: list[Any] = [None]
        dist.scatter_object_list(out, objs, src=self._global_coordinator, group=self.group)
        return out[0]

    def broadcast(self, obj: Any) -> Any:
        """The coordinator's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=self._global_coordinator, group=self.group)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def agree(self, error: BaseException | None) -> None:
        """Raise on every rank if any rank failed: the local error where there is one,
        else a :class:`CollectiveError` naming each failing rank and its message."""
        if self.max_ints([1 if error is not None else 0])[0]:
            self.raise_failures(error)

    def raise_failures(self, error: BaseException | None) -> None:
        """Once every rank knows some rank failed: share the messages, then raise the local
        error where there is one, else a :class:`CollectiveError` (a collective)."""
        messages = self.all_gather(
            f"{type(error).__name__}: {error}" if error is not None else None
        )
        if error is not None:
            raise error
        raise CollectiveError(messages)


class CollectiveError(CkptStoreError):
    """Another rank failed; this rank stops too so that no rank hangs or goes on alone."""

    def __init__(self, messages: list[str | None]) -> None:
        self.failed_ranks = [r for r, m in enumerate(messages) if m is not None]
        parts = [f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None]
        super().__init__("failed on other ranks: " + "; ".join(parts))
