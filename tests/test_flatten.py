"""Flattening: a dict of many tensors (a model's state_dict) is taken in column passes; the
leaves must be exactly those of the entry-by-entry walk, clashes and bad keys included."""

from __future__ import annotations

import pytest
import torch

from ckptstore.errors import StateDictError
from ckptstore.state import leaves as leaves_module
from ckptstore.state.leaves import flatten


def _walked_one_by_one(state: dict, monkeypatch: pytest.MonkeyPatch) -> dict:
    with monkeypatch.context() as m:
        m.setattr(leaves_module, "_BULK_MIN", 1 << 30)  # every dict entry by entry
        return flatten(state)


def _fields(leaves: dict) -> list[tuple]:
    """Every field of every leaf, tensors by identity (the container by identity too)."""
    return [
        (name, leaf.name, leaf.kind, id(leaf.value), leaf.global_shape, leaf.box, id(leaf.container), leaf.key, leaf.dtype)
        for name, leaf in leaves.items()
    ]  # fmt: skip


def test_a_dict_of_many_tensors_flattens_as_entry_by_entry(monkeypatch) -> None:
    g = torch.Generator().manual_seed(3)
    shapes = [(), (0,), (5,), (2, 3), (1, 1, 4), (3, 0, 2)] * 4
    dtypes = [torch.float32, torch.bfloat16, torch.int64, torch.bool]
    model = {
        f"layers.{i}.w": torch.rand(s, generator=g).to(dtypes[i % len(dtypes)])
        for i, s in enumerate(shapes)
    }
    state = {"model": model, "step": 7, "small": {"a": torch.zeros(2), "b": 1}, "top": model}
    bulk = flatten(state)
    assert _fields(bulk) == _fields(_walked_one_by_one(state, monkeypatch))
    assert [n for n in bulk if n.startswith("model.")] == [f"model.{k}" for k in model]
    # a root-level dict of tensors, and one with an empty key below a prefix
    assert _fields(flatten(model)) == _fields(_walked_one_by_one(model, monkeypatch))
    under = {"p": {"": torch.ones(1), **{str(i): torch.ones(i) for i in range(9)}}}
    assert _fields(flatten(under)) == _fields(_walked_one_by_one(under, monkeypatch))


def test_clashes_and_mixed_dicts_in_the_column_path(monkeypatch) -> None:
    many = {f"{i}": torch.zeros(1) for i in range(20)}
    with pytest.raises(StateDictError, match=r"'a\.7'"):
        flatten({"a.7": torch.zeros(1), "a": many})
    mixed = {**many, "n": 3, "obj": [torch.ones(2)]}  # not all tensors: entry by entry
    assert _fields(flatten({"m": mixed})) == _fields(_walked_one_by_one({"m": mixed}, monkeypatch))
    with pytest.raises(StateDictError, match="not a str or int"):
        flatten({"m": {**many, (1, 2): torch.zeros(1)}})
    with pytest.raises(StateDictError, match="must be a dict"):
        flatten({"": torch.zeros(1), **many})  # an empty name at the root


def test_flatten_columns_holds_the_same_leaves_and_refuses_the_same_clashes() -> None:
    from ckptstore.state.leaves import flatten_columns

    many = {f"{i}": torch.full((i % 3 + 1,), float(i)) for i in range(20)}
    state = {"model": many, "step": 7, "small": {"a": torch.zeros(2), "b": 1}, "opt": [many]}
    flat = flatten_columns(state)
    assert len(flat.blocks) == 2 and set(flat.leaves) == {"step", "small.a", "small.b"}
    held = dict(flat.leaves)
    for block in flat.blocks:
        held.update(block.leaves())
    assert sorted(_fields(held)) == sorted(_fields(flatten(state)))
    assert len(flat) == len(held) and sorted(flat.names()) == sorted(held)
    assert flat.locate()["opt.0.5"] == (many, "5") and flat.blocks[0].leaf(3) == held["model.3"]
    for clash in ({"a.7": torch.zeros(1), "a": many}, {"a": many, "a.7": torch.zeros(1)}):
        with pytest.raises(StateDictError, match=r"'a\.7'"):
            flatten_columns(clash)
    with pytest.raises(StateDictError, match=r"'a\.7'"):
        flatten_columns({"a": many, "b": {"a": {"7": torch.zeros(1)}}} | {"a.7": 1})
    twice = {"x": many, "x.0": {"1": torch.zeros(1)}}  # no clash: x.0.1 is not x.0
    assert len(flatten_columns(twice)) == 21
