"""ckptstore as Lightning's CheckpointIO, with a real Trainer on CPU: checkpoints of a DDP
run on 2 processes are ckptstore checkpoints; a run resumes from the last one -- on 2
processes and on 1 -- with model, optimizer, scheduler and loop state as saved."""

from __future__ import annotations

import os

import pytest
import torch

import ckptstore as cs

lightning = pytest.importorskip("lightning", reason="a dev dependency (make test has it)")
from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from ckptstore.integrations.lightning import CkptStoreIO  # noqa: E402
from tests.lightning_cases import Regression  # noqa: E402


def _trainer(root: str, epochs: int, devices: int) -> Trainer:
    return Trainer(
        default_root_dir=root,
        max_epochs=epochs,
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        plugins=[CkptStoreIO()],
        callbacks=[
            ModelCheckpoint(
                dirpath=os.path.join(root, "ckpt"),
                save_last=True,
                save_top_k=2,
                monitor="step",
                mode="max",
            )
        ],
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
    )


def test_ddp_checkpoints_are_ckptstore_checkpoints_and_resume_on_2_and_1(tmp_path) -> None:
    root = str(tmp_path)
    model = Regression()
    _trainer(root, epochs=2, devices=2).fit(model)
    last = os.path.join(root, "ckpt", "last.ckpt")
    ckpt = cs.open(last)  # a ckptstore checkpoint
    assert ckpt.read("epoch") == 1 and ckpt.read("global_step") == 8
    assert "state_dict.net.0.weight" in ckpt and ckpt.read("hyper_parameters.width") == 12
    saved = ckpt.read("state_dict.net.0.weight")
    kept = sorted(n for n in os.listdir(os.path.join(root, "ckpt")) if n != "last.ckpt")
    assert len(kept) == 2  # save_top_k: the older ones were removed through the plugin

    loaded = CkptStoreIO().load_checkpoint(last)
    assert isinstance(loaded["optimizer_states"], list)
    assert loaded["optimizer_states"][0]["param_groups"][0]["params"] == [0, 1, 2, 3]
    assert torch.equal(loaded["state_dict"]["net.0.weight"], saved)

    # Resume the same run on 2 processes from "last", and from the epoch-2 checkpoint on 1
    # process (a different world size: 8 steps per epoch instead of 4).
    _trainer(root, epochs=3, devices=2).fit(Regression(), ckpt_path="last")
    after = cs.open(last)  # ddp_spawn trains in child processes: read what they saved
    assert (after.read("epoch"), after.read("global_step")) == (2, 12)
    first_run = os.path.join(root, "ckpt", "epoch=1-step=8.ckpt")
    one = _trainer(str(tmp_path / "again"), epochs=3, devices=1)
    one.fit(Regression(), ckpt_path=first_run)
    assert (one.current_epoch, one.global_step) == (3, 16)
