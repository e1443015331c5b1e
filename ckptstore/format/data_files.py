"""Writing one rank's chunks into a few large data files with sequential writes.

Small chunks reach the store together, in one gathering write (``write_parts``: on a local
disk no copy joins them first); large ones are written straight from the tensor's memory.
Each chunk's stored bytes get one crc32c per checksum block. Files become visible (and
durable) only on commit.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import NamedTuple

from ckptstore.backends.base import Store, StoreWriter
from ckptstore.format import codecs
from ckptstore.format.checksum import block_crcs, crc32c, crc32c_of
from ckptstore.format.manifest import DATA_PREFIX


class WriteItem(NamedTuple):
    """One chunk (or pickled blob) to write: its raw bytes and an optional codec."""

    data: memoryview
    codec: str | None = None


@dataclass
class WriteResult:
    """Where each item went, as columns (item i: ``file[i]``, ``offset[i]``, ...; its
    ``crc_count[i]`` block checksums follow the previous items' in ``crc``)."""

    files: list[str] = field(default_factory=list)
    file: list[int] = field(default_factory=list)
    offset: list[int] = field(default_factory=list)
    nbytes: list[int] = field(default_factory=list)
    crc_count: list[int] = field(default_factory=list)
    crc: list[int] = field(default_factory=list)
    bytes_written: int = 0

    def extend(self, other: WriteResult) -> None:
        for name in ("file", "offset", "nbytes", "crc_count", "crc"):
            getattr(self, name).extend(getattr(other, name))


def _write_run(
    writer: StoreWriter,
    items: list[WriteItem],
    indices: list[int],
    file_index: int,
    block: int,
    pack_limit: int,
) -> WriteResult:
    """Append ``items[indices]`` to one file: small ones together (one gathering write per
    ``pack_limit`` bytes), large ones from their own memory; one loop, no object per chunk
    (models have many)."""
    out = WriteResult(file=[file_index] * len(indices))
    offsets, sizes, counts, crcs = out.offset, out.nbytes, out.crc_count, out.crc
    check = crc32c_of  # the extension's own function: one call per small chunk
    pack: list[memoryview] = []  # small items, written together by one gathering write
    packed = 0
    offset = 0
    for idx in indices:
        data, codec = items[idx]
        if codec:
            data = memoryview(codecs.encode(codec, data))
        n = len(data)
        offsets.append(offset)
        sizes.append(n)
        if n <= block:
            crcs.append(check(data))
            counts.append(1)
        else:
            more = block_crcs(data, block)
            crcs.extend(more)
            counts.append(len(more))
        offset += n
        if n < pack_limit:
            pack.append(data)
            packed += n
            if packed >= pack_limit:
                writer.write_parts(pack)
                pack, packed = [], 0
        else:
            if pack:
                writer.write_parts(pack)
                pack, packed = [], 0
            writer.write(data)
    if pack:
        writer.write_parts(pack)
    writer.commit()
    out.bytes_written = offset
    return out


def _split_by_bytes(items: list[WriteItem], parts: int) -> list[list[int]]:
    """Consecutive runs of item indices with about equal bytes each."""
    if parts <= 1:
        return [list(range(len(items)))]
    total = sum(len(i.data) for i in items)
    target = total / parts
    runs: list[list[int]] = [[]]
    acc = 0
    for idx, item in enumerate(items):
        if runs[-1] and acc >= target * len(runs) and len(runs) < parts:
            runs.append([])
        runs[-1].append(idx)
        acc += len(item.data)
    return [r for r in runs if r]


def rank_file_name(rank: int, tag: str, index: int | str) -> str:
    """The name of data file ``index`` of ``rank``'s save ``tag`` (random per save and rank:
    a new save never overwrites an older one's data). :func:`writer_rank` reads it back."""
    return f"{rank:05d}-{tag}-{index}.bin"


def replicated_file_name(tag: str) -> str:
    """The data file of the replicated tensors of a ``ckpt reshard`` output."""
    return f"replicated-{tag}.bin"


def data_key(name: str, spread: int = 0) -> str:
    """The key of a data file; with ``spread`` > 1 files are spread over that many prefixes
    (``data/<2 hex digits>/...``): object stores limit request rates per prefix."""
    if spread > 1:
        return f"{DATA_PREFIX}{crc32c(name.encode()) % spread:02x}/{name}"
    return f"{DATA_PREFIX}{name}"


def writer_rank(key: str) -> int | None:
    """The rank that wrote data file ``key`` (its name starts with the rank), or None."""
    head = key.rsplit("/", 1)[-1].split("-", 1)[0]
    return int(head) if head.isdigit() else None


@dataclass(frozen=True)
class FilePlan:
    """Which items go to which new data file: ``runs[i]`` are the item indices of ``keys[i]``."""

    keys: list[str]
    runs: list[list[int]]


def plan_files(items: list[WriteItem], *, rank: int, files: int, spread: int = 0) -> FilePlan:
    """Split ``items`` into about equal-sized runs, one new data file each."""
    if not items:
        return FilePlan([], [])
    tag = uuid.uuid4().hex[:10]
    runs = _split_by_bytes(items, files)
    keys = [data_key(rank_file_name(rank, tag, i), spread) for i in range(len(runs))]
    return FilePlan(keys, runs)


def write_items(
    store: Store,
    items: list[WriteItem],
    *,
    rank: int,
    files: int,
    block_bytes: int,
    pack_bytes: int,
    spread: int = 0,
    plan: FilePlan | None = None,
) -> WriteResult:
    """Write ``items`` into ``files`` new data files (in parallel), durable on return."""
    result = WriteResult()
    if not items:
        return result
    plan = plan or plan_files(items, rank=rank, files=files, spread=spread)
    runs = plan.runs
    result.files = list(plan.keys)

    def write_run(file_index: int) -> WriteResult:
        writer = store.open_writer(result.files[file_index])
        try:
            return _write_run(writer, items, runs[file_index], file_index, block_bytes, pack_bytes)
        except BaseException:
            writer.abort()
            raise

    if len(runs) == 1:
        parts = [write_run(0)]
    else:
        with ThreadPoolExecutor(len(runs), thread_name_prefix="ckptstore-write") as pool:
            parts = list(pool.map(write_run, range(len(runs))))
    for part in parts:  # runs are consecutive item ranges: their columns follow item order
        result.extend(part)
    result.bytes_written = sum(part.bytes_written for part in parts)
    return result


def stream_items(store: Store, items: list[WriteItem], plan: FilePlan) -> list[str]:
    """Write the raw bytes of ``plan``'s files to ``store`` (no codec, no checksums: the
    same bytes as :func:`write_items` lays out). Returns the keys written."""
    if any(item.codec for item in items):
        raise ValueError("stream_items writes raw bytes; items with a codec cannot be streamed")
    for key, run in zip(plan.keys, plan.runs, strict=True):
        with store.open_writer(key) as writer:
            for idx in run:
                writer.write(items[idx].data)
    return list(plan.keys)
