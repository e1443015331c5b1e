"""``save``: the collective that writes one committed checkpoint.

Flow: flatten -> plan (cached while the structure holds) -> write this rank's chunks ->
gather every rank's chunk index -> the coordinator commits ONE manifest atomically ->
everyone learns the outcome. Collectives per save: one all_reduce (cache check, existing
checkpoint, local errors), the plan exchange only when the plan is not cached (planned by
planning group, see ``plan_exchange``), one gather of chunk indexes, one broadcast of the
commit result.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from itertools import chain, compress, repeat
from operator import attrgetter, not_
from typing import Any

import numpy as np
import torch

from ckptstore import failpoints, knobs
from ckptstore.backends.base import Store
from ckptstore.coordination.collectives import Coordinator
from ckptstore.errors import (
    CheckpointExistsError,
    CkptStoreError,
    PickleNotAllowedError,
    SaveError,
    StateDictError,
)
from ckptstore.format.commit_point import store_for
from ckptstore.format.data_files import FilePlan, WriteItem, WriteResult, write_items
from ckptstore.format.dtypes import DTYPE_TO_NAME
from ckptstore.format.manifest import (
    MANIFEST_KEY,
    SAVING_KEY,
)
from ckptstore.format.rules import bad_name
from ckptstore.gcpause import gc_paused
from ckptstore.saving.commit import SaveInfo, commit_collective, prepare_commit, unmark_saving
from ckptstore.saving.plan import Declarations, GlobalPlan
from ckptstore.saving.plan_exchange import ALONE, PlanGroup, plan_by_groups
from ckptstore.state.leaves import FlatState, Leaf, flatten_columns
from ckptstore.state.tensor_bytes import all_as_bytes, all_host_contiguous
from ckptstore.tiers.seam import SaveTarget, save_target


@dataclass
class _CachedPlan:
    plan_id: int
    writes: np.ndarray
    global_plan: GlobalPlan | None  # only on the coordinator
    group: PlanGroup


_PLAN_CACHE: OrderedDict[tuple[int, int], _CachedPlan] = OrderedDict()


@dataclass
class _Local:
    """One rank's share of a save, ready to write."""

    tensor_names: list[str]
    tensor_locals: list[torch.Tensor]
    """This rank's global tensors (their local data), in the order of its declarations."""
    declared: Declarations
    """The keys of this rank's plan; its :class:`RankPlan` is built on a plan-cache miss."""
    rank_tensors: list[Leaf]
    values: dict[str, Any]
    rank_values: dict[str, Any]
    blobs: dict[str, bytes]
    rank_blobs: dict[str, bytes]


_NAME, _KIND = attrgetter("name"), attrgetter("kind")
_DTYPE, _IS_TENSOR_KIND = attrgetter("dtype"), "tensor".__eq__
_SHAPE, _BOX = attrgetter("global_shape"), attrgetter("box")
_NEW_ITEM = partial(tuple.__new__, WriteItem)
_VALUE = attrgetter("value")  # a tensor leaf's local tensor
_RELEASED = Declarations(([], [], [], []), [])  # what a staged async save keeps of them
_ITEMSIZE = {name: dtype.itemsize for dtype, name in DTYPE_TO_NAME.items()}


