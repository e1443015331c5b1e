"""Save on 4 real ranks (gloo) and load on 1, 2, 3 and 4 ranks with every sharding."""

from __future__ import annotations

import os

import pytest
import torch

import ckptstore as cs
from ckptstore.testing.ranks import run_ranks
from tests import dist_cases

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def saved_on_4(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dist") / "ckpt")
    infos = run_ranks(4, dist_cases.save_layouts, root)
    return root, infos


def test_second_save_with_same_structure_reuses_the_plan(saved_on_4) -> None:
    _, infos = saved_on_4
    for per_rank in infos:
        by = {i["layout"]: i["cached"] for i in per_rank}
        assert by["row"] is False
        assert by["row-again"] is True


def test_prepare_save_plans_the_first_save_and_builds_its_tensor_table(tmp_path) -> None:
    out = run_ranks(3, dist_cases.prepared_save, str(tmp_path), timeout=120)
    assert all(o["written"] == [] for o in out)  # preparing writes nothing
    assert out[0]["table_ready"] and not any(o["table_ready"] for o in out[1:]), out
    assert all(o["plan_cached"] and o["exact"] for o in out), out
    assert all(o["refused"] == "PickleNotAllowedError" for o in out), out


def test_saved_world_size_and_layouts(saved_on_4) -> None:
    root, _ = saved_on_4
    ck = cs.open(f"{root}/mesh2x2")
    assert ck.world_size == 4
    w0 = ck.meta("model.w0")
    assert w0.shape == (37, 19) and w0.chunks == 4 and w0.layout == "grid"
    assert ck.meta("model.bias").chunks == 1  # replicated: one chunk, written once
    sharded = ck.meta("model.w0") if False else cs.open(f"{root}/sharded").meta("model.w0")
    assert sharded.chunks == 4


@pytest.mark.parametrize("world", [4, 1, 2, 3])
def test_load_every_layout_on_world(saved_on_4, world) -> None:
    root, _ = saved_on_4
    problems = run_ranks(world, dist_cases.load_layouts, root, 4)
    assert problems == [{}] * world


def test_per_rank_values_when_world_size_changes(saved_on_4) -> None:
    root, _ = saved_on_4
    out = run_ranks(2, dist_cases.resize_policies, root)
    for r in out:
        assert r["error"] == "WorldSizeMismatchError"
        assert r["keep"] == "-1"


def test_replicated_bytes_are_written_exactly_once(tmp_path) -> None:
    root = str(tmp_path / "rep")
    out = run_ranks(4, dist_cases.save_replicated_only, root)
    unique = sum((1000 + i) * 4 for i in range(24)) + 4000 * 4
    assert sum(o[0] for o in out) == unique
    on_disk = sum(
        os.path.getsize(os.path.join(root, "data", f)) for f in os.listdir(f"{root}/data")
    )
    assert on_disk == unique
    # writers are balanced: no rank writes more than its fair share plus one chunk
    assert max(o[0] for o in out) <= unique / 4 + 8000


def test_bad_leaf_on_one_rank_fails_every_rank_without_commit(tmp_path) -> None:
    root = str(tmp_path / "bad")
    out = run_ranks(4, dist_cases.bad_leaf_on_one_rank, root)
    assert out[1] == "PickleNotAllowedError"
    assert all(o == "CollectiveError" for i, o in enumerate(out) if i != 1)
    assert not os.path.exists(os.path.join(root, "manifest.json"))


def test_load_mismatch_on_one_rank_fails_every_rank(saved_on_4) -> None:
    root, _ = saved_on_4
    out = run_ranks(4, dist_cases.mismatch_on_one_rank, root)
    assert out[2] == "LoadMismatchError"
    assert all(o == "CollectiveError" for i, o in enumerate(out) if i != 2)


def test_ranks_disagreeing_on_a_shape_is_a_sharding_error(tmp_path) -> None:
    out = run_ranks(4, dist_cases.inconsistent_shapes, str(tmp_path / "x"))
    assert all(o.startswith("ShardingError") and "'w'" in o for o in out)


def test_a_data_file_replaced_by_a_directory_fails_every_rank_at_once(tmp_path) -> None:
    """The rank that reads the damaged file raises a typed error through the agreement
    step; the other stops with it instead of waiting in a collective."""
    root = str(tmp_path / "c")
    files = run_ranks(2, dist_cases.save_rows, root)
    os.remove(os.path.join(root, files[1]))
    os.mkdir(os.path.join(root, files[1]))
    out = run_ranks(2, dist_cases.load_rows, root, timeout=60)
    assert out[1].startswith("NotARegularFileError") and "not a regular file" in out[1]
    assert out[0].startswith("CollectiveError") and "rank 1" in out[0]


def test_ranks_passing_different_paths_fail_before_writing(tmp_path) -> None:
    root = str(tmp_path)
    out = run_ranks(2, dist_cases.save_to_different_paths, root, timeout=60)
    assert all(o.startswith("SaveError") and "different paths" in o for o in out), out
    assert not any(os.path.exists(f"{root}/r{r}/data") for r in range(2))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_tensor_without_dense_data_on_one_rank_fails_every_rank(tmp_path, mode) -> None:
    root = str(tmp_path / "c")
    out = run_ranks(2, dist_cases.dataless_tensor_on_one_rank, root, mode, timeout=90)
    assert out[1].startswith("SaveError") and "'r'" in out[1] and "sparse or on the meta" in out[1]
    assert out[0].startswith("SaveError") and "rank 1" in out[0], out
    assert not os.path.exists(os.path.join(root, "manifest.json"))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_rank_that_stops_taking_part_is_a_typed_timeout(tmp_path, mode) -> None:
    out = run_ranks(2, dist_cases.one_rank_stops_taking_part, str(tmp_path / "c"), mode,
                    timeout=120)  # fmt: skip
    assert out[1] == "absent"
    assert out[0].startswith("CollectiveTimeoutError"), out[0]
    seconds = int(out[0].split(" after ")[1].split(" s")[0])
    assert seconds <= 40, out[0]  # the 4 s timeout (plus polling, on a busy machine), not 30 min


@pytest.mark.parametrize("when", ["first", "later"])
def test_a_collective_timeout_names_the_ranks_that_never_arrived(tmp_path, when) -> None:
    out = run_ranks(3, dist_cases.third_rank_stops_taking_part, str(tmp_path), when,
                    timeout=120)  # fmt: skip
    assert out[2] == "absent"
    for r in (0, 1):
        assert out[r].startswith("CollectiveTimeoutError [2]"), out[r]
        assert "1 rank(s) never arrived: [2]" in out[r], out[r]


def test_the_store_hosts_death_ends_a_key_value_exchange_with_a_typed_error() -> None:
    out = run_ranks(2, dist_cases.store_host_dies_during_an_exchange, timeout=60, dying=(0,))
    assert out[1].startswith("CollectiveTimeoutError") and "unreachable" in out[1], out[1]


def test_a_silent_rank_ends_a_key_value_exchange_with_a_typed_error() -> None:
    out = run_ranks(2, dist_cases.store_exchange_with_a_silent_rank, timeout=60)
    assert out[0].startswith("CollectiveTimeoutError") and "ranks [1]" in out[0], out[0]
    assert int(out[0].split(" after ")[1].split(" s")[0]) <= 30, out[0]  # 3 s, not 6 h


@pytest.mark.parametrize("world", [2, 3])
def test_dtensor_boxes_equal_torchs_on_every_spec_and_from_the_cache(world) -> None:
    assert run_ranks(world, dist_cases.dtensor_boxes_against_torch, timeout=120) == [[]] * world


@pytest.mark.parametrize("world", [2, 3])
def test_dtensor_columns_are_the_same_from_the_compiled_loop_and_the_python_passes(world) -> None:
    assert run_ranks(world, dist_cases.dtensor_columns_both_ways, timeout=120) == [[]] * world


def test_training_states_saved_on_4_ranks_load_bit_exactly_on_2_and_3(tmp_path) -> None:
    """What jobs save: an FSDP2 and a TP + FSDP2 (2 x 2 mesh, _StridedShard) Llama-style model
    with AdamW state from get_state_dict; loaded into FSDP2 on 2 and on 3 ranks (uneven
    shards), every tensor equals the saved one gathered whole, and the model holds it."""
    root = str(tmp_path)
    saved = run_ranks(4, dist_cases.llama_save, root, timeout=300)[0]
    for world in (2, 3):
        loaded = run_ranks(world, dist_cases.llama_load, root, timeout=300)[0]
        for layout in dist_cases.LLAMA_LAYOUTS:
            want, got = saved[layout], loaded[layout]
            assert any("exp_avg" in k for k in want) and len(want) > 20
            assert got["state"].keys() == want.keys()
            for name, tensor in want.items():
                assert torch.equal(got["state"][name], tensor), (layout, world, name)
            for name, tensor in got["params"].items():
                assert torch.equal(tensor, want[name]), (layout, world, name)
