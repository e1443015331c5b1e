"""A model trained under FSDP2 and saved with CheckpointManager, exported with ``ckpt export
--format hf`` and no other option, loads with transformers' ``from_pretrained`` and gives
the same logits -- for a Llama (``model.`` names) and a GPT-2 (``transformer.`` names)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ckptstore.cli.main import main as ckpt
from ckptstore.testing.ranks import run_ranks
from tests import hf_cases

transformers = pytest.importorskip("transformers", reason="a dev dependency (make test has it)")


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_from_pretrained_gives_the_trained_logits(tmp_path, kind: str, capsys) -> None:
    root, config = str(tmp_path / "run"), str(tmp_path / "config")
    logits = run_ranks(2, hf_cases.train_and_save, kind, root, config)[0]
    out = str(tmp_path / "hf")
    argv = ["export", f"{root}/step_00000001", out, "--format", "hf"]
    assert ckpt([*argv, "--config", f"{config}/config.json", "--max-shard-size", "60KB"]) == 0
    assert "config.json" in capsys.readouterr().out
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert len(set(index["weight_map"].values())) > 1  # sharded as HF shards
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        got = model(hf_cases.PROMPT).logits
    assert torch.allclose(got, torch.tensor(logits), atol=1e-5), (
        (got - torch.tensor(logits)).abs().max()
    )
