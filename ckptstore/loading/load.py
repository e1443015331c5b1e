"""``load``: fill the caller's state_dict in place from a checkpoint, whatever the sharding.

Every rank asks for the regions it holds (a DTensor's local shard, a Sharded box, or the
whole of a replicated tensor); those are intersected with the saved chunks and only the
needed byte ranges are read. Keys, shapes and dtypes are checked on every rank before any
tensor is written, and all ranks fail together if any rank finds a problem.
"""

from __future__ import annotations

import functools
import os
import pickle
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import and_, attrgetter, eq, is_not, itemgetter
from typing import Any, NamedTuple

import torch

from ckptstore import knobs
from ckptstore.backends.base import ByteRange, Store
from ckptstore.coordination.collectives import Coordinator
from ckptstore.errors import (
    CheckpointNotFoundError,
    ChecksumError,
    LoadMismatchError,
    PickleNotAllowedError,
    StoreError,
    WorldSizeMismatchError,
    typed,
)
from ckptstore.format.checksum import block_crcs
from ckptstore.format.commit_point import read_manifest_bytes, store_for
from ckptstore.format.dtypes import DTYPE_TO_NAME, dtype_name
from ckptstore.format.manifest import Manifest, ObjectRecord, TensorRecord
from ckptstore.format.safetensors_manifest import or_safetensors
from ckptstore.gcpause import with_gc_paused
from ckptstore.loading.mismatch import Mismatch
from ckptstore.loading.read import ChunkReader, Target
from ckptstore.loading.read_plan import TargetColumns, chunks_needed
from ckptstore.loading.shared_reads import fill_shared
from ckptstore.state.leaves import FlatState, Leaf, TensorBlock, flatten_columns
from ckptstore.state.replicas import THIS_RANK, replica_class

PER_RANK_POLICIES = ("error", "keep", "wrap")
_NEW_TARGET = functools.partial(tuple.__new__, Target)  # a C-level constructor: one per tensor


@dataclass
class LoadInfo:
    path: str
    saved_world_size: int
    tensors: int
    bytes_read: int
    """Bytes this rank read from the store."""
    read_requests: int
    seconds: dict[str, float]
    bytes_by_tier: dict[str, int] | None = None
    """For a :class:`~ckptstore.Tiered` path: bytes this rank read from each tier."""
    missing: list[str] = field(default_factory=list)
    """Entries named in ``optional=`` that the checkpoint lacks (left as they were)."""
    bytes_received: int = 0
    """Bytes this rank received from ranks that read them for it (``share_reads``)."""
    index_bytes_read: int = 0
    """Bytes of the chunk index (format 4) this rank read: only the parts its tensors need."""


def fetch_manifest(store: Store, coord: Coordinator) -> Manifest:
    """The manifest on every rank: read by each rank from a local store in small jobs,
    else read once by the coordinator and broadcast (all ranks parse the same bytes). A
    local directory of safetensors files (a Hugging Face model) is read as a checkpoint."""
    try:
        if store.reads_are_local and coord.world_size < knobs.manifest_broadcast_min_ranks():
            payload = read_manifest_bytes(store)
        else:  # the coordinator's failure is raised, typed, on every rank
            payload = coord.from_coordinator(lambda: read_manifest_bytes(store), store.url)
    except CheckpointNotFoundError as missing:
        return or_safetensors(store, missing)
    return Manifest.from_json(payload, where=store.url, store=store)


def read_blob(store: Store, manifest: Manifest, name: str, record: ObjectRecord) -> bytes:
    """A pickled object's bytes, checksum-verified (not unpickled)."""
    assert record.blob is not None
    b = record.blob
    key = manifest.files[b.file]
    if store.size(key) < b.offset + b.nbytes:  # before allocating what the manifest claims
        raise StoreError(f"{store.url}/{key}: too short for pickled object {name!r} (truncated?)")
    data = store.read(key, ByteRange(b.offset, b.offset + b.nbytes))
    if (
        len(data) != b.nbytes
        or tuple(block_crcs(memoryview(data), manifest.chunks.block_bytes)) != b.crc32c
    ):
        raise ChecksumError(
            f"{store.url}: checksum mismatch in pickled object {name!r}", bad=[name]
        )
    return data


def _describe(t: TensorRecord) -> str:
    return f"{t.dtype}{list(t.shape)}"


def _check_tensor(leaf: Leaf, rec: TensorRecord, problems: list[str]) -> None:
    if leaf.global_shape == rec.shape and DTYPE_TO_NAME.get(leaf.local.dtype) == rec.dtype:
        return
    want = f"{dtype_name(leaf.local.dtype)}{list(leaf.global_shape)}"
    problems.append(f"{leaf.name}: the state_dict has {want}, the checkpoint has {_describe(rec)}")


