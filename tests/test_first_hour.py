"""A newcomer's first hour with the library: the state shapes people already use
(torchtitan's containers, checkpoints without the manager's entries, the model alone for
evaluation) and load mismatches reported as one screen that says what to fix."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from torch import nn

import ckptstore as cs
from ckptstore.errors import LoadMismatchError
from ckptstore.testing.ranks import run_ranks
from tests import dist_cases
from tests.models import trained_mlp as _trained


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


# -- torchtitan's shapes ------------------------------------------------------------------------
class ModelWrapper:
    """torchtitan's ``ModelWrapper``: Stateful, not an nn.Module."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.model, state)


class OptimizersContainer(torch.optim.Optimizer):
    """torchtitan's ``OptimizersContainer``: an Optimizer *and* Stateful, with its own
    ``state_dict`` (flattened through its model)."""

    def __init__(self, model: nn.Module, optim: torch.optim.Optimizer) -> None:
        self.model, self.inner = model, optim
        super().__init__(model.parameters(), {"lr": optim.param_groups[0]["lr"]})

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(flatten_optimizer_state_dict=True)
        return get_optimizer_state_dict(self.model, self.inner, options=options)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(flatten_optimizer_state_dict=True)
        set_optimizer_state_dict(self.model, self.inner, state, options=options)


def test_torchtitan_shaped_state_round_trips_through_the_manager(tmp_path) -> None:
    model, optim = _trained(0)
    state = {"model": ModelWrapper(model), "optimizer": OptimizersContainer(model, optim)}
    with cs.CheckpointManager(tmp_path / "run", async_save=False) as mgr:
        mgr.save(5, state)
    saved = cs.open(tmp_path / "run" / "step_00000005")
    assert "model.0.weight" in saved
    assert any(n.startswith("optimizer.state.0.weight.exp_avg") for n in saved)

    other, other_optim = _trained(1)
    into = {"model": ModelWrapper(other), "optimizer": OptimizersContainer(other, other_optim)}
    assert cs.CheckpointManager(tmp_path / "run").restore(into) == 5
    assert _same_weights(model, other)
    for p, q in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(optim.state[p]["exp_avg"], other_optim.state[q]["exp_avg"])


# -- checkpoints without the manager's entries --------------------------------------------------
def test_restore_of_a_checkpoint_saved_without_the_manager(tmp_path, caplog) -> None:
    model, _ = _trained(0)
    cs.save({"model": model.state_dict(), "step": 3}, tmp_path / "run" / "step_00000003")
    other, _ = _trained(1)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="ckptstore"):
        step = cs.CheckpointManager(tmp_path / "run").restore({"model": other, "step": 0})
    assert step == 3
    assert _same_weights(model, other)
    assert torch.equal(torch.get_rng_state(), before)  # left as it is
    assert "RNG left as it is" in caplog.text


# -- the model alone, for evaluation ------------------------------------------------------------
def test_the_model_alone_from_a_manager_checkpoint(tmp_path) -> None:
    model, optim = _trained(0)
    with cs.CheckpointManager(tmp_path / "run", async_save=False) as mgr:
        mgr.save(9, {"model": model, "optim": optim})
    step_dir = tmp_path / "run" / "step_00000009"

    # One call through the manager ...
    evaluated, _ = _trained(1)
    assert cs.CheckpointManager(tmp_path / "run").restore({"model": evaluated}, partial=True) == 9
    assert _same_weights(model, evaluated)
    # ... or a sub-tree of the checkpoint, into a module or its state_dict.
    for into in (_trained(2)[0], _trained(3)[0].state_dict()):
        cs.load(into, step_dir, prefix="model")
        assert (
            _same_weights(model, into)
            if isinstance(into, nn.Module)
            else all(
                torch.equal(a, b)
                for a, b in zip(model.state_dict().values(), into.values(), strict=True)
            )
        )


def test_loading_a_sub_tree_still_fails_on_what_is_genuinely_missing(tmp_path) -> None:
    model, optim = _trained(0)
    cs.save({"model": model.state_dict(), "optim": optim.state_dict()}, tmp_path / "ckpt")
    bigger = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Linear(4, 2))
    with pytest.raises(LoadMismatchError) as info:
        cs.load(bigger, tmp_path / "ckpt", prefix="model")
    assert info.value.problems == [
        "model.3.weight: missing from the checkpoint",
        "model.3.bias: missing from the checkpoint",
    ]
    with pytest.raises(LoadMismatchError):  # partial: the same, through the manager's option
        cs.load({"model": bigger.state_dict()}, tmp_path / "ckpt", partial=True)
    with pytest.raises(LoadMismatchError) as info:  # strict inside the sub-tree
        cs.load({"0.weight": torch.zeros(16, 8)}, tmp_path / "ckpt", prefix="model")
    assert "model.2.bias: in the checkpoint but not in the state_dict" in info.value.problems
    with pytest.raises(ValueError, match="prefix"):
        cs.load(model, tmp_path / "ckpt", prefix=".model")


def test_optional_entries_are_left_as_they_are(tmp_path) -> None:
    cs.save({"w": torch.ones(3)}, tmp_path / "ckpt")
    state = {"w": torch.zeros(3), "extra": {"new": torch.full((2,), 7.0)}}
    info = cs.load(state, tmp_path / "ckpt", optional=["extra"])
    assert torch.equal(state["w"], torch.ones(3)) and torch.equal(
        state["extra"]["new"], torch.full((2,), 7.0)
    )
    assert info.missing == ["extra.new"]


# -- mismatches: one screen that says what to fix -----------------------------------------------
def test_a_renamed_sub_tree_is_summarized_with_a_did_you_mean(tmp_path) -> None:
    model, optim = _trained(0)
    cs.save({"model": model, "optim": optim, "step": 1}, tmp_path / "ckpt")
    wrong = {"model": _trained(1)[0], "optimizer": _trained(1)[1], "step": 0}
    with pytest.raises(LoadMismatchError) as info:
        cs.load(wrong, tmp_path / "ckpt")
    message = str(info.value)
    saved_optim = [n for n in cs.open(tmp_path / "ckpt") if n.startswith("optim.")]
    assert len(info.value.problems) == 2 * len(saved_optim)  # every one kept
    assert len(message.splitlines()) <= 12, message
    assert f"{len(saved_optim)} missing from the checkpoint" in message
    assert "top-level keys: model, optim, step" in message
    assert "did you mean 'optim' for 'optimizer'" in message


def test_a_mismatch_is_listed_by_rank_0_only(tmp_path) -> None:
    messages = run_ranks(2, dist_cases.mismatch_messages, str(tmp_path))
    assert messages[0].startswith("LoadMismatchError: 2 problem(s)")
    assert "did you mean 'optim' for 'optimizer'" in messages[0]
    assert messages[1].startswith("LoadMismatchError: 2 problem(s)")
    assert "the same as on rank 0" in messages[1] and "\n" not in messages[1]


def test_reading_an_unknown_name_suggests_the_near_ones(tmp_path) -> None:
    model, optim = _trained(0)
    cs.save({"model": model, "optim": optim}, tmp_path / "ckpt")
    ckpt = cs.open(tmp_path / "ckpt")
    with pytest.raises(cs.errors.EntryNotFoundError) as info:
        ckpt.read("model.0.weigth")
    assert "did you mean 'model.0.weight'" in str(info.value)
    assert isinstance(info.value, KeyError)  # what a dict-like read raised before
    with pytest.raises(
        cs.errors.EntryNotFoundError, match=r"did you mean 'optim\.state\.0\.exp_avg'"
    ):
        ckpt.read("optimizer.state.0.exp_avg")
