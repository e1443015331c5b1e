"""ckptstore as torch DCP's storage layer (``cs.dcp.Writer`` / ``cs.dcp.Reader``): DCP's own
save, async_save (thread and process) and load, unchanged, on real ranks with FSDP2 state;
what DCP writes is a ckptstore checkpoint (``cs.open``, ``cs.load``, ``ckpt verify``), and
any ckptstore checkpoint loads through DCP."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import ckptstore as cs
from ckptstore.cli.main import main as ckpt
from ckptstore.testing.ranks import run_ranks
from tests import dcp_cases


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():  # DCP's own note that no process group is set up
        warnings.filterwarnings("ignore", message=".*distributed is disabled.*")
        yield


def test_fsdp2_state_saved_by_dcp_on_4_loads_on_3_and_with_cs_load(tmp_path) -> None:
    path = str(tmp_path / "ckpt")
    saved = run_ranks(4, dcp_cases.save_through_dcp, path, "sync")[0]
    ckpt_ = cs.open(path)
    assert ckpt_.world_size == 4 and "model.0.weight" in ckpt_
    assert ckpt_.read("step") == 7
    assert torch.equal(ckpt_.read("model.0.weight"), saved["model.0.weight"])
    assert ckpt(["verify", path]) == 0
    for loaded in run_ranks(3, dcp_cases.load_through_dcp, path):
        assert loaded.pop("step") == 7
        _same(loaded, saved)
    for loaded in run_ranks(2, dcp_cases.load_with_ckptstore, path):
        assert loaded.pop("step") == 7
        _same(loaded, saved)


def test_dcp_async_save_through_ckptstore_thread_and_process(tmp_path) -> None:
    for mode in ("thread", "process"):  # one job each: DCP's stager, then its helper process
        path = str(tmp_path / mode)
        saved = run_ranks(2, dcp_cases.save_through_dcp, path, mode)[0]
        loaded = cs.open(path)
        for name, value in saved.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(loaded.read(name), value), (mode, name)


def test_a_ckptstore_checkpoint_loads_through_dcp(tmp_path) -> None:
    sd = {"w": torch.arange(12.0).reshape(3, 4), "n": 3, "names": ["a", "b"], "t": (1, 2.5)}
    cs.save(sd, tmp_path / "c")
    out = {"w": torch.zeros(3, 4), "n": 0, "names": [], "t": ()}
    dcp.load(out, storage_reader=cs.dcp.Reader(tmp_path / "c"), no_dist=True)
    assert torch.equal(out["w"], sd["w"]) and out["n"] == 3 and out["t"] == (1, 2.5)


def test_values_round_trip_and_objects_need_pickle(tmp_path) -> None:
    sd = {"w": torch.ones(5), "groups": [{"lr": 0.1, "params": ["a.b", "c"]}], "none": None}
    dcp.save(sd, storage_writer=cs.dcp.Writer(tmp_path / "v"), no_dist=True)
    out = {"w": torch.zeros(5), "groups": [{"lr": 0.0, "params": []}], "none": 1}
    dcp.load(out, storage_reader=cs.dcp.Reader(tmp_path / "v"), no_dist=True)
    assert out["groups"] == sd["groups"] and out["none"] is None and torch.equal(out["w"], sd["w"])

    class Custom:
        pass

    # DCP wraps a rank's error in its CheckpointException, which carries ours.
    with pytest.raises(CheckpointException, match="PickleNotAllowedError: DCP entry 'obj'"):
        dcp.save({"obj": Custom()}, storage_writer=cs.dcp.Writer(tmp_path / "p"), no_dist=True)
    assert not (tmp_path / "p" / "manifest.json").exists()
    dcp.save(
        {"obj": {1, 2}},
        storage_writer=cs.dcp.Writer(tmp_path / "q", allow_pickle=True),
        no_dist=True,
    )
    target = {"obj": None}
    with pytest.raises(CheckpointException, match="PickleNotAllowedError"):
        dcp.load(target, storage_reader=cs.dcp.Reader(tmp_path / "q"), no_dist=True)
    dcp.load(target, storage_reader=cs.dcp.Reader(tmp_path / "q", allow_pickle=True), no_dist=True)
    assert target["obj"] == {1, 2}


def test_an_existing_checkpoint_is_not_replaced_without_overwrite(tmp_path) -> None:
    dcp.save({"w": torch.ones(2)}, storage_writer=cs.dcp.Writer(tmp_path / "c"), no_dist=True)
    with pytest.raises(CheckpointException, match=r"CheckpointExistsError: .*overwrite"):
        dcp.save({"w": torch.zeros(2)}, storage_writer=cs.dcp.Writer(tmp_path / "c"), no_dist=True)
    writer = cs.dcp.Writer(tmp_path / "c", overwrite=True)
    dcp.save({"w": torch.zeros(2)}, storage_writer=writer, no_dist=True)
    assert torch.equal(cs.open(tmp_path / "c").read("w"), torch.zeros(2))


def test_torchtitan_calls_with_tp_fsdp_state_load_onto_fsdp_2(tmp_path) -> None:
    saved = run_ranks(4, dcp_cases.torchtitan_save, str(tmp_path))[0]
    assert cs.open(tmp_path / "step-10").read("train_state.step") == 10
    for loaded in run_ranks(2, dcp_cases.torchtitan_load, str(tmp_path)):
        _same(loaded, saved)
