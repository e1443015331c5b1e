"""Chunk math for save and load: pure functions on plain numbers, no torch, no I/O.

Save: every rank declares a :class:`RankPlan` (its tensors and the box of each it holds).
The coordinator turns all of them into one :class:`GlobalPlan`: the unique chunks of every
tensor (replicas deduplicated), whether they form a rectilinear grid (then the manifest
stores the grid, not one box per chunk), and which rank writes each chunk, chosen to
balance bytes written across ranks.

The layouts themselves (grid or boxes) are the format's: ``ckptstore.format.layouts``.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import pickle
from dataclasses import dataclass, field
from functools import partial
from operator import itemgetter
from typing import Any, NamedTuple

import numpy as np

from ckptstore.errors import ShardingError
from ckptstore.format.layouts import Box, BoxLayout, GridLayout, Layout, whole_layout


class TensorDecl(NamedTuple):
    """A global tensor as one rank sees it (a tuple: cheap to build, compare and pickle)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    itemsize: int


def _digest(*parts: bytes) -> int:
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(p)
    return int.from_bytes(h.digest(), "little") >> 1


_NAME_OF, _SHAPE_OF = itemgetter(0), itemgetter(2)  # of a TensorDecl
_OFFSETS_OF, _SHAPE_OF_BOX = itemgetter(0), itemgetter(1)  # of a Box


@dataclass
class RankPlan:
    """What one rank holds: ``tensors[i]`` and the box of it held locally (row i).

    Boxes are padded to ``ndim_max`` columns: offsets with 0, shapes with 1. The two keys
    are computed once, on the rank: ``decl_key`` digests the tensor declarations (equal on
    all ranks of a pipeline stage, so the coordinator checks each distinct list once),
    ``structure_key`` digests declarations and boxes (the plan cache key).
    """

    tensors: list[TensorDecl] | None  # None in transit when another rank sent the same list
    offsets: np.ndarray
    shapes: np.ndarray
    decl_key: int = 0
    structure_key: int = 0

    # Sent to the coordinator by pickle (inside torch.distributed's gather_object): as columns,
    # tens of thousands of declarations pickle and unpickle several times faster than tuples.
    def __getstate__(self) -> tuple:
        columns = (
            None if self.tensors is None else tuple(map(list, zip(*self.tensors, strict=True)))
        )
        return (
            columns,
            len(self.tensors or ()),
            self.offsets,
            self.shapes,
            self.decl_key,
            self.structure_key,
        )

    def __setstate__(self, state: tuple) -> None:
        columns, n, self.offsets, self.shapes, self.decl_key, self.structure_key = state
        if columns is None:
            self.tensors = None
        else:
            new = tuple.__new__
            self.tensors = [new(TensorDecl, row) for row in zip(*columns, strict=True)] if n else []

    @classmethod
    def build(cls, tensors: list[TensorDecl], boxes: list[Box]) -> RankPlan:
        columns = tuple(map(list, zip(*tensors, strict=True))) if tensors else ([],) * 4
        declared = Declarations(columns, boxes)  # type: ignore[arg-type]
        return cls(
            tensors, declared.offsets, declared.shapes, declared.decl_key, declared.structure_key
        )


DeclColumns = tuple[list[str], list[str], list[tuple[int, ...]], list[int]]
"""Names, dtype names, global shapes and item sizes of a rank's tensors (TensorDecl's fields)."""


