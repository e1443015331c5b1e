"""Reading saved chunks into destination tensors: read, verify, copy.

A :class:`~ckptstore.loading.read_plan.ReadPlan` lists requests (byte ranges of data files); they
run in parallel threads, from memory-mapped files or into reusable buffers, and every block
is checked against its crc32c *before* any of its bytes is copied into a destination tensor.
"""

from __future__ import annotations

import contextlib
import mmap
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from ckptstore import knobs
from ckptstore.backends.base import Store
from ckptstore.byte_buffers import byte_buffer
from ckptstore.errors import (
    ChecksumError,
    CorruptDataError,
    KeyNotFoundError,
    StoreError,
    TruncatedFileError,
    UnsafeCopyError,
)
from ckptstore.format import codecs
from ckptstore.format.checksum import crc32c
from ckptstore.format.manifest import Manifest
from ckptstore.loading.read_plan import (
    ReadPlan,
    ReadSpan,
    Request,
    Target,
    TargetColumns,
    WholeChunks,
    plan_reads,
)
from ckptstore.loading.verified_copy import COPIED, MISMATCH, check_and_copy
from ckptstore.state.tensor_bytes import address_range

__all__ = ["ChunkReader", "Target", "plan_reads"]


_WORDS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class _BufferPool:
    """Bounce buffers reused across loads: fresh memory costs a page fault per 4 KiB."""

    def __init__(self) -> None:
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def acquire(self, n: int) -> np.ndarray:
        with self._lock:
            for i, buf in enumerate(self._free):
                if len(buf) >= n:
                    return self._free.pop(i)
        return byte_buffer(n)

    def release(self, buf: np.ndarray) -> None:
        with self._lock:
            self._free.append(buf)
            self._free.sort(key=len)
            del self._free[: max(0, len(self._free) - 2 * knobs.read_threads())]


_POOL = _BufferPool()


