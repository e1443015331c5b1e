"""Agreement among the ranks of a process group through the job's key-value store.

For rare, small exchanges from background threads (a replication's per-rank outcome and its
verdict). It needs no process group of its own: nothing has to be created collectively, so
subgroups of a job may start using it independently, at different times. Payloads are JSON
(strings and None in practice), never pickle.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from ckptstore import knobs
from ckptstore.coordination.collectives import COORDINATOR, CollectiveTimeoutError, ranks_key


def _timeout() -> float:
    """How long a rank waits for the others (a replication's slowest upload included)."""
    return float(os.environ.get("CKPTSTORE_STORE_WAIT_S", str(6 * 3600)))


_POLL = timedelta(seconds=2)


class Team:
    """The ranks of one process group, as seen by this rank, with a counter of exchanges.

    Every rank of the team must start its exchanges in the same order (as with collectives);
    each gets the next number, so keys of different exchanges never meet.
    """

    def __init__(self, process_group: Any = None) -> None:
        self.distributed = dist.is_available() and dist.is_initialized()
        if self.distributed:
            ranks = dist.get_process_group_ranks(process_group or dist.group.WORLD)
            self.rank = dist.get_rank(process_group)
        else:
            ranks, self.rank = [0], 0
        self.ranks = tuple(ranks)
        self.key = ranks_key(self.ranks)
        self._count = 0
        self._lock = threading.Lock()

    def next_exchange(self, purpose: str) -> KeyValueExchange:
        with self._lock:
            self._count += 1
            number = self._count
        return KeyValueExchange(self, f"ckptstore/{purpose}/{self.key}/{number}")


class KeyValueExchange:
    """``gather`` and ``broadcast`` (the :class:`~ckptstore.coordination.collectives.Coordinator` calls a
    replication makes) over the default store, under a key prefix unique to one exchange.

    Keys are deleted once every rank has read the verdict.
    """

    def __init__(self, team: Team, prefix: str) -> None:
        self.team = team
        self.rank = team.rank
        self.world_size = len(team.ranks)
        self.prefix = prefix
        self._store = (
            dist.distributed_c10d._get_default_store()
            if team.distributed and self.world_size > 1
            else None
        )
        self._stop = threading.Event()
        if self._store is not None:  # a heartbeat, so that waits end when a rank is gone
            threading.Thread(target=self._beat, daemon=True, name="ckptstore-heartbeat").start()

    @property
    def is_coordinator(self) -> bool:
        return self.rank == COORDINATOR

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def _beat(self) -> None:
        """While this rank takes part in the exchange (its uploads included), count up its
        ``alive`` key every second: a long upload is progress, a dead rank is not."""
        assert self._store is not None
        key = self._key(f"alive/{self.rank}")
        while not self._stop.wait(1.0):
            try:
                self._store.add(key, 1)
            except Exception:  # the store is gone (the job is ending): nothing to report to
                return

    def _wait(self, keys: list[str], ranks: list[int]) -> None:
        """Wait for ``keys`` (posted by ``ranks``) while those ranks show signs of life; a
        rank silent for ``knobs.collective_timeout_s()`` (or any wait beyond
        ``CKPTSTORE_STORE_WAIT_S``) is a :class:`CollectiveTimeoutError` naming it."""
        assert self._store is not None
        silent_limit = knobs.collective_timeout_s()
        start = time.monotonic()
        seen: dict[int, tuple[int, float]] = {}  # rank -> (its heartbeat count, when it changed)
        while True:
            try:
                self._store.wait(keys, _POLL)
                return
            except RuntimeError:  # not all there yet: are the missing ranks still alive?
                pass
            now = time.monotonic()
            silent = []
            for r, k in zip(ranks, keys, strict=True):
                if self._store.check([k]):
                    continue
                beat = self._store.add(self._key(f"alive/{r}"), 0)
                if seen.get(r, (None,))[0] != beat:
                    seen[r] = (beat, now)
                elif now - seen[r][1] > silent_limit:
                    silent.append(r)
            if silent or now - start > _timeout():
                gone = [self.team.ranks[r] for r in silent]
                raise CollectiveTimeoutError(
                    f"ckptstore: ranks {gone} of the replication team {list(self.team.ranks)} "
                    f"did not report within {silent_limit:g} s of their last sign of life "
                    "(CKPTSTORE_COLLECTIVE_TIMEOUT_S): a rank died or stopped",
                    gone,
                )

    @contextlib.contextmanager
    def _reachable(self) -> Iterator[None]:
        """The job's store lives in rank 0's process (torchrun: the agent's); when it dies,
        every store call fails with torch's untyped network error: a typed one instead."""
        try:
            yield
        except RuntimeError as exc:  # torch's store errors (CollectiveTimeoutError is not one)
            self._stop.set()
            raise CollectiveTimeoutError(
                f"ckptstore: the job's key-value store became unreachable during an exchange "
                f"of the replication team {list(self.team.ranks)} (the rank that hosts it "
                f"died?): {type(exc).__name__}: {str(exc)[:200]}"
            ) from exc

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (JSON-serializable) on the coordinator (None elsewhere)."""
        if self._store is None:
            return [obj]
        with self._reachable():
            return self._gather(obj)

    def _gather(self, obj: Any) -> list[Any] | None:
        assert self._store is not None
        self._store.set(self._key(f"gather/{self.rank}"), json.dumps(obj))
        if not self.is_coordinator:
            return None
        keys = [self._key(f"gather/{r}") for r in range(self.world_size)]
        try:
            self._wait(keys, list(range(self.world_size)))
        except BaseException:
            self._stop.set()  # silent from now on: the others stop waiting for this rank too
            raise
        return [json.loads(self._store.get(k)) for k in keys]

    def broadcast(self, obj: Any) -> Any:
        """The coordinator's ``obj`` on every rank; ends the exchange (its keys go)."""
        if self._store is None:
            return obj
        with self._reachable():
            return self._broadcast(obj)

    def _broadcast(self, obj: Any) -> Any:
        assert self._store is not None
        verdict = self._key("broadcast")
        try:
            if self.is_coordinator:
                self._store.set(verdict, json.dumps(obj))
                out = obj
            else:
                self._wait([verdict], [COORDINATOR])
                out = json.loads(self._store.get(verdict))
        finally:
            self._stop.set()
        if self._store.add(self._key("done"), 1) == self.world_size:  # the last reader
            for r in range(self.world_size):
                self._store.delete_key(self._key(f"gather/{r}"))
                self._store.delete_key(self._key(f"alive/{r}"))
            self._store.delete_key(verdict)
            self._store.delete_key(self._key("done"))
        return out
