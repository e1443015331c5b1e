"""One trial of the crash campaign (``tools/chaos.py``): what it is, what it found, and the
checks every kind of trial shares."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field

STEPS = 5
# Trials that are not crashes: concurrency and fault scenarios (see chaos_scenarios.py and
# chaos_job.py). s3-restart restarts the campaign's S3 server, so those run one at a time,
# after the others.
SCENARIOS = (
    "overwrite-race", "gc-during-saves", "s3-faults", "retention-during-load", "full-disk",
    "s3-restart",
)  # fmt: skip


@dataclass
class Trial:
    id: int
    mode: str
    kill: str  # "phase@rank#n", "after:SECONDS@rank", or "none@0" for a scenario
    seed: int
    committed: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    skipped: str = ""  # why this trial could not run here (a reason a user would accept)
    note: str = ""  # what a passing scenario did (e.g. restores that succeeded)

    @property
    def ok(self) -> bool:
        return not self.problems


_RANK_PREFIX = re.compile(r"^\[rank\d+\]: ?")  # what torch puts before a rank's last words


def untyped_error(stderr: str) -> str | None:
    """The exception a process ended with, when it is not one of ckptstore's typed errors
    (None when it ended without one, or with a typed one). A rank may fail when another
    dies, but only with a :class:`~ckptstore.errors.CkptStoreError` that says why."""
    lines = [_RANK_PREFIX.sub("", line, count=1) for line in stderr.splitlines()]
    starts = [i for i, line in enumerate(lines) if line == "Traceback (most recent call last):"]
    if not starts:
        return None
    for line in lines[starts[-1] + 1 :]:
        if line and not line.startswith((" ", "\t")):
            kind = line.split(":", 1)[0]
            if kind.startswith("ckptstore.") or kind.startswith("KeyboardInterrupt"):
                return None
            return line[:300]
    return None


def finish(trial: Trial, root: str) -> Trial:
    """Remove the trial's files if it passed; keep them (and say where) if not."""
    if trial.ok:
        shutil.rmtree(root, ignore_errors=True)
    else:
        trial.problems.append(f"(root kept: {root})")
    return trial


def leftover_temporaries(root: str) -> list[str]:
    """Files a failed write left behind under ``root`` (``.tmp-`` names)."""
    return [
        os.path.join(d, f) for d, _, files in os.walk(root) for f in files if ".tmp-" in f
    ]  # fmt: skip
