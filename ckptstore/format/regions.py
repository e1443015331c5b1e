"""Cutting a tensor into C-order contiguous regions of bounded size, for streaming.

Streaming tools (export, reshard, diff) read a tensor region by region so that memory stays
bounded whatever the tensor's size; each region is a run of the flattened tensor, so writing
the regions one after the other produces the tensor's C-order bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

Index = tuple[int | slice, ...]


def bounded_regions(shape: tuple[int, ...], itemsize: int, max_bytes: int) -> Iterator[Index]:
    """Indexes (ints and slices) of consecutive C-order runs of ``shape``, each at most
    ``max_bytes`` (or one element, whichever is larger), in order."""
    total = math.prod(shape) * itemsize
    if not shape or total <= max_bytes:
        yield tuple(slice(0, n) for n in shape)
        return
    row = math.prod(shape[1:]) * itemsize  # bytes of one index along dim 0
    if row <= max_bytes:
        rows = max(1, max_bytes // max(row, 1))
        for lo in range(0, shape[0], rows):
            yield (slice(lo, min(lo + rows, shape[0])), *(slice(0, n) for n in shape[1:]))
        return
    for i in range(shape[0]):
        for rest in bounded_regions(shape[1:], itemsize, max_bytes):
            yield (slice(i, i + 1), *rest)
