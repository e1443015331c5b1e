"""The end of a save: every rank's chunk index goes to the coordinator, which assembles ONE
manifest and commits it atomically (create-if-absent), then tells every rank the outcome.

The chunk indexes travel the way the plan did (``plan_exchange``): each rank sends its own
to its planning group's leader, which joins its group's into one table and sends that to
the coordinator -- one message per pipeline stage reaches the coordinator, not one per rank.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass, field, replace
from itertools import repeat
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ckptstore import failpoints, knobs
from ckptstore.backends.base import Store
from ckptstore.coordination.collectives import COORDINATOR, Coordinator
from ckptstore.errors import CheckpointExistsError, SaveError
from ckptstore.format.chunk_index import encode_index, encode_names
from ckptstore.format.commit_point import commit_manifest, delete_replaced
from ckptstore.format.data_files import WriteResult, data_key, rank_file_name
from ckptstore.format.dtypes import dtype_name
from ckptstore.format.frozen_table import FrozenTensorTable
from ckptstore.format.layouts import GridLayout
from ckptstore.format.manifest import (
    DATA_PREFIX,
    SAVING_KEY,
    BlobRef,
    ChunkTable,
    Entry,
    Manifest,
    ObjectRecord,
    TensorRecord,
    new_record,
    prepare_tensor_table,
)
from ckptstore.saving.plan import GlobalPlan
from ckptstore.saving.plan_exchange import PlanGroup

if TYPE_CHECKING:
    from ckptstore.saving.save import PlannedSave, _Local
    from ckptstore.tiers.replicator import ReplicationHandle
    from ckptstore.tiers.seam import SaveTarget


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
    replication: ReplicationHandle | None = None
    """For a :class:`~ckptstore.Tiered` path: the background copy to the shared tier
    (``wait()``, ``done()``, ``state``); the save itself returned after the tier-0 commit."""


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
    gathered = _gather_reports(report, coord, planned.group)
    outcome: Any = None
    target = planned.target
    assert target is not None
    primary = target.commit_store
    if coord.is_coordinator:
        assert gathered is not None and planned.global_plan is not None
        try:
            outcome = _commit(
                target,
                *gathered,
                planned.global_plan,
                local,
                options.block,
                options.overwrite,
                options.metadata,
                planned.spread,
            )
        finally:  # no longer in flight, whatever the outcome: gc may look again
            unmark_saving(primary)
    outcome = coord.broadcast(outcome)
    replication = None
    if not isinstance(outcome, BaseException):
        replication = target.after_commit(
            outcome["manifest"],
            coord,
            options.overwrite,
            planned.replication_team,
            planned.streamed_upload,
            outcome.get("index"),
            result,
        )
    if target.marks_every_node and not coord.is_coordinator:  # after this node's manifest
        unmark_saving(primary)
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
        replication=replication,
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
        n = len(result.file)
        return cls(
            files=result.files,
            file=np.array(result.file, dtype=np.int64),
            offset=np.array(result.offset, dtype=np.int64),
            nbytes=np.array(result.nbytes, dtype=np.int64),
            crc_count=np.array(result.crc_count, dtype=np.int64),
            crc=np.array(result.crc, dtype=np.uint32),
            n_global=n - len(local.rank_tensors) - len(local.blobs) - len(local.rank_blobs),
            rank_tensors={
                leaf.name: (dtype_name(leaf.local.dtype), tuple(leaf.local.shape))
                for leaf in local.rank_tensors
            },
            rank_values=local.rank_values,
            blob_names=list(local.blobs),
            rank_blob_names=list(local.rank_blobs),
            codec=codec,
        )

    def header(self) -> _RankReport:
        """The report without its chunk columns (once they are in a :class:`_Written`)."""
        empty = np.zeros(0, dtype=np.int64)
        return replace(
            self,
            file=empty,
            offset=empty,
            nbytes=empty,
            crc_count=empty,
            crc=np.zeros(0, dtype=np.uint32),
        )


_Report = tuple[_RankReport | None, str | None]
"""A rank's report, or None and its error."""


