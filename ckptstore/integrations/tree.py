"""A nested state's containers, so that it can be rebuilt from a checkpoint without a
template (a framework's ``load_checkpoint`` gets a path and must return the whole dict).

The skeleton is JSON: ``{"dict": [[key, child], ...]}`` (int keys stay ints), ``{"list":
[child, ...]}``, ``{"tuple": [...]}`` of containers, or None for a leaf; leaves are named as
``cs.save`` names them (``optimizer_states.0.state.3.exp_avg``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ckptstore.errors import ConversionError


def skeleton(value: Any) -> Any:
    """The containers of ``value`` (None for a leaf)."""
    if isinstance(value, dict):
        return {"dict": [[k, skeleton(v)] for k, v in value.items()]}
    if isinstance(value, list):
        return {"list": [skeleton(v) for v in value]}
    return None


def rebuild(shape: Any, read: Callable[[str], Any], prefix: str = "") -> Any:
    """The state of ``shape`` with each leaf ``read(name)``."""
    if shape is None:
        return read(prefix)
    if not isinstance(shape, dict) or len(shape) != 1:
        raise ConversionError(f"{prefix or '<root>'}: malformed state skeleton")
    ((kind, children),) = shape.items()
    dot = f"{prefix}." if prefix else ""
    if kind == "dict":
        return {k: rebuild(child, read, f"{dot}{k}") for k, child in children}
    if kind == "list":
        return [rebuild(child, read, f"{dot}{i}") for i, child in enumerate(children)]
    raise ConversionError(f"{prefix or '<root>'}: unknown container {kind!r} in the skeleton")