class Declarations:
    """A rank's tensors and boxes as columns, with the keys of its plan (see
    :class:`RankPlan`). A save whose plan is cached needs only the keys; the box arrays
    and the :class:`RankPlan`, a :class:`TensorDecl` per tensor, are built on a miss.

    The keys digest the pickled columns and boxes. Pickling writes an object that recurs
    (the one box of thousands of same-sharded DTensors) once and then refers to it, so
    equal structures held differently may digest differently -- a plan-cache miss, never
    a wrong hit: the bytes still say every value."""

    def __init__(self, columns: DeclColumns, boxes: list[Box]) -> None:
        self.columns, self.boxes, self._plan = columns, boxes, None
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None
        decl_bytes = pickle.dumps(tuple(columns), protocol=4)
        self.decl_key = _digest(decl_bytes)
        self.structure_key = _digest(decl_bytes, pickle.dumps(boxes, protocol=4))

    @property
    def offsets(self) -> np.ndarray:
        """Every box's offsets, one row each, padded with 0 to the widest tensor."""
        return self._box_arrays()[0]

    @property
    def shapes(self) -> np.ndarray:
        """Every box's shape, one row each, padded with 1 to the widest tensor."""
        return self._box_arrays()[1]

    def _box_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._arrays is None:
            self._arrays = _box_arrays(self.columns[2], self.boxes)
        return self._arrays

    def rank_plan(self) -> RankPlan:
        """The :class:`RankPlan` of these declarations (built once, on first use)."""
        if self._plan is None:
            tensors = list(map(_NEW_DECL, zip(*self.columns, strict=True)))
            self._plan = RankPlan(
                tensors, self.offsets, self.shapes, self.decl_key, self.structure_key
            )
        return self._plan


def _box_arrays(
    shapes_of: list[tuple[int, ...]], boxes: list[Box]
) -> tuple[np.ndarray, np.ndarray]:
    """The boxes' offsets and shapes as (n, ndim) arrays, padded (offsets with 0, shapes
    with 1) to the widest of the tensors (``shapes_of``: their global shapes)."""
    ndims = set(map(len, shapes_of))
    offsets = _padded(list(map(_OFFSETS_OF, boxes)), ndims, 0)
    return offsets, _padded(list(map(_SHAPE_OF_BOX, boxes)), ndims, 1)


_NEW_DECL = partial(tuple.__new__, TensorDecl)  # C-level: one per tensor


@dataclass
class GlobalPlan:
    """The coordinator's view of one save structure; cached while the structure holds.

    Unique chunks are numbered globally, grouped by tensor (in ``tensors`` order) and,
    within a tensor, in C order of their offsets.
    """

    plan_id: int
    tensors: list[TensorDecl]
    chunk_start: list[int]  # of every tensor, then the chunk count
    layouts: list[Layout]
    chunk_nbytes: np.ndarray
    chunk_writer: np.ndarray
    chunk_slot: np.ndarray
    writes: list[np.ndarray] = field(repr=False)
    tensor_tables: dict[str | None, Any] = field(default_factory=dict, repr=False)
    """The manifest's tensor table of this plan's saves, by codec, once built (the commit's)."""

    @property
    def chunk_count(self) -> int:
        return len(self.chunk_writer)


def plan_save(rank_plans: list[RankPlan]) -> GlobalPlan:
    """Deduplicate, validate and assign the chunks every rank declared.

    Raises:
        ShardingError: ranks disagree on a tensor's dtype or shape, or its shards
            overlap without being identical, or leave part of it uncovered.
    """
    tensors, gid_per_rank = _global_ids(rank_plans)
    rows = _sorted_rows(rank_plans, tensors, gid_per_rank)
    chunks = _unique_chunks(rows, tensors)
    layouts = _layouts(tensors, chunks)
    writer, slot, writes = _assign_writers(rows, chunks, len(rank_plans))
    return GlobalPlan(
        plan_id=plan_id_of([rp.structure_key for rp in rank_plans]),
        tensors=tensors,
        chunk_start=chunks.t_start.tolist(),
        layouts=layouts,
        chunk_nbytes=chunks.nbytes,
        chunk_writer=writer.astype(np.int32),
        chunk_slot=slot,
        writes=writes,
    )


def plan_id_of(structure_keys: list[int]) -> int:
    """The id of the plan of ranks with these structure keys (in rank order)."""
    return _digest(np.array(structure_keys, dtype=np.int64).tobytes())


