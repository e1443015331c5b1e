"""``save``: the collective that writes one committed checkpoint.

Flow: flatten -> plan (cached while the structure holds) -> write this rank's chunks ->
gather every rank's chunk index -> the coordinator commits ONE manifest atomically ->
everyone learns the outcome. Collectives per save: one all_reduce (cache check, existing
checkpoint, local errors), a gather + scatter only when the plan is not cached, one gather
of chunk indexes, one broadcast of the commit result.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ckptstore import knobs
from ckptstore.backends.base import Store
from ckptstore.coordinate import CollectiveError, Coordinator
from ckptstore.dtypes import dtype_name
from ckptstore.errors import (
    CheckpointExistsError,
    CkptStoreError,
    KeyExistsError,
    PickleNotAllowedError,
    SaveError,
    StateDictError,
)
from ckptstore.gcpause import gc_paused
from ckptstore.leaves import Leaf, flatten
from ckptstore.locate import store_for
from ckptstore.manifest import (
    DATA_PREFIX,
    MANIFEST_KEY,
    BlobRef,
    ChunkTable,
    Entry,
    Manifest,
    ObjectRecord,
    TensorRecord,
)
from ckptstore.plan import GlobalPlan, GridLayout, RankPlan, TensorDecl, plan_save
from ckptstore.tensor_bytes import as_bytes, host_contiguous
from ckptstore.write import WriteItem, WriteResult, write_items


@dataclass
class SaveInfo:
    """What a save did; the same on every rank except the per-rank byte counts."""

    path: str
    world_size: int
    tensors: int
    total_bytes: int
    rank_bytes_written: int
    files: int
    plan_cached: bool
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class _CachedPlan:
    plan_id: int
    writes: np.ndarray
    global_plan: GlobalPlan | None  # only on the coordinator


_PLAN_CACHE: OrderedDict[tuple[int, int], _CachedPlan] = OrderedDict()


@dataclass
class _Local:
    """One rank's share of a save, ready to write."""

    tensor_leaves: list[Leaf]
    rank_plan: RankPlan
    rank_tensors: list[Leaf]
    values: dict[str, Any]
    rank_values: dict[str, Any]
    blobs: dict[str, bytes]
    rank_blobs: dict[str, bytes]


def _prepare(leaves: dict[str, Leaf], is_coordinator: bool, allow_pickle: bool) -> _Local:
    tensor_leaves, rank_tensors = [], []
    values: dict[str, Any] = {}
    rank_values: dict[str, Any] = {}
    blobs: dict[str, bytes] = {}
    rank_blobs: dict[str, bytes] = {}
    for leaf in leaves.values():
        if leaf.kind == "tensor":
            tensor_leaves.append(leaf)
        elif leaf.kind == "rank_tensor":
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
    decls, boxes = [], []
    for leaf in tensor_leaves:
        try:
            name = dtype_name(leaf.local.dtype)
        except ValueError as exc:
            raise StateDictError(f"tensor {leaf.name!r}: {exc}") from None
        decls.append(TensorDecl(leaf.name, name, leaf.global_shape, leaf.local.dtype.itemsize))
        boxes.append(leaf.box)
    for leaf in rank_tensors:
        dtype_name(leaf.local.dtype)
    plan = RankPlan.build(decls, boxes)
    return _Local(tensor_leaves, plan, rank_tensors, values, rank_values, blobs, rank_blobs)


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

    @property
    def block(self) -> int:
        return self.checksum_block_bytes or knobs.checksum_block_bytes()


