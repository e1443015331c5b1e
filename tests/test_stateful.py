"""Stateful objects anywhere in the state, as torch DCP accepts them (its tutorial's
``{"app": AppState(model, optimizer)}``): saved as their ``state_dict()``, handed the filled
dict back through ``load_state_dict()`` on load -- never pickled."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import ckptstore as cs
from tests.models import trained_mlp as _trained


class AppState:
    """The DCP tutorial's wrapper: model and optimizer behind one Stateful."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.loaded = 0

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        self.loaded += 1


def test_an_app_state_round_trips(tmp_path) -> None:
    model, optim = _trained(0)
    cs.save({"app": AppState(model, optim), "step": 7}, tmp_path / "ckpt")
    saved = cs.open(tmp_path / "ckpt")
    assert "app.model.0.weight" in saved and "app.optim.state.0.exp_avg" in saved

    other_model, other_optim = _trained(1)
    app = AppState(other_model, other_optim)
    state = {"app": app, "step": 0}
    cs.load(state, tmp_path / "ckpt")
    assert app.loaded == 1 and state["step"] == 7
    for a, b in zip(model.state_dict().values(), other_model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert other_optim.param_groups[0]["lr"] == optim.param_groups[0]["lr"]
    for p, q in zip(model.parameters(), other_model.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(optim.state[p][key], other_optim.state[q][key])


def test_a_module_and_an_optimizer_stand_for_their_state_dicts(tmp_path) -> None:
    model, optim = _trained(0)
    info = cs.save({"model": model, "optim": optim}, tmp_path / "ckpt")
    assert info.tensors > 0
    other_model, other_optim = _trained(1)
    cs.load({"model": other_model, "optim": other_optim}, tmp_path / "ckpt")
    assert torch.equal(model[0].weight, other_model[0].weight)
    assert other_optim.param_groups[0]["lr"] == optim.param_groups[0]["lr"]


def test_async_save_takes_the_state_dict_in_the_foreground(tmp_path) -> None:
    model, optim = _trained(0)
    handle = cs.async_save({"app": AppState(model, optim)}, tmp_path / "ckpt")
    handle.wait()
    other_model, other_optim = _trained(1)
    cs.load({"app": AppState(other_model, other_optim)}, tmp_path / "ckpt")
    assert torch.equal(model[2].bias, other_model[2].bias)