@with_gc_paused  # bulk object creation; see ckptstore.gcpause
def load(
    state_dict: Any,
    path: str | os.PathLike[str] | Store,
    *,
    process_group: torch.distributed.ProcessGroup | None = None,
    strict: bool = True,
    allow_pickle: bool = False,
    per_rank: str = "error",
    storage_options: dict[str, Any] | None = None,
    read_threads: int | None = None,
    prefix: str = "",
    partial: bool = False,
    optional: Collection[str] = (),
    share_reads: bool | None = None,
) -> LoadInfo:
    """Fill every tensor (and replace every plain value) of ``state_dict`` from ``path``.

    A collective over ``process_group``. The caller's tensors keep their sharding; they are
    filled from whatever sharding the checkpoint was saved with. ``path`` may also be a
    local directory of safetensors files (a Hugging Face model, sharded with its index or
    not): its tensors are read the same way, resharded, every block checked.

    Args:
        strict: fail on keys the state_dict lacks or the checkpoint lacks. Shape and dtype
            mismatches always fail. Either way nothing is written before all checks pass.
        allow_pickle: allow unpickling objects that were saved pickled.
        per_rank: what :class:`PerRank` entries do when the world size changed: ``"error"``,
            ``"keep"`` (leave the caller's value) or ``"wrap"`` (rank r takes the value of
            saved rank ``r % saved_world_size``).
        prefix: ``state_dict`` is the checkpoint's sub-tree of that name: load only the
            model of a ``{"model": ..., "optim": ...}`` checkpoint with
            ``load(model.state_dict(), path, prefix="model")`` (or pass the module). Strict
            within the sub-tree; the rest of the checkpoint is not read.
        partial: load what ``state_dict`` holds and leave the checkpoint's other entries
            unread (torch DCP's default); every entry of ``state_dict`` must still be saved.
        optional: names or sub-trees of ``state_dict`` that may be absent from the
            checkpoint: left as they are and listed in :attr:`LoadInfo.missing`.
        share_reads: ranks that need the same bytes (data-parallel replicas) read each
            byte once from the store and pass it on to each other over the network
            (``ckptstore.loading.shared_reads``). Default (None): on for stores that are
            not this node's disk (S3, a tiered store), else ``CKPTSTORE_SHARE_READS``.

    Raises:
        LoadMismatchError: missing/unexpected keys, shape or dtype mismatches: summarized in
            the message (on rank 0; the other ranks say they match it), all in ``problems``.
        ChecksumError: stored bytes do not match their crc32c (nothing bad is copied).
    """
    if per_rank not in PER_RANK_POLICIES:
        raise ValueError(f"per_rank must be one of {PER_RANK_POLICIES}, not {per_rank!r}")
    scope = _Scope(prefix, partial, optional)  # bad arguments raise here, on every rank
    t0 = time.perf_counter()
    coord = Coordinator(process_group)
    store = store_for(path, storage_options)
    tier_bytes_before = store.bytes_by_tier()
    # Every step that can fail on one rank ends in an agreement: no rank waits in a
    # collective for a rank that has already raised. (Reading the manifest and matching
    # share one: neither has a collective of its own that a failed rank would skip.)
    error: BaseException | None = None
    targets = TargetColumns([], [], [], [])
    rank_targets: list[Target] = []
    leaves = FlatState()
    assignments: list[tuple[Leaf, ObjectRecord]] = []
    statefuls: list[tuple[Any, Any]] = []  # (object, the state dict filled for it)
    try:
        manifest = fetch_manifest(store, coord)
    except Exception as exc:
        error = typed(exc, store.url)
    t_manifest = time.perf_counter()
    if error is None:
        try:
            targets, rank_targets, assignments, missing, leaves = _match(
                state_dict, manifest, coord, strict, allow_pickle, per_rank, statefuls, scope
            )
            if manifest.index is not None:  # read the parts of the chunk index it needs
                needed = chunks_needed(_with_rank_targets(targets, rank_targets))
                manifest = manifest.with_index(store, needed)
        except Exception as exc:
            error = typed(exc, store.url)
    coord.agree(error)
    t_plan = time.perf_counter()

    reader = ChunkReader(store, manifest, store.url, threads=read_threads)
    error = None
    try:
        with torch.no_grad():  # destinations may be parameters that require grad
            sharing = coord if _shares_reads(store, share_reads) else None
            _fill(reader, targets, rank_targets, leaves, sharing)
        for leaf, rec in assignments:
            if rec.blob is not None:
                value = pickle.loads(read_blob(store, manifest, leaf.name, rec))
            else:
                value = rec.value
            leaf.set_value(value)
        for obj, own in statefuls:  # as torch DCP does: the filled state dict goes back
            obj.load_state_dict(own)
    except Exception as exc:
        error = typed(exc, store.url)
    coord.agree(error)
    t_end = time.perf_counter()
    by_tier = None
    tier_bytes_after = store.bytes_by_tier()
    if tier_bytes_before is not None and tier_bytes_after is not None:  # a tiered store
        by_tier = {k: v - tier_bytes_before.get(k, 0) for k, v in tier_bytes_after.items()}
    return LoadInfo(
        path=store.url,
        saved_world_size=manifest.world_size,
        tensors=targets.count() + len(rank_targets),
        bytes_read=reader.bytes_read,
        bytes_received=reader.bytes_received,
        read_requests=reader.requests,
        seconds={
            "manifest": t_manifest - t0,
            "plan": t_plan - t_manifest,
            "read": t_end - t_plan,
            "total": t_end - t0,
        },
        bytes_by_tier=by_tier,
        missing=missing,
        index_bytes_read=_index_bytes(manifest),
    )


