"""The grid rows of the manifest's tensor table, parsed in bulk.

FSDP2 shards every parameter -- a model's thousands of norms and biases included -- so a
training checkpoint's tensor table holds tens of thousands of ``{"grid": [[0, 256, ...]]}``
layout rows, and most of them repeat a handful of (shape, grid) pairs. Each distinct pair is
validated once (:func:`~ckptstore.format.rules.check_grid`) and shares one
:class:`~ckptstore.format.layouts.GridLayout`; the types of every row are checked in one C-level pass
first, so that a cached result is only reused for a row that is the same list of exact
integers. Rows with anything else (boxes, a codec, a tensor without elements, a malformed
value) are left to the per-row parser, which names the row and the rule it breaks.
"""

from __future__ import annotations

import base64
from itertools import chain
from operator import itemgetter
from typing import Any, NamedTuple

import numpy as np

from ckptstore.errors import ManifestError
from ckptstore.format import rules
from ckptstore.format.layouts import GridLayout, grid_cell_elements

GridKey = tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]  # (shape, grid starts)


class GridShape(NamedTuple):
    """One validated (shape, grid) pair: its layout and each chunk's element count."""

    layout: GridLayout
    elements: np.ndarray  # int64, one per chunk in C order of grid cells


class GridRows(NamedTuple):
    """The tensor-table rows parsed here, as columns."""

    rows: np.ndarray  # int64 row index in the tensor table
    count: np.ndarray  # int64 chunks per row
    layouts: list[GridLayout]
    groups: list[tuple[np.ndarray, np.ndarray]]  # (positions into ``rows``, elements per chunk)

    @classmethod
    def empty(cls) -> GridRows:
        none = np.zeros(0, dtype=np.int64)
        return cls(none, none, [], [])

    def merged(self, other: GridRows) -> GridRows:
        """These rows and ``other``'s (rows of a table appear in one of them only)."""
        if not len(other.rows):
            return self
        if not len(self.rows):
            return other
        shift = len(self.rows)
        return GridRows(
            np.concatenate([self.rows, other.rows]),
            np.concatenate([self.count, other.count]),
            self.layouts + other.layouts,
            self.groups + [(pos + shift, elements) for pos, elements in other.groups],
        )


def column_grid_rows(
    grids_doc: Any,
    grid_of_doc: Any,
    names: list[str],
    shapes: list[tuple[int, ...]],
    empty: np.ndarray,
    where: str,
) -> GridRows:
    """Parse the grid column of a format-3 tensor table: ``grids`` lists each distinct grid
    once, ``grid_of`` (packed ``<i4``, one per row) names a row's grid or is -1. Rows are
    grouped by (shape, grid) with array operations; each distinct pair is validated once."""
    if not isinstance(grids_doc, list) or type(grid_of_doc) is not str:
        raise ManifestError(
            f"{where}: tensor table: grids must be a list and grid_of packed integers"
        )
    try:
        grid_of = np.frombuffer(base64.b64decode(grid_of_doc.encode("ascii"), validate=True), "<i4")
    except (ValueError, UnicodeError) as exc:
        raise ManifestError(f"{where}: tensor table: grid_of is not base64") from exc
    n = len(names)
    if len(grid_of) != n:
        raise ManifestError(
            f"{where}: tensor table: grid_of has {len(grid_of)} entries for {n} tensors"
        )
    if n and (grid_of.min() < -1 or grid_of.max() >= len(grids_doc)):
        bad = int(np.flatnonzero((grid_of < -1) | (grid_of >= len(grids_doc)))[0])
        raise ManifestError(
            f"{where}: tensor {names[bad]!r}: grid_of {int(grid_of[bad])} is not one of the "
            f"{len(grids_doc)} grids"
        )
    rows = np.flatnonzero(grid_of >= 0)
    if not len(rows):
        return GridRows.empty()
    if empty[rows].any():
        bad = int(rows[np.flatnonzero(empty[rows])[0]])
        raise ManifestError(f"{where}: tensor {names[bad]!r} has no elements, so no grid (grid_of)")
    row_list = rows.tolist()
    row_shapes = list(map(shapes.__getitem__, row_list))
    shape_id = {s: i for i, s in enumerate(dict.fromkeys(row_shapes))}
    ids = np.fromiter(map(shape_id.__getitem__, row_shapes), np.int64, len(row_list))
    gids = grid_of[rows].astype(np.int64)
    pairs, first, inverse = np.unique(
        ids * len(grids_doc) + gids, return_index=True, return_inverse=True
    )
    validated: list[GridShape] = []
    for pos in first.tolist():
        i = row_list[pos]
        validated.append(_validate_row(shapes[i], names[i], grids_doc[int(gids[pos])], where))
    order = np.argsort(inverse, kind="stable")
    bounds = np.searchsorted(inverse[order], np.arange(len(pairs) + 1))
    groups = [
        (order[lo:hi], v.elements)
        for lo, hi, v in zip(bounds[:-1].tolist(), bounds[1:].tolist(), validated, strict=True)
    ]
    per_pair = [v.layout for v in validated]
    layouts = list(map(per_pair.__getitem__, inverse.tolist()))
    count = np.array([len(v.elements) for v in validated], dtype=np.int64)[inverse]
    return GridRows(rows.astype(np.int64), count, layouts, groups)


