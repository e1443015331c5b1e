"""The tensor table's grid rows are parsed in bulk (``ckptstore.format.grids``): whatever a
row holds, the bulk parse and the row-by-row parse agree -- the same records, or both a
``ManifestError``. A hostile row among thousands of identical ones is not let through by
the cache of validated (shape, grid) pairs."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptstore.errors import ManifestError
from ckptstore.format import grids as manifest_grids
from ckptstore.format.layouts import GridLayout, whole_layout
from ckptstore.format.manifest import ChunkTable, Manifest, TensorRecord, encode_manifest

GRIDS = {  # shape -> grid starts (FSDP's torch.chunk shards, uneven ones, a 2-D grid)
    (10,): ((0, 3, 6, 9),),
    (1024,): ((0, 342, 684),),
    (6, 4): ((0, 2, 4), (0, 2)),
}


def _manifest(rows: int = 60) -> Manifest:
    shapes = list(GRIDS)
    tensors: dict[str, TensorRecord] = {}
    sizes: list[int] = []
    for i in range(rows):
        shape = shapes[i % len(shapes)]
        grid = GRIDS[shape]
        tensors[f"layers.{i}.norm"] = TensorRecord("float32", shape, len(sizes), GridLayout(grid))
        cells = [1]
        for starts, dim in zip(grid, shape, strict=True):
            steps = np.diff([*starts, dim]).tolist()
            cells = [a * b for a in cells for b in steps]
        sizes += [4 * c for c in cells]
    tensors["step"] = TensorRecord("int64", (), len(sizes), whole_layout(0))
    sizes.append(8)
    nbytes = np.array(sizes, dtype=np.int64)
    offset = np.concatenate([[0], np.cumsum(nbytes)[:-1]]).astype(np.int64)
    chunks = ChunkTable(
        np.zeros(len(sizes), np.int64), offset, nbytes, np.zeros(len(sizes), np.uint32), 1 << 22
    )
    return Manifest(1, ["data/00000-a-0.bin"], chunks, tensors, {}, {})


def _parse_both(data: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    """(bulk result, row-by-row result); each a Manifest or the ManifestError raised."""

    def parse() -> Any:
        try:
            return Manifest.from_json(data)
        except ManifestError as exc:
            return exc

    bulk = parse()
    with monkeypatch.context() as m:
        m.setattr(
            "ckptstore.format.manifest.split_grid_rows",
            lambda doc, *_: (manifest_grids.GridRows.empty(), doc),
        )
        rows = parse()
    return bulk, rows


def _same(bulk: Any, rows: Any) -> None:
    if isinstance(rows, ManifestError):
        assert isinstance(bulk, ManifestError), f"the bulk parse accepted what rows refuse: {rows}"
        return
    assert not isinstance(bulk, ManifestError), f"the bulk parse refused a valid table: {bulk}"
    assert bulk.tensors == rows.tensors
    for column in ("file", "offset", "nbytes", "crc32c"):
        assert np.array_equal(getattr(bulk.chunks, column), getattr(rows.chunks, column))


def test_bulk_parse_equals_row_by_row(monkeypatch: pytest.MonkeyPatch) -> None:
    original = _manifest()
    bulk, rows = _parse_both(original.to_json(), monkeypatch)
    _same(bulk, rows)
    assert bulk.tensors == original.tensors
    assert np.array_equal(bulk.chunks.nbytes, original.chunks.nbytes)
    # Rows of one (shape, grid) share one validated layout.
    layouts = {id(t.layout) for t in bulk.tensors.values() if t.shape == (10,)}
    assert len(layouts) == 1


def _doc() -> dict[str, Any]:
    return json.loads(_manifest().to_json())


def _signed(doc: dict[str, Any]) -> bytes:
    doc = dict(doc)
    doc.pop("checksum", None)
    return encode_manifest(doc)


HOSTILE_ROWS = {
    "a float start": {"grid": [[0, 3.0, 6, 9]]},
    "a bool start": {"grid": [[False, 3, 6, 9]]},
    "not increasing": {"grid": [[0, 6, 3, 9]]},
    "a start past the end": {"grid": [[0, 3, 6, 10]]},
    "not from 0": {"grid": [[1, 3, 6, 9]]},
    "too many dims": {"grid": [[0, 3, 6, 9], [0]]},
    "an extra key": {"grid": [[0, 3, 6, 9]], "codex": "zstd"},
    "a string": {"grid": "[[0, 3, 6, 9]]"},
    "nested too deep": {"grid": [[[0], 3, 6, 9]]},
}


@pytest.mark.parametrize("what", sorted(HOSTILE_ROWS))
def test_one_hostile_row_among_identical_ones(what: str, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = _doc()
    doc["tensors"]["layouts"]["30"] = HOSTILE_ROWS[what]  # row 30 has shape (10,)
    bulk, rows = _parse_both(_signed(doc), monkeypatch)
    assert isinstance(bulk, ManifestError), what
    _same(bulk, rows)


@pytest.mark.parametrize("key", ["030", "+30", " 30", "-0", "1e1", "99999", "30.0"])
def test_non_canonical_row_numbers_are_refused(key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = _doc()
    layouts = doc["tensors"]["layouts"]
    layouts[key] = layouts.pop("30")
    bulk, rows = _parse_both(_signed(doc), monkeypatch)
    assert isinstance(bulk, ManifestError), key
    _same(bulk, rows)


def test_a_tensor_without_elements_keeps_the_row_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    doc = _doc()
    doc["tensors"]["shapes"][30] = [0]
    doc["tensors"]["layouts"]["30"] = {"grid": [[]]}
    _same(*_parse_both(_signed(doc), monkeypatch))


_LEAVES = st.one_of(
    st.integers(-2, 12), st.booleans(), st.floats(-1, 12), st.none(), st.text(max_size=3)
)
_ROWS = st.one_of(
    st.fixed_dictionaries({"grid": st.recursive(_LEAVES, st.lists, max_leaves=8)}),
    st.dictionaries(st.sampled_from(["grid", "boxes", "codec", "x"]), _LEAVES, max_size=2),
    _LEAVES,
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(row=st.integers(0, 59), value=_ROWS, repeat=st.booleans())
def test_any_row_value_parses_alike(
    row: int, value: Any, repeat: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = _doc()
    rows = [row, (row + 3) % 60] if repeat else [row]  # the same value twice hits the cache
    for r in rows:
        doc["tensors"]["layouts"][str(r)] = value
    _same(*_parse_both(_signed(doc), monkeypatch))