class ChunkReader:
    """Executes read plans against one checkpoint's store."""

    def __init__(self, store: Store, manifest: Manifest, where: str, threads: int | None = None):
        self.store = store
        self.manifest = manifest
        self.where = where
        self.threads = threads or knobs.read_threads()
        self._maps: dict[int, np.ndarray | None] = {}
        self._views: dict[int, memoryview] = {}  # the mapped files, for _populate
        self._local_sizes: dict[int, int] = {}  # file -> its size on this node's tier (-1: none)
        self.bytes_read = 0  # from the store
        self.bytes_received = 0  # from other ranks that read them (shared reads)
        self.requests = 0
        self._lock = threading.Lock()

    def fill(
        self,
        targets: list[Target] | TargetColumns,
        window: int | None = None,
        gap: int | None = None,
    ) -> None:
        self.run(self.plan(targets, window, gap))

    def plan(
        self,
        targets: list[Target] | TargetColumns,
        window: int | None = None,
        gap: int | None = None,
    ) -> ReadPlan:
        """The byte-range requests that fill ``targets`` (nothing read yet)."""
        return plan_reads(
            self.manifest,
            targets,
            window or self.store.read_window_bytes or knobs.read_window_bytes(),
            knobs.coalesce_gap_bytes() if gap is None else gap,
        )

    def run(self, plan: ReadPlan) -> None:
        """Read, verify and copy every request of ``plan``, in parallel threads."""
        self.fetch(plan, [(g, None) for g in plan.groups])

    def fetch(self, plan: ReadPlan, work: list[tuple[Request, np.ndarray | None]]) -> None:
        """Run requests of ``plan``, in parallel threads; where a buffer comes with a request,
        its bytes are also left there (``buffer[0]`` is the request's first byte), verified,
        for ranks that receive them instead of reading them (see ``shared_reads``)."""
        if self.threads <= 1 or len(work) <= 1:
            for g, keep in work:
                self._run(g, plan, keep)
            return
        with ThreadPoolExecutor(
            min(self.threads, len(work)), thread_name_prefix="ckptstore-read"
        ) as pool:
            for f in [pool.submit(self._run, g, plan, keep) for g, keep in work]:
                f.result()

    def holds_locally(self, file: int, end: int) -> bool:
        """Whether this node's own disk holds bytes ``[0, end)`` of data file ``file`` (a
        tiered store's local tier, or a local store), so that reading them costs no trip to
        shared storage."""
        tiers = self.store.tiers()
        if tiers is None:
            return self.store.reads_are_local
        if file not in self._local_sizes:  # one stat per file, not per request
            try:
                self._local_sizes[file] = tiers[0].size(self.manifest.files[file])
            except StoreError:
                self._local_sizes[file] = -1
        return self._local_sizes[file] >= end

    def copy_received(self, group: Request, buf: np.ndarray, plan: ReadPlan) -> None:
        """Verify and copy a request whose bytes another rank read (``buf[0]`` is the
        request's first byte): every block is checked here as if it had been read here."""
        if len(buf) != group.end - group.start:
            _unsafe(self.where, group.start, group.end, group.start, group.start + len(buf), 0)
        with self._lock:
            self.bytes_received += len(buf)
        self._check_and_copy(group, buf, group.start, plan)

    def _mapped(self, file: int) -> np.ndarray | None:
        with self._lock:
            if file not in self._maps:
                view = self.store.map(self.manifest.files[file])
                self._maps[file] = None if view is None else np.frombuffer(view, dtype=np.uint8)
                if view is not None:
                    self._views[file] = view
            return self._maps[file]

    def _run(self, group: Request, plan: ReadPlan, keep: np.ndarray | None = None) -> None:
        key = self.manifest.files[group.file]
        with self._lock:
            self.bytes_read += group.end - group.start
            self.requests += 1
        fallback = self.store.fallback_reader()  # a tiered store's shared tier
        try:
            mapped = self._mapped(group.file)
            if mapped is not None:
                if len(mapped) < group.end:
                    raise TruncatedFileError(
                        f"{self.where}: data file {key} has {len(mapped)} bytes, the manifest "
                        f"needs {group.end}: truncated?"
                    )
                _populate(self._views.get(group.file), group.start, group.end)
                self._check_and_copy(group, mapped, 0, plan)
                if keep is not None:
                    keep[:] = mapped[group.start : group.end]
                self.store.count_mapped(group.end - group.start)
                return
            self._read_and_copy(group, key, self.store.read_into, plan, keep)
        except (ChecksumError, StoreError, CorruptDataError) as exc:
            if fallback is None:
                raise
            # The fast tier's copy is bad or short: take these bytes from the shared tier.
            try:
                self._read_and_copy(group, key, fallback, plan, keep)
            except KeyNotFoundError:
                raise exc from None

    def _read_and_copy(
        self, group: Request, key: str, read_into: Any, plan: ReadPlan, keep: np.ndarray | None
    ) -> None:
        """Read the request into ``keep`` (where its bytes must stay) or a pooled buffer,
        then verify and copy."""
        n = group.end - group.start
        pooled = _POOL.acquire(n) if keep is None else None
        view = keep if pooled is None else pooled[:n]
        try:
            if len(view) != n:
                _unsafe(self.where, group.start, group.end, 0, len(view), 0)
            read_into(key, group.start, memoryview(view))
            self._check_and_copy(group, view, group.start, plan)
        finally:
            if pooled is not None:
                _POOL.release(pooled)

    def _check_and_copy(
        self, group: Request, buf: np.ndarray, buf_start: int, plan: ReadPlan
    ) -> None:
        """Verify every block the spans touch, then copy; ``buf[0]`` is file byte ``buf_start``."""
        view = memoryview(buf)
        buf_end = buf_start + len(buf)
        runs = group.simple
        if len(runs.start):
            if group.start < buf_start or group.end > buf_end:
                # The plan checked each run against the request's bytes and its
                # destination's size; here the buffer must hold the request's bytes.
                _unsafe(self.where, group.start, group.end, buf_start, buf_end, 0)
            self._check_and_copy_whole(runs, view[group.start - buf_start :], group, plan)
        checked: set[tuple[int, int]] = set()
        for p in group.spans:
            if p.dest_ptr:
                # A whole raw chunk into contiguous memory: its blocks verified and copied
                # one by one, so each is copied while still in cache from its checksum.
                self._check_and_copy_chunk(p, view, buf_start, group.file)
                continue
            for b in range(p.block_lo, p.block_hi):
                if (p.chunk, b) not in checked:
                    checked.add((p.chunk, b))
                    self._verify_block(p, b, view, buf_start, group.file)
            self._copy(p, buf, buf_start, self.where)

    def _check_and_copy_chunk(
        self, p: ReadSpan, view: memoryview, buf_start: int, file: int
    ) -> None:
        """Blocks ``block_lo..block_hi`` of ``p``'s chunk, verified and copied into the
        contiguous destination at ``p.dest_ptr`` (``view[0]`` is file byte ``buf_start``)."""
        if p.chunk_nbytes != p.dest_nbytes:
            _unsafe(self.where, p.start, p.end, buf_start, buf_start + len(view), p.dest_nbytes)
        table = self.manifest.chunks
        at = np.arange(p.block_lo, p.block_hi, dtype=np.int64) * table.block_bytes
        starts = p.chunk_base + at
        ends = np.minimum(starts + table.block_bytes, p.chunk_base + p.chunk_nbytes)
        crcs = table.crc32c[p.crc0 + p.block_lo : p.crc0 + p.block_hi]
        dest = address_range(p.dest_ptr, p.dest_nbytes, writable=True)
        status, i = check_and_copy(view, buf_start, starts, ends, crcs, dest, at)
        if status == MISMATCH:
            self._verify_block(p, p.block_lo + i, view, buf_start, file)  # names the block
        if status != COPIED:
            lo, hi = int(starts[i]), int(ends[i])
            _unsafe(self.where, lo, hi, buf_start, buf_start + len(view), p.dest_nbytes)

    def _check_and_copy_whole(
        self, runs: WholeChunks, view: memoryview, group: Request, plan: ReadPlan
    ) -> None:
        """Verify and copy whole small chunks (``view[0]`` is the request's first byte).
        Destinations are parts of one writable view of the address range they lie in; the
        plan checked that each lies inside its own destination."""
        dests = address_range(runs.dest_base, runs.dest_extent, writable=True)
        first = group.start
        status, i = check_and_copy(view, first, runs.start, runs.end, runs.crc, dests, runs.dest_at)
        if status != COPIED:
            lo, hi, k = int(runs.start[i]), int(runs.end[i]), int(runs.item[i])
            if status == MISMATCH:
                found = crc32c(view[lo - first : hi - first])
                name, chunk = plan.simple_names[k], plan.simple_chunks[k]
                self._mismatch(name, chunk, group.file, lo, hi, int(runs.crc[i]), found)
            _unsafe(self.where, lo, hi, first, first + len(view), 0)

    def _verify_block(
        self, p: ReadSpan, b: int, view: memoryview, buf_start: int, file: int
    ) -> tuple[int, int]:
        """Check block ``b`` of ``p``'s chunk; returns its file byte range."""
        block = self.manifest.chunks.block_bytes
        lo = p.chunk_base + b * block
        hi = p.chunk_base + min((b + 1) * block, p.chunk_nbytes)
        found = crc32c(view[lo - buf_start : hi - buf_start])
        expected = int(self.manifest.chunks.crc32c[p.crc0 + b])
        if found != expected:
            self._mismatch(p.name, p.chunk, file, lo, hi, expected, found, b)
        return lo, hi

    def _mismatch(
        self,
        name: str,
        chunk: int,
        file: int,
        lo: int,
        hi: int,
        expected: int,
        found: int,
        block: int = 0,
    ) -> None:
        raise ChecksumError(
            f"{self.where}: checksum mismatch in tensor {name!r}, chunk {chunk}, block {block} "
            f"(file {self.manifest.files[file]}, bytes {lo}..{hi}): expected crc32c "
            f"{expected:#010x}, found {found:#010x}",
            bad=[name],
        )

    @staticmethod
    def _copy(p: ReadSpan, buf: np.ndarray, group_start: int, where: str) -> None:
        size = p.dtype.itemsize
        if p.codec:
            if p.start < group_start or p.end > group_start + len(buf):
                _unsafe(where, p.start, p.end, group_start, group_start + len(buf), p.raw_nbytes)
            stored = buf[p.start - group_start : p.end - group_start]
            raw = codecs.decode(p.codec, stored, p.raw_nbytes)
            lo = p.src_elem_in_raw * size
        else:
            raw = buf
            lo = p.src_byte - group_start
        # Copy bits, not values: both sides are viewed as integers of the element's width, so
        # every dtype (float8, float4, complex32, ...) moves bit-exactly through torch's
        # well-vectorized integer copy kernels, whatever the strides.
        extent = sum((n - 1) * s for n, s in zip(p.src_shape, p.src_strides, strict=True)) + 1
        if lo < 0 or lo + extent * size > len(raw) or tuple(p.dest.shape) != p.src_shape:
            _unsafe(where, lo, lo + extent * size, 0, len(raw), p.dest.numel() * size)
        raw_t = torch.from_numpy(raw[lo : lo + extent * size])
        if p.lazy:  # a lazy conjugate or negative view: its memory holds other bits
            p.dest.copy_(raw_t.view(p.dtype).as_strided(p.src_shape, p.src_strides))
            return
        word = _WORDS.get(size)
        if word is not None:
            src = raw_t.view(word).as_strided(p.src_shape, p.src_strides)
            dest = p.dest if p.dest.dtype == word else p.dest.view(word)
        else:  # 16-byte elements (complex128): two int64 words each
            lanes = size // 8
            src = raw_t.view(torch.int64).as_strided(
                (*p.src_shape, lanes), (*(s * lanes for s in p.src_strides), 1)
            )
            dest = p.dest.unsqueeze(-1).view(torch.int64)
        dest.copy_(src)


def _unsafe(where: str, lo: int, hi: int, buf_lo: int, buf_hi: int, dest_nbytes: int) -> None:
    raise UnsafeCopyError(
        f"{where}: refusing a copy of bytes {lo}..{hi} from a buffer holding {buf_lo}..{buf_hi} "
        f"into a destination of {dest_nbytes} bytes (a manifest that should have been refused)"
    )


_MADV_POPULATE_READ = 22 if sys.platform.startswith("linux") else None  # Linux 5.14+


def _populate(view: memoryview | None, lo: int, hi: int) -> None:
    """Map the pages of bytes ``lo..hi`` of a mapped file in one system call
    (``MADV_POPULATE_READ``) instead of a page fault per few pages as the checksums first
    touch them; nothing where the kernel or the view does not support it. The bytes are
    verified as before: this only saves the faults."""
    madvise = getattr(getattr(view, "obj", None), "madvise", None)
    if madvise is None or _MADV_POPULATE_READ is None or hi <= lo:
        return
    start = lo - lo % mmap.PAGESIZE
    with contextlib.suppress(OSError, ValueError):  # an older kernel (EINVAL), a short file
        madvise(_MADV_POPULATE_READ, start, hi - start)