class _Rows(NamedTuple):
    """Every rank's non-empty boxes, one row each, sorted by (tensor, offsets, shape)."""

    gid: np.ndarray  # global tensor id
    rank: np.ndarray
    local: np.ndarray  # index in the rank's own list
    offsets: np.ndarray  # padded to the widest tensor: offsets with 0, shapes with 1
    shapes: np.ndarray


class _Chunks(NamedTuple):
    """The distinct boxes (chunks): rows ``start[u]:end[u]`` of :class:`_Rows` hold chunk u."""

    start: np.ndarray
    end: np.ndarray
    gid: np.ndarray
    offsets: np.ndarray
    shapes: np.ndarray
    nbytes: np.ndarray
    t_start: np.ndarray  # chunks of tensor g: t_start[g]:t_start[g + 1]


def _global_ids(rank_plans: list[RankPlan]) -> tuple[list[TensorDecl], list[np.ndarray]]:
    """One global id per tensor name (in name order), checking that every rank agrees on
    each tensor; and each rank's declarations as global ids."""
    # Ranks of one pipeline stage declare the same list: each distinct list is read once.
    distinct: dict[int, tuple[int, list[TensorDecl]]] = {}
    for rank, rp in enumerate(rank_plans):
        distinct.setdefault(rp.decl_key, (rank, rp.tensors))
    lists = list(distinct.values())
    # The first list in one C-level pass (names within one rank's list are unique); the
    # others, if any (pipeline stages), are checked against it one declaration at a time.
    first, first_decls = lists[0] if lists else (0, [])
    decl_by_name: dict[str, TensorDecl] = dict(
        zip(map(_NAME_OF, first_decls), first_decls, strict=True)
    )
    first_rank: dict[str, int] = dict.fromkeys(decl_by_name, first)
    for rank, decls in lists[1:]:
        for decl in decls:
            seen = decl_by_name.get(decl.name)
            if seen is None:
                decl_by_name[decl.name] = decl
                first_rank[decl.name] = rank
            elif seen != decl:
                raise ShardingError(
                    f"tensor {decl.name!r}: rank {first_rank[decl.name]} declares "
                    f"{seen.dtype}{list(seen.shape)}, rank {rank} declares "
                    f"{decl.dtype}{list(decl.shape)}"
                )
    names = sorted(decl_by_name)
    gid_of = dict(zip(names, range(len(names)), strict=True))
    tensors = list(map(decl_by_name.__getitem__, names))
    ids_of_key = {
        key: np.fromiter(map(gid_of.__getitem__, map(_NAME_OF, decls)), np.int64, len(decls))
        for key, (_, decls) in distinct.items()
    }
    gid_per_rank = [ids_of_key[rp.decl_key] for rp in rank_plans]
    return tensors, gid_per_rank


def _sorted_rows(
    rank_plans: list[RankPlan], tensors: list[TensorDecl], gid_per_rank: list[np.ndarray]
) -> _Rows:
    """All ranks' boxes as rows; empty ones dropped (uneven sharding leaves some ranks
    without data); sorted so that identical boxes (replicas) are adjacent."""
    ndim = max(map(len, map(_SHAPE_OF, tensors)), default=0)
    counts = [len(rp.tensors or ()) for rp in rank_plans]
    total = sum(counts)
    gid = np.concatenate(gid_per_rank) if total else np.zeros(0, np.int64)
    rank_col = np.repeat(np.arange(len(rank_plans), dtype=np.int64), counts)
    local_col = np.concatenate([np.arange(c, dtype=np.int64) for c in counts]) if total else gid
    offsets = np.zeros((total, ndim), dtype=np.int64)
    shapes = np.ones((total, ndim), dtype=np.int64)
    row = 0
    for rp, c in zip(rank_plans, counts, strict=True):
        d = rp.offsets.shape[1]
        offsets[row : row + c, :d] = rp.offsets
        shapes[row : row + c, :d] = rp.shapes
        row += c
    keep = np.all(shapes > 0, axis=1) if ndim else np.ones(total, dtype=bool)
    gid, rank_col, local_col = gid[keep], rank_col[keep], local_col[keep]
    offsets, shapes = offsets[keep], shapes[keep]
    keys = [shapes[:, d] for d in reversed(range(ndim))]
    keys += [offsets[:, d] for d in reversed(range(ndim))]
    keys.append(gid)
    order = np.lexsort(keys) if len(gid) else np.zeros(0, dtype=np.int64)
    return _Rows(gid[order], rank_col[order], local_col[order], offsets[order], shapes[order])


