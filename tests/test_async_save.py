"""async_save: returns after staging, persists in the background, never swallows an error."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import ckptstore as cs
from ckptstore.errors import CkptStoreError
from ckptstore.testing.ranks import run_ranks
from tests import dist_cases


def test_tensors_may_change_as_soon_as_async_save_returns(tmp_path) -> None:
    w = torch.randn(300, 200)
    original = w.clone()
    handle = cs.async_save({"w": w, "meta": {"step": 5}}, tmp_path / "c")
    w.mul_(0)  # the training loop goes on
    info = handle.wait()
    assert handle.done() and info.tensors == 1
    out = {"w": torch.zeros(300, 200), "meta": {"step": 0}}
    cs.load(out, tmp_path / "c")
    assert torch.equal(out["w"], original) and out["meta"]["step"] == 5


def test_staging_buffer_is_reused_and_saves_are_serialized(tmp_path) -> None:
    from ckptstore.saving.async_save import _state

    w = torch.randn(256, 256)
    first = cs.async_save({"w": w}, tmp_path / "a")
    second = cs.async_save({"w": w}, tmp_path / "b")  # waits for the first (backpressure)
    assert first.done()
    second.wait()
    free = _state().pool._free
    ptr = free[0].data_ptr()
    cs.async_save({"w": w}, tmp_path / "c").wait()
    assert _state().pool._free[0].data_ptr() == ptr, "the staging buffer must be reused"


def test_background_failure_is_raised_by_wait_and_by_the_next_call(tmp_path) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "data").write_text("a file where the data directory belongs")
    handle = cs.async_save({"w": torch.ones(4)}, tmp_path / "bad")
    with pytest.raises(CkptStoreError, match="bad"):
        handle.wait()
    # once seen, it is not raised again
    cs.async_save({"w": torch.ones(4)}, tmp_path / "ok").wait()
    # not seen: the next async_save raises it
    cs.async_save({"w": torch.ones(4)}, tmp_path / "bad2")
    (tmp_path / "bad3").mkdir()
    (tmp_path / "bad3" / "data").write_text("x")
    failing = cs.async_save({"w": torch.ones(4)}, tmp_path / "bad3")
    while not failing.done():  # (not wait(): that would report the error)
        time.sleep(0.01)
    with pytest.raises(CkptStoreError):
        cs.async_save({"w": torch.ones(4)}, tmp_path / "after")
    assert not (tmp_path / "after" / "manifest.json").exists()


def test_process_persistence_single_rank(tmp_path) -> None:
    w = torch.arange(10000, dtype=torch.float64)
    sd = {"w": w, "b": torch.ones(3, dtype=torch.bfloat16), "obj": {1, 2}}
    handle = cs.async_save(sd, tmp_path / "c", persist="process", allow_pickle=True)
    w.zero_()
    handle.wait()
    out = {"w": torch.zeros(10000, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.bfloat16)}
    cs.load(out, tmp_path / "c", strict=False)
    assert cs.open(tmp_path / "c").read("obj", allow_pickle=True) == {1, 2}
    assert torch.equal(out["w"], torch.arange(10000, dtype=torch.float64))


def test_interpreter_exit_finishes_the_save_in_flight(tmp_path) -> None:
    script = textwrap.dedent(
        f"""
        import torch, ckptstore as cs
        cs.async_save({{"w": torch.ones(2048, 2048)}}, {str(tmp_path / "c")!r})
        # no wait(): the interpreter exits with the save in flight
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    assert (tmp_path / "c" / "manifest.json").exists()
    assert torch.equal(cs.open(tmp_path / "c").read("w"), torch.ones(2048, 2048))


@pytest.mark.parametrize("persist", ["thread", "process"])
def test_async_saves_on_four_ranks(tmp_path, persist) -> None:
    out = run_ranks(4, dist_cases.async_saves, str(tmp_path), persist)
    for r in out:
        assert r["cached"] == [False, True, True]


def test_async_failure_on_one_rank_fails_all_ranks(tmp_path) -> None:
    out = run_ranks(2, dist_cases.async_failure_everywhere, str(tmp_path))
    assert out[1][0] in ("SaveError", "NotADirectoryError", "FileExistsError")
    assert out[0][0] == "SaveError"
    assert all(o[1] == "next ok" for o in out)
    assert not os.path.exists(tmp_path / "bad" / "manifest.json")


def test_prepare_async_save_plans_and_faults_in_the_first_saves_buffer(tmp_path) -> None:
    out = run_ranks(2, dist_cases.prepared_async_save, str(tmp_path), timeout=120)
    assert all(o["written"] == [] for o in out)  # preparing writes nothing
    assert all(o["plan_cached"] and o["reused"] for o in out), out
    # one buffer per rank, together exactly the bytes the ranks stage: each rank's 500
    # rows of w (48,000 bytes) and, on one of them, b (308 bytes, aligned to 320)
    assert all(len(o["sizes"]) == 1 for o in out), out
    assert sum(o["sizes"][0] for o in out) == 2 * 48_000 + 320, out


def test_host_copy_made_during_the_agreement_is_kept_redone_or_given_back(tmp_path) -> None:
    out = run_ranks(2, dist_cases.async_early_staging, str(tmp_path), timeout=180)
    # save 0: planned (no cached plan), one copy after; save 1: one copy, made early;
    # save 2: rank 1 lost its plan: rank 0's early copy is made again after the new plan;
    # save 3: the checkpoint exists: the early copy is given back, the save fails everywhere
    assert out[0]["copies"] == [1, 1, 2, 1], out
    assert out[1]["copies"] == [1, 1, 1, 1], out
    assert all(o["errors"] == [(3, "CheckpointExistsError")] for o in out), out
    assert all(o["in_use"] == [0, 0, 0, 0] for o in out), out