class _Bundle(NamedTuple):
    """A planning group's reports, as its leader sends them to the coordinator."""

    ranks: list[int]
    written: _Written | None  # the members' chunk columns joined; None if one failed
    reports: list[_Report]  # headers only (see _RankReport.header)


def _gather_reports(
    report: _Report, coord: Coordinator, group: PlanGroup
) -> tuple[list[_Report], _Written | None] | None:
    """Every rank's report on the coordinator, by way of the planning groups' leaders: each
    rank's report to its leader, one bundle per group to the coordinator. Returns (reports
    in rank order, their chunk columns joined; None if a rank failed) there, else None."""
    if not coord.active:
        return [report], _written_of([report])
    if coord.rank != group.leader:
        coord.finish_sends(coord.post_object(report, group.leader))
        return None
    mine = [report if r == coord.rank else coord.receive_object(r) for r in group.members]
    written = _written_of(mine)
    if not coord.is_coordinator:  # the columns travel once, in ``written``
        headers = [(rep.header() if rep is not None else None, msg) for rep, msg in mine]
        coord.finish_sends(coord.post_object(_Bundle(group.members, written, headers), COORDINATOR))
        return None
    own = _Bundle(group.members, written, mine)
    bundles = [own if r == coord.rank else coord.receive_object(r) for r in group.leaders]
    reports: list[_Report] = [(None, None)] * coord.world_size
    for b in bundles:
        for rank, rep in zip(b.ranks, b.reports, strict=True):
            reports[rank] = rep
    parts = [b.written for b in bundles]
    if any(p is None for p in parts):
        return reports, None
    return reports, _Written.join(parts, [b.ranks for b in bundles], coord.world_size)  # type: ignore[arg-type]


def _written_of(reports: list[_Report]) -> _Written | None:
    reps = [rep for rep, _ in reports]
    return None if any(rep is None for rep in reps) else _Written.of(reps)  # type: ignore[arg-type]


def unmark_saving(store: Store) -> None:
    """Remove the in-flight marker a save wrote before its data (best effort: a marker left
    behind only keeps gc off this checkpoint for the lease)."""
    with contextlib.suppress(Exception):
        store.delete(SAVING_KEY)


def _commit(
    target: SaveTarget,
    reports: list[_Report],
    written: _Written | None,
    plan: GlobalPlan,
    local: _Local,
    block: int,
    overwrite: bool,
    metadata: dict[str, Any] | None,
    spread: int = 0,
) -> Any:
    """Build and commit the manifest on the target's commit store (coordinator only); returns
    a summary (with the manifest's bytes) or an exception. A chunk table of
    ``knobs.index_min_chunks()`` chunks or more goes into a chunk index file first (format 4),
    written durably before the manifest that names it."""
    store, primary = target.store, target.commit_store
    failed = [f"rank {r}: {msg}" for r, (_, msg) in enumerate(reports) if msg is not None]
    if failed:
        return SaveError(f"{store.url}: save not committed; " + "; ".join(failed))
    try:
        assert written is not None  # every rank reported
        manifest = _assemble(reports, written, plan, local, block, metadata)  # type: ignore[arg-type]
        index = None
        if len(manifest.chunks) >= knobs.index_min_chunks():
            manifest, index = write_chunk_index(primary, manifest, spread)
        data = manifest.to_json()
        if target.holds_every_rank:  # every rank's files are here: all must be there
            present = set(store.list(DATA_PREFIX))
            missing = [key for key in manifest.files if key not in present]
            if missing:  # deleted during the save (a gc that took it for a killed one)
                return SaveError(
                    f"{store.url}: save not committed: {len(missing)} data file(s) vanished "
                    f"before the commit ({missing[0]}, ...)"
                )
        failpoints.hit("before_commit")
        replaced = commit_manifest(primary, data, overwrite=overwrite)
        failpoints.hit("committed")
    except CheckpointExistsError as exc:
        return exc
    except Exception as exc:
        return SaveError(f"{store.url}: commit failed: {type(exc).__name__}: {exc}")
    delete_replaced(primary, replaced, manifest)
    return {
        "tensors": len(manifest.tensors),
        "total_bytes": manifest.total_tensor_bytes(),
        "files": len(manifest.files),
        "manifest": data if target.wants_manifest else None,
        "index": index if target.wants_manifest else None,
    }


