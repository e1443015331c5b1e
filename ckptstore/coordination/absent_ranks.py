"""After a collective of ckptstore failed: which ranks never reached it.

A gloo timeout says only that the wait ended. To name the missing ranks, every rank whose
wait failed posts its presence under a tag (the same on every rank for the same collective)
in the job's key-value store, then gives the others a short grace to post theirs; the ranks
that did not post are the ones that never arrived (dead, or busy elsewhere). It costs nothing
while collectives succeed: only a failing rank talks to the store.
"""

from __future__ import annotations

import time

import torch.distributed as dist

from ckptstore import knobs

_POLL_S = 0.1


def grace_s() -> float:
    """How long a rank that timed out waits for the others to say they were there too: a
    quarter of the collective timeout, between 1 and 5 s (ranks that arrived time out within
    about the same span, since they entered within it)."""
    return min(5.0, max(1.0, knobs.collective_timeout_s() / 4))


def absent_ranks(tag: str, ranks: tuple[int, ...]) -> list[int] | None:
    """The global ranks of ``ranks`` that did not post under ``tag`` within :func:`grace_s`
    (this rank posts first). None when the job's store cannot tell (it is gone too)."""
    try:
        store = dist.distributed_c10d._get_default_store()
        prefix = f"ckptstore/present/{tag}"
        store.set(f"{prefix}/{dist.get_rank()}", "1")
        arrived = store.add(f"{prefix}/count", 1)
        deadline = time.monotonic() + grace_s()
        while arrived < len(ranks) and time.monotonic() < deadline:
            time.sleep(_POLL_S)
            arrived = store.add(f"{prefix}/count", 0)
        if arrived >= len(ranks):
            return []
        return [r for r in ranks if not store.check([f"{prefix}/{r}"])]
    except Exception:  # the store went with the job: nothing more to learn
        return None


def absent_text(missing: list[int] | None) -> str:
    if missing is None:
        return "the job's store could not say which ranks were missing"
    if not missing:
        return "every rank arrived (the group broke after a rank failed inside it)"
    shown = ", ".join(map(str, missing[:32])) + (" ..." if len(missing) > 32 else "")
    return f"{len(missing)} rank(s) never arrived: [{shown}]"
