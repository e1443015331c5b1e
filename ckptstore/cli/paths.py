"""What a path given to ``ckpt`` is, and what to say when it is not a checkpoint.

A newcomer points ``inspect`` at the run root (``/ckpt/run``) or at a step that was never
saved (``step_150``), and ``ls`` at a typo. Each gets a one-line error that says what is
there instead and which command or path to use.
"""

from __future__ import annotations

import os
import re

from ckptstore.backends.registry import open_store
from ckptstore.errors import CheckpointNotFoundError, CkptStoreError
from ckptstore.format.manifest import MANIFEST_KEY
from ckptstore.loading.checkpoint import Checkpoint, open_checkpoint
from ckptstore.training.catalog import committed_steps, join, step_dir

_STEP_NAME = re.compile(r"^step_(\d+)$")


def open_for_cli(path: str) -> Checkpoint:
    """``open_checkpoint(path)``; when there is no checkpoint, an error that points at the
    run root's checkpoints (``path`` is a run root, or a step it does not hold)."""
    try:
        return open_checkpoint(path)
    except CheckpointNotFoundError as exc:
        raise CheckpointNotFoundError(_not_a_checkpoint(path) or str(exc)) from None


def _not_a_checkpoint(path: str) -> str | None:
    """What is at ``path`` instead of a checkpoint, as a message (None: nothing to add)."""
    steps = _steps(path)
    if steps:  # a run root
        latest = join(path, step_dir(steps[-1]))
        return (
            f"{path} is a run root with {len(steps)} committed checkpoint(s), steps "
            f"{_span(steps)}: `ckpt ls {path}` lists them; inspect one with e.g. {latest}"
        )
    parent, _, name = path.rstrip("/").rpartition("/")
    m = _STEP_NAME.match(name)
    if parent and m:
        steps = _steps(parent)
        if steps:
            want = int(m.group(1))
            nearest = sorted(steps, key=lambda s: (abs(s - want), s))[:2]
            near = " and ".join(join(parent, step_dir(s)) for s in sorted(nearest))
            return (
                f"{path}: no checkpoint for step {want}; the nearest: {near} "
                f"(`ckpt ls {parent}` lists all {len(steps)})"
            )
    if _is_missing_directory(path):
        return f"{path}: no such file or directory"
    return None


def _steps(root: str) -> list[int]:
    try:
        return committed_steps(root)
    except CkptStoreError:
        return []


def _span(steps: list[int]) -> str:
    return str(steps[0]) if len(steps) == 1 else f"{steps[0]}..{steps[-1]}"


def _is_missing_directory(path: str) -> bool:
    return "://" not in path and not os.path.exists(path)


def check_root(root: str) -> bool:
    """For ``ckpt ls``: raise when nothing is at ``root``; True when ``root`` is itself one
    checkpoint (its manifest is there) rather than a run root."""
    if _is_missing_directory(root):
        raise CheckpointNotFoundError(f"{root}: no such file or directory")
    store = open_store(root)
    if store.exists(MANIFEST_KEY):
        return True
    if "://" in root and not any(True for _ in store.list_children("")):
        raise CheckpointNotFoundError(f"{root}: nothing stored under this prefix")
    return False
