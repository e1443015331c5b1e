"""How a saved tensor is cut into chunks: the geometry the on-disk format records.

A tensor's chunks form a rectilinear grid (:class:`GridLayout`, what ``torch.chunk`` and so
DTensor ``Shard`` placements produce) or a list of boxes (:class:`BoxLayout`); a tensor
stored whole is the one-cell grid of :func:`whole_layout`. :func:`overlaps` intersects a
wanted region with the chunks of one tensor. Pure functions on plain numbers: the format
(``manifest``), the save planner and the read planner all build on this module, and it on
nothing of theirs.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass

import numpy as np

Box = tuple[tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class GridLayout:
    """Chunks on a rectilinear grid: ``starts[d]`` are the chunk starts along dim d."""

    starts: tuple[tuple[int, ...], ...]

    def chunk_count(self) -> int:
        n = 1
        for s in self.starts:
            n *= len(s)
        return n


@dataclass(frozen=True, slots=True)
class BoxLayout:
    """Chunks that do not form a grid: one (offsets, shape) row per chunk."""

    offsets: np.ndarray
    shapes: np.ndarray

    def chunk_count(self) -> int:
        return len(self.offsets)


Layout = GridLayout | BoxLayout

_WHOLE: dict[int, GridLayout] = {}


def grid_cell_elements(starts: tuple[tuple[int, ...], ...], shape: tuple[int, ...]) -> np.ndarray:
    """Elements of each cell of a grid (``starts`` per dim of ``shape``), in C order of cells."""
    elements = np.ones(1, dtype=np.int64)
    for s, dim in zip(starts, shape, strict=True):
        elements = np.outer(elements, np.diff(np.array((*s, dim), dtype=np.int64))).ravel()
    return elements


def whole_layout(ndim: int) -> GridLayout:
    """The layout of a tensor stored as one chunk (shared instances: there are many)."""
    layout = _WHOLE.get(ndim)
    if layout is None:
        layout = _WHOLE[ndim] = GridLayout(tuple((0,) for _ in range(ndim)))
    return layout


def _row_overlaps(
    starts: tuple[int, ...], shape: tuple[int, ...], box: Box
) -> list[tuple[int, Box, Box]]:
    """:func:`overlaps` for a grid cut along dim 0 only: chunk i is rows starts[i]..."""
    offs, shp = box
    lo, hi = offs[0], offs[0] + shp[0]
    rest_zero, rest_shape = (0,) * (len(shape) - 1), shape[1:]
    rest_offs, rest_shp = offs[1:], shp[1:]
    out = []
    for i in range(max(bisect.bisect_right(starts, lo) - 1, 0), bisect.bisect_left(starts, hi)):
        c_lo = starts[i]
        c_hi = starts[i + 1] if i + 1 < len(starts) else shape[0]
        i_lo, i_hi = max(lo, c_lo), min(hi, c_hi)
        out.append(
            (
                i,
                ((c_lo, *rest_zero), (c_hi - c_lo, *rest_shape)),
                ((i_lo, *rest_offs), (i_hi - i_lo, *rest_shp)),
            )
        )
    return out


def overlaps(layout: Layout, shape: tuple[int, ...], box: Box) -> list[tuple[int, Box, Box]]:
    """Saved chunks that intersect ``box``: (chunk index in the tensor, chunk box, intersection)."""
    offs, shp = box
    nd = len(shape)
    if 0 in shp or 0 in shape:
        return []
    if isinstance(layout, GridLayout):
        if all(len(st) == 1 for st in layout.starts):  # one chunk: the whole tensor
            return [(0, ((0,) * nd, shape), box)]
        if all(len(st) == 1 for st in layout.starts[1:]):  # rows only (FSDP's Shard(0))
            return _row_overlaps(layout.starts[0], shape, box)
        per_dim: list[list[tuple[int, int, int, int, int]]] = []
        for d in range(nd):
            starts = layout.starts[d]
            lo, hi = offs[d], offs[d] + shp[d]
            first = bisect.bisect_right(starts, lo) - 1
            last = bisect.bisect_left(starts, hi)
            cells = []
            for i in range(max(first, 0), last):
                c_lo = starts[i]
                c_hi = starts[i + 1] if i + 1 < len(starts) else shape[d]
                cells.append((i, c_lo, c_hi, max(lo, c_lo), min(hi, c_hi)))
            per_dim.append(cells)
        result = []
        sizes = [len(s) for s in layout.starts]
        for combo in itertools.product(*per_dim):
            index = 0
            for c, n in zip(combo, sizes, strict=True):
                index = index * n + c[0]
            result.append(
                (
                    index,
                    (tuple(c[1] for c in combo), tuple(c[2] - c[1] for c in combo)),
                    (tuple(c[3] for c in combo), tuple(c[4] - c[3] for c in combo)),
                )
            )
        return result
    lo = np.asarray(offs, dtype=np.int64)
    hi = lo + np.asarray(shp, dtype=np.int64)
    c_lo = layout.offsets
    c_hi = layout.offsets + layout.shapes
    i_lo = np.maximum(c_lo, lo)
    i_hi = np.minimum(c_hi, hi)
    hit = np.all(i_lo < i_hi, axis=1) if nd else np.ones(len(c_lo), dtype=bool)
    return [
        (
            int(i),
            (tuple(int(x) for x in c_lo[i]), tuple(int(x) for x in layout.shapes[i])),
            (tuple(int(x) for x in i_lo[i]), tuple(int(x) for x in i_hi[i] - i_lo[i])),
        )
        for i in np.flatnonzero(hit)
    ]
