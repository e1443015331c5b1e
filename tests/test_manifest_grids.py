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


def _manifest(rows: int = 60, version: int = 2) -> Manifest:
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
    return Manifest(1, ["data/00000-a-0.bin"], chunks, tensors, {}, {}, format_version=version)


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


def _doc(version: int = 2) -> dict[str, Any]:
    """A format-2 table (a layout row per grid tensor) or a format-3 one (the grid column)."""
    return json.loads(_manifest(version=version).to_json())


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


# -- the grid column of format 3 -------------------------------------------------------------
def test_the_grid_column_parses_to_the_same_records_as_layout_rows() -> None:
    v2, v3 = _manifest(version=2), _manifest(version=3)
    doc = json.loads(v3.to_json())
    assert "layouts" not in doc["tensors"] or not doc["tensors"]["layouts"]
    assert len(doc["tensors"]["grids"]) == len(GRIDS)  # each distinct grid once
    parsed2, parsed3 = Manifest.from_json(v2.to_json()), Manifest.from_json(v3.to_json())
    assert parsed3.tensors == parsed2.tensors == v3.tensors
    assert np.array_equal(parsed3.chunks.nbytes, v3.chunks.nbytes)
    layouts = {id(t.layout) for t in parsed3.tensors.values() if t.shape == (10,)}
    assert len(layouts) == 1


def _column_doc() -> dict[str, Any]:
    return json.loads(_manifest(version=3).to_json())


def _grid_of(doc: dict[str, Any]) -> np.ndarray:
    import base64

    return np.frombuffer(base64.b64decode(doc["tensors"]["grid_of"]), "<i4").copy()


def _set_grid_of(doc: dict[str, Any], values: np.ndarray) -> None:
    import base64

    doc["tensors"]["grid_of"] = base64.b64encode(values.astype("<i4").tobytes()).decode()


def _refused(doc: dict[str, Any], *words: str) -> None:
    with pytest.raises(ManifestError) as info:
        Manifest.from_json(_signed(doc))
    for word in words:
        assert word in str(info.value), str(info.value)


@pytest.mark.parametrize("what", sorted(set(HOSTILE_ROWS) - {"an extra key", "a string"}))
def test_a_hostile_grid_in_the_column_is_refused_naming_a_tensor(what: str) -> None:
    doc = _column_doc()
    # Give row 30 (shape (10,)) a grid of its own: the hostile value.
    doc["tensors"]["grids"].append(HOSTILE_ROWS[what]["grid"])
    grid_of = _grid_of(doc)
    grid_of[30] = len(doc["tensors"]["grids"]) - 1
    _set_grid_of(doc, grid_of)
    _refused(doc, "layers.30.norm")


def test_a_grid_of_another_shape_is_refused() -> None:
    doc = _column_doc()
    grid_of = _grid_of(doc)
    grid_of[30] = grid_of[31]  # row 31 has shape (1024,): its grid does not fit (10,)
    _set_grid_of(doc, grid_of)
    _refused(doc, "layers.30.norm")


@pytest.mark.parametrize("value", [-2, 3, 2**31 - 1])
def test_a_grid_index_outside_the_list_is_refused(value: int) -> None:
    doc = _column_doc()
    grid_of = _grid_of(doc)
    grid_of[7] = value
    _set_grid_of(doc, grid_of)
    _refused(doc, "layers.7.norm", "grid_of")


def test_malformed_grid_columns_are_refused() -> None:
    doc = _column_doc()
    _set_grid_of(doc, _grid_of(doc)[:-1])
    _refused(doc, "grid_of has 60 entries for 61 tensors")
    doc = _column_doc()
    del doc["tensors"]["grids"]
    _refused(doc, "grids and grid_of go together")
    doc = _column_doc()
    doc["tensors"]["grid_of"] = "not base64!"
    _refused(doc, "grid_of")
    doc = _column_doc()
    doc["tensors"]["grids"] = {"0": [[0]]}
    _refused(doc, "grids must be a list")


def test_a_row_with_a_grid_index_and_a_layout_row_is_refused() -> None:
    doc = _column_doc()
    doc["tensors"]["layouts"] = {"30": {"grid": [[0, 3, 6, 9]]}}
    _refused(doc, "layers.30.norm", "grid_of and a layout row")
    doc = _column_doc()
    doc["tensors"]["layouts"] = {"30": {"codec": "zstd"}}
    _refused(doc, "layers.30.norm", "grid_of and a layout row")


def test_a_tensor_without_elements_has_no_grid_index() -> None:
    doc = _column_doc()
    doc["tensors"]["shapes"][30] = [0]
    _refused(doc, "layers.30.norm", "no elements")


def test_a_format_2_manifest_is_written_without_the_grid_column() -> None:
    """A manifest read from a format-2 checkpoint keeps its version when written again
    (a copy of an old checkpoint stays readable by the readers that read it)."""
    doc = _doc(version=2)
    assert doc["format_version"] == 2
    assert "grid_of" not in doc["tensors"] and len(doc["tensors"]["layouts"]) == 60
