"""Pausing Python's cyclic garbage collector around bulk object creation.

Flattening a state_dict of tens of thousands of tensors, or parsing its manifest, creates
that many small objects; each allocation burst can trigger full collections that walk every
object of the training process (model, optimizer, framework). None of these objects form
cycles, so collection is deferred to the end of the phase.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


@contextmanager
def gc_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def with_gc_paused(fn: F) -> F:
    """Decorator: run ``fn`` with the cyclic collector paused."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with gc_paused():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
