"""Pipeline-stage jobs: each stage's ranks are planned by the stage's leader (plan_exchange);
the joined plan commits one checkpoint that reads back bit-exact; a stage's error stops
every rank."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import ckptstore as cs
from ckptstore.format.verify import verify_checkpoint
from ckptstore.saving.plan import RankPlan, TensorDecl, plan_save
from ckptstore.saving.plan_groups import group_ranks, join_plans, plan_group, plan_groups
from ckptstore.testing.ranks import run_ranks
from tests import stage_cases

pytestmark = pytest.mark.timeout(600)


def _decl(name: str, shape: tuple[int, ...]) -> TensorDecl:
    return TensorDecl(name, "float32", shape, 4)


def test_lists_sharing_a_name_directly_or_through_others_are_one_group() -> None:
    lists = {
        10: [_decl("a", (2,)), _decl("b", (2,))],
        20: [_decl("c", (2,))],
        30: [_decl("d", (2,)), _decl("e", (2,))],
        40: [_decl("e", (2,)), _decl("b", (2,))],  # joins 10 and 30
    }
    assert plan_groups(lists) == {10: 0, 20: 1, 30: 0, 40: 0}
    assert group_ranks([20, 10, 30, 20, 40], plan_groups(lists)) == [[1, 2, 4], [0, 3]]


def test_joined_group_plans_equal_one_plan_of_the_whole_job() -> None:
    """Two stages of three ranks (interleaved): the groups planned apart and joined hold
    the same chunks, writers and layouts as one plan of every rank."""
    stages = {
        s: [_decl(f"s{s}.t{i}", (7 + i + s, 3)) for i in range(4)] + [_decl(f"s{s}.n", (5,))]
        for s in range(2)
    }
    plans = []
    for rank in range(6):
        stage, place = rank % 2, rank // 2
        decls = stages[stage]
        boxes = []
        for d in decls:
            n = d.shape[0]
            lo, hi = n * place // 3, n * (place + 1) // 3
            boxes.append(((lo, 0), (hi - lo, 3)) if len(d.shape) == 2 else ((0,), d.shape))
        plans.append(RankPlan.build(decls, boxes))
    whole = plan_save(plans)
    keys = [p.decl_key for p in plans]
    groups = plan_groups({k: stages[i % 2] for i, k in enumerate(dict.fromkeys(keys))})
    members = group_ranks(keys, groups)
    assert members == [[0, 2, 4], [1, 3, 5]]
    parts = [plan_group([plans[r] for r in ranks], ranks) for ranks in members]
    writes = {
        r: part.writes[i]
        for part, ranks in zip(parts, members, strict=True)
        for i, r in enumerate(ranks)
    }
    joined = join_plans(parts, whole.plan_id)

    def by_tensor(plan):
        out = {}
        for g, t in enumerate(plan.tensors):
            span = slice(plan.chunk_start[g], plan.chunk_start[g + 1])
            out[t] = (
                plan.layouts[g],
                plan.chunk_nbytes[span].tolist(),
                plan.chunk_writer[span].tolist(),
            )
        return out

    assert by_tensor(joined) == by_tensor(whole)
    assert joined.chunk_start[-1] == joined.chunk_count == whole.chunk_count
    for r in range(6):  # each writer's slots name its own write list in order
        mine = np.flatnonzero(joined.chunk_writer == r)
        assert sorted(joined.chunk_slot[mine].tolist()) == list(range(len(writes[r])))


def test_a_pipeline_job_saves_through_its_stage_leaders_and_reads_back(tmp_path) -> None:
    root = str(tmp_path / "pp")
    cached = run_ranks(4, stage_cases.save_stages, root)
    assert cached == [[False, True]] * 4
    expected = {}
    for stage in range(stage_cases.STAGES):
        expected.update(stage_cases.full_tensors(stage))
    for name in ("a", "b", "c"):
        ck = cs.open(f"{root}/{name}")
        assert sorted(ck.keys()) == sorted([*expected, "rng", "step"])
        for key, full in expected.items():
            assert torch.equal(ck.read(key), full), (name, key)
        for rank in range(4):  # per-rank entries keep their ranks
            assert torch.equal(ck.read("rng", rank=rank), torch.full((3,), float(rank)))
            assert ck.read("step", rank=rank) == 10 + rank
        assert verify_checkpoint(ck.store, ck.manifest).ok


def test_a_stage_that_fails_stops_every_rank_without_commit(tmp_path) -> None:
    """A gap in one stage's shards (found by that stage's leader) is a ShardingError on
    every rank; a failed copy on a stage member reaches the coordinator in its stage's
    bundle and fails every rank. Nothing is committed either time."""
    out = run_ranks(4, stage_cases.failed_saves, str(tmp_path))
    gap, copy = zip(*out, strict=True)
    assert all(o.startswith("ShardingError") and "'layers.3.w'" in o for o in gap), gap
    assert copy[3].startswith("SaveError") and "'rng'" in copy[3], copy
    assert all(o.startswith("SaveError") and "rank 3" in o for o in copy[:3]), copy
    for name in ("gap", "copy"):
        assert not os.path.exists(tmp_path / name / "manifest.json")


def test_ckptstore_groups_connect_only_the_pairs_that_exchange_messages(tmp_path) -> None:
    """Gloo connects every pair of a group at creation unless told otherwise: at 16,384
    ranks that is 134 M connections for ckptstore's own groups. Created lazily, a rank
    connects to its ring neighbours, its leader and the coordinator only."""
    world = 8
    opened = run_ranks(world, stage_cases.sockets_of_a_save, str(tmp_path / "s"))
    # Created eagerly, every rank opens a socket to each of its 7 peers plus one at once
    # (8). Lazily: one at creation, then one per peer it exchanges messages with during
    # the save -- ring neighbours, its leader, the coordinator; a leader its members too.
    # (Counted together: a fast peer may connect while a slow rank still creates.)
    assert all(created + saving < world for created, saving in opened), opened
    assert sum(created for created, _ in opened) < world * (world - 1), opened


def test_planning_groups_are_the_connected_lists_for_random_overlaps() -> None:
    """Against a plain search over the lists' overlaps: chains, stars, disjoint stages."""
    import random

    rng = random.Random(7)
    for _ in range(200):
        n = rng.randint(1, 8)
        lists = {
            100 + k: [_decl(f"t{rng.randint(0, 15)}", (2,)) for _ in range(rng.randint(0, 4))]
            for k in range(n)
        }
        keys = list(lists)
        names = {k: {d.name for d in v} for k, v in lists.items()}
        expected: dict[int, int] = {}
        for k in keys:  # numbered in the order of each group's first list
            if k in expected:
                continue
            group, todo = len(set(expected.values())), [k]
            while todo:
                x = todo.pop()
                if x in expected:
                    continue
                expected[x] = group
                todo += [y for y in keys if y not in expected and names[x] & names[y]]
        assert plan_groups(lists) == expected, lists
