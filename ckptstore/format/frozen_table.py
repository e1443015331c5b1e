"""A tensor table that cannot change, so that what is derived from it can be kept with it.

Saves of one structure (every checkpoint of a training job) have the same tensor table: the
coordinator builds it once per cached plan, and its JSON -- tens of thousands of names,
shapes and chunk numbers -- is encoded once and reused by every manifest of that structure.
Kept results cannot go stale: the table refuses every change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")


class FrozenTensorTable(dict):
    """A ``dict`` of tensor records (name -> record) that refuses changes; ``derived`` holds
    what was computed from it (e.g. its encoded JSON), by the caller's key."""

    __slots__ = ("derived",)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.derived: dict[Any, Any] = {}

    def _refuse(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("a frozen tensor table cannot change (copy it with dict(table))")

    __setitem__ = __delitem__ = __ior__ = _refuse  # type: ignore[assignment]
    update = pop = popitem = clear = setdefault = _refuse  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, tuple[dict]]:
        return FrozenTensorTable, (dict(self),)


def derived(table: Mapping[str, Any], key: Any, compute: Callable[[], T]) -> T:
    """``compute()`` for ``table``: kept with a frozen table under ``key`` (computed once),
    computed afresh for any other mapping (which may change)."""
    if not isinstance(table, FrozenTensorTable):
        return compute()
    if key not in table.derived:
        table.derived[key] = compute()
    return table.derived[key]
