"""Named points of a save where the crash campaign acts (failpoints, as databases have them).

``CKPTSTORE_FAILPOINT=phase`` (``phase@rank``, ``phase@rank#n``: the n-th time that rank gets
there) makes the process that reaches that point kill itself with SIGKILL: the crash
campaign (``tools/chaos.py``) uses it to crash ranks at every named phase. Tests may also
run a function there (:func:`on`). With neither, a point costs one dictionary lookup.

Phases, in order: ``planned`` (after the foreground collectives), ``staged`` (async: the
host copy is done), ``written`` (this rank's data files are durable), ``before_commit`` and
``committed`` (coordinator, around the manifest's commit), ``replicated`` (tiered: files on
the shared tier, before its manifest), ``retention`` (manager, before deleting old steps).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

PHASES = (
    "planned",
    "staged",
    "written",
    "before_commit",
    "committed",
    "replicated",
    "retention",
)
_ACTIONS: dict[str, Callable[[], None]] = {}


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def on(phase: str, action: Callable[[], None] | None) -> None:
    """Run ``action`` whenever ``phase`` is reached in this process (None: stop)."""
    if action is None:
        _ACTIONS.pop(phase, None)
    else:
        _ACTIONS[phase] = action


def hit(phase: str, rank: int = 0) -> None:
    """Reached ``phase`` on ``rank``."""
    action = _ACTIONS.get(phase) or _ACTIONS.get(f"{phase}@{rank}")
    if action is not None:
        action()


def _kill_on_hit(n: int) -> Callable[[], None]:
    hits = [0]

    def action() -> None:
        hits[0] += 1
        if hits[0] == n:
            _kill()

    return action


_spec = os.environ.get("CKPTSTORE_FAILPOINT")
if _spec:
    _point, _, _nth = _spec.partition("#")
    _ACTIONS[_point] = _kill_on_hit(int(_nth or 1))
