"""Read planning: which byte ranges of which data files fill which destination tensors.

For every destination region the saved chunks that overlap it are found; each overlap
becomes the smallest byte span of its chunk that holds it (the whole chunk when the chunk
is compressed), widened to checksum-block boundaries. Whole small tensors (most of a
model's) skip the per-region work: their spans are looked up and sorted as arrays. Spans of
one file that are close together become one request, at most a window long.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from itertools import compress
from operator import attrgetter, is_, itemgetter
from typing import Any, NamedTuple

import numpy as np
import torch

from ckptstore.errors import ManifestError, UnsafeCopyError
from ckptstore.format.dtypes import dtype_from_name, itemsize
from ckptstore.format.layouts import Box, GridLayout, overlaps, whole_layout
from ckptstore.format.manifest import Manifest, TensorRecord
from ckptstore.state.tensor_bytes import holds_its_values
from ckptstore.state.tensor_fields import host_addresses


class Target(NamedTuple):
    """Fill ``dest`` (shape = ``box`` shape) with region ``box`` of tensor ``name``."""

    name: str
    record: TensorRecord
    box: Box
    dest: torch.Tensor


@dataclass(slots=True)
class ReadSpan:
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
    dest_ptr: int = 0  # set when the span is one contiguous run into contiguous host memory
    chunk_base: int = 0  # the chunk's offset in its file, size and first checksum index
    chunk_nbytes: int = 0
    crc0: int = 0
    dest_nbytes: int = 0  # bytes of ``dest`` (checked before a raw copy into ``dest_ptr``)
    lazy: bool = False  # ``dest`` is a lazy conjugate or negative view: copy values, not bits


class TargetColumns(NamedTuple):
    """Targets as parallel columns: what a load plans for a model's tensor blocks, without
    a :class:`Target` per tensor (tens of thousands of them cost more than planning)."""

    names: list[str]
    records: list[TensorRecord]
    boxes: list[Box]
    dests: list[torch.Tensor]

    @staticmethod
    def of(targets: list[Target]) -> TargetColumns:
        return TargetColumns(
            list(map(_NAME, targets)),
            list(map(_RECORD, targets)),
            list(map(_BOX, targets)),
            list(map(_DEST, targets)),
        )

    @staticmethod
    def joined(parts: list[TargetColumns]) -> TargetColumns:
        """One set of columns of ``parts``, in order (the one part that has rows, as it is)."""
        parts = [part for part in parts if part.names]
        if len(parts) == 1:
            return parts[0]
        columns: tuple[list[Any], ...] = ([], [], [], [])
        for part in parts:
            for column, more in zip(columns, part, strict=True):
                column.extend(more)
        return TargetColumns(*columns)

    def targets(self, picked: list[int] | None = None) -> list[Target]:
        """The targets of rows ``picked`` (all by default)."""
        rows = zip(self.names, self.records, self.boxes, self.dests, strict=True)
        if picked is None:
            return list(map(_NEW_TARGET, rows))
        return [
            Target(self.names[i], self.records[i], self.boxes[i], self.dests[i]) for i in picked
        ]

    def count(self) -> int:
        return len(self.names)


def as_columns(targets: list[Target] | TargetColumns) -> TargetColumns:
    """``targets`` as columns (as they are, when they are columns already)."""
    return targets if isinstance(targets, TargetColumns) else TargetColumns.of(targets)


class WholeChunks(NamedTuple):
    """Whole one-block raw chunks copied into contiguous host memory: the fast path for the
    tens of thousands of small tensors of a large model. Parallel numpy columns, one entry
    per chunk (file byte range, crc32c as stored (uint32), destination address as an offset
    from ``dest_base``, index into ``names``/``chunks``); every destination lies in the
    ``dest_extent`` bytes from ``dest_base`` (the reader copies through one view of that
    range). Arrays, not lists: the compiled verify-and-copy reads them as they are."""

    start: np.ndarray
    end: np.ndarray
    crc: np.ndarray
    dest_at: np.ndarray
    item: np.ndarray
    dest_base: int = 0
    dest_extent: int = 0


_NONE = np.zeros(0, dtype=np.int64)
NO_WHOLE_CHUNKS = WholeChunks(_NONE, _NONE, _NONE, _NONE, _NONE)


@dataclass
class Request:
    file: int
    start: int
    end: int
    spans: list[ReadSpan] = field(default_factory=list)
    simple: WholeChunks = NO_WHOLE_CHUNKS


@dataclass
class ReadPlan:
    """The byte-range requests of one fill, plus the names behind the fast-path chunks."""

    groups: list[Request]
    simple_names: list[str]
    simple_chunks: list[int]


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


def _slices(box: Box, origin: tuple[int, ...]) -> tuple[slice, ...]:
    """``box`` as slices of a tensor whose element 0 sits at ``origin``."""
    return tuple(slice(a - o, a - o + n) for a, o, n in zip(box[0], origin, box[1], strict=True))


def exact_cell(layout: GridLayout, shape: tuple[int, ...], box: Box) -> int | None:
    """The index of the grid cell that is exactly ``box`` (None when ``box`` is not one
    cell): then the chunk's bytes are the box's bytes in C order."""
    index = 0
    for starts, off, size, extent in zip(layout.starts, box[0], box[1], shape, strict=True):
        i = bisect.bisect_right(starts, off) - 1
        end = starts[i + 1] if i + 1 < len(starts) else extent
        if i < 0 or starts[i] != off or end != off + size:
            return None
        index = index * len(starts) + i
    return index


def plan_reads(
    manifest: Manifest, targets: list[Target] | TargetColumns, window: int, gap: int
) -> ReadPlan:
    """Byte-range requests for ``targets``, grouped and coalesced per file.

    One-block chunks that are exactly a destination -- a whole small tensor, or a shard
    loaded with the sharding it was saved in (the many norms of a model) -- are looked up,
    sorted and grouped with array operations; everything else becomes a :class:`ReadSpan`.
    """
    table = manifest.chunks
    whole = _whole_chunk_targets(as_columns(targets), table)
    chunk_col, ptr_col, room_col, names, others = whole
    nbytes = table.nbytes[chunk_col]
    chunks = chunk_col.tolist()
    spans = _spans(table, others, window)

    # All spans (fast-path chunks first, then spans) sorted by (file, start).
    n_simple = len(chunks)
    files = np.concatenate([table.file[chunk_col], np.array([p.file for p in spans], np.int64)])
    starts = np.concatenate([table.offset[chunk_col], np.array([p.start for p in spans], np.int64)])
    ends = np.concatenate([starts[:n_simple] + nbytes, np.array([p.end for p in spans], np.int64)])
    order = np.lexsort((starts, files))
    crc_col = table.crc32c[table.crc_first[chunk_col]] if n_simple else chunk_col
    if not np.array_equal(nbytes, room_col):  # each is exactly its box: a stored size is not
        bad = int(np.flatnonzero(nbytes != room_col)[0])
        _check_stored_size(names[bad], chunks[bad], int(nbytes[bad]), int(room_col[bad]), None)
    groups: list[Request] = []
    for lo, hi, g_start, g_end in coalesce(files[order], starts[order], ends[order], gap, window):
        items = order[lo:hi]
        is_simple = items < n_simple
        s_items = items[is_simple]
        runs = NO_WHOLE_CHUNKS
        if len(s_items):
            s_start = table.offset[chunk_col[s_items]]
            s_end = s_start + nbytes[s_items]
            # The bounds of every raw copy of this request, checked here as one array
            # operation: inside the request's bytes, exactly the destination's size. (The
            # reader checks that its buffer holds the request's bytes.)
            if not (
                (s_start >= g_start) & (s_end <= g_end) & (s_end - s_start == room_col[s_items])
            ).all():
                raise UnsafeCopyError(
                    f"a whole-chunk copy of file {int(files[items[0]])} would leave its request "
                    f"({g_start}..{g_end}) or its destination"
                )
            s_ptr = ptr_col[s_items]
            base = int(s_ptr.min())
            runs = WholeChunks(
                s_start,
                s_end,
                crc_col[s_items],
                s_ptr - base,
                s_items,
                base,
                int((s_ptr + room_col[s_items]).max()) - base,
            )
        group_spans = [spans[i - n_simple] for i in items[~is_simple].tolist()]
        groups.append(Request(int(files[items[0]]), g_start, g_end, group_spans, runs))
    return ReadPlan(groups, names, chunks)


def _whole_chunk_targets(
    cols: TargetColumns, table: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[Target]]:
    """The targets that are exactly one saved one-block raw chunk, copied into contiguous
    host memory: (their chunks, destination addresses, destination sizes in bytes, names),
    and the other targets (the general path).

    C-level passes over the columns: tensors of one shape and sharding share a layout, so
    the chunk cell of each distinct (layout, shape, box) is worked out once."""
    n = cols.count()
    if not n:
        none = np.zeros(0, dtype=np.int64)
        return none, none, none, [], []
    records, dests = cols.records, cols.dests
    keys, layout_of = _distinct_boxes(cols)
    cell = np.fromiter(map(_Cells(layout_of).__getitem__, keys), np.int64, n)
    ptr, room = host_addresses(dests)  # 0: not contiguous host memory
    usable = np.fromiter(map(_CODEC_IS_NONE, map(_CODEC, records)), bool, n)
    chunk = np.fromiter(map(_CHUNK_START, records), np.int64, n) + cell
    usable &= (cell >= 0) & (ptr != 0)
    nbytes = np.zeros(n, dtype=np.int64)
    nbytes[usable] = table.nbytes[chunk[usable]]
    # Empty tensors and multi-block chunks take the general path.
    usable &= (nbytes > 0) & (nbytes <= table.block_bytes)
    if usable.all():
        return chunk, ptr, room, cols.names, []
    others = cols.targets(np.flatnonzero(~usable).tolist())
    names = list(compress(cols.names, usable.tolist()))
    return chunk[usable], ptr[usable], room[usable], names, others


class _Cells(dict):
    """The chunk cell of each (layout id, shape, box) key, worked out on its first lookup
    (one hashing pass over the targets, not one to find the distinct keys and another to
    look them up)."""

    __slots__ = ("layout_of",)

    def __init__(self, layout_of: dict[int, Any]) -> None:
        super().__init__()
        self.layout_of = layout_of

    def __missing__(self, key: tuple[int, tuple[int, ...], Box]) -> int:
        found = self[key] = _cell(self.layout_of[key[0]], key[1], key[2])
        return found


def _distinct_boxes(
    cols: TargetColumns,
) -> tuple[Iterator[tuple[int, tuple[int, ...], Box]], dict[int, Any]]:
    """Each target's key (layout identity, shape, box), and the layouts by identity
    (layouts holding boxes are not hashable): tensors of one shape and sharding share a
    key, so per-key work is done once."""
    layouts = list(map(_LAYOUT, cols.records))
    layout_of = dict(zip(map(id, layouts), layouts, strict=True))
    keys = zip(map(id, layouts), map(_SHAPE, cols.records), cols.boxes, strict=True)
    return keys, layout_of


def chunks_needed(targets: list[Target] | TargetColumns) -> np.ndarray:
    """Every chunk (global number) some target's box overlaps: what a rank must know of a
    chunk index (format 4) to plan its reads. Each distinct (layout, shape, box) is worked
    out once: the thousands of same-shaped shards of a model share a handful."""
    cols = as_columns(targets)
    if not cols.count():
        return np.zeros(0, dtype=np.int64)
    found, layout_of = _distinct_boxes(cols)
    keys = list(found)
    cells: dict[Any, np.ndarray] = {}
    for key in dict.fromkeys(keys):
        layout, shape, box = layout_of[key[0]], key[1], key[2]
        exact = _cell(layout, shape, box)
        if exact >= 0:
            cells[key] = np.array([exact], dtype=np.int64)
        else:
            found_cells = [index for index, _, _ in overlaps(layout, shape, box)]
            cells[key] = np.array(found_cells, dtype=np.int64)
    starts = map(_CHUNK_START, cols.records)
    pieces = [cells[key] + start for key, start in zip(keys, starts, strict=True)]
    return np.unique(np.concatenate(pieces))


def _cell(layout: Any, shape: tuple[int, ...], box: Box) -> int:
    """The chunk (relative to the tensor's first) that is exactly ``box``, or -1."""
    if layout is whole_layout(len(shape)):
        return 0 if box[1] == shape else -1
    if type(layout) is GridLayout:  # a shard loaded as it was saved (FSDP, TP)
        found = exact_cell(layout, shape, box)
        return -1 if found is None else found
    return -1


_NAME, _RECORD, _BOX, _DEST = itemgetter(0), itemgetter(1), itemgetter(2), itemgetter(3)
_NEW_TARGET = partial(tuple.__new__, Target)
_LAYOUT, _SHAPE, _CODEC = attrgetter("layout"), attrgetter("shape"), attrgetter("codec")
_CHUNK_START = attrgetter("chunk_start")
_CODEC_IS_NONE = partial(is_, None)


def _check_stored_size(name: str, chunk: int, nbytes: int, raw: int, codec: str | None) -> None:
    """A chunk about to be read stores exactly its box's bytes (a compressed one at most a
    codec's worst case): checked for the whole table when a manifest is parsed, and here
    again for the chunks a rank read from a chunk index in part."""
    if (nbytes != raw) if not codec else (nbytes > raw + raw // 8 + 4096):
        raise ManifestError(
            f"tensor {name!r}: chunk {chunk} stores {nbytes} bytes, its box has {raw}"
        )


def coalesce(
    files: np.ndarray, starts: np.ndarray, ends: np.ndarray, gap: int, window: int
) -> list[tuple[int, int, int, int]]:
    """Requests for byte spans sorted by (file, start): ``(lo, hi, start, end)`` reads bytes
    ``[start, end)`` of one file for spans ``lo..hi-1``. Spans closer than ``gap`` share a
    request, no request covering several spans exceeds ``window`` bytes. Array operations
    throughout, but for one step per request: a rank may read tens of thousands of spans.
    """
    if not len(files):
        return []
    # The running maximum of span ends, restarted at each file (one pass per file read: few).
    new_file = np.flatnonzero(files[1:] != files[:-1]) + 1
    covered = np.empty_like(ends)
    for lo, hi in itertools.pairwise([0, *new_file.tolist(), len(files)]):
        np.maximum.accumulate(ends[lo:hi], out=covered[lo:hi])
    gaps = starts[1:] - covered[:-1] > gap
    gaps[new_file - 1] = True  # a file change always starts a new request
    breaks = np.flatnonzero(gaps) + 1
    out: list[tuple[int, int, int, int]] = []
    bounds = [0, *breaks.tolist(), len(files)]
    for lo, hi in itertools.pairwise(bounds):
        while lo < hi:  # cut the run of close spans into requests of at most ``window`` bytes
            start = int(starts[lo])
            fits = int(np.searchsorted(covered[lo:hi], start + window, "right"))
            end = lo + max(1, fits)
            out.append((lo, end, start, int(covered[end - 1])))
            lo = end
    return out


def _host_address(dest: torch.Tensor, shape: tuple[int, ...] | None = None) -> int:
    """``dest``'s address if it is C-contiguous host memory holding its values
    (:func:`holds_its_values`) and exactly ``shape`` (when given), else 0."""
    usable = holds_its_values(dest) and (shape is None or dest.numel() == math.prod(shape))
    return dest.data_ptr() if usable else 0


def _spans(table: Any, targets: list[Target], window: int) -> list[ReadSpan]:
    """The reads of targets off the fast path: regions of chunks, or compressed chunks."""
    block = table.block_bytes
    spans: list[ReadSpan] = []
    for t in targets:
        rec = t.record
        size = itemsize(rec.dtype)
        dtype = dtype_from_name(rec.dtype)
        t_off, t_shape = t.box
        base_ptr = -1  # the destination's address, once a chunk of whole rows needs it
        lazy = t.dest.is_conj() or t.dest.is_neg()  # its views (each span's dest) are too
        for index, cbox, obox in overlaps(rec.layout, rec.shape, t.box):
            chunk = rec.chunk_start + index
            c_off, c_shape = cbox
            strides = _c_strides(c_shape)
            file, base = int(table.file[chunk]), int(table.offset[chunk])
            nbytes, crc0 = int(table.nbytes[chunk]), int(table.crc_first[chunk])
            _check_stored_size(t.name, chunk, nbytes, math.prod(c_shape) * size, rec.codec)
            if obox == cbox and not rec.codec and nbytes <= window:
                # The common case (same sharding on save and load): the whole raw chunk.
                rows = t.box != cbox and c_off[1:] == t_off[1:] and c_shape[1:] == t_shape[1:]
                if rows and base_ptr < 0:
                    base_ptr = _host_address(t.dest, t_shape)
                if rows and base_ptr:
                    # Whole rows of a C-contiguous host destination: one contiguous run whose
                    # address is computed, not sliced out as a torch view per chunk (FSDP2
                    # shards loaded onto fewer ranks are such rows).
                    dest = t.dest  # the chunk's rows of it, at ptr
                    ptr = base_ptr + (c_off[0] - t_off[0]) * math.prod(t_shape[1:]) * size
                    dest_nbytes = math.prod(c_shape) * size
                else:
                    dest = t.dest if t.box == cbox else t.dest[_slices(cbox, t_off)]
                    ptr = _host_address(dest)  # 0 for a lazy view too
                    dest_nbytes = dest.nbytes
                blocks = max(1, -(-nbytes // block))
                spans.append(
                    ReadSpan(
                        name=t.name,
                        chunk=chunk,
                        file=file,
                        start=base,
                        end=base + nbytes,
                        block_lo=0,
                        block_hi=blocks,
                        src_byte=base,
                        src_shape=c_shape,
                        src_strides=strides,
                        dest=dest,
                        dtype=dtype,
                        codec=None,
                        raw_nbytes=nbytes,
                        src_elem_in_raw=0,
                        dest_ptr=ptr,
                        chunk_base=base,
                        chunk_nbytes=nbytes,
                        crc0=crc0,
                        dest_nbytes=dest_nbytes,
                        lazy=lazy,
                    )
                )
                continue
            parts = [obox] if rec.codec else _split(obox, strides, size, window)
            for o_off, o_shape in parts:
                rel = tuple(a - b for a, b in zip(o_off, c_off, strict=True))
                first = sum(r * s for r, s in zip(rel, strides, strict=True))
                dest = t.dest[_slices((o_off, o_shape), t.box[0])] if t.box[1] else t.dest
                if rec.codec:
                    blo, bhi, lo, hi = 0, max(1, math.ceil(nbytes / block)), 0, nbytes
                else:
                    last = first + sum((n - 1) * s for n, s in zip(o_shape, strides, strict=True))
                    span_lo, span_hi = first * size, (last + 1) * size
                    blo, bhi = span_lo // block, math.ceil(span_hi / block)
                    lo, hi = blo * block, min(bhi * block, nbytes)
                spans.append(
                    ReadSpan(
                        name=t.name,
                        chunk=chunk,
                        file=file,
                        start=base + lo,
                        end=base + hi,
                        block_lo=blo,
                        block_hi=bhi,
                        src_byte=base + first * size,
                        src_shape=o_shape,
                        src_strides=strides,
                        dest=dest,
                        dtype=dtype,
                        codec=rec.codec,
                        raw_nbytes=math.prod(c_shape) * size,
                        src_elem_in_raw=first,
                        dest_ptr=0,
                        chunk_base=base,
                        chunk_nbytes=nbytes,
                        crc0=crc0,
                        lazy=lazy,
                    )
                )
    return spans
