"""CheckpointManager: cadence, retention, resume (also resharded), RNG, ckpt ls."""

from __future__ import annotations

import json
import os
import random
import threading

import numpy as np
import pytest
import torch

import ckptstore as cs
from ckptstore.cli.main import main as ckpt_main
from ckptstore.testing.ranks import run_ranks
from tests import dist_cases


def _model_and_optim(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _step(model, optim) -> None:
    model(torch.randn(4, 8)).sum().backward()
    optim.step()
    optim.zero_grad()


def test_cadence_retention_and_listing(tmp_path, capsys) -> None:
    model, optim = _model_and_optim()
    state = {"model": model, "optim": optim, "epoch": 1}
    with cs.CheckpointManager(
        str(tmp_path), every_n_steps=3, keep=cs.KeepAny((cs.KeepLast(2), cs.KeepEvery(6)))
    ) as mgr:
        saved = [
            s for s in range(1, 16) if (_step(model, optim) or True) and mgr.maybe_save(s, state)
        ]
    assert saved == [3, 6, 9, 12, 15]
    assert mgr.steps() == [6, 12, 15] and mgr.latest_step() == 15
    assert len(mgr.history) == 5 and all(h["stall_s"] >= 0 for h in mgr.history)
    (tmp_path / "step_00000099" / "data").mkdir(parents=True)
    (tmp_path / "step_00000099" / "data" / "00000-x-0.bin").write_bytes(b"partial")
    assert mgr.steps() == [6, 12, 15], "an incomplete checkpoint is invisible"
    assert ckpt_main(["ls", str(tmp_path), "--json"]) == 0
    listed = {e["step"]: e["state"] for e in json.loads(capsys.readouterr().out)}
    assert listed == {6: "committed", 12: "committed", 15: "committed", 99: "incomplete"}


def test_restore_models_optimizers_values_and_rng(tmp_path) -> None:
    model, optim = _model_and_optim()
    for _ in range(3):
        _step(model, optim)
    state = {"model": model, "optim": optim, "epoch": 7, "buffer": torch.arange(5.0)}
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    mgr = cs.CheckpointManager(str(tmp_path), async_save=False)
    mgr.save(3, state)
    expected_rand = (torch.rand(4), random.random(), np.random.rand())

    model2, optim2 = _model_and_optim(seed=1)
    optim2.param_groups[0]["lr"] = 0.5
    state2 = {"model": model2, "optim": optim2, "epoch": 0, "buffer": torch.zeros(5)}
    torch.manual_seed(123)
    assert cs.CheckpointManager(str(tmp_path)).restore(state2) == 3
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert optim2.param_groups[0]["lr"] == 1e-2
    s1 = optim.state[next(iter(model.parameters()))]
    s2 = optim2.state[next(iter(model2.parameters()))]
    assert torch.equal(s1["exp_avg"], s2["exp_avg"]) and torch.equal(s1["step"], s2["step"])
    assert state2["epoch"] == 7 and torch.equal(state2["buffer"], torch.arange(5.0))
    assert torch.equal(torch.rand(4), expected_rand[0])
    assert random.random() == expected_rand[1] and np.random.rand() == expected_rand[2]


def test_restore_without_checkpoint_returns_none(tmp_path) -> None:
    model, optim = _model_and_optim()
    assert (
        cs.CheckpointManager(str(tmp_path / "empty")).restore({"model": model, "optim": optim})
        is None
    )


def test_same_world_size_resume_matches_an_uninterrupted_run(tmp_path) -> None:
    full = run_ranks(2, dist_cases.train_with_manager, str(tmp_path / "a"), 3, 6)
    # interrupted: train to step 3 (saving there), then new processes resume and go to 6
    first = run_ranks(2, dist_cases.train_with_manager, str(tmp_path / "b"), 3, 3)
    resumed = run_ranks(2, dist_cases.train_with_manager, str(tmp_path / "b"), 3, 6)
    assert [r["resumed"] for r in first] == [0, 0] and [r["resumed"] for r in resumed] == [3, 3]
    for a, b in zip(full, resumed, strict=True):
        assert a["losses"][3:] == b["losses"]
        for k in a["params"]:
            assert torch.equal(a["params"][k], b["params"][k]), k
        assert torch.equal(a["rand"], b["rand"]), "per-rank RNG streams continue exactly"


def test_resume_on_fewer_ranks_reshards_model_and_optimizer(tmp_path) -> None:
    run_ranks(2, dist_cases.train_with_manager, str(tmp_path), 3, 3)
    saved = cs.open(str(tmp_path / "step_00000003"))
    one = run_ranks(1, dist_cases.train_with_manager, str(tmp_path), 3, 3)[0]
    assert one["resumed"] == 3
    for k, v in one["params"].items():
        assert torch.equal(v, saved.read(f"model.{k}")), k


def test_restore_of_a_checkpoint_deleted_while_read_takes_the_newest(tmp_path, monkeypatch) -> None:
    """Another process's retention deletes the checkpoint this restore picked, after it was
    listed and before its files were read, and commits a newer one meanwhile: the restore
    takes the newest committed now and says why."""

    import ckptstore.training.manager as manager_module

    writer = cs.CheckpointManager(str(tmp_path), async_save=False, keep=1)
    writer.save(1, {"w": torch.full((64,), 1.0)})
    real_load = manager_module.load
    calls = []

    def load_after_a_concurrent_retention(sd, path, **kw):
        calls.append(str(path))
        if len(calls) == 1:  # what the other process does between our listing and our read
            writer.save(2, {"w": torch.full((64,), 2.0)})  # keep=1: step 1 goes
            writer.wait()  # its retention thread is done
            assert not os.path.exists(tmp_path / "step_00000001")
        return real_load(sd, path, **kw)

    monkeypatch.setattr(manager_module, "load", load_after_a_concurrent_retention)
    reader = cs.CheckpointManager(str(tmp_path))
    state = {"w": torch.zeros(64)}
    with pytest.warns(UserWarning, match="deleted while it was read"):
        assert reader.restore(state) == 2
    assert torch.equal(state["w"], torch.full((64,), 2.0))
    assert [s for s, _ in reader.skipped_on_restore] == [1]
    assert calls[-1].endswith("step_00000002")


def test_time_based_policy_and_errors(tmp_path) -> None:
    mgr = cs.CheckpointManager(str(tmp_path), every_n_seconds=3600, async_save=False)
    state = {"w": torch.ones(2)}
    assert mgr.maybe_save(1, state) is True  # first call: nothing saved yet
    assert mgr.maybe_save(2, state) is False
    with pytest.raises(ValueError, match="reserved"):
        mgr.save(3, {"_ckptstore": 1})
    with pytest.raises(cs.errors.CheckpointNotFoundError):
        mgr.restore(state, step=42)


def test_restore_passes_over_damaged_checkpoints_and_says_so(tmp_path) -> None:
    model, optim = _model_and_optim()
    state = {"model": model, "optim": optim}
    weights = {}
    with cs.CheckpointManager(str(tmp_path), async_save=False) as mgr:
        for step in (1, 2, 3):
            _step(model, optim)
            mgr.save(step, state)
            weights[step] = model[0].weight.detach().clone()
    newest = tmp_path / "step_00000003" / "manifest.json"
    raw = bytearray(newest.read_bytes())
    raw[len(raw) // 2] ^= 1  # one flipped bit
    newest.write_bytes(bytes(raw))
    data = tmp_path / "step_00000002" / "data"
    victim = data / sorted(p.name for p in data.iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:-8])  # truncated

    fresh = cs.CheckpointManager(str(tmp_path))
    with pytest.warns(UserWarning, match="damaged") as caught:
        assert fresh.restore(state) == 1
    assert torch.equal(model[0].weight, weights[1])
    assert [s for s, _ in fresh.skipped_on_restore] == [3, 2]
    assert len([w for w in caught if "damaged" in str(w.message)]) == 2

    with pytest.raises(cs.errors.LoadMismatchError), pytest.warns(UserWarning, match="damaged"):
        fresh.restore({"model": model, "optim": optim, "extra": torch.zeros(1)})  # not damage
    with pytest.raises(cs.errors.ManifestError):  # an explicit step is not replaced
        fresh.restore(state, step=3)


def test_retention_runs_off_the_training_thread(tmp_path, monkeypatch) -> None:
    """Retiring a checkpoint (a listing and batches of deletes: seconds on S3 at scale) runs
    in the coordinator's retention thread: saves go on while it is under way, and wait()
    waits for it."""
    from ckptstore.training import catalog

    real_delete = catalog.delete_checkpoint
    entered, release = threading.Event(), threading.Event()

    def slow_delete(store, step):
        entered.set()
        release.wait(30)
        real_delete(store, step)

    monkeypatch.setattr(catalog, "delete_checkpoint", slow_delete)
    mgr = cs.CheckpointManager(str(tmp_path), async_save=False, keep=1)
    sd = {"w": torch.ones(8)}
    mgr.save(1, sd)
    mgr.save(2, sd)  # retires step 1 in the background
    assert entered.wait(10)
    assert (tmp_path / "step_00000001" / "manifest.json").exists()  # the loop went on
    mgr.save(3, sd)  # while that retirement is still under way
    release.set()
    mgr.wait()
    assert mgr.steps() == [3]


def test_sync_saves_are_planned_at_the_first_step_that_does_not_save(tmp_path, monkeypatch) -> None:
    from ckptstore.saving import save as save_module

    exchanges: list[int] = []
    real = save_module.plan_by_groups

    def counted(*args, **kwargs):
        exchanges.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(save_module, "plan_by_groups", counted)
    model, optim = _model_and_optim(seed=7)
    state = {"model": model, "optim": optim, "own": {"w": torch.ones(3, 1031)}}  # a new shape
    mgr = cs.CheckpointManager(str(tmp_path), every_n_steps=2, async_save=False)
    assert mgr.maybe_save(1, state) is False and len(exchanges) == 1  # planned, not saved
    assert mgr.steps() == []
    assert mgr.maybe_save(2, state) is True and len(exchanges) == 1  # the plan held
    restored = {"model": _model_and_optim(seed=8)[0], "own": {"w": torch.zeros(3, 1031)}}
    assert mgr.restore(restored, partial=True) == 2
    assert torch.equal(restored["own"]["w"], state["own"]["w"])
    for key, value in model.state_dict().items():
        assert torch.equal(restored["model"].state_dict()[key], value), key