def write_chunk_index(
    store: Store, manifest: Manifest, spread: int
) -> tuple[Manifest, tuple[str, bytes]]:
    """``manifest`` with its chunk table and its data file keys moved into a chunk index
    file, written (durably) to ``store`` under a fresh name listed with the data files."""
    table = manifest.chunks
    key = data_key(rank_file_name(0, uuid.uuid4().hex[:10], "index"), spread)
    files = [*manifest.files, key]
    part = knobs.index_part_chunks()
    chunk_parts, directory = encode_index(
        table.file, table.offset, table.nbytes, table.crc32c, table.crc_first,
        part, len(files) - 1, key,
    )  # fmt: skip
    name_parts, names = encode_names(files, part, len(chunk_parts))
    data = chunk_parts + name_parts
    store.write(key, data)
    return replace(manifest, files=files, index=replace(directory, names=names)), (key, data)


class _Written(NamedTuple):
    """Every rank's written chunks as one table (rank after rank), file indexes global."""

    files: list[str]
    row_base: np.ndarray  # each rank's first row
    file: np.ndarray
    offset: np.ndarray
    nbytes: np.ndarray
    crc_count: np.ndarray
    crc: np.ndarray
    crc_start: np.ndarray

    @classmethod
    def of(cls, reps: list[_RankReport]) -> _Written:
        files: list[str] = []
        file_base = []
        for r in reps:
            file_base.append(len(files))
            files.extend(r.files)
        counts = np.array([len(r.file) for r in reps], dtype=np.int64)
        crc_count = np.concatenate([r.crc_count for r in reps])
        return cls(
            files=files,
            row_base=np.concatenate([[0], np.cumsum(counts)[:-1]]),
            file=np.concatenate([r.file + file_base[i] for i, r in enumerate(reps)]),
            offset=np.concatenate([r.offset for r in reps]),
            nbytes=np.concatenate([r.nbytes for r in reps]),
            crc_count=crc_count,
            crc=np.concatenate([r.crc for r in reps]),
            crc_start=np.concatenate([[0], np.cumsum(crc_count)[:-1]]),
        )

    @classmethod
    def join(cls, parts: list[_Written], ranks: list[list[int]], world: int) -> _Written:
        """One table from the tables of disjoint sets of ranks (``parts[i]`` holds the rows
        of ``ranks[i]``, in that order): rows part after part, ``row_base`` by job rank."""
        if len(parts) == 1 and ranks[0] == list(range(world)):
            return parts[0]
        files: list[str] = []
        file, crc_start = [], []
        row_base = np.zeros(world, dtype=np.int64)
        rows = crcs = 0
        for part, members in zip(parts, ranks, strict=True):
            row_base[members] = part.row_base + rows
            file.append(part.file + len(files))
            crc_start.append(part.crc_start + crcs)
            files.extend(part.files)
            rows += len(part.file)
            crcs += len(part.crc)
        return cls(
            files=files,
            row_base=row_base,
            file=np.concatenate(file),
            offset=np.concatenate([p.offset for p in parts]),
            nbytes=np.concatenate([p.nbytes for p in parts]),
            crc_count=np.concatenate([p.crc_count for p in parts]),
            crc=np.concatenate([p.crc for p in parts]),
            crc_start=np.concatenate(crc_start),
        )

    def blob(self, row: int) -> BlobRef:
        c0, cn = int(self.crc_start[row]), int(self.crc_count[row])
        return BlobRef(
            int(self.file[row]),
            int(self.offset[row]),
            int(self.nbytes[row]),
            tuple(int(x) for x in self.crc[c0 : c0 + cn]),
        )

    def table(self, order: np.ndarray, block: int) -> ChunkTable:
        """The chunk table of rows ``order`` (manifest order), with their crc runs."""
        n_crc = self.crc_count[order]
        first = self.crc_start[order] - np.concatenate([[0], np.cumsum(n_crc)[:-1]])
        crc_idx = np.repeat(first, n_crc) + np.arange(int(n_crc.sum()))
        return ChunkTable(
            self.file[order], self.offset[order], self.nbytes[order], self.crc[crc_idx], block
        )


