"""The few collectives a save or load needs. Nothing else in ckptstore calls torch.distributed.

Every method is a collective over ``group``: all ranks call it in the same order. Without
an initialized process group (or with world size 1) each is a local no-op, so the same
code path serves a single process.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from ckptstore import knobs
from ckptstore.coordination.absent_ranks import absent_ranks, absent_text
from ckptstore.errors import CkptStoreError, typed

COORDINATOR = 0


_GROUPS: dict[tuple[str, tuple[int, ...]], Any] = {}  # (purpose, ranks) -> group
_GROUP_OF: dict[tuple[str, int], Any] = {}  # (purpose, id(process_group)) -> group
_ATTEMPTS: dict[tuple[str, tuple[int, ...]], int] = {}  # group creations tried, per key
_ISSUED: dict[int, int] = {}  # id(group) -> collectives issued on it (the same on every rank)


def own_group(process_group: dist.ProcessGroup | None, purpose: str) -> Any:
    """A gloo group with the ranks of ``process_group``, for ckptstore's own collectives,
    created once per ``purpose`` (``control``: the foreground of save/load/manager;
    ``background``: asynchronous commits), with ckptstore's timeout: no ckptstore wait
    lasts longer than ``knobs.collective_timeout_s()``, whatever the job's group allows.

    Creation is itself a collective; it happens inside the first save, load or manager
    call over these ranks, which every rank makes. Over a subgroup only its ranks take
    part (``use_local_synchronization``), so subgroups may start independently, provided
    their members have created the same number of groups (torch's naming rule).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    known = _GROUP_OF.get((purpose, id(process_group)))
    if known is not None:
        return known
    ranks = tuple(dist.get_process_group_ranks(process_group or dist.group.WORLD))
    group = _GROUPS.get((purpose, ranks))
    if group is None:
        subgroup = len(ranks) < dist.get_world_size()
        attempt = _ATTEMPTS[(purpose, ranks)] = _ATTEMPTS.get((purpose, ranks), 0) + 1
        try:
            with _connect_lazily():
                group = dist.new_group(
                    ranks=list(ranks),
                    backend="gloo",
                    use_local_synchronization=subgroup,
                    timeout=timedelta(seconds=knobs.collective_timeout_s()),
                )
        except RuntimeError as exc:
            missing = absent_ranks(f"group/{purpose}/{ranks_key(ranks)}/{attempt}", ranks)
            raise CollectiveTimeoutError(
                f"ckptstore: creating its {purpose} group over ranks {_ranks_text(ranks)} "
                f"failed: {absent_text(missing)}; a rank died or never called save/load "
                f"({str(exc)[:200]})",
                missing,
            ) from exc
        _GROUPS[(purpose, ranks)] = group
    _GROUP_OF[(purpose, id(process_group))] = group
    return group


@contextlib.contextmanager
def _connect_lazily() -> Iterator[None]:
    """Gloo groups created here connect a pair of ranks when the pair first exchanges a
    message (``TORCH_GLOO_LAZY_INIT``, read when the group is created), not every pair at
    creation: ckptstore's messages go between ring neighbours, to planning-group leaders and
    to the coordinator, so a job of N ranks opens O(N) connections instead of N * (N - 1) / 2."""
    before = os.environ.get(_GLOO_LAZY)
    os.environ[_GLOO_LAZY] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(_GLOO_LAZY, None)
        else:
            os.environ[_GLOO_LAZY] = before


_GLOO_LAZY = "TORCH_GLOO_LAZY_INIT"


def ranks_key(ranks: tuple[int, ...]) -> str:
    """A short name for a set of ranks, the same on every rank (for keys in the job's store)."""
    return hashlib.blake2b(repr(ranks).encode(), digest_size=8).hexdigest()


def _ranks_text(ranks: tuple[int, ...]) -> str:
    return f"{list(ranks)}" if len(ranks) <= 16 else f"{ranks[0]}..{ranks[-1]} ({len(ranks)})"


class Coordinator:
    """ckptstore's collectives over the ranks of ``group`` (by default on its own gloo
    group of those ranks, see :func:`own_group`; ``purpose=None`` uses ``group`` as is)."""

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        purpose: str | None = "control",
        alone: bool = False,
    ) -> None:
        # ``alone``: this process acts by itself, even inside a distributed job (no collective).
        self.distributed = not alone and dist.is_available() and dist.is_initialized()
        self.group = group
        self.purpose = purpose or "job"
        if self.distributed:
            if purpose is not None and dist.get_world_size(group) > 1:
                self.group = own_group(group, purpose)
            self.rank = dist.get_rank(self.group)
            self.world_size = dist.get_world_size(self.group)
            self._global_coordinator = (
                dist.get_global_rank(self.group, COORDINATOR) if self.group else COORDINATOR
            )
        else:
            self.rank, self.world_size, self._global_coordinator = 0, 1, 0

    @property
    def is_coordinator(self) -> bool:
        return self.rank == COORDINATOR

    @property
    def active(self) -> bool:
        return self.distributed and self.world_size > 1

    @contextlib.contextmanager
    def _bounded(self, what: str) -> Iterator[None]:
        """A collective that did not complete in time (a rank died, or stopped calling
        ckptstore) is a typed error naming the ranks that never arrived, not a gloo
        RuntimeError."""
        number = _ISSUED[id(self.group)] = _ISSUED.get(id(self.group), 0) + 1
        try:
            yield
        except RuntimeError as exc:
            ranks = tuple(dist.get_process_group_ranks(self.group or dist.group.WORLD))
            missing = absent_ranks(f"op/{self.purpose}/{ranks_key(ranks)}/{number}", ranks)
            raise CollectiveTimeoutError(
                f"ckptstore: {what} over ranks {_ranks_text(ranks)} did not complete "
                f"(timeout {knobs.collective_timeout_s():g} s, CKPTSTORE_COLLECTIVE_TIMEOUT_S): "
                f"{absent_text(missing)} ({str(exc)[:200]})",
                missing,
            ) from exc

    def max_ints(self, values: list[int], meanwhile: Callable[[], None] | None = None) -> list[int]:
        """Element-wise maximum of ``values`` over all ranks (one all_reduce).

        ``meanwhile`` runs while the all_reduce is in flight (work that does not depend on
        its outcome, such as an async save's host copy, instead of waiting for the slowest
        rank); it must not raise: the all_reduce is waited for whatever it does."""
        if not self.active:
            if meanwhile is not None:
                meanwhile()
            return list(values)
        t = torch.tensor(values, dtype=torch.int64)
        with self._bounded("an all_reduce"):
            if meanwhile is None:
                dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
            else:
                work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
                try:
                    meanwhile()
                finally:
                    work.wait()
        return [int(v) for v in t.tolist()]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` on the coordinator (None elsewhere)."""
        if not self.active:
            return [obj]
        out: list[Any] | None = [None] * self.world_size if self.is_coordinator else None
        with self._bounded("a gather"):
            dist.gather_object(obj, out, dst=self._global_coordinator, group=self.group)
        return out

    def scatter(self, objs: list[Any] | None) -> Any:
        """Rank r receives ``objs[r]`` from the coordinator."""
        if not self.active:
            assert objs is not None
            return objs[0]
        out: list[Any] = [None]
        with self._bounded("a scatter"):
            dist.scatter_object_list(out, objs, src=self._global_coordinator, group=self.group)
        return out[0]

    def broadcast(self, obj: Any) -> Any:
        """The coordinator's ``obj`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        with self._bounded("a broadcast"):
            dist.broadcast_object_list(box, src=self._global_coordinator, group=self.group)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        with self._bounded("an all_gather"):
            dist.all_gather_object(out, obj, group=self.group)
        return out

    def post_send(self, tensor: torch.Tensor, dst: int) -> Any:
        """Start sending ``tensor`` to rank ``dst`` of this group (point to point: only the
        two ranks take part); returns a handle for :meth:`finish_sends`."""
        return dist.isend(tensor, dst=dist.get_global_rank(self.group, dst), group=self.group)

    def receive(self, tensor: torch.Tensor, src: int) -> None:
        """Receive into ``tensor`` what rank ``src`` sent with :meth:`post_send` (bounded by
        the group's timeout)."""
        try:
            dist.recv(tensor, src=dist.get_global_rank(self.group, src), group=self.group)
        except RuntimeError as exc:
            raise CollectiveTimeoutError(
                f"ckptstore: receiving from rank {src} did not complete (timeout "
                f"{knobs.collective_timeout_s():g} s): it died or stopped taking part "
                f"({str(exc)[:200]})"
            ) from exc

    def post_object(self, obj: Any, dst: int) -> list[Any]:
        """Start sending ``obj`` (pickled: between ranks of one job, never from storage) to
        rank ``dst``: its length, then its bytes. Returns handles for :meth:`finish_sends`."""
        data = bytearray(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        size = torch.tensor([len(data)], dtype=torch.int64)
        return [
            _Sending(self.post_send(size, dst), size),
            _Sending(self.post_send(torch.frombuffer(data, dtype=torch.uint8), dst), data),
        ]

    def receive_object(self, src: int) -> Any:
        """What rank ``src`` sent with :meth:`post_object`."""
        size = torch.zeros(1, dtype=torch.int64)
        self.receive(size, src)
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        self.receive(data, src)
        return pickle.loads(memoryview(data.numpy()))

    def finish_sends(self, handles: list[Any]) -> None:
        """Wait until every send of ``handles`` was taken by its receiver."""
        try:
            for handle in handles:
                handle.wait()
        except RuntimeError as exc:
            raise CollectiveTimeoutError(
                f"ckptstore: a send did not complete (timeout {knobs.collective_timeout_s():g} "
                f"s): its receiver died or stopped taking part ({str(exc)[:200]})"
            ) from exc

    def from_coordinator(self, compute: Callable[[], Any], where: str) -> Any:
        """``compute()`` run by the coordinator alone, its result on every rank (a
        broadcast); its failure is raised on every rank, typed, so that no rank waits in
        the broadcast for a coordinator that raised."""
        result: Any = None
        if self.is_coordinator:
            try:
                result = compute()
            except Exception as exc:
                result = typed(exc, where)
        result = self.broadcast(result)
        if isinstance(result, BaseException):
            raise result
        return result

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
            if self.rank != 0 and messages[0] == messages[self.rank] and _long(messages[0]):
                # The same (long) report on every rank: rank 0 prints it, the others say so.
                first = str(error).split("\n", 1)[0]
                error.args = (f"{first} (the same as on rank 0, whose message lists them)",)
            raise error
        raise CollectiveError(messages, self.rank)


class _Sending(NamedTuple):
    """A send in flight and the buffer it reads (kept alive until it completes)."""

    work: Any
    buffer: Any

    def wait(self) -> None:
        self.work.wait()


class CollectiveTimeoutError(CkptStoreError):
    """A collective of ckptstore did not complete within its timeout: a rank died or
    stopped taking part. Raised instead of waiting for the job's own (often 30-minute)
    process-group timeout. ``absent_ranks``: the global ranks that never arrived (None when
    unknown)."""

    def __init__(self, message: str, absent_ranks: list[int] | None = None) -> None:
        super().__init__(message)
        self.absent_ranks = absent_ranks


class CollectiveError(CkptStoreError):
    """Another rank failed; this rank stops too so that no rank hangs or goes on alone."""

    def __init__(self, messages: list[str | None], rank: int = 0) -> None:
        """``messages``: each rank's failure or None; ``rank``: the raising one (rank 0 shows
        long messages in full, the others their first line)."""
        self.failed_ranks = [r for r, m in enumerate(messages) if m is not None]
        by_message: dict[str, list[int]] = {}
        for r in self.failed_ranks:
            by_message.setdefault(messages[r], []).append(r)  # type: ignore[arg-type]
        parts = [
            f"{_ranks(ranks)}: {message if rank == 0 or not _long(message) else _head(message)}"
            for message, ranks in by_message.items()
        ]
        super().__init__("failed on other ranks: " + "; ".join(parts))


def _long(message: str | None) -> bool:
    return message is not None and message.count("\n") > 1


def _head(message: str) -> str:
    return message.split("\n", 1)[0] + " (...)"


def _ranks(ranks: list[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    shown = ", ".join(map(str, ranks[:8])) + (", ..." if len(ranks) > 8 else "")
    return f"ranks {shown}"