def _unique_chunks(rows: _Rows, tensors: list[TensorDecl]) -> _Chunks:
    """Group identical boxes into chunks (replicas are stored once)."""
    gid, offsets, shapes = rows.gid, rows.offsets, rows.shapes
    if len(gid):
        same = (gid[1:] == gid[:-1]) & np.all(offsets[1:] == offsets[:-1], axis=1)
        same &= np.all(shapes[1:] == shapes[:-1], axis=1)
        is_first = np.concatenate([[True], ~same])
    else:
        is_first = np.zeros(0, dtype=bool)
    start = np.flatnonzero(is_first)
    end = np.append(start[1:], len(gid))
    u_gid, u_off, u_shp = gid[start], offsets[start], shapes[start]
    itemsizes = np.array([t.itemsize for t in tensors], dtype=np.int64)
    nbytes = np.prod(u_shp, axis=1) * itemsizes[u_gid] if len(u_gid) else np.zeros(0, np.int64)
    t_start = np.searchsorted(u_gid, np.arange(len(tensors) + 1))
    return _Chunks(start, end, u_gid, u_off, u_shp, nbytes, t_start)


def _layouts(tensors: list[TensorDecl], chunks: _Chunks) -> list[Layout]:
    """Each tensor's layout, checking that its chunks tile it exactly. Tensors held whole
    (replicated or unsharded) are one chunk: no per-tensor work for them."""
    u_off, u_shp, t_start = chunks.offsets, chunks.shapes, chunks.t_start
    shapes = list(map(_SHAPE_OF, tensors))
    tensor_ndims = np.fromiter(map(len, shapes), np.int64, len(shapes))
    ndims = set(tensor_ndims.tolist())
    ndim = max(ndims, default=0)
    full_shapes = _padded(shapes, ndims, 1)
    # Held whole: one chunk, at offset 0, of the tensor's shape (checked for those only).
    single = np.diff(t_start) == 1
    one = np.flatnonzero(single)
    first = t_start[one]
    single[one] = (u_off[first] == 0).all(axis=1) & (u_shp[first] == full_shapes[one]).all(axis=1)
    whole_of = [whole_layout(d) for d in range(ndim + 1)]
    layouts = np.empty(len(tensors), dtype=object)  # filled in C: one object per tensor
    layouts[:] = list(map(whole_of.__getitem__, tensor_ndims.tolist()))
    # Sharded tensors: a grid or boxes each. FSDP shards thousands of tensors of one shape
    # the same way: tensors with the same chunk count are compared as rows of (ndim,
    # shape, every chunk's offsets and shape) in one pass, and each distinct row is worked
    # out once.
    sharded = np.flatnonzero(~single)
    counts = np.diff(t_start)[sharded]
    for count in np.unique(counts).tolist():
        group = sharded[counts == count]
        chunk = t_start[group][:, None] + np.arange(count)  # (tensors, chunks)
        rows = np.concatenate(
            [
                tensor_ndims[group][:, None],
                full_shapes[group],
                u_off[chunk].reshape(len(group), -1),
                u_shp[chunk].reshape(len(group), -1),
            ],
            axis=1,
        )
        first, inverse = _distinct_rows(rows)
        built = [
            _layout_of(
                tensors[g], u_off[t_start[g] : t_start[g + 1]], u_shp[t_start[g] : t_start[g + 1]]
            )
            for g in group[first].tolist()
        ]
        distinct = np.empty(len(built), dtype=object)
        distinct[:] = built
        layouts[group] = distinct[inverse]
    return layouts.tolist()


