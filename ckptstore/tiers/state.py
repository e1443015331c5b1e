"""Per-tier state of one checkpoint, as the local tier records it (``replication.json``).

A checkpoint's state on each tier:

- local tier: ``writing`` (data files, no manifest yet) or ``committed`` (manifest there);
- remote tier: ``replicating`` (upload in progress), ``replicated`` (its manifest committed
  there), ``failed`` (the upload gave up; the local copy stays usable) or ``absent``.

``replication.json`` sits next to the local manifest; it is bookkeeping, not part of the
checkpoint (the remote copy is complete without it).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from ckptstore.backends.base import Store
from ckptstore.errors import KeyNotFoundError

TIER_STATE_KEY = "replication.json"
REPLICATING, REPLICATED, FAILED = "replicating", "replicated", "failed"


@dataclass(frozen=True)
class TierState:
    remote: str
    state: str
    error: str | None = None
    updated_unix: float = 0.0
    attempts: int = 0

    def to_json(self) -> bytes:
        return json.dumps(
            {"format": "ckptstore-replication", "version": 1, **asdict(self)}
        ).encode()


def write_tier_state(local: Store, state: TierState) -> None:
    """Replace the local record (atomic; ranks of one node may write the same record).

    Not fsynced on a local disk: it is bookkeeping on the replication's critical path, and a
    record lost in a crash only makes ``ls`` say less (retention then keeps the local copy).
    """
    stamped = TierState(state.remote, state.state, state.error, time.time(), state.attempts)
    local.write_volatile(TIER_STATE_KEY, stamped.to_json())


def read_tier_state(local: Store) -> TierState | None:
    try:
        raw = json.loads(local.read(TIER_STATE_KEY))
    except (KeyNotFoundError, ValueError):
        return None
    return TierState(
        str(raw.get("remote", "")),
        str(raw.get("state", "")),
        raw.get("error"),
        float(raw.get("updated_unix", 0.0)),
        int(raw.get("attempts", 0)),
    )
