"""Rewriting a checkpoint into the layout a job of N ranks will load (``ckpt reshard``).

Each tensor gets a placement -- ``shard(d)`` (split along dim d the way ``torch.chunk`` and
DTensor's ``Shard(d)`` split it) or ``replicate`` -- and the output holds one data file per
target rank with that rank's shard of every sharded tensor, in manifest order, plus one file
of replicated tensors. A job of N ranks that loads with the same placements then reads its
own file and the replicated file front to back: purely sequential reads, one request per
contiguous run. The work is streamed region by region (memory bounded by ``max_memory``);
checksums are computed on the way, per checksum block, as a save would.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ckptstore import knobs
from ckptstore.backends.base import Store
from ckptstore.errors import ConversionError
from ckptstore.format.chunk_writer import ChunkRow, ChunkWriter, blob_ref, chunk_table
from ckptstore.format.commit_point import (
    commit_manifest,
    delete_replaced,
    refuse_existing,
    store_for,
)
from ckptstore.format.data_files import data_key, rank_file_name, replicated_file_name
from ckptstore.format.dtypes import dtype_from_name
from ckptstore.format.layouts import GridLayout, whole_layout
from ckptstore.format.manifest import (
    BlobRef,
    Manifest,
    ObjectRecord,
    TensorRecord,
)
from ckptstore.format.regions import bounded_regions
from ckptstore.loading.checkpoint import Checkpoint, open_checkpoint
from ckptstore.loading.load import read_blob
from ckptstore.state.tensor_bytes import as_bytes

_MiB = 1 << 20
REPLICATE = -1


def parse_placements(specs: list[str]) -> list[tuple[str, int]]:
    """``["*.weight=shard(0)", "*.norm=replicate"]`` -> [(glob, dim or REPLICATE)]."""
    out = []
    for spec in specs:
        glob, sep, what = spec.rpartition("=")
        m = re.fullmatch(r"\s*shard\((\d+)\)\s*", what.lower())
        if not sep or not glob:
            raise ConversionError(f"--placement {spec!r}: use GLOB=shard(d) or GLOB=replicate")
        if m:
            out.append((glob, int(m.group(1))))
        elif what.strip().lower() == "replicate":
            out.append((glob, REPLICATE))
        else:
            raise ConversionError(f"--placement {spec!r}: use GLOB=shard(d) or GLOB=replicate")
    return out


def placement_for(name: str, rec: TensorRecord, rules: list[tuple[str, int]], world: int) -> int:
    """The first matching rule; by default shard(0) where dim 0 has at least ``world`` rows."""
    for glob, dim in rules:
        if fnmatch.fnmatchcase(name, glob):
            if dim != REPLICATE and dim >= len(rec.shape):
                raise ConversionError(
                    f"tensor {name!r} has {len(rec.shape)} dims; cannot shard({dim}) it"
                )
            return dim
    return 0 if rec.shape and rec.shape[0] >= world else REPLICATE


def shard_starts(n: int, world: int) -> list[int]:
    """Chunk starts along a dim of ``n`` split over ``world`` ranks as torch.chunk does
    (ceil-sized pieces; trailing ranks may get nothing)."""
    size = max(1, math.ceil(n / world))
    return [r * size for r in range(world) if r * size < n] or [0]


@dataclass
class ReshardInfo:
    src: str
    dst: str
    world_size: int
    sharded: int
    replicated: int
    bytes: int
    dropped: list[str] = field(default_factory=list)
    """Per-rank entries that cannot follow a change of world size (not written)."""


def reshard_checkpoint(
    src: str | os.PathLike[str] | Store | Checkpoint,
    dst: str | os.PathLike[str] | Store,
    *,
    world_size: int,
    placements: list[str] | None = None,
    max_memory: int = 256 * _MiB,
    overwrite: bool = False,
    src_options: dict[str, Any] | None = None,
    dst_options: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> ReshardInfo:
    """Write ``src`` again at ``dst``, laid out for ``world_size`` ranks (see module doc)."""
    if world_size < 1:
        raise ConversionError(f"world size must be >= 1, got {world_size}")
    rules = parse_placements(placements or [])
    ckpt = open_checkpoint(src, storage_options=src_options)
    target = store_for(dst, dst_options)
    refuse_existing(target, overwrite=overwrite)
    m = ckpt.manifest
    block = knobs.checksum_block_bytes()
    plan = {n: placement_for(n, r, rules, world_size) for n, r in m.tensors.items()}
    tag = uuid.uuid4().hex[:10]
    files = [data_key(rank_file_name(r, tag, 0)) for r in range(world_size)]
    files.append(data_key(replicated_file_name(tag)))
    copier = _RegionCopier(ckpt, max_memory, progress)
    rows: dict[tuple[str, int], ChunkRow] = {}
    blobs: dict[tuple[str, int | None], BlobRef] = {}
    dropped = [] if m.world_size == world_size else sorted(m.per_rank)
    try:
        for r in range(world_size):  # one sequential file per target rank
            with target.open_writer(files[r]) as w:
                _write_rank_file(ChunkWriter(w, r, block), r, world_size, plan, copier, rows)
        with target.open_writer(files[-1]) as w:
            out = ChunkWriter(w, world_size, block)
            _write_replicated_file(out, plan, copier, rows, blobs, keep_per_rank=not dropped)
    except BaseException:
        for key in files:
            target.delete(key)
        raise

    manifest = _assemble(m, plan, world_size, files, rows, blobs, block, dropped, ckpt.url)
    replaced = commit_manifest(target, manifest.to_json(), overwrite=overwrite)
    delete_replaced(target, replaced, manifest)
    sharded = sum(1 for d in plan.values() if d != REPLICATE)
    return ReshardInfo(
        ckpt.url, target.url, world_size, sharded, len(plan) - sharded, copier.written, dropped
    )


class _RegionCopier:
    """Copies boxes of the source's tensors into a chunk writer, region by region (memory
    bounded by ``max_memory``), counting the bytes."""

    def __init__(
        self, ckpt: Checkpoint, max_memory: int, progress: Callable[[int], None] | None
    ) -> None:
        self.ckpt, self.max_memory, self.progress = ckpt, max_memory, progress
        self.written = 0

    def copy_box(self, out: ChunkWriter, name: str, rec: TensorRecord, offs, shape) -> ChunkRow:
        out.begin()
        size = dtype_from_name(rec.dtype).itemsize
        for index in bounded_regions(tuple(shape), size, self.max_memory):
            glob = tuple(slice(o + s.start, o + s.stop) for o, s in zip(offs, index, strict=True))
            region = self.ckpt.read(name, glob).contiguous()
            out.add(as_bytes(region))
            self.written += region.numel() * size
            if self.progress:
                self.progress(region.numel() * size)
        return out.end()


def _write_rank_file(
    out: ChunkWriter,
    r: int,
    world_size: int,
    plan: dict[str, int],
    copier: _RegionCopier,
    rows: dict[tuple[str, int], ChunkRow],
) -> None:
    """Target rank ``r``'s shard of every sharded tensor (``torch.chunk`` sizes)."""
    for name, rec in copier.ckpt.manifest.tensors.items():
        dim = plan[name]
        if dim == REPLICATE or 0 in rec.shape:
            continue
        starts = shard_starts(rec.shape[dim], world_size)
        if r >= len(starts):
            continue
        lo = starts[r]
        hi = starts[r + 1] if r + 1 < len(starts) else rec.shape[dim]
        offs = [0] * len(rec.shape)
        shape = list(rec.shape)
        offs[dim], shape[dim] = lo, hi - lo
        rows[(name, r)] = copier.copy_box(out, name, rec, offs, shape)