def _padded(rows: list[tuple[int, ...]], ndims: set[int], fill: int) -> np.ndarray:
    """``rows`` (tuples of the lengths ``ndims``) as an (n, max(ndims)) array, padded with
    ``fill``: straight from the tuples when they are all of one length (the usual case),
    else one pass per length."""
    ndim, n = max(ndims, default=0), len(rows)
    if len(ndims) <= 1:
        flat = itertools.chain.from_iterable(rows)
        return np.fromiter(flat, np.int64, n * ndim).reshape(n, ndim)
    out = np.full((n, ndim), fill, dtype=np.int64)
    of_rank = np.fromiter(map(len, rows), np.int64, n)
    for d in ndims - {0}:  # scalars have no column to fill
        at = np.flatnonzero(of_rank == d)
        picked = map(rows.__getitem__, at.tolist())
        flat = np.fromiter(itertools.chain.from_iterable(picked), np.int64, len(at) * d)
        out[at, :d] = flat.reshape(len(at), d)
    return out


def _distinct_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first index of each distinct row of ``rows`` and, for every row, which distinct
    row it is. FSDP shards thousands of tensors alike: rows equal to the first are found in
    one comparison; only the others (a handful of differently-shaped tensors) are sorted."""
    same = (rows == rows[0]).all(axis=1)
    if same.all():
        return np.zeros(1, np.int64), np.zeros(len(rows), np.int64)
    rest = np.flatnonzero(~same)
    _, first, inverse = np.unique(rows[rest], axis=0, return_index=True, return_inverse=True)
    index = np.zeros(len(rows), np.int64)
    index[rest] = inverse.reshape(-1) + 1
    return np.concatenate([[0], rest[first]]), index


def _assign_writers(
    rows: _Rows, chunks: _Chunks, world: int
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Who writes each chunk: its sole holder, or the least-loaded of its replicas' holders
    (bytes balanced across ranks); each chunk's slot in its writer's list; each rank's list
    of its own tensors (local indexes) to write, in order."""
    group_start, group_end, u_nbytes = chunks.start, chunks.end, chunks.nbytes
    rank_col, local_col = rows.rank, rows.local
    replicas = group_end - group_start
    writer = np.where(replicas == 1, rank_col[group_start], -1)
    load = np.bincount(writer[writer >= 0], weights=u_nbytes[writer >= 0], minlength=world)
    load = load.astype(np.int64).tolist()
    multi = np.flatnonzero(replicas > 1)
    multi = multi[np.argsort(-u_nbytes[multi], kind="stable")]
    everywhere = multi[replicas[multi] == world]
    partial = multi[replicas[multi] < world]
    # Held by every rank (replicated tensors): the least-loaded rank takes the next largest.
    sizes = u_nbytes[everywhere]
    starts = np.flatnonzero(np.r_[True, sizes[1:] != sizes[:-1]]).tolist() if len(sizes) else []
    for lo, hi in itertools.pairwise([*starts, len(sizes)]):  # runs of one size
        load = _assign_equal(everywhere[lo:hi], int(sizes[lo]), load, writer)
    rank_list = rank_col.tolist()
    for u, s, e, nb in zip(
        partial.tolist(),
        group_start[partial].tolist(),
        group_end[partial].tolist(),
        u_nbytes[partial].tolist(),
        strict=True,
    ):
        best = min(rank_list[s:e], key=load.__getitem__)
        writer[u] = best
        load[best] += nb
    # The writer's own row for each chunk. Rows of a group are in rank order (the sort is
    # stable over rank-major rows), so where every rank holds the chunk, rank r is row r.
    writer_row = group_start.copy()
    writer_row[everywhere] = group_start[everywhere] + writer[everywhere]
    for u in partial.tolist():
        s, e = int(group_start[u]), int(group_end[u])
        writer_row[u] = s + rank_list[s:e].index(int(writer[u]))
    w_local = local_col[writer_row]
    by_writer = np.lexsort((w_local, writer))
    slot = np.empty(len(writer), dtype=np.int64)
    writes: list[np.ndarray] = []
    bounds = np.searchsorted(writer[by_writer], np.arange(world + 1))
    for r in range(world):
        idx = by_writer[bounds[r] : bounds[r + 1]]
        slot[idx] = np.arange(len(idx))
        writes.append(w_local[idx])
    return writer, slot, writes