def _index_bytes(manifest: Manifest) -> int:
    """Bytes of the chunk index parts this load read (0: the table is inline)."""
    d = manifest.index
    parts = getattr(manifest.chunks, "loaded", ())
    return 0 if d is None else sum(int(d.at[p + 1] - d.at[p]) for p in parts)


def _shares_reads(store: Store, explicit: bool | None) -> bool:
    """Whether ranks with the same reads share them (the same answer on every rank)."""
    if explicit is not None:
        return explicit
    setting = knobs.share_reads()
    return not store.reads_are_local if setting == "auto" else setting == "on"


def _with_rank_targets(targets: TargetColumns, rank_targets: list[Target]) -> TargetColumns:
    return TargetColumns.joined([targets, TargetColumns.of(rank_targets)])


def _fill(
    reader: ChunkReader,
    targets: TargetColumns,
    rank_targets: list[Target],
    leaves: FlatState,
    coord: Coordinator | None,
) -> None:
    """Fill the global tensors' ``targets`` and the per-rank entries' ``rank_targets``: in
    one plan, or with the ranks of ``coord`` that read the same bytes if given (a collective
    then, in which a rank whose planning fails still takes part)."""
    if coord is None or not coord.active:
        reader.fill(_with_rank_targets(targets, rank_targets))
        return
    parts: dict[str, list[Target]] = {THIS_RANK: list(rank_targets)} if rank_targets else {}
    where = leaves.locate()
    for t in targets.targets():
        container, key = where[t.name]
        held = container[key] if container is not None else None
        parts.setdefault(replica_class(held), []).append(t)
    fill_shared(reader, parts, coord)


class _Matched(NamedTuple):
    """What matching found: tensors to fill, values to assign, and what is wrong."""

    targets: list[Target]  # of global tensors
    assignments: list[tuple[Leaf, ObjectRecord]]
    mismatch: Mismatch
    pickled: list[str]  # entries saved pickled
    resized_keys: list[str]  # per-rank entries of another world size
    missing: list[str]  # optional entries the checkpoint lacks
    rank_targets: list[Target]  # of per-rank entries (this rank's own)
    blocks: list[TargetColumns]  # of global tensors, as columns (tensor blocks)


class _Scope:
    """Which names a load covers: a sub-tree (``prefix``), only the state_dict's entries
    (``partial``), and entries that may be absent (``optional``)."""

    def __init__(self, prefix: str, partial: bool, optional: Collection[str]) -> None:
        if prefix and (not isinstance(prefix, str) or prefix.startswith(".") or ".." in prefix):
            raise ValueError(f"prefix must be a dotted name such as 'model', not {prefix!r}")
        self.prefix = prefix.rstrip(".")
        self.partial = partial
        if isinstance(optional, str):
            raise TypeError("optional must be a collection of names, not one string")
        lead = f"{self.prefix}." if self.prefix else ""
        self.optional = tuple(lead + name for name in optional)

    def is_optional(self, name: str) -> bool:
        return any(name == o or name.startswith(o + ".") for o in self.optional)

    def covers(self, saved_name: str) -> bool:
        """Whether a saved entry the state_dict lacks is a problem (strict loads)."""
        if self.partial:
            return False
        p = self.prefix
        return not p or saved_name == p or saved_name.startswith(p + ".")


