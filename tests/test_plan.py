"""The chunk math: deduplication, grids, writer assignment, overlaps (pure numbers)."""

from __future__ import annotations

import numpy as np
import pytest

from ckptstore.errors import ShardingError
from ckptstore.format.layouts import BoxLayout, GridLayout, overlaps
from ckptstore.saving.plan import RankPlan, TensorDecl, plan_save


def decl(name: str, shape: tuple[int, ...], itemsize: int = 4) -> TensorDecl:
    return TensorDecl(name, "float32", shape, itemsize)


def rows(n: int, parts: int) -> list[tuple[int, int]]:
    step = -(-n // parts)
    return [
        (min(n, i * step), max(0, min(n, (i + 1) * step) - min(n, i * step))) for i in range(parts)
    ]


def test_replicas_are_written_once_by_a_holder_and_bytes_are_balanced() -> None:
    world = 4
    plans = []
    for r in range(world):
        decls = [decl(f"rep{i}", (1000 + i,)) for i in range(40)] + [decl("w", (10, 8))]
        boxes = [((0,), (1000 + i,)) for i in range(40)]
        lo, n = rows(10, world)[r]
        boxes.append(((lo, 0), (n, 8)))
        plans.append(RankPlan.build(decls, boxes))
    plan = plan_save(plans)
    names = [t.name for t in plan.tensors]
    assert plan.chunk_count == 40 + 4  # each replicated tensor once, w in 4 row blocks
    per_rank = plan.chunk_writer
    loads = np.bincount(per_rank, weights=plan.chunk_nbytes, minlength=world)
    assert loads.max() - loads.min() <= 1040 * 4  # within one chunk of perfect balance
    w = plan.layouts[names.index("w")]
    assert isinstance(w, GridLayout) and w.starts == ((0, 3, 6, 9), (0,))
    # every rank's write list names chunks it holds, each exactly once overall
    assert sum(len(x) for x in plan.writes) == plan.chunk_count


def test_ranks_that_hold_nothing_and_uneven_grids() -> None:
    # torch.chunk of 5 rows over 4 ranks: 2, 2, 1, 0
    plans = [RankPlan.build([decl("t", (5, 3))], [((lo, 0), (n, 3))]) for lo, n in rows(5, 4)]
    plan = plan_save(plans)
    assert plan.chunk_count == 3 and plan.layouts[0] == GridLayout(((0, 2, 4), (0,)))
    assert len(plan.writes[3]) == 0


def test_non_grid_shards_become_boxes_and_gaps_or_overlaps_are_refused() -> None:
    boxes = [((0, 0), (2, 4)), ((2, 0), (2, 1)), ((2, 1), (2, 3))]  # no common grid
    plans = [RankPlan.build([decl("t", (4, 4))], [b]) for b in boxes]
    plan = plan_save(plans)
    assert isinstance(plan.layouts[0], BoxLayout) and plan.chunk_count == 3
    gap = [RankPlan.build([decl("t", (4, 4))], [((0, 0), (2, 4))])]
    with pytest.raises(ShardingError, match="gaps"):
        plan_save(gap)
    overlap = [
        RankPlan.build([decl("t", (4, 4))], [b]) for b in [((0, 0), (3, 4)), ((2, 0), (2, 4))]
    ]
    with pytest.raises(ShardingError, match="overlap"):
        plan_save(overlap)


def test_ranks_must_agree_on_dtype_and_shape() -> None:
    a = RankPlan.build([decl("t", (4,))], [((0,), (4,))])
    b = RankPlan.build([TensorDecl("t", "float16", (4,), 2)], [((0,), (4,))])
    with pytest.raises(ShardingError, match="'t'"):
        plan_save([a, b])


def test_plan_id_and_structure_key_are_stable_and_change_with_structure() -> None:
    make = lambda n: RankPlan.build([decl("t", (n,))], [((0,), (n,))])  # noqa: E731
    assert make(4).structure_key == make(4).structure_key
    assert make(4).structure_key != make(5).structure_key
    assert plan_save([make(4)]).plan_id == plan_save([make(4)]).plan_id
    # Boxes shared by many tensors (a DTensor box cache's) digest as well as distinct equal
    # ones; one box that differs changes the key however the others are held.
    decls = [decl(f"n{i}", (8,)) for i in range(50)]
    shared = ((4,), (4,))
    same = RankPlan.build(decls, [shared] * 50)
    assert same.structure_key == RankPlan.build(decls, [shared] * 50).structure_key
    for held in ([shared] * 49, [((4,), (4,)) for _ in range(49)]):
        moved = RankPlan.build(decls, [*held, ((0,), (4,))])
        assert moved.structure_key != same.structure_key
        assert moved.offsets[-1, 0] == 0 and moved.offsets[0, 0] == 4  # arrays on demand


def test_overlaps_on_grids_and_boxes() -> None:
    grid = GridLayout(((0, 3, 6), (0, 4)))
    found = overlaps(grid, (8, 8), ((2, 3), (5, 2)))  # rows 2..6, cols 3..4
    assert [(i, o) for i, _, o in found] == [
        (0, ((2, 3), (1, 1))), (1, ((2, 4), (1, 1))),
        (2, ((3, 3), (3, 1))), (3, ((3, 4), (3, 1))),
        (4, ((6, 3), (1, 1))), (5, ((6, 4), (1, 1))),
    ]  # fmt: skip
    boxes = BoxLayout(np.array([[0, 0], [2, 0]]), np.array([[2, 4], [2, 4]]))
    assert [i for i, _, _ in overlaps(boxes, (4, 4), ((1, 0), (2, 4)))] == [0, 1]
    assert overlaps(grid, (8, 8), ((0, 0), (0, 8))) == []


def test_boxes_of_mixed_dimensions_are_padded_as_declared() -> None:
    """A rank's boxes as columns: tensors of fewer dimensions than the most (scalars, norms
    next to matrices) are padded with offset 0 and extent 1, each row exactly its box."""
    rng = np.random.default_rng(7)
    for _ in range(200):
        tensors, boxes = [], []
        for i in range(int(rng.integers(1, 30))):
            ndim = int(rng.integers(0, 5))
            shape = tuple(int(s) for s in rng.integers(1, 9, ndim))
            offsets = tuple(int(o) for o in rng.integers(0, 5, ndim))
            extents = tuple(int(e) for e in rng.integers(1, 5, ndim))
            tensors.append(TensorDecl(f"t{i}", "float32", shape, 4))
            boxes.append((offsets, extents))
        plan = RankPlan.build(tensors, boxes)
        width = max(len(t.shape) for t in tensors)
        assert plan.offsets.shape == plan.shapes.shape == (len(tensors), width)
        for row, (offsets, extents) in enumerate(boxes):
            pad = width - len(offsets)
            assert plan.offsets[row].tolist() == [*offsets, *[0] * pad]
            assert plan.shapes[row].tolist() == [*extents, *[1] * pad]
