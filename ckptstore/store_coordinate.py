"""Agreement among the ranks of a process group through the job's key-value store.

For rare, small exchanges from background threads (a replication's per-rank outcome and its
verdict). It needs no process group of its own: nothing has to be created collectively, so
subgroups of a job may start using it independently, at different times. Payloads are JSON
(strings and None in practice), never pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from ckptstore.coordinate import COORDINATOR


def _timeout() -> timedelta:
    """How long a rank waits for the others (a replication's slowest upload included)."""
    return timedelta(seconds=float(os.environ.get("CKPTSTORE_STORE_WAIT_S", str(6 * 3600))))


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
        self.key = hashlib.blake2b(repr(self.ranks).encode(), digest_size=8).hexdigest()
        self._count = 0
        self._lock = threading.Lock()

    def next_exchange(self, purpose: str) -> StoreCoordinator:
        with self._lock:
            self._count += 1
            number = self._count
        return StoreCoordinator(self, f"ckptstore/{purpose}/{self.key}/{number}")


class StoreCoordinator:
    """``gather`` and ``broadcast`` (the :class:`~ckptstore.coordinate.Coordinator` calls a
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

    @property
    def is_coordinator(self) -> bool:
        return self.rank == COORDINATOR

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj`` (JSON-serializable) on the coordinator (None elsewhere)."""
        if self._store is None:
            return [obj]
        self._store.set(self._key(f"gather/{self.rank}"), json.dumps(obj))
        if not self.is_coordinator:
            return None
        keys = [self._key(f"gather/{r}") for r in range(self.world_size)]
        self._store.wait(keys, _timeout())
        return [json.loads(self._store.get(k)) for k in keys]

    def broadcast(self, obj: Any) -> Any:
        """The coordinator's ``obj`` on every rank; ends the exchange (its keys go)."""
        if self._store is None:
            return obj
        verdict = self._key("broadcast")
        if self.is_coordinator:
            self._store.set(verdict, json.dumps(obj))
            out = obj
        else:
            self._store.wait([verdict], _timeout())
            out = json.loads(self._store.get(verdict))
        if self._store.add(self._key("done"), 1) == self.world_size:  # the last reader
            for r in range(self.world_size):
                self._store.delete_key(self._key(f"gather/{r}"))
            self._store.delete_key(verdict)
            self._store.delete_key(self._key("done"))
        return out