def _match(
    state_dict: Any,
    manifest: Manifest,
    coord: Coordinator,
    strict: bool,
    allow_pickle: bool,
    per_rank: str,
    statefuls: list[tuple[Any, Any]],
    scope: _Scope,
) -> tuple[TargetColumns, list[Target], list[tuple[Leaf, ObjectRecord]], list[str], FlatState]:
    """Pair every leaf of ``state_dict`` with its entry of ``manifest``; raise on any
    mismatch (all of them listed) before anything is read. Stateful objects are flattened
    as their ``state_dict()`` and listed in ``statefuls``."""
    leaves = flatten_columns(state_dict, statefuls, scope.prefix)
    found = _Matched([], [], Mismatch(), [], [], [], [], [])
    for name, leaf in _match_tensors(leaves, manifest, found):
        _match_other(name, leaf, manifest, coord, strict, allow_pickle, per_rank, found, scope)
    if strict and not scope.partial:
        _check_nothing_left(leaves, manifest, found.mismatch, scope)
    _raise_problems(found, manifest, coord.world_size)
    targets = TargetColumns.joined([TargetColumns.of(found.targets), *found.blocks])
    return targets, found.rank_targets, found.assignments, found.missing, leaves


def _match_tensors(
    leaves: FlatState, manifest: Manifest, found: _Matched
) -> list[tuple[str, Leaf]]:
    """The common case, tens of thousands of times: a tensor leaf of a saved tensor. Returns
    the leaves of names the tensor table lacks (for :func:`_match_other`).

    C-level passes (``map`` over getters and ``operator`` functions) pick the leaves that
    are tensors of a saved tensor with its shape and dtype and make their targets; a Python
    loop looks only at the rest (values, missing names, mismatches). Tensor blocks (a
    model's dicts) are matched from their columns."""
    rest = _match_leaves(leaves.leaves, manifest, found)
    for block in leaves.blocks:
        _match_block(block, manifest, found, rest)
    return rest


def _match_leaves(
    leaves: dict[str, Leaf], manifest: Manifest, found: _Matched
) -> list[tuple[str, Leaf]]:
    """:func:`_match_tensors` for the leaves outside tensor blocks."""
    tensors = manifest.tensors
    names = list(leaves)
    values = list(leaves.values())
    records = list(map(tensors.get, names))
    saved = map(is_not, records, repeat(None))
    fast = list(map(and_, saved, map(_TENSOR_KINDS.__contains__, map(_KIND, values))))
    picked_values = list(compress(values, fast))
    picked_records = list(compress(records, fast))
    locals_ = list(map(_LOCAL, picked_values))
    shapes = map(eq, map(_GLOBAL_SHAPE, picked_values), map(_SHAPE, picked_records))
    dtypes = map(DTYPE_TO_NAME.get, map(_DTYPE, picked_values))  # read by flatten
    same = list(map(and_, shapes, map(eq, dtypes, map(_DTYPE, picked_records))))
    boxes = map(_BOX, picked_values)
    good = zip(compress(names, fast), picked_records, boxes, locals_, strict=True)
    found.targets.extend(map(_NEW_TARGET, compress(good, same)))
    rest: list[tuple[str, Leaf]] = []
    if all(fast) and all(same):
        return rest
    for name, leaf, rec, ok in zip(names, values, records, fast, strict=True):
        if ok:
            continue
        if rec is None:
            rest.append((name, leaf))
            continue
        found.mismatch.other.append(
            f"{name}: the state_dict has a {type(leaf.value).__name__}, "
            f"the checkpoint has tensor {_describe(rec)}"
        )
    for leaf, rec, ok in zip(picked_values, picked_records, same, strict=True):
        if not ok:
            _check_tensor(leaf, rec, found.mismatch.other)
    return rest


