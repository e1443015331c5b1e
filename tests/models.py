"""Small models shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


def trained_mlp(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A small MLP and its AdamW after one step (the seed sets weights and learning rate)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3 * (seed + 1))
    model(torch.randn(5, 8)).sum().backward()
    optim.step()
    return model, optim