def _prepare(flat: FlatState, is_coordinator: bool, allow_pickle: bool) -> _Local:
    problem = bad_name(flat.names())  # what a reader would refuse is refused before writing
    if problem:
        raise StateDictError(f"state_dict entry {problem}")
    rank_tensors: list[Leaf] = []
    values: dict[str, Any] = {}
    rank_values: dict[str, Any] = {}
    blobs: dict[str, bytes] = {}
    rank_blobs: dict[str, bytes] = {}
    every = list(flat.leaves.values())
    is_tensor = list(map(_IS_TENSOR_KIND, map(_KIND, every)))  # most leaves: C-level passes
    tensor_leaves = list(compress(every, is_tensor))
    others = [] if len(tensor_leaves) == len(every) else list(compress(every, map(not_, is_tensor)))
    for leaf in others:
        if leaf.kind == "rank_tensor":
            rank_tensors.append(leaf)
        elif leaf.kind == "value":
            values[leaf.name] = leaf.value
        elif leaf.kind == "rank_value":
            rank_values[leaf.name] = leaf.value
        else:
            if not allow_pickle:
                raise PickleNotAllowedError(
                    f"state_dict entry {leaf.name!r} is a {type(leaf.value).__qualname__}, which "
                    "is not a tensor or a plain value; pass allow_pickle=True to store it pickled "
                    "(loading it will need allow_pickle=True too)"
                )
            if leaf.kind == "rank_object":
                rank_blobs[leaf.name] = pickle.dumps(leaf.value, protocol=pickle.HIGHEST_PROTOCOL)
            elif is_coordinator:
                blobs[leaf.name] = pickle.dumps(leaf.value, protocol=pickle.HIGHEST_PROTOCOL)
    # Column passes (map over attribute getters) instead of a Python loop per tensor: a
    # state_dict may hold tens of thousands of them, most in tensor blocks (columns already).
    blocks = flat.blocks
    names = list(map(_NAME, tensor_leaves))
    names += chain.from_iterable(b.names for b in blocks)
    dtypes = list(map(_DTYPE, tensor_leaves))  # read by flatten: the tensors stay untouched
    dtypes += chain.from_iterable(b.dtypes for b in blocks)
    dtype_names = list(map(DTYPE_TO_NAME.get, dtypes))
    unsupported = [
        (x.name, x.local.dtype) for x in rank_tensors if x.local.dtype not in DTYPE_TO_NAME
    ]
    if None in dtype_names:
        at = dtype_names.index(None)
        unsupported.insert(0, (names[at], dtypes[at]))
    if unsupported:
        name, dtype = unsupported[0]
        raise StateDictError(f"tensor {name!r}: unsupported tensor dtype {dtype}")
    shapes = list(map(_SHAPE, tensor_leaves))
    shapes += chain.from_iterable(b.shapes for b in blocks)
    boxes = list(map(_BOX, tensor_leaves))
    boxes += chain.from_iterable(b.boxes for b in blocks)
    locals_ = list(map(_VALUE, tensor_leaves))
    locals_ += chain.from_iterable(b.locals for b in blocks)
    columns = (names, dtype_names, shapes, list(map(_ITEMSIZE.get, dtype_names)))
    declared = Declarations(columns, boxes)
    return _Local(names, locals_, declared, rank_tensors, values, rank_values, blobs, rank_blobs)


@dataclass
class SaveOptions:
    """Options of one save (see :func:`save` for their meaning)."""

    overwrite: bool = False
    codec: str | None = None
    allow_pickle: bool = False
    metadata: dict[str, Any] | None = None
    files_per_rank: int | None = None
    checksum_block_bytes: int | None = None
    storage_options: dict[str, Any] | None = None
    spread_prefixes: int | None = None

    @property
    def block(self) -> int:
        return self.checksum_block_bytes or knobs.checksum_block_bytes()


@dataclass
class PlannedSave:
    """A save after its foreground collectives: what this rank writes, ready to stage/write."""

    target: SaveTarget | None  # None: planned without a checkpoint (to prepare one)
    options: SaveOptions
    rank: int
    world_size: int
    local: _Local
    writes: np.ndarray
    global_plan: GlobalPlan | None
    plan_cached: bool
    seconds: dict[str, float] = field(default_factory=dict)
    group: PlanGroup = ALONE
    """This rank's planning group: the commit's chunk indexes go through its leader."""
    replication_team: Any = None
    """The ranks that agree on this save's replication to a shared tier (tiered paths)."""
    streamed_upload: Future | None = None
    """Tiered async saves: this rank's data files going to the shared tier straight from
    the staging buffer while tier 0 is written (a Future of the keys uploaded)."""

    @property
    def store(self) -> Any:
        """The store saved into (None when planned without a checkpoint)."""
        return self.target.store if self.target is not None else None

    @property
    def spread(self) -> int:
        """Key prefixes the data files are spread over (``spread_prefixes``, resolved)."""
        if self.options.spread_prefixes is not None:
            return self.options.spread_prefixes
        store = self.store
        remote = store is not None and (store.tiers() is not None or not store.reads_are_local)
        return knobs.spread_prefixes() if remote else 0

    def release_tensors(self) -> None:
        """Drop what the write no longer needs once this rank's tensors are staged: a leaf
        per tensor (the caller's tensors stay referenced otherwise until the background
        write ends) and the declarations the plan was made from."""
        self.local.tensor_locals = []
        self.local.declared = _RELEASED

    def tensors_to_write(self) -> list[torch.Tensor]:
        """This rank's tensors in write order: its planned chunks, then per-rank tensors."""
        local = self.local
        return list(map(local.tensor_locals.__getitem__, self.writes.tolist())) + [
            leaf.local for leaf in local.rank_tensors
        ]

    def blobs(self) -> list[bytes]:
        return [*self.local.blobs.values(), *self.local.rank_blobs.values()]

    def write_items(self, host_tensors: list[torch.Tensor]) -> list[WriteItem]:
        """Write items for ``host_tensors`` (CPU, contiguous, in :meth:`tensors_to_write`
        order) followed by the pickled blobs; the caller keeps the tensors alive."""
        codec = self.options.codec
        items = list(map(_NEW_ITEM, zip(all_as_bytes(host_tensors), repeat(codec))))
        return items + [WriteItem(memoryview(b)) for b in self.blobs()]


