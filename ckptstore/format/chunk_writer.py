"""Appending chunks to one data file, piece by piece, with their block checksums.

Conversions (reshard, import) produce a chunk in pieces of whatever size streaming allows;
the running crc32c is cut at checksum-block boundaries so that the chunk's checksums are the
ones a save would have recorded for the same bytes.
"""

from __future__ import annotations

import crc32c as _crc32c
import numpy as np

from ckptstore.backends.base import StoreWriter
from ckptstore.format.manifest import BlobRef, ChunkTable

ChunkRow = tuple[int, int, int, list[int]]
"""(file, offset, nbytes, block crcs) of one written chunk, as :meth:`ChunkWriter.end` gives it."""


class ChunkWriter:
    """Appends chunks to one data file, with a crc32c per checksum block of each chunk.

    A chunk arrives in pieces of any size (``begin``, ``add``..., ``end``); the running crc
    is cut at block boundaries, so the result matches what a save would have recorded.
    """

    def __init__(self, writer: StoreWriter, file_index: int, block: int) -> None:
        self.writer, self.file, self.block = writer, file_index, block
        self.offset = 0
        self.start = 0
        self.crcs: list[int] = []
        self.crc = 0
        self.in_block = 0

    def begin(self) -> None:
        self.start, self.crcs, self.crc, self.in_block = self.offset, [], 0, 0

    def add(self, data: memoryview) -> None:
        self.writer.write(data)
        self.offset += len(data)
        while data:
            take = min(self.block - self.in_block, len(data))
            self.crc = _crc32c.crc32c(data[:take], self.crc)
            self.in_block += take
            data = data[take:]
            if self.in_block == self.block:
                self.crcs.append(self.crc)
                self.crc, self.in_block = 0, 0

    def end(self) -> ChunkRow:
        """(file, offset, nbytes, block crcs) of the chunk just written."""
        if self.in_block or not self.crcs:
            self.crcs.append(self.crc)
        return self.file, self.start, self.offset - self.start, self.crcs


def blob_ref(out: ChunkWriter, data: bytes) -> BlobRef:
    """Append ``data`` (a pickled object's bytes) whole; where it went, with its checksums."""
    out.begin()
    out.add(memoryview(data))
    file, offset, nbytes, crcs = out.end()
    return BlobRef(file, offset, nbytes, tuple(crcs))


def chunk_table(rows: list[ChunkRow], block: int) -> ChunkTable:
    """The manifest's chunk table of ``rows``, in order."""
    return ChunkTable(
        np.array([r[0] for r in rows], dtype=np.int64),
        np.array([r[1] for r in rows], dtype=np.int64),
        np.array([r[2] for r in rows], dtype=np.int64),
        np.array([c for r in rows for c in r[3]], dtype=np.uint32),
        block,
    )