def _match_block(
    block: TensorBlock, manifest: Manifest, found: _Matched, rest: list[tuple[str, Leaf]]
) -> None:
    """:func:`_match_tensors` for one tensor block, from its columns; names the tensor
    table lacks go to ``rest`` (as leaves)."""
    records = list(map(manifest.tensors.get, block.names))
    columns = (block.names, records, block.boxes, block.locals, block.shapes, block.dtypes)
    picked: Iterable[int] = range(len(records))  # which entries the columns hold
    if None in records:  # names the tensor table lacks: values, per-rank entries, missing
        saved = list(map(is_not, records, repeat(None)))
        rest += [(block.names[i], block.leaf(i)) for i, ok in enumerate(saved) if not ok]
        picked = list(compress(picked, saved))
        columns = tuple(list(compress(column, saved)) for column in columns)
    names, records, boxes, locals_, shapes, dtypes = columns
    same = list(
        map(
            and_,
            map(eq, shapes, map(_SHAPE, records)),
            map(eq, map(DTYPE_TO_NAME.get, dtypes), map(_DTYPE, records)),
        )
    )
    if all(same):
        found.blocks.append(TargetColumns(names, records, boxes, locals_))
        return
    good = zip(names, records, boxes, locals_, strict=True)
    found.targets.extend(map(_NEW_TARGET, compress(good, same)))
    for i, rec, ok in zip(picked, records, same, strict=True):
        if not ok:
            _check_tensor(block.leaf(i), rec, found.mismatch.other)


_TENSOR_KINDS = frozenset(("tensor", "rank_tensor"))
_KIND, _LOCAL, _GLOBAL_SHAPE, _BOX = itemgetter(1), itemgetter(2), itemgetter(3), itemgetter(4)
_SHAPE, _DTYPE = attrgetter("shape"), attrgetter("dtype")  # of leaves and records alike


def _match_other(
    name: str,
    leaf: Leaf,
    manifest: Manifest,
    coord: Coordinator,
    strict: bool,
    allow_pickle: bool,
    per_rank: str,
    found: _Matched,
    scope: _Scope,
) -> None:
    """A leaf that is not a saved global tensor: a value, a per-rank entry, or missing."""
    is_tensor = leaf.kind in ("tensor", "rank_tensor")
    problems = found.mismatch.other
    if name in manifest.objects:
        obj = manifest.objects[name]
        if is_tensor:
            problems.append(f"{name}: the state_dict has a tensor, the checkpoint has a value")
            return
        if obj.blob is not None and not allow_pickle:
            found.pickled.append(name)
        found.assignments.append((leaf, obj))
    elif name in manifest.per_rank:
        entries = manifest.per_rank[name]
        if manifest.world_size != coord.world_size:
            if per_rank == "error":
                found.resized_keys.append(name)
                return
            if per_rank == "keep":
                return
        entry = entries[coord.rank % len(entries)]
        if isinstance(entry, TensorRecord):
            if not is_tensor:
                problems.append(f"{name}: the state_dict has a value, the checkpoint has a tensor")
                return
            want = f"{dtype_name(leaf.local.dtype)}{list(leaf.local.shape)}"
            if want != _describe(entry):
                problems.append(
                    f"{name} (per-rank): the state_dict has {want}, the checkpoint has "
                    f"{_describe(entry)}"
                )
                return
            box = ((0,) * len(entry.shape), entry.shape)
            found.rank_targets.append(Target(name, entry, box, leaf.local))
        else:
            if entry.blob is not None and not allow_pickle:
                found.pickled.append(name)
            found.assignments.append((leaf, entry))
    elif scope.is_optional(name):
        found.missing.append(name)
    elif strict:
        found.mismatch.missing.append(name)


def _check_nothing_left(
    leaves: FlatState, manifest: Manifest, mismatch: Mismatch, scope: _Scope
) -> None:
    """Strict loads: every saved entry (of the loaded sub-tree) has a leaf to go to."""
    tables = (manifest.tensors, manifest.objects, manifest.per_rank)
    saved_count = sum(map(len, tables))
    ours, in_blocks = leaves.leaves.keys(), leaves.block_names
    if (
        scope.prefix
        or len(leaves) != saved_count
        or not all(table.keys() <= ours or table.keys() - ours <= in_blocks for table in tables)
    ):
        for name in [*manifest.tensors, *manifest.objects, *manifest.per_rank]:
            if name not in ours and name not in in_blocks and scope.covers(name):
                mismatch.unexpected.append(name)


def _raise_problems(found: _Matched, manifest: Manifest, world: int) -> None:
    saved_world = manifest.world_size
    if found.mismatch:
        saved = [*manifest.tensors, *manifest.objects, *manifest.per_rank]
        raise LoadMismatchError(found.mismatch.summary(saved), found.mismatch.problems())
    if found.resized_keys:
        raise WorldSizeMismatchError(
            f"per-rank entries {found.resized_keys} were saved by {saved_world} ranks and are "
            f"being loaded by {world}; pass per_rank='keep' or per_rank='wrap'"
        )
    if found.pickled:
        raise PickleNotAllowedError(
            f"entries {found.pickled} were saved pickled; pass allow_pickle=True to unpickle "
            "them (only for checkpoints you trust: unpickling can run arbitrary code)"
        )
