"""A rank's chunks laid out in a data file: every chunk at its recorded offset with its
crc32c per checksum block, small chunks gathered into writes of about ``pack_bytes``,
large ones written on their own, from their own memory."""

from __future__ import annotations

import numpy as np
import pytest
from crc32c import crc32c

from ckptstore.backends.base import StoreWriter
from ckptstore.format import data_files
from ckptstore.format.data_files import WriteItem


class _Recorder(StoreWriter):
    """Each write as the list of parts it was given."""

    def __init__(self) -> None:
        self.writes: list[list[bytes]] = []
        self.committed = False

    def write(self, data) -> None:
        self.writes.append([bytes(data)])

    def write_parts(self, parts) -> None:
        self.writes.append([bytes(p) for p in parts])

    def commit(self) -> None:
        self.committed = True

    def abort(self) -> None:
        raise AssertionError("nothing failed")


def _expected_writes(sizes: list[int], pack: int) -> list[list[int]]:
    """Which items each write holds, by the layout's rule (the specification)."""
    writes, run, packed = [], [], 0
    for i, n in enumerate(sizes):
        if n >= pack:
            if run:
                writes.append(run)
                run, packed = [], 0
            writes.append([i])
            continue
        run.append(i)
        packed += n
        if packed >= pack:
            writes.append(run)
            run, packed = [], 0
    if run:
        writes.append(run)
    return writes


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("multi_block", [False, True])
def test_chunks_land_at_their_offsets_in_the_specified_writes(seed, multi_block) -> None:
    rng = np.random.default_rng(seed)
    pack, block = 1000, 4000
    sizes = [int(x) for x in rng.choice([0, 1, 7, 300, 999, 1000, 1500, 3999, 4000], 60)]
    datas = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]
    items = [WriteItem(memoryview(d)) for d in datas]
    if multi_block:  # a chunk of two checksum blocks
        sizes.append(block + 1)
        datas.append(rng.integers(0, 256, block + 1, dtype=np.uint8).tobytes())
        items.append(WriteItem(memoryview(datas[-1])))
    writer = _Recorder()
    out = data_files._write_run(writer, items, list(range(len(items))), 3, block, pack)
    assert writer.committed
    assert [[bytes(datas[i]) for i in w] for w in _expected_writes(sizes, pack)] == writer.writes
    stored = b"".join(b"".join(w) for w in writer.writes)
    assert out.bytes_written == len(stored) == sum(sizes)
    assert out.file == [3] * len(items) and out.nbytes == sizes
    crc_at = 0
    for i, data in enumerate(datas):
        assert stored[out.offset[i] : out.offset[i] + sizes[i]] == data
        blocks = [data[k : k + block] for k in range(0, max(len(data), 1), block)]
        assert out.crc_count[i] == len(blocks)
        assert out.crc[crc_at : crc_at + len(blocks)] == [crc32c(b) for b in blocks]
        crc_at += len(blocks)
    assert crc_at == len(out.crc)