def _assign_equal(
    chunks: np.ndarray, nbytes: int, load: list[int], writer: np.ndarray
) -> list[int]:
    """Give each of ``chunks`` (all ``nbytes`` long, held by every rank) to the least-loaded
    rank (ties: the lowest rank), one after another; returns the new loads. While every
    rank carries the same load that is round robin, done in one pass (thousands of
    replicated norms and biases of one size); otherwise a heap, O(log W) per chunk."""
    world = len(load)
    if min(load, default=0) == max(load, default=0):
        turn = np.arange(len(chunks)) % world
        writer[chunks] = turn
        taken = np.bincount(turn, minlength=world) * nbytes
        return [a + b for a, b in zip(load, taken.tolist(), strict=True)]
    heap = [(load[r], r) for r in range(world)]
    heapq.heapify(heap)
    for u in chunks.tolist():
        least, r = heapq.heappop(heap)
        writer[u] = r
        heapq.heappush(heap, (least + nbytes, r))
    out = list(load)
    for least, r in heap:
        out[r] = least
    return out


def _layout_of(decl: TensorDecl, offs: np.ndarray, shps: np.ndarray) -> Layout:
    nd = len(decl.shape)
    numel = 1
    for s in decl.shape:
        numel *= s
    n = len(offs)
    if numel == 0:
        return GridLayout(tuple(() for _ in range(nd)))
    if n == 1 and all(int(offs[0, d]) == 0 and int(shps[0, d]) == decl.shape[d] for d in range(nd)):
        return GridLayout(tuple((0,) for _ in range(nd)))
    ends = offs[:, :nd] + shps[:, :nd]
    for d in range(nd):
        if offs[:, d].min(initial=0) < 0 or ends[:, d].max(initial=0) > decl.shape[d]:
            raise ShardingError(
                f"tensor {decl.name!r}: a shard lies outside shape {list(decl.shape)}"
            )
    # A grid: along every dim the chunk starts are the cut points and each chunk fills one cell.
    starts = [np.unique(offs[:, d]) for d in range(nd)]
    cells = 1
    for s in starts:
        cells *= len(s)
    if cells == n and all(len(s) and s[0] == 0 for s in starts):
        ok = True
        for d in range(nd):
            cut = np.append(starts[d], decl.shape[d])
            pos = np.searchsorted(starts[d], offs[:, d])
            if not np.array_equal(cut[pos + 1] - cut[pos], shps[:, d]):
                ok = False
                break
        if ok:
            return GridLayout(tuple(tuple(int(x) for x in s) for s in starts))
    # Not a grid: the boxes must still tile the tensor exactly (no overlap, no gap).
    volume = int(np.prod(shps[:, :nd], axis=1).sum())
    if volume != numel:
        problem = "overlap" if volume > numel else "leave gaps"
        raise ShardingError(
            f"tensor {decl.name!r} of shape {list(decl.shape)}: the declared shards {problem} "
            f"(they cover {volume} elements, the tensor has {numel})"
        )
    if n <= 4096:
        lo = offs[:, None, :nd]
        hi = ends[:, None, :]
        inter = np.all(
            (np.maximum(lo, offs[None, :, :nd]) < np.minimum(hi, ends[None, :, :])), axis=2
        )
        np.fill_diagonal(inter, False)
        if inter.any():
            i, j = map(int, np.argwhere(inter)[0])
            raise ShardingError(
                f"tensor {decl.name!r}: shards at offsets {offs[i, :nd].tolist()} and "
                f"{offs[j, :nd].tolist()} overlap without being identical"
            )
    return BoxLayout(offs[:, :nd].copy(), shps[:, :nd].copy())