def split_grid_rows(
    special_doc: dict[str, Any],
    names: list[str],
    shapes: list[tuple[int, ...]],
    empty: np.ndarray,
    where: str,
) -> tuple[GridRows, dict[str, Any]]:
    """Parse the layout rows that are a bare grid of exact integers; return them and the
    other rows (for the per-row parser). ``special_doc`` maps row index strings to layout
    records; ``empty[i]`` says row i has no elements (no chunks: the per-row rules apply)."""
    picked, grids, rest = _bare_grids(special_doc, len(names), empty)
    if not picked or not _exact_int_lists(grids):
        return GridRows.empty(), special_doc
    keys: list[GridKey] = [
        (shapes[i], tuple(map(tuple, g))) for i, g in zip(picked, grids, strict=True)
    ]
    by_key: dict[GridKey, list[int]] = {}
    for pos, key in enumerate(keys):
        by_key.setdefault(key, []).append(pos)
    validated = {
        key: _validate(key, names[picked[pos[0]]], grids[pos[0]], where)
        for key, pos in by_key.items()
    }
    shapes_of = list(map(validated.__getitem__, keys))
    count = np.fromiter((len(s.elements) for s in shapes_of), np.int64, len(shapes_of))
    groups = [
        (np.array(pos, dtype=np.int64), validated[key].elements) for key, pos in by_key.items()
    ]
    layouts = [s.layout for s in shapes_of]
    return GridRows(np.array(picked, dtype=np.int64), count, layouts, groups), rest


def _bare_grids(
    special_doc: dict[str, Any], n: int, empty: np.ndarray
) -> tuple[list[int], list[Any], dict[str, Any]]:
    """The rows whose layout record is ``{"grid": ...}`` alone, under a canonical row number
    of a tensor with elements: (rows, their grids, every other entry). The usual table --
    all of them -- is recognized in C-level passes; a mixed one row by row."""
    keys, records = list(special_doc), list(special_doc.values())
    try:
        rows = list(map(int, keys))
    except ValueError:
        rows = []
    if (
        rows
        and list(map(str, rows)) == keys
        and min(rows) >= 0
        and max(rows) < n
        and set(map(type, records)) == {dict}
        and set(map(len, records)) == {1}
    ):
        try:
            grids = list(map(_GRID_OF, records))
        except KeyError:
            pass
        else:
            if not empty[rows].any():
                return rows, grids, {}
    rows, grids, rest = [], [], {}
    for key, extra in special_doc.items():
        i = int(key) if key.isdigit() and len(key) < 12 else -1
        if (
            0 <= i < n
            and key == str(i)
            and type(extra) is dict
            and len(extra) == 1
            and "grid" in extra
            and not empty[i]
        ):
            rows.append(i)
            grids.append(extra["grid"])
        else:
            rest[key] = extra
    return rows, grids, rest


_GRID_OF = itemgetter("grid")


def _exact_int_lists(grids: list[Any]) -> bool:
    """Every grid is a list of lists of ints (not bools, not floats): one C-level pass."""
    if not all(map(list.__instancecheck__, grids)):
        return False
    dims = list(chain.from_iterable(grids))
    if not all(map(list.__instancecheck__, dims)):
        return False
    return set(map(type, chain.from_iterable(dims))) <= {int}


def _validate(key: GridKey, name: str, grid: Any, where: str) -> GridShape:
    """Check one distinct (shape, grid) pair of a tensor with elements."""
    return _validate_row(key[0], name, grid, where)


def _validate_row(shape: tuple[int, ...], name: str, grid: Any, where: str) -> GridShape:
    starts = rules.check_grid(where, name, grid, shape)
    return GridShape(GridLayout(starts), grid_cell_elements(starts, shape))


def fill_raw_nbytes(
    grid: GridRows, start_col: np.ndarray, itemsizes: np.ndarray, nbytes: np.ndarray
) -> None:
    """Write each grid row's chunk sizes into ``nbytes`` (rows whose chunks lie outside the
    table are skipped here: the range check refuses them)."""
    count = len(nbytes)
    for pos, elements in grid.groups:
        rows = grid.rows[pos]
        first = start_col[rows]
        inside = (first >= 0) & (first + len(elements) <= count)
        first, rows = first[inside], rows[inside]
        index = first[:, None] + np.arange(len(elements), dtype=np.int64)
        nbytes[index] = itemsizes[rows][:, None] * elements
