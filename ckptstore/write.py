"""Writing one rank's chunks into a few large data files with sequential writes.

Small chunks are packed into one buffer before they reach the store; large ones are
written straight from the tensor's memory. Each chunk's stored bytes get one crc32c per
checksum block. Files become visible (and durable) only on commit.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ckptstore import codecs
from ckptstore.backends.base import Store, StoreWriter
from ckptstore.checksum import block_crcs, crc32c
from ckptstore.manifest import DATA_PREFIX


@dataclass(frozen=True, slots=True)
class WriteItem:
    """One chunk (or pickled blob) to write: its raw bytes and an optional codec."""

    data: memoryview
    codec: str | None = None


@dataclass(frozen=True, slots=True)
class WrittenChunk:
    file: int
    """Index into :attr:`WriteResult.files`."""
    offset: int
    nbytes: int
    crc32c: tuple[int, ...]


@dataclass
class WriteResult:
    files: list[str] = field(default_factory=list)
    chunks: list[WrittenChunk] = field(default_factory=list)
    bytes_written: int = 0


class _PackedFileWriter:
    """Appends chunks to one store file, packing small ones, and records where each went."""

    def __init__(self, writer: StoreWriter, file_index: int, block_bytes: int, pack_bytes: int):
        self._writer = writer
        self._file = file_index
        self._block = block_bytes
        self._pack_limit = pack_bytes
        self._pack = bytearray()
        self._offset = 0

    def append(self, item: WriteItem) -> WrittenChunk:
        data = item.data
        if item.codec:
            data = memoryview(codecs.encode(item.codec, data))
        crcs = tuple(block_crcs(data, self._block))
        chunk = WrittenChunk(self._file, self._offset, len(data), crcs)
        self._offset += len(data)
        if len(data) < self._pack_limit:
            self._pack += data
            if len(self._pack) >= self._pack_limit:
                self._flush()
        else:
            self._flush()
            self._writer.write(data)
        return chunk

    def _flush(self) -> None:
        if self._pack:
            self._writer.write(self._pack)
            self._pack = bytearray()

    def commit(self) -> int:
        self._flush()
        self._writer.commit()
        return self._offset


def _split_by_bytes(items: list[WriteItem], parts: int) -> list[list[int]]:
    """Consecutive runs of item indices with about equal bytes each."""
    total = sum(len(i.data) for i in items)
    target = total / max(parts, 1)
    runs: list[list[int]] = [[]]
    acc = 0
    for idx, item in enumerate(items):
        if runs[-1] and acc >= target * len(runs) and len(runs) < parts:
            runs.append([])
        runs[-1].append(idx)
        acc += len(item.data)
    return [r for r in runs if r]


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
    return FilePlan([data_key(f"{rank:05d}-{tag}-{i}.bin", spread) for i in range(len(runs))], runs)


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
    written: list[WrittenChunk | None] = [None] * len(items)

    def write_run(file_index: int) -> int:
        writer = store.open_writer(result.files[file_index])
        packed = _PackedFileWriter(writer, file_index, block_bytes, pack_bytes)
        try:
            for idx in runs[file_index]:
                written[idx] = packed.append(items[idx])
            return packed.commit()
        except BaseException:
            writer.abort()
            raise

    if len(runs) == 1:
        sizes = [write_run(0)]
    else:
        with ThreadPoolExecutor(len(runs), thread_name_prefix="ckptstore-write") as pool:
            sizes = list(pool.map(write_run, range(len(runs))))
    result.chunks = [w for w in written if w is not None]
    result.bytes_written = sum(sizes)
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
