"""Re-reading every stored byte of a checkpoint and checking it against its crc32c."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ckptstore.backends.base import Store
from ckptstore.byte_buffers import byte_buffer
from ckptstore.errors import CorruptDataError, StoreError
from ckptstore.format import codecs
from ckptstore.format.checksum import crc32c
from ckptstore.format.manifest import Manifest, TensorRecord


@dataclass(frozen=True)
class BadChunk:
    entry: str
    chunk: int
    file: str
    offset: int
    problem: str

    def as_dict(self) -> dict[str, object]:
        return {
            "entry": self.entry,
            "chunk": self.chunk,
            "file": self.file,
            "offset": self.offset,
            "problem": self.problem,
        }


@dataclass(frozen=True)
class VerifyReport:
    chunks: int
    bytes_checked: int
    bad: list[BadChunk]

    @property
    def ok(self) -> bool:
        return not self.bad


def chunk_owners(manifest: Manifest) -> list[str]:
    """For each chunk index, the name of the entry it belongs to."""
    owners = [""] * len(manifest.chunks)
    records: list[tuple[str, TensorRecord]] = list(manifest.tensors.items())
    for name, entries in manifest.per_rank.items():
        records += [
            (f"{name}[rank {r}]", e) for r, e in enumerate(entries) if isinstance(e, TensorRecord)
        ]
    for name, rec in records:
        for i in range(rec.chunk_start, rec.chunk_start + rec.chunk_count):
            owners[i] = name
    return owners


class StoredRange(NamedTuple):
    """Bytes of a data file with their block checksums: a chunk, or a pickled object."""

    chunk: int  # row of the chunk table; -1 for a pickled object
    blob: str | None  # the pickled object's entry name (None for a chunk)
    file: int
    offset: int
    nbytes: int
    crcs: np.ndarray


def stored_ranges(manifest: Manifest, file: int | None = None) -> list[StoredRange]:
    """Every chunk and pickled object of the checkpoint, or only those stored in ``file``
    (picked with one array comparison: a manifest may hold millions of chunks)."""
    t = manifest.chunks
    rows = np.arange(len(t)) if file is None else np.flatnonzero(t.file == file)
    out = [
        StoredRange(c, None, f, o, n, t.crc32c[a:b])
        for c, f, o, n, a, b in zip(
            rows.tolist(),
            t.file[rows].tolist(),
            t.offset[rows].tolist(),
            t.nbytes[rows].tolist(),
            t.crc_first[rows].tolist(),
            t.crc_first[rows + 1].tolist(),
            strict=True,
        )
    ]
    for name, blob in manifest.blobs():
        if file is None or blob.file == file:
            crcs = np.array(blob.crc32c, dtype=np.uint32)
            out.append(StoredRange(-1, name, blob.file, blob.offset, blob.nbytes, crcs))
    return out


VERIFY_WINDOW_BYTES = 16 << 20
"""Largest single read of ``verify`` (memory per job), whatever the checksum block size."""


def verify_checkpoint(
    store: Store,
    manifest: Manifest,
    *,
    jobs: int = 4,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Read every chunk and pickled object back and check what a load checks: every block's
    crc32c (read in windows of at most 16 MiB, whatever the block size), and that every
    compressed chunk decodes to exactly its box's size."""
    owners = chunk_owners(manifest)
    codec_of = manifest.codec_chunks()
    work = stored_ranges(manifest)
    windows = threading.local()  # each thread's read window, reused from chunk to chunk

    def window(n: int) -> np.ndarray:
        buf = getattr(windows, "buf", None)
        if buf is None or len(buf) < n:
            buf = windows.buf = byte_buffer(n)
        return buf

    def check(r: StoredRange) -> list[BadChunk]:
        entry = r.blob if r.blob is not None else owners[r.chunk]
        key = manifest.files[r.file]
        codec = codec_of.get(r.chunk) if r.blob is None else None
        try:
            buf = window(min(r.nbytes, VERIFY_WINDOW_BYTES)) if codec is None else None
            stored, problems = _check_blocks(store, key, r, manifest.chunks.block_bytes, codec, buf)
            if codec is not None and not problems:
                try:
                    codecs.decode(codec[0], stored, codec[1])
                except CorruptDataError as exc:
                    problems = [(r.offset, f"does not decode: {exc}")]
        except (StoreError, OSError) as exc:
            problems = [(r.offset, f"unreadable: {exc}")]
        if progress:
            progress(r.nbytes)
        return [BadChunk(entry, r.chunk, key, at, what) for at, what in problems]

    with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="ckptstore-verify") as pool:
        results = list(pool.map(check, work))
    bad = [b for r in results for b in r]
    return VerifyReport(chunks=len(work), bytes_checked=sum(w.nbytes for w in work), bad=bad)


def _check_blocks(
    store: Store,
    key: str,
    r: StoredRange,
    block: int,
    codec: tuple[str, int] | None,
    buf: np.ndarray | None,
) -> tuple[np.ndarray | None, list[tuple[int, str]]]:
    """Stream ``r``'s bytes, checking each block's crc32c; returns the stored bytes when
    ``codec`` is set (a compressed chunk is decoded whole), and the problems found. ``buf``
    (at least ``min(r.nbytes, VERIFY_WINDOW_BYTES)`` bytes) is the read window of a chunk
    that is not compressed."""
    problems: list[tuple[int, str]] = []
    whole = np.empty(r.nbytes, dtype=np.uint8) if codec is not None else None
    pos = index = filled = crc = 0
    while pos < r.nbytes:
        n = min(VERIFY_WINDOW_BYTES, r.nbytes - pos)
        # A compressed chunk is read straight into the buffer it is decoded from.
        view = memoryview(whole)[pos : pos + n] if whole is not None else memoryview(buf)[:n]
        store.read_into(key, r.offset + pos, view)
        i = 0
        while i < n:
            take = min(block - filled, n - i)
            crc = crc32c(view[i : i + take], crc)
            filled, i = filled + take, i + take
            if filled == block or pos + i == r.nbytes:
                if crc != int(r.crcs[index]):
                    at = r.offset + index * block
                    problems.append((at, f"crc32c mismatch in block {index}"))
                index, filled, crc = index + 1, 0, 0
        pos += n
    if r.nbytes == 0 and crc32c(b"") != int(r.crcs[0]):
        problems.append((r.offset, "crc32c mismatch in block 0"))
    return whole, problems