def save(
    state_dict: Any,
    path: str | os.PathLike[str] | Store,
    *,
    process_group: torch.distributed.ProcessGroup | None = None,
    overwrite: bool = False,
    codec: str | None = None,
    allow_pickle: bool = False,
    metadata: dict[str, Any] | None = None,
    files_per_rank: int | None = None,
    checksum_block_bytes: int | None = None,
    storage_options: dict[str, Any] | None = None,
    spread_prefixes: int | None = None,
    no_dist: bool = False,
) -> SaveInfo:
    """Save ``state_dict`` from every rank of ``process_group`` as one checkpoint at ``path``.

    A collective: every rank calls it with its own state_dict. Returns after the manifest
    is committed; raises on every rank if any rank failed, and then nothing is committed.

    Args:
        state_dict: nested dicts/lists of tensors, DTensors, :class:`Sharded`,
            :class:`PerRank` and plain values.
        path: a directory or URL (``file://``, ``memory://``, any fsspec URL) or a Store.
        overwrite: replace a committed checkpoint at ``path`` (the old one stays loadable
            until the new manifest replaces it).
        codec: per-chunk compression (``"zstd"``, ``"zstd:3"``, ``"lz4"``); off by default.
        allow_pickle: store objects that are not plain values pickled.
        metadata: a JSON-able dict stored in the manifest.
        files_per_rank: data files (and writer threads) per rank.
        checksum_block_bytes: bytes covered by each crc32c.
        spread_prefixes: spread data files over this many key prefixes (object stores limit
            request rates per prefix); 0 keeps them all under ``data/``. Default: 0 on this
            node's disk, ``CKPTSTORE_SPREAD_PREFIXES`` (64) on object stores and tiered
            paths.
        no_dist: this process saves by itself, even inside a distributed job -- no
            collective (as torch DCP's ``no_dist``): rank 0 writing a consolidated state, a
            framework hook that runs on one rank. Not with a tiered path.
    """
    options = SaveOptions(
        overwrite=overwrite,
        codec=codec,
        allow_pickle=allow_pickle,
        metadata=metadata,
        files_per_rank=files_per_rank,
        checksum_block_bytes=checksum_block_bytes,
        storage_options=storage_options,
        spread_prefixes=spread_prefixes,
    )
    coord = Coordinator(process_group, alone=no_dist)
    target = save_target(store_for(path, options.storage_options))
    if no_dist and target.store.tiers() is not None:
        raise ValueError("no_dist=True saves one process's state; a tiered path needs every rank")
    team = None if no_dist else target.replication_team(process_group)
    with gc_paused():  # bulk object creation; see ckptstore.gcpause
        group_key = -1 if no_dist else id(process_group)  # plans cached per set of ranks
        planned = plan_save_collective(state_dict, target, coord, options, group_key)
        planned.replication_team = team
        failpoints.hit("planned", coord.rank)
        t = time.perf_counter()
        prepare_commit(planned)
        try:
            keep_alive = all_host_contiguous(planned.tensors_to_write())
            items = planned.write_items(keep_alive)
        except Exception as exc:  # reported through the commit: no rank waits for this one
            result, error = None, unwritable_error(planned, exc)
        else:
            result, error = write_planned(planned, items)
            del keep_alive, items
            failpoints.hit("written", coord.rank)
        planned.seconds["write"] = time.perf_counter() - t
        info = commit_collective(planned, result, error, coord)
        # The save's own objects (a leaf per tensor, its plan) go while the collector is
        # still paused: alive when it resumes, they would make its next young-generation
        # pass walk every one of them (15-20 ms at 20,000 tensors) for nothing.
        del planned, result, error
        return info