def _assemble(
    reports: list[tuple[_RankReport, None]],
    written: _Written,
    plan: GlobalPlan,
    local: _Local,
    block: int,
    metadata: dict[str, Any] | None,
) -> Manifest:
    """The manifest from every rank's report (headers) and their chunk columns: the planned
    chunks first (in plan order), then the per-rank entries and pickled objects."""
    reps = [r for r, _ in reports]
    rows = [written.row_base[plan.chunk_writer] + plan.chunk_slot]
    tensors = _global_tensors(plan, reps[0].codec)
    objects: dict[str, ObjectRecord] = {
        name: ObjectRecord(value=value) for name, value in local.values.items()
    }
    per_rank = _per_rank_entries(reps, written, plan.chunk_count, rows, objects)
    order = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    return Manifest(
        world_size=len(reps),
        files=written.files,
        chunks=written.table(order, block),
        tensors=tensors,
        objects=objects,
        per_rank=per_rank,
        metadata=dict(metadata or {}),
    )


def prepare_commit(planned: PlannedSave) -> None:
    """After a plan exchange, on the coordinator: build the plan's tensor table and its
    JSON now, while the other ranks write, not in the commit, while every rank waits for
    it (30-40 ms at 20,000 tensors). A failure here is left for the commit to raise, in
    the protocol (no rank may leave it)."""
    plan = planned.global_plan
    if plan is None or planned.plan_cached:
        return
    with contextlib.suppress(Exception):
        prepare_tensor_table(_global_tensors(plan, planned.options.codec))


def _global_tensors(plan: GlobalPlan, codec: str | None) -> FrozenTensorTable:
    """The tensor table of ``plan``'s saves: built once per plan and codec and kept with the
    (cached) plan, frozen, for the next saves of the same structure (its JSON with it)."""
    table = plan.tensor_tables.get(codec)
    if table is None:
        names, dtypes, shapes, _ = zip(*plan.tensors, strict=True) if plan.tensors else ((),) * 4
        layouts = plan.layouts
        records = map(new_record, zip(dtypes, shapes, plan.chunk_start, layouts, repeat(codec)))
        table = plan.tensor_tables[codec] = FrozenTensorTable(zip(names, records, strict=True))
    return table


def _per_rank_entries(
    reps: list[_RankReport],
    written: _Written,
    next_chunk: int,
    rows: list[np.ndarray],
    objects: dict[str, ObjectRecord],
) -> dict[str, list[Entry]]:
    """Per-rank tensors (one chunk each, numbered after the planned ones; their rows are
    appended to ``rows``), per-rank values, and pickled objects (global ones go to
    ``objects``). Every rank must hold the same per-rank names."""
    world = len(reps)
    names = set(reps[0].rank_tensors) | set(reps[0].rank_values) | set(reps[0].rank_blob_names)
    for r, rep in enumerate(reps):
        mine = set(rep.rank_tensors) | set(rep.rank_values) | set(rep.rank_blob_names)
        if mine != names:
            raise SaveError(
                f"per-rank entries differ between rank 0 and rank {r}: {sorted(names ^ mine)}"
            )
    per_rank: dict[str, list[Any]] = {}
    for r, rep in enumerate(reps):
        row = int(written.row_base[r]) + rep.n_global
        for name, (dtype, shape) in rep.rank_tensors.items():
            rows.append(np.array([row]))
            layout = GridLayout(tuple((0,) for _ in shape))
            record = TensorRecord(dtype, shape, next_chunk, layout, rep.codec)
            per_rank.setdefault(name, [None] * world)[r] = record
            next_chunk += 1
            row += 1
        for name, value in rep.rank_values.items():
            per_rank.setdefault(name, [None] * world)[r] = ObjectRecord(value=value)
        for name in [*rep.blob_names, *rep.rank_blob_names]:
            if name in rep.blob_names:
                objects[name] = ObjectRecord(blob=written.blob(row))
            else:
                per_rank.setdefault(name, [None] * world)[r] = ObjectRecord(blob=written.blob(row))
            row += 1
    return per_rank
