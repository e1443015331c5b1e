"""The manifest: the one file that makes a checkpoint exist. JSON, versioned, never pickle.

The serialized form documented in ``docs/format.md`` is the compatibility contract; the
dataclasses here are only its in-memory types. Per-chunk columns (file, offset, crc32c)
are packed little-endian arrays in base64, so that a 16,384-rank checkpoint with millions
of chunks stays a compact file that parses in well under a second.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import math
import re
import time
from dataclasses import dataclass, field, replace
from functools import cached_property, partial
from itertools import chain, repeat
from operator import is_, itemgetter, mul
from typing import Any, NamedTuple

import numpy as np

from ckptstore.backends.base import Store
from ckptstore.errors import ManifestError
from ckptstore.format import rules
from ckptstore.format.checksum import crc32c
from ckptstore.format.chunk_index import (
    FileNames,
    IndexDirectory,
    IndexedChunks,
    NameDirectory,
    PartColumns,
    decode_part,
    joined,
    parts_of_chunks,
    read_parts,
)
from ckptstore.format.codecs import CODEC_SPEC
from ckptstore.format.dtypes import NAME_TO_DTYPE, itemsize
from ckptstore.format.frozen_table import derived
from ckptstore.format.grids import (
    GridRows,
    column_grid_rows,
    fill_raw_nbytes,
    split_grid_rows,
)
from ckptstore.format.layouts import (
    BoxLayout,
    GridLayout,
    Layout,
    grid_cell_elements,
    whole_layout,
)
from ckptstore.gcpause import gc_paused

FORMAT_NAME = "ckptstore"
FORMAT_VERSION = 4
"""The newest format this code reads (``docs/format.md``): 1, the first; 2, the manifest
carries its own checksum; 3, the tensor table's grid column; 4, the chunk table may live in
a chunk index file (``format/chunk_index.py``)."""
INLINE_FORMAT_VERSION = 3
"""What a manifest with its chunk table inline is written as (readable by readers of 3)."""
MANIFEST_KEY = "manifest.json"
DATA_PREFIX = "data/"
SAVING_KEY = ".ckptstore-saving"
"""Present while a save of the checkpoint is in flight (written before any data, deleted
after the commit): ``ckpt gc`` leaves such a checkpoint alone for ``knobs.save_lease_s()``."""

_CHECKSUM_SUFFIX = re.compile(rb',"checksum":"crc32c:([0-9a-f]{8})"\}')
_SUFFIX_LEN = 30  # len(',"checksum":"crc32c:01234567"}')


def encode_manifest(doc: dict[str, Any], encoded: dict[str, str] | None = None) -> bytes:
    """The manifest file for ``doc``: its compact JSON with a last member ``checksum``, the
    crc32c of every byte before that member. Readers check it before parsing anything.
    ``encoded``: members already in compact JSON (appended after ``doc``'s own)."""
    body = json.dumps(doc, separators=(",", ":")).encode()
    if not body.endswith(b"}") or len(body) < 3:
        raise ValueError("a manifest is a non-empty JSON object")
    signed = body[:-1]
    for name, text in (encoded or {}).items():
        signed += b",%s:%s" % (json.dumps(name).encode(), text.encode())
    return signed + b',"checksum":"crc32c:%08x"}' % crc32c(signed)


def prepare_tensor_table(tensors: dict[str, TensorRecord]) -> None:
    """Encode a frozen tensor table's JSON now, as a save's manifest writes it: it is kept
    with the table, so a later manifest of it encodes only the rest."""
    _tensor_table_text(tensors, grid_column=_has_grid_column(INLINE_FORMAT_VERSION))


def _has_grid_column(version: int) -> bool:
    """Whether a manifest of ``version`` stores grid rows as a column (format 3 and later)."""
    return version >= 3


def _tensor_table_text(tensors: dict[str, TensorRecord], grid_column: bool) -> str:
    """The tensor table's compact JSON; a frozen table (a cached save plan's) keeps it."""
    return derived(
        tensors,
        ("json", grid_column),
        lambda: json.dumps(_tensor_table_to_json(tensors, grid_column), separators=(",", ":")),
    )


def _table_bytes(tensors: dict[str, TensorRecord]) -> int:
    records = tensors.values()
    numels = map(math.prod, map(_SHAPE_OF, records))
    return sum(map(mul, numels, map(_ITEMSIZE.__getitem__, map(_DTYPE_OF, records))))


def check_manifest_checksum(data: bytes, where: str) -> bool:
    """Verify the checksum member of a manifest file; False when it has none (format 1).

    Raises:
        ManifestError: the checksum does not match (the manifest was damaged).
    """
    m = _CHECKSUM_SUFFIX.fullmatch(data, len(data) - _SUFFIX_LEN)
    if m is None:
        return False
    found = crc32c(memoryview(data)[: len(data) - _SUFFIX_LEN])
    if found != int(m.group(1), 16):
        raise ManifestError(
            f"{where}: the manifest's checksum does not match its content (stored "
            f"crc32c {m.group(1).decode()}, computed {found:08x}): it was damaged after commit"
        )
    return True


def _pack(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def _unpack(text: str, dtype: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text.encode("ascii"), validate=True), dtype=dtype)


@dataclass(frozen=True)
class ChunkTable:
    """Where every chunk's bytes are: column ``i`` describes chunk ``i``.

    ``crc32c`` holds one checksum per ``block_bytes`` of each chunk's stored bytes (at least
    one per chunk), chunk after chunk; :meth:`crc_range` finds a chunk's run.
    """

    file: np.ndarray
    offset: np.ndarray
    nbytes: np.ndarray
    crc32c: np.ndarray
    block_bytes: int
    crc_first: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        blocks = np.maximum(1, -(-self.nbytes.astype(np.int64) // self.block_bytes))
        first = np.zeros(len(blocks) + 1, dtype=np.int64)
        np.cumsum(blocks, out=first[1:])
        object.__setattr__(self, "crc_first", first)

    def __len__(self) -> int:
        return len(self.file)

    @classmethod
    def from_lists(
        cls,
        file: list[int],
        offset: list[int],
        nbytes: list[int],
        crc32c: list[int],
        block_bytes: int,
    ) -> ChunkTable:
        """A table from Python lists (a manifest built chunk by chunk)."""
        return cls(
            np.array(file, dtype=np.int64),
            np.array(offset, dtype=np.int64),
            np.array(nbytes, dtype=np.int64),
            np.array(crc32c, dtype=np.uint32),
            block_bytes,
        )

    @cached_property
    def columns(self) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
        """(file, offset, nbytes, crc_first, crc32c) as Python lists, for per-chunk loops."""
        return (
            self.file.tolist(),
            self.offset.tolist(),
            self.nbytes.tolist(),
            self.crc_first.tolist(),
            self.crc32c.tolist(),
        )

    def crc_range(self, chunk: int) -> tuple[int, int]:
        return int(self.crc_first[chunk]), int(self.crc_first[chunk + 1])


class TensorRecord(NamedTuple):
    """One tensor of the manifest (a tuple: manifests hold tens of thousands of these)."""

    dtype: str
    shape: tuple[int, ...]
    chunk_start: int
    layout: Layout
    codec: str | None = None

    @property
    def chunk_count(self) -> int:
        if 0 in self.shape:
            return 0
        return self.layout.chunk_count()

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)


@dataclass(frozen=True)
class BlobRef:
    """Bytes of one pickled object inside a data file."""

    file: int
    offset: int
    nbytes: int
    crc32c: tuple[int, ...]


@dataclass(frozen=True)
class ObjectRecord:
    """A non-tensor leaf: a plain JSON value, or a pickled blob (opt-in only)."""

    value: Any = None
    blob: BlobRef | None = None


Entry = TensorRecord | ObjectRecord


@dataclass(frozen=True)
class Manifest:
    world_size: int
    files: list[str]
    chunks: ChunkTable
    tensors: dict[str, TensorRecord]
    objects: dict[str, ObjectRecord]
    per_rank: dict[str, list[Entry]]
    created_unix: float = field(default_factory=time.time)
    metadata: dict[str, Any] = field(default_factory=dict)
    format_version: int = INLINE_FORMAT_VERSION
    index: IndexDirectory | None = None
    """Where the chunk table is when it is not inline (format 4): ``chunks`` then holds
    the parts read so far (see :meth:`with_index`)."""

    def total_tensor_bytes(self) -> int:
        return derived(self.tensors, "bytes", partial(_table_bytes, self.tensors))

    def stored_bytes(self) -> int:
        if self.index is not None and isinstance(self.chunks, IndexedChunks):
            return self.index.stored_bytes  # the table is not read whole
        return int(self.chunks.nbytes.sum())

    def blobs(self) -> list[tuple[str, BlobRef]]:
        """Every pickled object's bytes, named ``name`` or ``name[rank r]`` (per-rank)."""
        out = [(n, o.blob) for n, o in self.objects.items() if o.blob is not None]
        for name, entries in self.per_rank.items():
            for r, e in enumerate(entries):
                if isinstance(e, ObjectRecord) and e.blob is not None:
                    out.append((f"{name}[rank {r}]", e.blob))
        return out

    def codec_chunks(self) -> dict[int, tuple[str, int]]:
        """Every compressed chunk: index -> (codec, the raw bytes it decodes to)."""
        out: dict[int, tuple[str, int]] = {}
        records = [*self.tensors.values()]
        records += [e for es in self.per_rank.values() for e in es if isinstance(e, TensorRecord)]
        records = [t for t in records if t.codec and t.chunk_count]
        raw = np.zeros(len(self.chunks) if records else 0, dtype=np.int64)
        for t in records:
            _fill_raw_nbytes(t, raw)
            for i in range(t.chunk_start, t.chunk_start + t.chunk_count):
                out[i] = (t.codec, int(raw[i]))  # type: ignore[assignment]
        return out

    def file_extents(self) -> list[int]:
        """For each data file, the end of the last byte any chunk or pickled object uses
        (0 for a file nothing uses): what a copy of the checkpoint needs of it."""
        ends = np.zeros(len(self.files), dtype=np.int64)
        t = self.chunks
        if len(t):
            np.maximum.at(ends, t.file, t.offset + t.nbytes)
        for _, b in self.blobs():
            ends[b.file] = max(int(ends[b.file]), b.offset + b.nbytes)
        if self.index is not None:
            ends[self.index.file] = self.index.file_bytes()
        return ends.tolist()

    # -- the chunk index (format 4) ------------------------------------------------------
    def with_index(
        self, store: Store, chunks: np.ndarray | None = None, where: str | None = None
    ) -> Manifest:
        """This manifest with its chunk table read from its chunk index on ``store``: the
        parts that hold ``chunks`` (global chunk numbers), or all of it -- then checked as
        an inline table is (stored sizes against the tensors' boxes). An inline table is
        returned as it is.

        Raises:
            ManifestError: the index is missing, short, damaged, or inconsistent.
        """
        d = self.index
        if d is None:
            return self
        where = where or store.url
        parts = range(d.parts) if chunks is None else parts_of_chunks(chunks, d)
        block = self.chunks.block_bytes
        raw = read_parts(store, d.key, d.at, parts, where)
        decoded = {p: decode_part(raw[p], p, d, block, len(self.files), where) for p in raw}
        if chunks is not None:
            return replace(self, chunks=IndexedChunks(d, block, decoded, where))
        if isinstance(self.files, FileNames):
            self.files.whole()  # every key read and checked, as an inline list is
        return replace(self, chunks=self._full_table(d, block, decoded, where))

    def _full_table(
        self, d: IndexDirectory, block: int, parts: dict[int, PartColumns], where: str
    ) -> ChunkTable:
        cols = [parts[p] for p in range(d.parts)]
        nbytes = joined(cols, "nbytes", np.int64)
        records = [*self.tensors.values()]
        records += [e for es in self.per_rank.values() for e in es if isinstance(e, TensorRecord)]
        raw = np.zeros(d.count, dtype=np.int64)
        for t in records:
            _fill_raw_nbytes(t, raw)
        rules.check_total(where, "stored chunks", int(nbytes.sum(dtype=np.float64)))
        if int(nbytes.sum()) != d.stored_bytes:
            raise ManifestError(f"{where}: chunks.index.stored_bytes does not add up")
        _check_chunk_sizes(nbytes, raw, [t for t in records if t.codec], where)
        file, offset = joined(cols, "file", np.int64), joined(cols, "offset", np.int64)
        return ChunkTable(file, offset, nbytes, joined(cols, "crc32c", np.uint32), block)

    # -- serialization ------------------------------------------------------------------
    def to_json(self) -> bytes:
        with gc_paused():
            return self._to_json()

    def _to_json(self) -> bytes:
        has_codec = any(map(_CODEC_OF, self.tensors.values())) or any(
            isinstance(e, TensorRecord) and e.codec for es in self.per_rank.values() for e in es
        )
        chunks: dict[str, Any] = {"count": len(self.chunks), "block_bytes": self.chunks.block_bytes}
        version = self.format_version
        files: Any = self.files
        if self.index is not None:
            chunks["index"] = self.index.to_json(_pack)
            version = max(version, 4)
            if self.index.names is not None:  # the keys stay in the index file
                files = self.index.names.to_json(_pack)
        else:
            chunks["file"] = _pack(self.chunks.file, "<u4")
            chunks["offset"] = _pack(self.chunks.offset, "<u8")
            chunks["crc32c"] = _pack(self.chunks.crc32c, "<u4")
            if has_codec:
                chunks["nbytes"] = _pack(self.chunks.nbytes, "<u8")
        if isinstance(files, FileNames):
            files = list(files)
        doc = {
            "format": FORMAT_NAME,
            "format_version": version,
            "created_unix": self.created_unix,
            "world_size": self.world_size,
            "byte_order": "little",
            "files": files,
            "chunks": chunks,
            "objects": {name: _object_to_json(o) for name, o in self.objects.items()},
            "per_rank": {
                name: [_entry_to_json(e) for e in entries]
                for name, entries in self.per_rank.items()
            },
            "metadata": self.metadata,
        }
        table = _tensor_table_text(self.tensors, grid_column=_has_grid_column(version))
        return encode_manifest(doc, {"tensors": table})

    @classmethod
    def from_json(
        cls, data: bytes, where: str = "manifest", store: Store | None = None
    ) -> Manifest:
        """Parse and validate a manifest; any defect raises :class:`ManifestError`.

        ``store`` is the checkpoint's: a format-4 manifest reads its data file keys from its
        chunk index there, as they are used (:class:`~ckptstore.format.chunk_index.FileNames`).
        """
        with gc_paused():
            return cls._from_json(data, where, store)

    @classmethod
    def _from_json(cls, data: bytes, where: str, store: Store | None = None) -> Manifest:
        signed = check_manifest_checksum(data, where)
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(
                f"{where}: not valid JSON ({exc}); truncated or corrupted?"
            ) from exc
        except RecursionError:
            raise ManifestError(f"{where}: JSON nested too deeply to be a manifest") from None
        try:
            return _manifest_from_doc(doc, where, signed, store)
        except ManifestError:
            raise
        except (
            KeyError,
            TypeError,
            ValueError,
            IndexError,
            AttributeError,
            OverflowError,
            binascii.Error,
            RecursionError,
            MemoryError,
        ) as exc:
            raise ManifestError(
                f"{where}: malformed manifest: {type(exc).__name__}: {str(exc)[:200]}"
            ) from exc


_TOP_KEYS = {
    "format",
    "format_version",
    "world_size",
    "files",
    "chunks",
    "tensors",
    "objects",
    "per_rank",
}
_CHUNK_KEYS = {"count", "block_bytes", "file", "offset", "crc32c"}


def _manifest_from_doc(doc: Any, where: str, signed: bool, store: Store | None = None) -> Manifest:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise ManifestError(f"{where}: not a {FORMAT_NAME} manifest")
    version = doc.get("format_version")
    if type(version) is not int or version > FORMAT_VERSION or version < 1:
        raise ManifestError(
            f"{where}: format_version {version!r} is not supported (this ckptstore reads "
            f"1..{FORMAT_VERSION}); upgrade ckptstore to read it"
        )
    if version >= 2 and not signed:
        raise ManifestError(
            f"{where}: a format {version} manifest must end with its checksum; it does not "
            "(damaged, or edited by hand)"
        )
    if _TOP_KEYS - doc.keys():  # unknown top-level keys are additions a reader may ignore
        raise ManifestError(f"{where}: the manifest lacks {sorted(_TOP_KEYS - doc.keys())}")
    if doc.get("byte_order", "little") != "little":
        raise ManifestError(f"{where}: byte_order {doc.get('byte_order')!r} is not supported")
    world_size = rules.check_int(where, "world_size", doc["world_size"], 1, rules.MAX_WORLD_SIZE)
    c = doc["chunks"]
    index: IndexDirectory | None = None
    files: list[str] | FileNames
    if version >= 4 and isinstance(c, dict) and "index" in c:
        rules.check_keys(where, "chunks", c, {"count", "block_bytes", "index"}, set())
        files, index = _indexed_files(doc["files"], c, store, where)
    else:
        files = rules.check_file_keys(where, doc["files"])
        rules.check_keys(where, "chunks", c, _CHUNK_KEYS, {"nbytes"})
    block = rules.check_int(where, "chunks.block_bytes", c["block_bytes"], 1, rules.MAX_BLOCK_BYTES)
    table_cols = _tensor_table_from_json(doc["tensors"], where)
    tensors = table_cols.records
    if not isinstance(doc["per_rank"], dict) or not isinstance(doc["objects"], dict):
        raise ManifestError(f"{where}: objects and per_rank must be objects")
    per_rank = {k: _per_rank_from_json(k, v, world_size, where) for k, v in doc["per_rank"].items()}
    objects = {k: _object_from_json(v, k, where) for k, v in doc["objects"].items()}
    rules.check_names(where, "object", objects)
    rules.check_names(where, "per-rank", per_rank)
    if len(tensors) + len(objects) + len(per_rank) != len({*tensors, *objects, *per_rank}):
        raise ManifestError(f"{where}: a name is used by more than one entry")
    others = list(table_cols.special)  # records whose chunks are not one whole chunk each
    others += [e for es in per_rank.values() for e in es if isinstance(e, TensorRecord)]
    rules.check_total(where, "tensors", int(table_cols.total_bytes))
    table: ChunkTable | IndexedChunks
    if index is not None:
        _check_chunk_ranges(tensors, per_rank, table_cols, others, index.count, where)
        table = IndexedChunks(index, block, {}, where)  # parts are read as needed
    else:
        table = _inline_table(c, block, table_cols, others, tensors, per_rank, len(files), where)
    for name, entry in [*objects.items(), *((n, e) for n, es in per_rank.items() for e in es)]:
        if isinstance(entry, ObjectRecord) and entry.blob is not None:
            _check_blob(name, entry.blob, len(files), block, where)
    metadata = doc.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ManifestError(f"{where}: metadata must be an object")
    rules.check_value_depth(where, "metadata", metadata)
    created = doc.get("created_unix", 0.0)
    if type(created) not in (int, float):
        raise ManifestError(f"{where}: created_unix must be a number")
    return Manifest(
        world_size=world_size,
        files=files,
        chunks=table,
        tensors=tensors,
        objects=objects,
        per_rank=per_rank,
        created_unix=float(created),
        metadata=metadata,
        format_version=version,
        index=index,
    )


def _indexed_files(
    files_doc: Any, c: dict[str, Any], store: Store | None, where: str
) -> tuple[list[str] | FileNames, IndexDirectory]:
    """The data file keys and the chunk index directory of a format-4 manifest. The keys
    are a list, or (as saves write them) name parts in the index file after the chunk
    parts, read from ``store`` as they are used."""
    count = rules.check_int(where, "chunks.count", c["count"], 0, rules.MAX_CHUNKS)
    if isinstance(files_doc, list):
        files = rules.check_file_keys(where, files_doc)
        index = IndexDirectory.from_json(c["index"], count, len(files), _unpack, where)
        if files[index.file] != index.key:
            raise ManifestError(f"{where}: the chunk index is not at files[{index.file}]")
        return files, index
    names = NameDirectory.from_json(files_doc, _unpack, where)
    index = IndexDirectory.from_json(c["index"], count, names.count, _unpack, where)
    if int(names.at[0]) != index.nbytes():
        raise ManifestError(f"{where}: the file name parts do not follow the chunk parts")
    keys = FileNames(store, index.key, index.file, names, where)
    return keys, replace(index, names=names)


def _inline_table(
    c: dict[str, Any],
    block: int,
    table_cols: _TensorColumns,
    others: list[TensorRecord],
    tensors: dict[str, TensorRecord],
    per_rank: dict[str, list[Entry]],
    n_files: int,
    where: str,
) -> ChunkTable:
    """The chunk table of formats 1-3, stored inline as packed columns, validated."""
    file_col = _unpack(c["file"], "<u4").astype(np.int64)
    count = rules.check_int(where, "chunks.count", c["count"], 0, len(file_col))
    offset_col = _unpack(c["offset"], "<u8").astype(np.int64)
    crcs = _unpack(c["crc32c"], "<u4")
    raw = _raw_nbytes(table_cols, others, count)
    codec_rows = [t for t in others if t.codec]
    if "nbytes" in c:
        nbytes = _unpack(c["nbytes"], "<u8").astype(np.int64)
    elif codec_rows:
        raise ManifestError(f"{where}: compressed chunks need a chunks.nbytes column")
    else:
        nbytes = raw
    for name, col in (("file", file_col), ("offset", offset_col), ("nbytes", nbytes)):
        if len(col) != count:
            raise ManifestError(f"{where}: chunks.{name} has {len(col)} entries, expected {count}")
    if count and (file_col.max() >= n_files or file_col.min() < 0):
        raise ManifestError(f"{where}: a chunk refers to a file index outside files[]")
    if count and (offset_col.min() < 0 or nbytes.min() < 0):
        raise ManifestError(f"{where}: a chunk offset or size is beyond 2^63")
    rules.check_total(where, "stored chunks", int(nbytes.sum(dtype=np.float64)))
    if count and int((offset_col + nbytes).max()) > 1 << 62:
        raise ManifestError(f"{where}: a chunk ends beyond 2^62 bytes")
    _check_chunk_ranges(tensors, per_rank, table_cols, others, count, where)
    _check_chunk_sizes(nbytes, raw, codec_rows, where)
    table = ChunkTable(file_col, offset_col, nbytes, crcs, block)
    if len(crcs) != int(table.crc_first[-1]):
        raise ManifestError(
            f"{where}: chunks.crc32c has {len(crcs)} checksums, expected {int(table.crc_first[-1])}"
        )
    return table


def _check_chunk_sizes(
    nbytes: np.ndarray, raw: np.ndarray, codec_rows: list[TensorRecord], where: str
) -> None:
    """An uncompressed chunk's stored size is exactly its box's bytes (a larger one would be
    copied past its destination, a smaller one would leave bytes unwritten); a compressed
    one is at most a codec's worst-case expansion of them."""
    compressed = np.zeros(len(nbytes), dtype=bool)
    for t in codec_rows:
        compressed[t.chunk_start : t.chunk_start + t.chunk_count] = True
    plain = ~compressed
    if not np.array_equal(nbytes[plain], raw[plain]):
        bad = int(np.flatnonzero(plain & (nbytes != raw))[0])
        raise ManifestError(
            f"{where}: chunk {bad} stores {int(nbytes[bad])} bytes, its tensor's box has "
            f"{int(raw[bad])}"
        )
    if (
        compressed.any()
        and (nbytes[compressed] > raw[compressed] + raw[compressed] // 8 + 4096).any()
    ):
        raise ManifestError(f"{where}: a compressed chunk is larger than any codec writes")


def _check_blob(name: str, b: BlobRef, n_files: int, block: int, where: str) -> None:
    if not 0 <= b.file < n_files or b.offset < 0 or b.nbytes < 0 or b.offset + b.nbytes > 1 << 62:
        raise ManifestError(f"{where}: pickled object {name!r} lies outside the data files")
    rules.check_total(where, f"pickled object {name!r}", b.nbytes)
    if len(b.crc32c) != max(1, -(-b.nbytes // block)):
        raise ManifestError(f"{where}: pickled object {name!r} has the wrong checksum count")


def _check_chunk_ranges(
    tensors: dict[str, TensorRecord],
    per_rank: dict[str, list[Entry]],
    cols: _TensorColumns,
    others: list[TensorRecord],
    count: int,
    where: str,
) -> None:
    """Every tensor's chunks lie inside the chunk table, and no chunk belongs to two
    tensors: vectorized for whole-chunk rows, a loop over ``others`` (the rest); by name
    only on the error path."""

    def outside(t: TensorRecord) -> bool:
        return t.chunk_start < 0 or t.chunk_start + t.chunk_count > count

    whole_count = (cols.whole_nbytes > 0).astype(np.int64)  # a tensor without elements has none
    bad = (cols.whole_start < 0) | (cols.whole_start + whole_count > count)
    bad_grid = cols.grid_start + cols.grids.count > count
    if bad.any() or bad_grid.any() or any(map(outside, others)):
        named = [*tensors.items()]
        named += [(n, e) for n, es in per_rank.items() for e in es if isinstance(e, TensorRecord)]
        for name, t in named:
            if outside(t):
                raise ManifestError(f"{where}: tensor {name!r} refers to chunks outside the table")
    starts = np.concatenate(
        [
            cols.whole_start[whole_count > 0],
            cols.grid_start,
            np.array([t.chunk_start for t in others], np.int64),
        ]
    )
    counts = np.concatenate(
        [
            whole_count[whole_count > 0],
            cols.grids.count,
            np.array([t.chunk_count for t in others], np.int64),
        ]
    )
    starts, counts = starts[counts > 0], counts[counts > 0]
    order = np.argsort(starts, kind="stable")
    ends = (starts + counts)[order]
    if len(order) > 1 and (starts[order][1:] < ends[:-1]).any():
        raise ManifestError(f"{where}: two tensors claim the same chunk")


def _raw_nbytes(cols: _TensorColumns, others: list[TensorRecord], count: int) -> np.ndarray:
    """Stored bytes per chunk of an uncompressed checkpoint (derived, not stored).

    Tensors stored whole (most of a model's) are done in one vectorized assignment.
    """
    nbytes = np.zeros(count, dtype=np.int64)
    index, values = cols.whole_start, cols.whole_nbytes
    keep = (values > 0) & (index >= 0) & (index < count)  # the others fail the range check
    nbytes[index[keep]] = values[keep]
    fill_raw_nbytes(cols.grids, cols.starts, cols.itemsizes, nbytes)
    for t in others:
        if t.chunk_start >= 0 and t.chunk_start + t.chunk_count <= count:
            _fill_raw_nbytes(t, nbytes)
    return nbytes


_SMALL_GRID = 64


def _fill_raw_nbytes(t: TensorRecord, nbytes: np.ndarray) -> None:
    size = itemsize(t.dtype)
    n = t.chunk_count
    if n == 0:
        return
    if n == 1:
        nbytes[t.chunk_start] = math.prod(t.shape) * size
        return
    if isinstance(t.layout, BoxLayout):
        vols = (
            np.prod(t.layout.shapes, axis=1) if t.layout.shapes.shape[1] else np.ones(n, np.int64)
        )
    elif n <= _SMALL_GRID:  # FSDP's few shards of a norm: plain integers beat numpy set-up
        sizes = [1]
        for s, dim in zip(t.layout.starts, t.shape, strict=True):
            cells = [b - a for a, b in itertools.pairwise((*s, dim))]
            sizes = [v * c for v in sizes for c in cells]
        nbytes[t.chunk_start : t.chunk_start + n] = [v * size for v in sizes]
        return
    else:
        vols = grid_cell_elements(t.layout.starts, t.shape)
    nbytes[t.chunk_start : t.chunk_start + n] = vols * size


def _tensor_table_to_json(
    tensors: dict[str, TensorRecord], grid_column: bool = True
) -> dict[str, Any]:
    """The tensor table as parallel columns (a manifest may hold tens of thousands of tensors:
    columns are several times faster to write and parse than one object per tensor).

    With ``grid_column`` (format 3), uncompressed tensors on a grid -- FSDP's and TP's shards
    -- name one of the table's distinct grids in ``grid_of`` instead of a layout row each."""
    records = list(tensors.values())
    dtypes, shapes, starts, layouts, codecs = zip(*records, strict=True) if records else ((),) * 5
    whole_of = [whole_layout(d) for d in range(max(map(len, shapes), default=0) + 1)]
    special: dict[str, dict[str, Any]] = {}
    grid_ids: dict[tuple[tuple[int, ...], ...], int] = {}
    grid_of = np.full(len(records), -1, dtype=np.int32) if grid_column else None
    plain = map(is_, layouts, map(whole_of.__getitem__, map(len, shapes)))
    for i, is_plain in enumerate(plain):
        if is_plain and codecs[i] is None:
            continue
        layout = layouts[i]
        if (
            grid_of is not None
            and codecs[i] is None
            and type(layout) is GridLayout
            and all(shapes[i])  # a tensor without elements keeps its row
        ):
            grid_of[i] = grid_ids.setdefault(layout.starts, len(grid_ids))
            continue
        extra = _tensor_to_json(records[i])
        for key in ("dtype", "shape", "chunk_start"):
            del extra[key]
        if extra:
            special[str(i)] = extra
    out: dict[str, Any] = {
        "names": list(tensors),
        "dtypes": list(dtypes),
        "shapes": list(shapes),
        "chunk_starts": list(starts),
        "layouts": special,
    }
    if grid_ids:
        out["grids"] = [[list(s) for s in g] for g in grid_ids]
        out["grid_of"] = _pack(grid_of, "<i4")
    return out


class _TensorColumns(NamedTuple):
    """The parsed tensor table: records by name, plus per-row columns of the rows stored as
    one whole chunk (most of a model's tensors), for vectorized checks and chunk sizes."""

    records: dict[str, TensorRecord]
    whole_start: np.ndarray  # chunk index of each whole-chunk row
    whole_nbytes: np.ndarray  # its raw byte size (0 for a tensor without elements)
    special: list[TensorRecord]  # the rows parsed one by one (boxes, codecs, ...)
    total_bytes: int  # raw bytes of all tensors
    grids: GridRows  # rows that are a bare grid, parsed in bulk
    grid_start: np.ndarray  # chunk index of each grid row's first chunk
    itemsizes: np.ndarray  # of every row
    starts: np.ndarray  # chunk_start of every row


def _tensor_table_from_json(doc: Any, where: str) -> _TensorColumns:
    """Parse and check the column form of the tensor table with C-level passes over the
    columns, not a Python loop per tensor: a manifest may hold tens of thousands of tensors."""
    rules.check_keys(
        where, "tensors", doc, {"names", "dtypes", "shapes", "chunk_starts"}, _TABLE_OPTIONAL
    )
    if ("grids" in doc) != ("grid_of" in doc):
        raise ManifestError(f"{where}: tensor table: grids and grid_of go together")
    names, dtypes, shapes, starts = doc["names"], doc["dtypes"], doc["shapes"], doc["chunk_starts"]
    special_doc = doc.get("layouts") or {}
    if not all(isinstance(c, list) for c in (names, dtypes, shapes, starts)) or not isinstance(
        special_doc, dict
    ):
        raise ManifestError(f"{where}: tensor table columns must be lists")
    n = len(names)
    if not len(dtypes) == len(shapes) == len(starts) == n:
        raise ManifestError(f"{where}: tensor table columns have different lengths")
    rules.check_names(where, "tensor", names)
    if not set(map(type, dtypes)) <= {str}:
        raise ManifestError(f"{where}: dtype names must be strings")
    unknown = set(dtypes) - NAME_TO_DTYPE.keys()
    if unknown:
        raise ManifestError(f"{where}: unknown dtype(s) {sorted(map(str, unknown))[:5]}")
    if not all(map(list.__instancecheck__, shapes)):
        _raise_bad_row(names, shapes, starts, where)
    dims = list(chain.from_iterable(shapes))
    if not set(map(type, dims)) <= {int} or not set(map(type, starts)) <= {int}:
        _raise_bad_row(names, shapes, starts, where)
    if dims and (min(dims) < 0 or max(dims) > rules.MAX_DIM):
        _raise_bad_row(names, shapes, starts, where)
    if starts and (min(starts) < 0 or max(starts) > 1 << 62):
        _raise_bad_row(names, shapes, starts, where)
    shape_tuples = list(map(tuple, shapes))
    ndims = np.fromiter(map(len, shape_tuples), np.int64, n)
    sizes = np.fromiter(map(_ITEMSIZE.__getitem__, dtypes), np.int64, n)
    row_bytes = rules.check_shape_sizes(where, np.array(dims, dtype=np.int64), ndims, sizes)
    whole_of = [whole_layout(d) for d in range(int(ndims.max(initial=0)) + 1)]
    layouts: list[Layout] = list(map(whole_of.__getitem__, ndims.tolist()))
    empty = row_bytes == 0
    grids, rest = split_grid_rows(special_doc, names, shape_tuples, empty, where)
    in_column = np.zeros(n, dtype=bool)
    if "grid_of" in doc:
        column = column_grid_rows(doc["grids"], doc["grid_of"], names, shape_tuples, empty, where)
        in_column[column.rows] = True
        if in_column[grids.rows].any():
            bad = int(grids.rows[in_column[grids.rows]][0])
            raise ManifestError(f"{where}: tensor {names[bad]!r} has a grid_of and a layout row")
        grids = grids.merged(column)
    for i, layout in zip(grids.rows.tolist(), grids.layouts, strict=True):
        layouts[i] = layout
    records = list(map(new_record, zip(dtypes, shape_tuples, starts, layouts, repeat(None))))
    is_whole = np.ones(n, dtype=bool)
    is_whole[grids.rows] = False
    special: list[TensorRecord] = []
    for key, extra in rest.items():
        i = int(key) if key.isdigit() and len(key) < 12 else -1
        if not 0 <= i < n or key != str(i):
            raise ManifestError(f"{where}: tensor table: layouts refers to row {key[:20]!r} of {n}")
        if in_column[i]:
            raise ManifestError(f"{where}: tensor {names[i]!r} has a grid_of and a layout row")
        rules.check_keys(where, f"layout of tensor {names[i]!r}", extra, set(), _LAYOUT_KEYS)
        records[i] = _tensor_from_json(
            {"dtype": dtypes[i], "shape": shapes[i], "chunk_start": starts[i], **extra},
            names[i],
            where,
        )
        if records[i].layout is not whole_of[len(shapes[i])] or records[i].codec:
            is_whole[i] = False
            special.append(records[i])
    out = dict(zip(names, records, strict=True))
    if len(out) != n:
        raise ManifestError(f"{where}: duplicate tensor names")
    start_col = np.array(starts, dtype=np.int64).reshape(n)
    return _TensorColumns(
        out,
        start_col[is_whole],
        row_bytes[is_whole],
        special,
        int(row_bytes.sum()),
        grids,
        start_col[grids.rows],
        sizes,
        start_col,
    )


_LAYOUT_KEYS = {"grid", "boxes", "codec"}
_TABLE_OPTIONAL = {"layouts", "grids", "grid_of"}
_SHAPE_OF, _DTYPE_OF, _CODEC_OF = itemgetter(1), itemgetter(0), itemgetter(4)
new_record = partial(tuple.__new__, TensorRecord)
"""TensorRecord from one (dtype, shape, chunk_start, layout, codec) tuple, at C speed."""
_ITEMSIZE = {name: dtype.itemsize for name, dtype in NAME_TO_DTYPE.items()}


def _raise_bad_row(names: list[Any], shapes: list[Any], starts: list[Any], where: str) -> None:
    """Name the first row whose shape or chunk_start is malformed (the error path only)."""
    for name, shape, start in zip(names, shapes, starts, strict=True):
        ok = isinstance(shape, list) and all(
            type(d) is int and 0 <= d <= rules.MAX_DIM for d in shape
        )
        if not ok or type(start) is not int or start < 0:
            raise ManifestError(
                f"{where}: tensor {name!r}: malformed shape {str(shape)[:80]} or chunk_start "
                f"{str(start)[:40]}"
            )
    raise ManifestError(f"{where}: tensor table: malformed shapes or chunk_starts")


def _tensor_to_json(t: TensorRecord) -> dict[str, Any]:
    out: dict[str, Any] = {"dtype": t.dtype, "shape": t.shape, "chunk_start": t.chunk_start}
    if isinstance(t.layout, GridLayout):
        if any(len(s) != 1 for s in t.layout.starts):  # one whole chunk: "grid" is implied
            out["grid"] = t.layout.starts
    else:
        out["boxes"] = {
            "count": len(t.layout.offsets),
            "offsets": _pack(t.layout.offsets, "<i8"),
            "shapes": _pack(t.layout.shapes, "<i8"),
        }
    if t.codec:
        out["codec"] = t.codec
    return out


def _tensor_from_json(v: Any, name: str, where: str) -> TensorRecord:
    """One tensor record (a layout row of the table, or a per-rank tensor), checked."""
    rules.check_keys(where, f"tensor {name!r}", v, {"dtype", "shape", "chunk_start"}, _LAYOUT_KEYS)
    dtype = v["dtype"]
    if dtype not in NAME_TO_DTYPE:
        raise ManifestError(f"{where}: tensor {name!r}: unknown dtype {str(dtype)[:40]!r}")
    shape = v["shape"]
    if not isinstance(shape, list) or not set(map(type, shape)) <= {int}:
        raise ManifestError(f"{where}: tensor {name!r}: shape is not a list of integers")
    shape = tuple(shape)
    rules.check_shape(where, name, shape, itemsize(dtype))
    start = rules.check_int(where, f"tensor {name!r}: chunk_start", v["chunk_start"], 0, 1 << 62)
    codec = v.get("codec")
    if codec is not None and (type(codec) is not str or not CODEC_SPEC.fullmatch(codec)):
        raise ManifestError(f"{where}: tensor {name!r}: unknown codec {str(codec)[:40]!r}")
    if "grid" in v and "boxes" in v:
        raise ManifestError(f"{where}: tensor {name!r}: both a grid and boxes")
    layout: Layout
    if "grid" in v:
        layout = GridLayout(rules.check_grid(where, name, v["grid"], shape))
    elif "boxes" in v:
        b = v["boxes"]
        rules.check_keys(
            where, f"boxes of tensor {name!r}", b, {"count", "offsets", "shapes"}, set()
        )
        nd = len(shape)
        offsets = _unpack(b["offsets"], "<i8").astype(np.int64)
        n = rules.check_int(
            where, f"tensor {name!r}: boxes.count", b["count"], 0, len(offsets) // max(nd, 1)
        )
        shapes = _unpack(b["shapes"], "<i8").astype(np.int64)
        if len(offsets) != n * nd or len(shapes) != n * nd or (nd == 0 and n != 1):
            raise ManifestError(f"{where}: tensor {name!r}: boxes hold the wrong number of values")
        offsets, shapes = offsets.reshape(n, nd), shapes.reshape(n, nd)
        rules.check_box_tiling(where, name, offsets, shapes, shape)
        layout = BoxLayout(offsets, shapes)
    else:
        layout = whole_layout(len(shape))
    return TensorRecord(dtype, shape, start, layout, codec or None)


def encode_value(value: Any) -> Any:
    """A plain value as JSON; tuples are tagged so that they come back as tuples."""
    if isinstance(value, tuple):
        return {"tuple": [encode_value(v) for v in value]}
    return value


def decode_value(value: Any, depth: int = 0) -> Any:
    if depth > rules.MAX_VALUE_DEPTH:
        raise ManifestError(f"a stored value nests deeper than {rules.MAX_VALUE_DEPTH} levels")
    if isinstance(value, dict):
        if value.keys() != {"tuple"} or not isinstance(value["tuple"], list):
            raise ManifestError("a stored value holds an object other than a tagged tuple")
        return tuple(decode_value(v, depth + 1) for v in value["tuple"])
    if isinstance(value, list):
        raise ManifestError("untagged list in a stored value")
    return value


def _object_to_json(o: ObjectRecord) -> dict[str, Any]:
    if o.blob is not None:
        b = o.blob
        return {
            "pickle": {
                "file": b.file,
                "offset": b.offset,
                "nbytes": b.nbytes,
                "crc32c": list(b.crc32c),
            }
        }
    return {"value": encode_value(o.value)}


def _object_from_json(v: Any, name: str, where: str) -> ObjectRecord:
    if isinstance(v, dict) and v.keys() == {"pickle"}:
        p = v["pickle"]
        rules.check_keys(
            where, f"pickled object {name!r}", p, {"file", "offset", "nbytes", "crc32c"}, set()
        )
        crcs = p["crc32c"]
        if not isinstance(crcs, list) or not all(type(c) is int and 0 <= c < 1 << 32 for c in crcs):
            raise ManifestError(f"{where}: pickled object {name!r}: malformed checksums")
        blob = BlobRef(
            rules.check_int(where, f"{name!r}: file", p["file"], 0, 1 << 32),
            rules.check_int(where, f"{name!r}: offset", p["offset"], 0, 1 << 62),
            rules.check_int(where, f"{name!r}: nbytes", p["nbytes"], 0, 1 << 62),
            tuple(crcs),
        )
        return ObjectRecord(blob=blob)
    if isinstance(v, dict) and v.keys() == {"value"}:
        try:
            return ObjectRecord(value=decode_value(v["value"]))
        except ManifestError as exc:
            raise ManifestError(f"{where}: object {name!r}: {exc}") from None
    raise ManifestError(f"{where}: object {name!r} is neither a value nor a pickle record")


def _entry_to_json(e: Entry) -> dict[str, Any]:
    if isinstance(e, TensorRecord):
        return {"tensor": _tensor_to_json(e)}
    return _object_to_json(e)


def _per_rank_from_json(name: str, entries: Any, world_size: int, where: str) -> list[Entry]:
    """One record per saving rank."""
    if not isinstance(entries, list) or len(entries) != world_size:
        raise ManifestError(f"{where}: per-rank entry {name!r} needs one record per rank")
    out: list[Entry] = []
    for r, v in enumerate(entries):
        label = f"{name}[rank {r}]"
        if isinstance(v, dict) and v.keys() == {"tensor"}:
            out.append(_tensor_from_json(v["tensor"], label, where))
        else:
            out.append(_object_from_json(v, label, where))
    return out