def prepare_save(
    state_dict: Any,
    *,
    process_group: torch.distributed.ProcessGroup | None = None,
    no_dist: bool = False,
    **options: Any,
) -> None:
    """Make the first :func:`save` of ``state_dict`` as quick as the later ones.

    A collective, like ``save`` (same ``process_group``, ``no_dist`` and options; no path).
    It plans the save now and caches the plan -- the first save then needs one
    ``all_reduce``, not the plan exchange -- and has the coordinator build the manifest's
    tensor table of that plan, which the commit would otherwise build while every rank
    waits. Call it once before the first checkpoint step (after building the model and
    optimizer, or after restoring); :class:`~ckptstore.CheckpointManager` calls it by
    itself. Nothing is written. A save of another structure plans afresh, as it would.

    Raises (on every rank, as ``save`` would): what the state_dict or the plan refuses
    (:class:`~ckptstore.errors.StateDictError`, ``ShardingError``, ...).
    """
    save_options = SaveOptions(**options)
    coord = Coordinator(process_group, alone=no_dist)
    with gc_paused():
        group_key = -1 if no_dist else id(process_group)
        planned = plan_save_collective(state_dict, None, coord, save_options, group_key)
        prepare_commit(planned)
        del planned  # see save(): gone before the collector resumes


def plan_save_collective(
    state_dict: Any,
    target: SaveTarget | None,
    coord: Coordinator,
    options: SaveOptions,
    group_key: int,
    meanwhile: Callable[[PlannedSave], None] | None = None,
) -> PlannedSave:
    """The foreground part of a save: flatten, agree, plan (or reuse the cached plan).

    Collectives on ``coord``: one all_reduce; on a plan-cache miss the plan exchange
    (``plan_exchange``). Raises on every rank if any rank failed.
    ``target=None`` plans without a checkpoint (to prepare a later save): nothing is
    checked, marked or written, and the returned plan has no store.

    ``meanwhile``: when this rank holds a cached plan, it is called with that plan while
    the all_reduce is in flight (an async save stages its tensors then, instead of waiting
    for the slowest rank). It must not raise. The plan it got is the one returned if every
    rank holds it; otherwise (a miss elsewhere, a failure) the caller undoes its work.
    """
    t0 = time.perf_counter()
    if options.codec is not None:
        from ckptstore.format.codecs import get_codec

        get_codec(options.codec)
    local, error = _prepare_locally(state_dict, coord, options)
    cached = _cached_plan(local, group_key)
    exists, marked, error = _check_and_mark(target, coord, options, error)
    early: PlannedSave | None = None  # the cached plan, handed to ``meanwhile``
    early_work = None
    if meanwhile is not None and cached is not None and error is None and target is not None:
        assert local is not None
        early = _planned(target, options, coord, local, cached, True)
        early_work = partial(meanwhile, early)
    plan_cached = _agree(target, coord, cached, exists, marked, error, early_work)
    assert local is not None
    t_plan = time.perf_counter()
    if plan_cached and early is not None:
        early.seconds.update(prepare=t_plan - t0, plan=0.0)
        return early
    if not plan_cached:
        cached = _plan_exchanged(local, coord, group_key)
    assert cached is not None
    planned = _planned(target, options, coord, local, cached, plan_cached)
    planned.seconds.update(prepare=t_plan - t0, plan=time.perf_counter() - t_plan)
    return planned


def _planned(
    target: SaveTarget | None,
    options: SaveOptions,
    coord: Coordinator,
    local: _Local,
    cached: _CachedPlan,
    plan_cached: bool,
) -> PlannedSave:
    return PlannedSave(
        target,
        options,
        coord.rank,
        coord.world_size,
        local,
        cached.writes,
        cached.global_plan,
        plan_cached,
        group=cached.group,
    )


def _prepare_locally(
    state_dict: Any, coord: Coordinator, options: SaveOptions
) -> tuple[_Local | None, BaseException | None]:
    """Flatten and declare this rank's state; an error is kept for the agreement."""
    try:
        local = _prepare(flatten_columns(state_dict), coord.is_coordinator, options.allow_pickle)
        if options.metadata is not None:
            import json

            json.dumps(options.metadata)
    except (CkptStoreError, TypeError, ValueError) as exc:
        return None, exc
    return local, None


def _cached_plan(local: _Local | None, group_key: int) -> _CachedPlan | None:
    """This rank's plan from an earlier save of the same structure, if any."""
    if local is None:
        return None
    key = (group_key, local.declared.structure_key)
    cached = _PLAN_CACHE.get(key)
    if cached is not None:
        _PLAN_CACHE.move_to_end(key)
    return cached


