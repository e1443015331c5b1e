"""Pausing Python's cyclic garbage collector around bulk object creation.

Flattening a state_dict of tens of thousands of tensors, or parsing its manifest, creates
that many small objects; each allocation burst can trigger full collections that walk every
object of the training process (model, optimizer, framework). None of these objects form
cycles, so collection is deferred to the end of the phase.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def gc_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