@dataclass
class PlannedSave:
    """A save after its foreground collectives: what this rank writes, ready to stage/write."""

    store: Store
    options: SaveOptions
    rank: int
    world_size: int
    local: _Local
    writes: np.ndarray
    global_plan: GlobalPlan | None
    plan_cached: bool
    seconds: dict[str, float] = field(default_factory=dict)

    def tensors_to_write(self) -> list[torch.Tensor]:
        """This rank's tensors in write order: its planned chunks, then per-rank tensors."""
        leaves = self.local.tensor_leaves
        return [leaves[i].local for i in self.writes.tolist()] + [
            leaf.local for leaf in self.local.rank_tensors
        ]

    def blobs(self) -> list[bytes]:
        return [*self.local.blobs.values(), *self.local.rank_blobs.values()]


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
    """
    options = SaveOptions(
        overwrite,
        codec,
        allow_pickle,
        metadata,
        files_per_rank,
        checksum_block_bytes,
        storage_options,
    )
    coord = Coordinator(process_group)
    with gc_paused():  # bulk object creation; see ckptstore.gcpause
        planned = plan_save_collective(state_dict, path, coord, options, id(process_group))
        t = time.perf_counter()
        keep_alive = [host_contiguous(x) for x in planned.tensors_to_write()]
        items = [WriteItem(as_bytes(x), codec) for x in keep_alive]
        items += [WriteItem(memoryview(b)) for b in planned.blobs()]
        result, error = write_planned(planned, items)
        del keep_alive
        planned.seconds["write"] = time.perf_counter() - t
        return commit_collective(planned, result, error, coord)


def plan_save_collective(
    state_dict: Any,
    path: str | os.PathLike[str] | Store,
    coord: Coordinator,
    options: SaveOptions,
    group_key: int,
) -> PlannedSave:
    """The foreground part of a save: flatten, agree, plan (or reuse the cached plan).

    Collectives on ``coord``: one all_reduce; on a plan-cache miss an all_gather of
    declaration keys, a gather and a scatter. Raises on every rank if any rank failed.
    """
    t0 = time.perf_counter()
    store = store_for(path, options.storage_options)
    if options.codec is not None:
        from ckptstore.codecs import get_codec

        get_codec(options.codec)

    # -- one all_reduce decides: plan cache hit everywhere? checkpoint exists? any error? ---
    local: _Local | None = None
    error: BaseException | None = None
    try:
        local = _prepare(flatten(state_dict), coord.is_coordinator, options.allow_pickle)
        if options.metadata is not None:
            import json

            json.dumps(options.metadata)
    except (CkptStoreError, TypeError, ValueError) as exc:
        error = exc
    cached = None
    structure_key = local.rank_plan.structure_key if local else -1
    if local is not None:
        cached = _PLAN_CACHE.get((group_key, structure_key))
        if cached is not None:
            _PLAN_CACHE.move_to_end((group_key, structure_key))
    my_plan_id = cached.plan_id if cached else -1
    exists = 0
    if coord.is_coordinator and not options.overwrite and error is None:
        exists = int(store.exists(MANIFEST_KEY))
    hi, neg_lo, exists, failed = coord.max_ints(
        [my_plan_id, -my_plan_id, exists, int(error is not None)]
    )
    if failed:
        coord_messages = coord.all_gather(f"{type(error).__name__}: {error}" if error else None)
        if error is not None:
            raise error
        raise CollectiveError(coord_messages)
    if exists:
        raise CheckpointExistsError(
            f"{store.url}: a committed checkpoint is already there; pass overwrite=True to replace it"
        )
    assert local is not None
    plan_cached = hi == -neg_lo and hi >= 0
    t_plan = time.perf_counter()

    # -- plan, only when some rank's structure changed --------------------------------------
    if plan_cached:
        assert cached is not None
        writes, global_plan = cached.writes, cached.global_plan
    else:
        # Ranks of one pipeline stage declare the same tensors: only the first rank with a
        # given declaration list sends it (an all_gather of 8-byte keys decides which).
        decl_keys = coord.all_gather(local.rank_plan.decl_key)
        first_with = {key: r for r, key in reversed(list(enumerate(decl_keys)))}
        mine = local.rank_plan
        if first_with[mine.decl_key] != coord.rank:
            mine = dataclasses.replace(mine, tensors=None)
        rank_plans = coord.gather(mine)
        replies: list[Any] | None = None
        global_plan = None
        if coord.is_coordinator:
            assert rank_plans is not None
            for rp in rank_plans:
                if rp.tensors is None:
                    rp.tensors = rank_plans[first_with[rp.decl_key]].tensors
            try:
                global_plan = plan_save(rank_plans)
                replies = [(global_plan.plan_id, w) for w in global_plan.writes]
            except CkptStoreError as exc:
                replies = [exc] * coord.world_size
        reply = coord.scatter(replies)
        if isinstance(reply, BaseException):
            raise reply
        plan_id, writes = reply
        _PLAN_CACHE[(group_key, structure_key)] = _CachedPlan(plan_id, writes, global_plan)
        while len(_PLAN_CACHE) > knobs.plan_cache_size():
            _PLAN_CACHE.popitem(last=False)
    t_end = time.perf_counter()
    return PlannedSave(
        store, options, coord.rank, coord.world_size, local, writes, global_plan, plan_cached,
        {"prepare": t_plan - t0, "plan": t_end - t_plan},
    )  # fmt: skip


def write_planned(
    planned: PlannedSave, items: list[WriteItem]
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
        )
    except Exception as exc:  # reported to the coordinator, which aborts the commit
        error = SaveError(
            f"{planned.store.url}: rank {planned.rank} could not write its data: "
            f"{type(exc).__name__}: {exc}"
        )
        error.__cause__ = exc
        return None, error
    return result, None


def commit_collective(
    planned: PlannedSave,
    result: WriteResult | None,
    error: BaseException | None,
    coord: Coordinator,
) -> SaveInfo:
    """Gather chunk indexes, commit on the coordinator, tell everyone (a gather + a broadcast)."""
    t = time.perf_counter()
    local, options = planned.local, planned.options
    report = (
        _RankReport.of(result, local, options.codec) if result is not None else None,
        None if error is None else f"{type(error).__name__}: {error}",
    )
    reports = coord.gather(report)
    outcome: Any = None
    if coord.is_coordinator:
        assert reports is not None and planned.global_plan is not None
        outcome = _commit(
            planned.store, reports, planned.global_plan, local, options.block,
            options.overwrite, options.metadata,
        )  # fmt: skip
    outcome = coord.broadcast(outcome)
    if isinstance(outcome, BaseException):
        if error is not None:
            raise error
        raise outcome
    seconds = dict(planned.seconds)
    seconds["commit"] = time.perf_counter() - t
    seconds["total"] = sum(seconds.values())
    return SaveInfo(
        path=planned.store.url,
        world_size=planned.world_size,
        tensors=outcome["tensors"],
        total_bytes=outcome["total_bytes"],
        rank_bytes_written=result.bytes_written if result else 0,
        files=outcome["files"],
        plan_cached=planned.plan_cached,
        seconds=seconds,
    )


@dataclass
class _RankReport:
    """What one rank sends the coordinator after writing: compact arrays, no tensors."""

    files: list[str]
    file: np.ndarray
    offset: np.ndarray
    nbytes: np.ndarray
    crc_count: np.ndarray
    crc: np.ndarray
    n_global: int
    rank_tensors: dict[str, tuple[str, tuple[int, ...]]]
    rank_values: dict[str, Any]
    blob_names: list[str]
    rank_blob_names: list[str]
    codec: str | None

    @classmethod
    def of(cls, result: WriteResult, local: _Local, codec: str | None) -> _RankReport:
        ch = result.chunks
        return cls(
            files=result.files,
            file=np.array([c.file for c in ch], dtype=np.int64),
            offset=np.array([c.offset for c in ch], dtype=np.int64),
            nbytes=np.array([c.nbytes for c in ch], dtype=np.int64),
            crc_count=np.array([len(c.crc32c) for c in ch], dtype=np.int64),
            crc=np.array([x for c in ch for x in c.crc32c], dtype=np.uint32),
            n_global=len(ch) - len(local.rank_tensors) - len(local.blobs) - len(local.rank_blobs),
            rank_tensors={
                leaf.name: (dtype_name(leaf.local.dtype), tuple(leaf.local.shape))
                for leaf in local.rank_tensors
            },
            rank_values=local.rank_values,
            blob_names=list(local.blobs),
            rank_blob_names=list(local.rank_blobs),
            codec=codec,
        )


def _commit(
    store: Store,
    reports: list[tuple[_RankReport | None, str | None]],
    plan: GlobalPlan,
    local: _Local,
    block: int,
    overwrite: bool,
    metadata: dict[str, Any] | None,
) -> Any:
    """Build and commit the manifest (coordinator only); returns a summary or an exception."""
    failed = [f"rank {r}: {msg}" for r, (_, msg) in enumerate(reports) if msg is not None]
    if failed:
        return SaveError(f"{store.url}: save not committed; " + "; ".join(failed))
    try:
        manifest = _assemble(reports, plan, local, block, metadata)  # type: ignore[arg-type]
        data = manifest.to_json()
        if overwrite:
            store.write(MANIFEST_KEY, data)
        else:
            store.write_if_absent(MANIFEST_KEY, data)
    except KeyExistsError:
        return CheckpointExistsError(f"{store.url}: another save committed this checkpoint first")
    except Exception as exc:
        return SaveError(f"{store.url}: commit failed: {type(exc).__name__}: {exc}")
    # Data files that the committed manifest does not name (killed or replaced saves) go.
    live = set(manifest.files)
    for key in list(store.list(DATA_PREFIX)):
        if key not in live:
            store.delete(key)
    return {
        "tensors": len(manifest.tensors),
        "total_bytes": manifest.total_tensor_bytes(),
        "files": len(manifest.files),
    }


def _assemble(
    reports: list[tuple[_RankReport, None]],
    plan: GlobalPlan,
    local: _Local,
    block: int,
    metadata: dict[str, Any] | None,
) -> Manifest:
    reps = [r for r, _ in reports]
    world = len(reps)
    files: list[str] = []
    file_base = []
    for r in reps:
        file_base.append(len(files))
        files.extend(r.files)
    # Flatten every rank's written chunks into one table, then pick rows in manifest order.
    counts = np.array([len(r.file) for r in reps], dtype=np.int64)
    row_base = np.concatenate([[0], np.cumsum(counts)[:-1]])
    all_file = np.concatenate([r.file + file_base[i] for i, r in enumerate(reps)])
    all_offset = np.concatenate([r.offset for r in reps])
    all_nbytes = np.concatenate([r.nbytes for r in reps])
    all_crc_count = np.concatenate([r.crc_count for r in reps])
    all_crc = np.concatenate([r.crc for r in reps])
    crc_start = np.concatenate([[0], np.cumsum(all_crc_count)[:-1]])

    rows = [row_base[plan.chunk_writer] + plan.chunk_slot]
    tensors: dict[str, TensorRecord] = {}
    for g, decl in enumerate(plan.tensors):
        tensors[decl.name] = TensorRecord(
            decl.dtype, decl.shape, plan.chunk_start[g], plan.layouts[g], reps[0].codec
        )
    next_chunk = plan.chunk_count
    per_rank: dict[str, list[Entry]] = {}
    objects: dict[str, ObjectRecord] = {
        name: ObjectRecord(value=value) for name, value in local.values.items()
    }
    names = set(reps[0].rank_tensors) | set(reps[0].rank_values) | set(reps[0].rank_blob_names)
    for r, rep in enumerate(reps):
        mine = set(rep.rank_tensors) | set(rep.rank_values) | set(rep.rank_blob_names)
        if mine != names:
            raise SaveError(
                f"per-rank entries differ between rank 0 and rank {r}: {sorted(names ^ mine)}"
            )
    for r, rep in enumerate(reps):
        row = int(row_base[r]) + rep.n_global
        for name, (dtype, shape) in rep.rank_tensors.items():
            rows.append(np.array([row]))
            layout = GridLayout(tuple((0,) for _ in shape))
            per_rank.setdefault(name, [None] * world)[r] = TensorRecord(  # type: ignore[list-item]
                dtype, shape, next_chunk, layout, rep.codec
            )
            next_chunk += 1
            row += 1
        for name, value in rep.rank_values.items():
            per_rank.setdefault(name, [None] * world)[r] = ObjectRecord(value=value)  # type: ignore[list-item]
        for name in [*rep.blob_names, *rep.rank_blob_names]:
            c0, cn = int(crc_start[row]), int(all_crc_count[row])
            ref = BlobRef(
                int(all_file[row]), int(all_offset[row]), int(all_nbytes[row]),
                tuple(int(x) for x in all_crc[c0 : c0 + cn]),
            )  # fmt: skip
            if name in rep.blob_names:
                objects[name] = ObjectRecord(blob=ref)
            else:
                per_rank.setdefault(name, [None] * world)[r] = ObjectRecord(blob=ref)  # type: ignore[list-item]
            row += 1
    order = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    # crc runs of the chosen rows, in order
    n_crc = all_crc_count[order]
    starts = crc_start[order]
    crc_idx = np.repeat(starts - np.concatenate([[0], np.cumsum(n_crc)[:-1]]), n_crc) + np.arange(
        int(n_crc.sum())
    )
    table = ChunkTable(
        all_file[order], all_offset[order], all_nbytes[order], all_crc[crc_idx], block
    )
    return Manifest(
        world_size=world,
        files=files,
        chunks=table,
        tensors=tensors,
        objects=objects,
        per_rank=per_rank,
        metadata=dict(metadata or {}),
    )
