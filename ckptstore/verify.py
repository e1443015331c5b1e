"""Re-reading every stored byte of a checkpoint and checking it against its crc32c."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

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


def verify_checkpoint(
    store: Store,
    manifest: Manifest,
    *,
    jobs: int = 4,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Read every chunk and pickled object back and compare every block's crc32c."""
    table = manifest.chunks
    owners = chunk_owners(manifest)
    block = table.block_bytes
    work: list[tuple[str, int, int, int, int, np.ndarray]] = []  # entry, chunk, file, off, n, crcs
    for c in range(len(table)):
        a, b = table.crc_range(c)
        work.append(
            (
                owners[c],
                c,
                int(table.file[c]),
                int(table.offset[c]),
                int(table.nbytes[c]),
                table.crc32c[a:b],
            )
        )
    for name, blob in manifest.blobs():
        crcs = np.array(blob.crc32c, dtype=np.uint32)
        work.append((name, -1, blob.file, blob.offset, blob.nbytes, crcs))

    def check(item: tuple[str, int, int, int, int, np.ndarray]) -> list[BadChunk]:
        entry, chunk, file, offset, nbytes, crcs = item
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
    return VerifyReport(chunks=len(work), bytes_checked=sum(w[4] for w in work), bad=bad)