def _write_replicated_file(
    out: ChunkWriter,
    plan: dict[str, int],
    copier: _RegionCopier,
    rows: dict[tuple[str, int], ChunkRow],
    blobs: dict[tuple[str, int | None], BlobRef],
    keep_per_rank: bool,
) -> None:
    """The replicated tensors, then the per-rank tensors and pickled objects (per-rank
    entries only when the world size is unchanged)."""
    ckpt = copier.ckpt
    m = ckpt.manifest
    for name, rec in m.tensors.items():
        if plan[name] == REPLICATE and 0 not in rec.shape:
            rows[(name, -1)] = copier.copy_box(out, name, rec, [0] * len(rec.shape), rec.shape)
    objects = [(n, None, o) for n, o in m.objects.items()]
    if keep_per_rank:
        objects += [(n, r, e) for n, es in m.per_rank.items() for r, e in enumerate(es)]
    for name, rank, entry in objects:
        if isinstance(entry, TensorRecord):
            _copy_rank_tensor(ckpt, out, name, rank, entry)
            rows[(name, -2 - rank)] = out.end()
        elif entry.blob is not None:
            label = name if rank is None else f"{name}[rank {rank}]"
            data = read_blob(ckpt.store, m, label, entry)  # checksum-verified
            blobs[(name, rank)] = blob_ref(out, data)


def _copy_rank_tensor(ckpt: Checkpoint, out: ChunkWriter, name: str, rank: int, rec) -> None:
    out.begin()
    t = ckpt.read(name, rank=rank).contiguous()
    out.add(as_bytes(t))


def _assemble(m, plan, world, files, rows, blobs, block, dropped, source) -> Manifest:
    order: list[ChunkRow] = []  # the chunk table, in manifest order
    add = order.append

    tensors: dict[str, TensorRecord] = {}
    for name, rec in m.tensors.items():
        dim = plan[name]
        start = len(order)
        if 0 in rec.shape:
            layout = whole_layout(len(rec.shape))
        elif dim == REPLICATE:
            layout = whole_layout(len(rec.shape))
            add(rows[(name, -1)])
        else:
            starts = shard_starts(rec.shape[dim], world)
            layout = GridLayout(
                tuple(tuple(starts) if d == dim else (0,) for d in range(len(rec.shape)))
            )
            for r in range(len(starts)):
                add(rows[(name, r)])
        tensors[name] = TensorRecord(rec.dtype, rec.shape, start, layout, None)
    objects = {}
    for name, o in m.objects.items():
        objects[name] = ObjectRecord(blob=blobs[(name, None)]) if o.blob else ObjectRecord(o.value)
    per_rank: dict[str, list] = {}
    if not dropped:
        for name, entries in m.per_rank.items():
            new = []
            for r, e in enumerate(entries):
                if isinstance(e, TensorRecord):
                    new.append(
                        TensorRecord(e.dtype, e.shape, len(order), whole_layout(len(e.shape)), None)
                    )
                    add(rows[(name, -2 - r)])
                elif e.blob is not None:
                    new.append(ObjectRecord(blob=blobs[(name, r)]))
                else:
                    new.append(ObjectRecord(e.value))
            per_rank[name] = new
    table = chunk_table(order, block)
    metadata = dict(m.metadata)
    metadata["resharded_from"] = {"path": source, "world_size": m.world_size}
    return Manifest(world, files, table, tensors, objects, per_rank, metadata=metadata)
