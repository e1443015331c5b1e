"""Reading saved chunks into destination tensors: plan byte ranges, coalesce, read, verify, copy.

For every destination region the saved chunks that overlap it are found; each overlap
becomes the smallest byte span of its chunk that holds it (the whole chunk when the chunk
is compressed), widened to checksum-block boundaries. Spans of one file that are close
together are read as one request; requests run in parallel threads into reusable
per-thread buffers; every block is checked against its crc32c *before* any of its bytes
is copied into a destination tensor.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ckptstore import codecs, knobs
from ckptstore.backends.base import Store
from ckptstore.checksum import crc32c
from ckptstore.dtypes import dtype_from_name, itemsize
from ckptstore.errors import ChecksumError
from ckptstore.manifest import Manifest, TensorRecord
from ckptstore.plan import Box, overlaps


@dataclass(frozen=True, slots=True)
class Target:
    """Fill ``dest`` (shape = ``box`` shape) with region ``box`` of tensor ``name``."""

    name: str
    record: TensorRecord
    box: Box
    dest: torch.Tensor


@dataclass(slots=True)
class _Piece:
    name: str
    chunk: int
    file: int
    start: int  # absolute byte range to read in the file (block aligned)
    end: int
    block_lo: int
    block_hi: int
    src_byte: int  # absolute file byte of the first element to copy (raw chunks)
    src_shape: tuple[int, ...]
    src_strides: tuple[int, ...]
    dest: torch.Tensor
    dtype: torch.dtype
    codec: str | None = None
    raw_nbytes: int = 0
    src_elem_in_raw: int = 0  # decoded chunks: element offset inside the raw chunk


@dataclass
class _Group:
    file: int
    start: int
    end: int
    pieces: list[_Piece] = field(default_factory=list)


def _c_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for s in reversed(shape):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


def _split(overlap: Box, strides: tuple[int, ...], size: int, window: int) -> list[Box]:
    """Cut ``overlap`` along its outer dims until each part's byte span fits in ``window``."""
    offs, shp = overlap
    span = (sum((s - 1) * st for s, st in zip(shp, strides, strict=True)) + 1) * size
    if span <= window:
        return [overlap]
    for d, extent in enumerate(shp):
        if extent > 1:
            inner = (
                sum((s - 1) * st for s, st in zip(shp[d + 1 :], strides[d + 1 :], strict=True)) + 1
            )
            per_step = strides[d] * size
            rows = max(1, (window - inner * size) // per_step + 1) if per_step else extent
            if rows >= extent:
                continue
            parts: list[Box] = []
            for lo in range(0, extent, rows):
                n = min(rows, extent - lo)
                sub_offs = (*offs[:d], offs[d] + lo, *offs[d + 1 :])
                sub_shp = (*shp[:d], n, *shp[d + 1 :])
                parts.extend(_split((sub_offs, sub_shp), strides, size, window))
            return parts
    return [overlap]


def plan_reads(manifest: Manifest, targets: list[Target], window: int, gap: int) -> list[_Group]:
    """Byte-range requests for ``targets``, grouped and coalesced per file."""
    table = manifest.chunks
    block = table.block_bytes
    pieces: list[_Piece] = []
    for t in targets:
        rec = t.record
        size = itemsize(rec.dtype)
        dtype = dtype_from_name(rec.dtype)
        for index, cbox, obox in overlaps(rec.layout, rec.shape, t.box):
            chunk = rec.chunk_start + index
            c_off, c_shape = cbox
            strides = _c_strides(c_shape)
            file, base, nbytes = (
                int(table.file[chunk]),
                int(table.offset[chunk]),
                int(table.nbytes[chunk]),
            )
            parts = [obox] if rec.codec else _split(obox, strides, size, window)
            for o_off, o_shape in parts:
                rel = tuple(a - b for a, b in zip(o_off, c_off, strict=True))
                first = sum(r * s for r, s in zip(rel, strides, strict=True))
                d_sl = tuple(
                    slice(a - b, a - b + n)
                    for a, b, n in zip(o_off, t.box[0], o_shape, strict=True)
                )
                dest = t.dest[d_sl] if d_sl else t.dest
                if rec.codec:
                    blo, bhi, lo, hi = 0, max(1, math.ceil(nbytes / block)), 0, nbytes
                else:
                    last = first + sum((n - 1) * s for n, s in zip(o_shape, strides, strict=True))
                    span_lo, span_hi = first * size, (last + 1) * size
                    blo, bhi = span_lo // block, math.ceil(span_hi / block)
                    lo, hi = blo * block, min(bhi * block, nbytes)
                pieces.append(
                    _Piece(
                        t.name, chunk, file, base + lo, base + hi, blo, bhi,
                        base + first * size, o_shape, strides, dest, dtype,
                        rec.codec, math.prod(c_shape) * size, first,
                    )
                )  # fmt: skip
    pieces.sort(key=lambda p: (p.file, p.start))
    groups: list[_Group] = []
    for p in pieces:
        g = groups[-1] if groups else None
        if (
            g
            and g.file == p.file
            and p.start - g.end <= gap
            and max(g.end, p.end) - g.start <= window
        ):
            g.end = max(g.end, p.end)
            g.pieces.append(p)
        else:
            groups.append(_Group(p.file, p.start, p.end, [p]))
    return groups


class _ThreadBuffers(threading.local):
    def __init__(self) -> None:
        self.buf = np.empty(0, dtype=np.uint8)

    def get(self, n: int) -> np.ndarray:
        if len(self.buf) < n:
            self.buf = np.empty(max(n, 2 * len(self.buf)), dtype=np.uint8)
        return self.buf[:n]


class ChunkReader:
    """Executes read plans against one checkpoint's store."""

    def __init__(self, store: Store, manifest: Manifest, where: str, threads: int | None = None):
        self.store = store
        self.manifest = manifest
        self.where = where
        self.threads = threads or knobs.read_threads()
        self._buffers = _ThreadBuffers()
        self.bytes_read = 0
        self.requests = 0
        self._lock = threading.Lock()

    def fill(
        self, targets: list[Target], window: int | None = None, gap: int | None = None
    ) -> None:
        groups = plan_reads(
            self.manifest,
            targets,
            window or knobs.read_window_bytes(),
            knobs.coalesce_gap_bytes() if gap is None else gap,
        )
        if not groups:
            return
        if self.threads <= 1 or len(groups) == 1:
            for g in groups:
                self._run(g)
            return
        with ThreadPoolExecutor(
            min(self.threads, len(groups)), thread_name_prefix="ckptstore-read"
        ) as pool:
            for f in [pool.submit(self._run, g) for g in groups]:
                f.result()

    def _run(self, group: _Group) -> None:
        table = self.manifest.chunks
        block = table.block_bytes
        buf = self._buffers.get(group.end - group.start)
        self.store.read_into(self.manifest.files[group.file], group.start, memoryview(buf))
        with self._lock:
            self.bytes_read += group.end - group.start
            self.requests += 1
        checked: set[tuple[int, int]] = set()
        for p in group.pieces:
            base = int(table.offset[p.chunk])
            nbytes = int(table.nbytes[p.chunk])
            crc0 = int(table.crc_first[p.chunk])
            for b in range(p.block_lo, p.block_hi):
                if (p.chunk, b) in checked:
                    continue
                lo = base + b * block - group.start
                hi = base + min((b + 1) * block, nbytes) - group.start
                found = crc32c(memoryview(buf[lo:hi]))
                expected = int(table.crc32c[crc0 + b])
                if found != expected:
                    raise ChecksumError(
                        f"{self.where}: checksum mismatch in tensor {p.name!r}, chunk {p.chunk}, "
                        f"block {b} (file {self.manifest.files[p.file]}, bytes {base + b * block}"
                        f"..{base + min((b + 1) * block, nbytes)}): expected crc32c {expected:#010x}, "
                        f"found {found:#010x}",
                        bad=[p.name],
                    )
                checked.add((p.chunk, b))
            self._copy(p, buf, group.start)

    @staticmethod
    def _copy(p: _Piece, buf: np.ndarray, group_start: int) -> None:
        size = p.dtype.itemsize
        if p.codec:
            stored = buf[p.start - group_start : p.end - group_start]
            raw = np.frombuffer(codecs.decode(p.codec, stored, p.raw_nbytes), dtype=np.uint8)
            lo = p.src_elem_in_raw * size
        else:
            raw = buf
            lo = p.src_byte - group_start
        # Copy bytes, not values: every dtype (float8, float4, complex32, ...) moves bit-exactly
        # and no dtype kernel is involved. The trailing dim of ``size`` bytes keeps any
        # destination strides valid.
        extent = sum((n - 1) * s for n, s in zip(p.src_shape, p.src_strides, strict=True)) + 1
        src = torch.from_numpy(raw[lo : lo + extent * size]).as_strided(
            (*p.src_shape, size), (*(s * size for s in p.src_strides), 1)
        )
        p.dest.unsqueeze(-1).view(torch.uint8).copy_(src)