def _check_and_mark(
    target: SaveTarget | None,
    coord: Coordinator,
    options: SaveOptions,
    error: BaseException | None,
) -> tuple[int, bool, BaseException | None]:
    """Before any rank writes data: does a committed checkpoint exist (the coordinator asks
    the commit store; a tiered save never asks the shared tier, which may be unreachable),
    and the in-flight marker that keeps gc off (on every node for tiered saves).
    Returns (exists, marked, error)."""
    if target is None:  # planning only
        return 0, False, error
    primary = target.commit_store
    exists = 0
    if coord.is_coordinator and not options.overwrite and error is None:
        try:
            exists = int(primary.exists(MANIFEST_KEY))
        except CkptStoreError as exc:
            error = exc
    marked = False
    if error is None and not exists and (coord.is_coordinator or target.marks_every_node):
        try:  # the all_reduce of the agreement orders this before any rank's data
            primary.write_volatile(SAVING_KEY, b"")  # no fsync: it is bookkeeping
            marked = True
        except CkptStoreError as exc:
            error = exc
    return exists, marked, error


def _agree(
    target: SaveTarget | None,
    coord: Coordinator,
    cached: _CachedPlan | None,
    exists: int,
    marked: bool,
    error: BaseException | None,
    meanwhile: Callable[[], None] | None = None,
) -> bool:
    """One all_reduce decides: is the plan cached on every rank, does every rank name the
    same checkpoint, does it exist, did any rank fail. Raises the same on every rank;
    returns whether the cached plan holds. ``meanwhile`` runs while it is in flight."""
    shared_url = target.shared_url if target is not None else ""
    path_key = int.from_bytes(hashlib.blake2b(shared_url.encode(), digest_size=7).digest(), "big")
    my_plan_id = cached.plan_id if cached else -1
    hi, neg_lo, path_hi, path_neg_lo, exists, failed = coord.max_ints(
        [my_plan_id, -my_plan_id, path_key, -path_key, exists, int(error is not None)],
        meanwhile,
    )
    if (failed or exists or path_hi != -path_neg_lo) and marked:
        assert target is not None
        unmark_saving(target.commit_store)
    if failed:
        coord.raise_failures(error)
    if path_hi != -path_neg_lo:
        urls = coord.all_gather(shared_url)
        raise SaveError(
            "the ranks passed different paths for one save: "
            + ", ".join(f"rank {r}: {u}" for r, u in enumerate(urls) if u != urls[0])
            + f" (rank 0: {urls[0]}); every rank must save to the same checkpoint"
        )
    if exists:
        assert target is not None
        raise CheckpointExistsError(
            f"{target.store.url}: a committed checkpoint is already there; pass overwrite=True "
            "to replace it"
        )
    return hi == -neg_lo and hi >= 0


def _plan_exchanged(local: _Local, coord: Coordinator, group_key: int) -> _CachedPlan:
    """A plan-cache miss: plan by planning groups (``plan_exchange``), cache the result."""
    plan_id, writes, global_plan, group = plan_by_groups(local.declared.rank_plan(), coord)
    cached = _PLAN_CACHE[(group_key, local.declared.structure_key)] = _CachedPlan(
        plan_id, writes, global_plan, group
    )
    while len(_PLAN_CACHE) > knobs.plan_cache_size():
        _PLAN_CACHE.popitem(last=False)
    return cached


def unwritable_error(planned: PlannedSave, exc: Exception) -> SaveError:
    """The error of a rank that could not copy its tensors to host memory, naming the
    tensor when it is one that holds no dense data (sparse, or on the meta device)."""
    local = planned.local
    held = [
        *zip(local.tensor_names, local.tensor_locals, strict=False),
        *((x.name, x.local) for x in local.rank_tensors),
    ]
    bad = next((name for name, t in held if t.layout != torch.strided or t.is_meta), None)
    what = (
        f"tensor {bad!r} is sparse or on the meta device: only dense tensors with data can "
        "be saved (convert with .to_dense(), or materialize it first)"
        if bad is not None
        else f"{type(exc).__name__}: {exc}"
    )
    error = SaveError(f"{planned.store.url}: rank {planned.rank} cannot copy its tensors: {what}")
    error.__cause__ = exc
    return error


def write_planned(
    planned: PlannedSave, items: list[WriteItem], file_plan: FilePlan | None = None
) -> tuple[WriteResult | None, BaseException | None]:
    """Write this rank's items (no collective); an error is returned, to be reported at commit."""
    try:
        result = write_items(
            planned.store,
            items,
            rank=planned.rank,
            files=planned.options.files_per_rank or knobs.files_per_rank(),
            block_bytes=planned.options.block,
            pack_bytes=knobs.pack_bytes(),
            spread=planned.spread,
            plan=file_plan,
        )
    except Exception as exc:  # reported to the coordinator, which aborts the commit
        error = SaveError(
            f"{planned.store.url}: rank {planned.rank} could not write its data: "
            f"{type(exc).__name__}: {exc}"
        )
        error.__cause__ = exc
        return None, error
    return result, None
