"""Re-reading every stored byte of a checkpoint and checking it against its crc32c."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ckptstore.backends.base import Store
from ckptstore.checksum import crc32c
from ckptstore.errors import StoreError
from ckptstore.manifest import Manifest, TensorRecord


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
            rows.tolist(), t.file[rows].tolist(), t.offset[rows].tolist(),
            t.nbytes[rows].tolist(), t.crc_first[rows].tolist(), t.crc_first[rows + 1].tolist(),
            strict=True,
        )
    ]  # fmt: skip
    for name, blob in manifest.blobs():
        if file is None or blob.file == file:
            crcs = np.array(blob.crc32c, dtype=np.uint32)
            out.append(StoredRange(-1, name, blob.file, blob.offset, blob.nbytes, crcs))
    return out


def verify_checkpoint(
    store: Store,
    manifest: Manifest,
    *,
    jobs: int = 4,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Read every chunk and pickled object back and compare every block's crc32c."""
    owners = chunk_owners(manifest)
    block = manifest.chunks.block_bytes
    work = stored_ranges(manifest)

    def check(r: StoredRange) -> list[BadChunk]:
        entry = r.blob if r.blob is not None else owners[r.chunk]
        chunk, file, offset, nbytes, crcs = r.chunk, r.file, r.offset, r.nbytes, r.crcs
        key = manifest.files[file]
        bad: list[BadChunk] = []
        buf = bytearray(min(max(nbytes, 1), 4 * block))
        pos = 0
        nblock = 0
        try:
            while pos < nbytes or (nbytes == 0 and nblock == 0):
                n = min(len(buf), nbytes - pos)
                view = memoryview(buf)[:n]
                if n:
                    store.read_into(key, offset + pos, view)
                for i in range(0, max(n, 1), block):
                    part = view[i : i + block]
                    if crc32c(part) != int(crcs[nblock]):
                        bad.append(
                            BadChunk(
                                entry,
                                chunk,
                                key,
                                offset + pos + i,
                                f"crc32c mismatch in block {nblock}",
                            )
                        )
                    nblock += 1
                pos += n
                if nbytes == 0:
                    break
        except (StoreError, OSError) as exc:
            bad.append(BadChunk(entry, chunk, key, offset, f"unreadable: {exc}"))
        if progress:
            progress(nbytes)
        return bad

    with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="ckptstore-verify") as pool:
        results = list(pool.map(check, work))
    bad = [b for r in results for b in r]
    return VerifyReport(chunks=len(work), bytes_checked=sum(w.nbytes for w in work), bad=bad)
