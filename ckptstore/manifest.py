"""The manifest: the one file that makes a checkpoint exist. JSON, versioned, never pickle.

The serialized form documented in ``docs/format.md`` is the compatibility contract; the
dataclasses here are only its in-memory types. Per-chunk columns (file, offset, crc32c)
are packed little-endian arrays in base64, so that a 16,384-rank checkpoint with millions
of chunks stays a compact file that parses in well under a second.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
from dataclasses import dataclass, field
from functools import cached_property, partial
from itertools import chain, repeat
from operator import is_, itemgetter, mul
from typing import Any, NamedTuple

import numpy as np

from ckptstore.dtypes import NAME_TO_DTYPE, itemsize
from ckptstore.errors import ManifestError
from ckptstore.gcpause import gc_paused
from ckptstore.plan import BoxLayout, GridLayout, Layout, whole_layout

FORMAT_NAME = "ckptstore"
FORMAT_VERSION = 1
MANIFEST_KEY = "manifest.json"
DATA_PREFIX = "data/"


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

    @cached_property
    def columns(self) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
        """(file, offset, nbytes, crc_first, crc32c) as Python lists, for per-chunk loops."""
        return (
            self.file.tolist(), self.offset.tolist(), self.nbytes.tolist(),
            self.crc_first.tolist(), self.crc32c.tolist(),
        )  # fmt: skip

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
    format_version: int = FORMAT_VERSION

    def total_tensor_bytes(self) -> int:
        records = self.tensors.values()
        numels = map(math.prod, map(_SHAPE_OF, records))
        return sum(map(mul, numels, map(_ITEMSIZE.__getitem__, map(_DTYPE_OF, records))))

    def stored_bytes(self) -> int:
        return int(self.chunks.nbytes.sum())

    def blobs(self) -> list[tuple[str, BlobRef]]:
        """Every pickled object's bytes, named ``name`` or ``name[rank r]`` (per-rank)."""
        out = [(n, o.blob) for n, o in self.objects.items() if o.blob is not None]
        for name, entries in self.per_rank.items():
            for r, e in enumerate(entries):
                if isinstance(e, ObjectRecord) and e.blob is not None:
                    out.append((f"{name}[rank {r}]", e.blob))
        return out

    # -- serialization ------------------------------------------------------------------
    def to_json(self) -> bytes:
        with gc_paused():
            return self._to_json()

    def _to_json(self) -> bytes:
        has_codec = any(t.codec for t in self.tensors.values()) or any(
            isinstance(e, TensorRecord) and e.codec for es in self.per_rank.values() for e in es
        )
        chunks: dict[str, Any] = {
            "count": len(self.chunks),
            "block_bytes": self.chunks.block_bytes,
            "file": _pack(self.chunks.file, "<u4"),
            "offset": _pack(self.chunks.offset, "<u8"),
            "crc32c": _pack(self.chunks.crc32c, "<u4"),
        }
        if has_codec:
            chunks["nbytes"] = _pack(self.chunks.nbytes, "<u8")
        doc = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "created_unix": self.created_unix,
            "world_size": self.world_size,
            "byte_order": "little",
            "files": self.files,
            "chunks": chunks,
            "tensors": _tensor_table_to_json(self.tensors),
            "objects": {name: _object_to_json(o) for name, o in self.objects.items()},
            "per_rank": {
                name: [_entry_to_json(e) for e in entries]
                for name, entries in self.per_rank.items()
            },
            "metadata": self.metadata,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str = "manifest") -> Manifest:
        """Parse and validate a manifest; any defect raises :class:`ManifestError`."""
        with gc_paused():
            return cls._from_json(data, where)

    @classmethod
    def _from_json(cls, data: bytes, where: str) -> Manifest:
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ManifestError(
                f"{where}: not valid JSON ({exc}); truncated or corrupted?"
            ) from exc
        try:
            return _manifest_from_doc(doc, where)
        except ManifestError:
            raise
        except (
            KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError,
            binascii.Error,
        ) as exc:  # fmt: skip
            raise ManifestError(
                f"{where}: malformed manifest: {type(exc).__name__}: {exc}"
            ) from exc


def _manifest_from_doc(doc: Any, where: str) -> Manifest:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise ManifestError(f"{where}: not a {FORMAT_NAME} manifest")
    version = doc["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise ManifestError(
            f"{where}: format_version {version!r} is not supported (this ckptstore reads "
            f"1..{FORMAT_VERSION}); upgrade ckptstore to read it"
        )
    if doc.get("byte_order", "little") != "little":
        raise ManifestError(f"{where}: byte_order {doc.get('byte_order')!r} is not supported")
    files = [str(f) for f in doc["files"]]
    c = doc["chunks"]
    count = int(c["count"])
    block = int(c["block_bytes"])
    if block <= 0:
        raise ManifestError(f"{where}: chunks.block_bytes must be positive")
    file_col = _unpack(c["file"], "<u4").astype(np.int64)
    offset_col = _unpack(c["offset"], "<u8").astype(np.int64)
    crcs = _unpack(c["crc32c"], "<u4")
    table_cols = _tensor_table_from_json(doc["tensors"])
    tensors = table_cols.records
    per_rank = {str(k): [_entry_from_json(e) for e in v] for k, v in doc["per_rank"].items()}
    others = list(table_cols.special)  # records whose chunks are not one whole chunk each
    others += [e for es in per_rank.values() for e in es if isinstance(e, TensorRecord)]
    if "nbytes" in c:
        nbytes = _unpack(c["nbytes"], "<u8").astype(np.int64)
    else:
        nbytes = _raw_nbytes(table_cols, others, count)
    for name, col in (("file", file_col), ("offset", offset_col), ("nbytes", nbytes)):
        if len(col) != count:
            raise ManifestError(f"{where}: chunks.{name} has {len(col)} entries, expected {count}")
    if count and (file_col.max() >= len(files) or file_col.min() < 0):
        raise ManifestError(f"{where}: a chunk refers to a file index outside files[]")
    table = ChunkTable(file_col, offset_col, nbytes, crcs, block)
    if len(crcs) != int(table.crc_first[-1]):
        raise ManifestError(
            f"{where}: chunks.crc32c has {len(crcs)} checksums, expected {int(table.crc_first[-1])}"
        )
    _check_chunk_ranges(tensors, per_rank, table_cols, others, count, where)
    return Manifest(
        world_size=int(doc["world_size"]),
        files=files,
        chunks=table,
        tensors=tensors,
        objects={str(k): _object_from_json(v) for k, v in doc["objects"].items()},
        per_rank=per_rank,
        created_unix=float(doc.get("created_unix", 0.0)),
        metadata=dict(doc.get("metadata") or {}),
        format_version=version,
    )


def _check_chunk_ranges(
    tensors: dict[str, TensorRecord],
    per_rank: dict[str, list[Entry]],
    cols: _TensorColumns,
    others: list[TensorRecord],
    count: int,
    where: str,
) -> None:
    """Every tensor's chunks lie inside the chunk table: one vectorized check for whole-chunk
    rows, a loop over ``others`` (the rest); by name only on the error path."""

    def outside(t: TensorRecord) -> bool:
        return t.chunk_start < 0 or t.chunk_start + t.chunk_count > count

    whole_count = (cols.whole_nbytes > 0).astype(np.int64)  # a tensor without elements has none
    bad = (cols.whole_start < 0) | (cols.whole_start + whole_count > count)
    if bad.any() or any(map(outside, others)):
        named = [*tensors.items()]
        named += [(n, e) for n, es in per_rank.items() for e in es if isinstance(e, TensorRecord)]
        for name, t in named:
            if outside(t):
                raise ManifestError(f"{where}: tensor {name!r} refers to chunks outside the table")


def _raw_nbytes(cols: _TensorColumns, others: list[TensorRecord], count: int) -> np.ndarray:
    """Stored bytes per chunk of an uncompressed checkpoint (derived, not stored).

    Tensors stored whole (most of a model's) are done in one vectorized assignment.
    """
    nbytes = np.zeros(count, dtype=np.int64)
    index, values = cols.whole_start, cols.whole_nbytes
    keep = (values > 0) & (index >= 0) & (index < count)  # the others fail the range check
    nbytes[index[keep]] = values[keep]
    for t in others:
        if t.chunk_start >= 0 and t.chunk_start + t.chunk_count <= count:
            _fill_raw_nbytes(t, nbytes)
    return nbytes


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
    else:
        per_dim = [
            np.diff(np.append(np.asarray(s, dtype=np.int64), dim))
            for s, dim in zip(t.layout.starts, t.shape, strict=True)
        ]
        vols = np.ones(1, dtype=np.int64)
        for sizes in per_dim:
            vols = np.outer(vols, sizes).ravel()
    nbytes[t.chunk_start : t.chunk_start + n] = vols * size


def _tensor_table_to_json(tensors: dict[str, TensorRecord]) -> dict[str, Any]:
    """The tensor table as parallel columns (a manifest may hold tens of thousands of tensors:
    columns are several times faster to write and parse than one object per tensor)."""
    records = list(tensors.values())
    dtypes, shapes, starts, layouts, codecs = zip(*records, strict=True) if records else ((),) * 5
    whole_of = [whole_layout(d) for d in range(max(map(len, shapes), default=0) + 1)]
    special: dict[str, dict[str, Any]] = {}
    plain = map(is_, layouts, map(whole_of.__getitem__, map(len, shapes)))
    for i, is_plain in enumerate(plain):
        if not is_plain or codecs[i] is not None:
            extra = _tensor_to_json(records[i])
            for key in ("dtype", "shape", "chunk_start"):
                del extra[key]
            if extra:
                special[str(i)] = extra
    return {
        "names": list(tensors),
        "dtypes": list(dtypes),
        "shapes": list(shapes),
        "chunk_starts": list(starts),
        "layouts": special,
    }


class _TensorColumns(NamedTuple):
    """The parsed tensor table: records by name, plus per-row columns of the rows stored as
    one whole chunk (most of a model's tensors), for vectorized checks and chunk sizes."""

    records: dict[str, TensorRecord]
    whole_start: np.ndarray  # chunk index of each whole-chunk row
    whole_nbytes: np.ndarray  # its raw byte size (0 for a tensor without elements)
    special: list[TensorRecord]  # the other rows (grids, boxes, codecs)


def _tensor_table_from_json(doc: dict[str, Any]) -> _TensorColumns:
    """Parse the column form of the tensor table with C-level passes over the columns, not a
    Python loop per tensor: a manifest may hold tens of thousands of tensors."""
    names, dtypes, shapes, starts = doc["names"], doc["dtypes"], doc["shapes"], doc["chunk_starts"]
    special_doc = doc["layouts"]
    n = len(names)
    if not len(dtypes) == len(shapes) == len(starts) == n:
        raise ManifestError("tensor table columns have different lengths")
    if not set(map(type, names)) <= {str}:
        raise ManifestError("tensor names must be strings")
    unknown = set(dtypes) - NAME_TO_DTYPE.keys()
    if unknown:
        raise ManifestError(f"unknown dtype(s) {sorted(map(str, unknown))}")
    if not all(map(list.__instancecheck__, shapes)):
        _raise_bad_row(names, shapes, starts)
    dims = list(chain.from_iterable(shapes))
    if not set(map(type, dims)) <= {int} or not set(map(type, starts)) <= {int}:
        _raise_bad_row(names, shapes, starts)
    if dims and min(dims) < 0:
        _raise_bad_row(names, shapes, starts)
    shape_tuples = list(map(tuple, shapes))
    ndims = np.fromiter(map(len, shape_tuples), np.int64, n)
    whole_of = [whole_layout(d) for d in range(int(ndims.max(initial=0)) + 1)]
    records = list(
        map(
            new_record,
            zip(dtypes, shape_tuples, starts, map(whole_of.__getitem__, ndims.tolist()),
                repeat(None)),
        )
    )  # fmt: skip
    is_whole = np.ones(n, dtype=bool)
    special: list[TensorRecord] = []
    for key, extra in (special_doc or {}).items():
        i = int(key)
        if not 0 <= i < n:
            raise ManifestError(f"tensor table: layouts refers to row {key!r} of {n}")
        records[i] = _tensor_from_json(
            {"dtype": dtypes[i], "shape": shapes[i], "chunk_start": starts[i], **extra}
        )
        if records[i].layout is not whole_of[len(shapes[i])] or records[i].codec:
            is_whole[i] = False
            special.append(records[i])
    out = dict(zip(names, records, strict=True))
    if len(out) != n:
        raise ManifestError("duplicate tensor names")
    numel = _row_numel(np.array(dims, dtype=np.int64), ndims)
    sizes = np.fromiter(map(_ITEMSIZE.__getitem__, dtypes), np.int64, n)
    start_col = np.array(starts, dtype=np.int64).reshape(n)
    return _TensorColumns(out, start_col[is_whole], (numel * sizes)[is_whole], special)


_SHAPE_OF, _DTYPE_OF = itemgetter(1), itemgetter(0)
new_record = partial(tuple.__new__, TensorRecord)
"""TensorRecord from one (dtype, shape, chunk_start, layout, codec) tuple, at C speed."""
_ITEMSIZE = {name: dtype.itemsize for name, dtype in NAME_TO_DTYPE.items()}


def _row_numel(dims: np.ndarray, ndims: np.ndarray) -> np.ndarray:
    """Elements per row from the rows' dimensions laid end to end (``ndims[i]`` each)."""
    numel = np.ones(len(ndims), dtype=np.int64)
    has_dims = ndims > 0
    if len(dims):
        first = np.cumsum(ndims) - ndims
        numel[has_dims] = np.multiply.reduceat(dims, first[has_dims])
    return numel


def _raise_bad_row(names: list[Any], shapes: list[Any], starts: list[Any]) -> None:
    """Name the first row whose shape or chunk_start is malformed (the error path only)."""
    for name, shape, start in zip(names, shapes, starts, strict=True):
        ok = isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
        if not ok or type(start) is not int:
            raise ManifestError(
                f"tensor {name!r}: malformed shape {shape!r} or chunk_start {start!r}"
            )
    raise ManifestError("tensor table: malformed shapes or chunk_starts")


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


def _tensor_from_json(v: dict[str, Any]) -> TensorRecord:
    dtype = v["dtype"]
    if dtype not in NAME_TO_DTYPE:
        raise ManifestError(f"unknown dtype {dtype!r}")
    shape = tuple(v["shape"])
    # sum() is a cheap check that every dimension is an int (a float or str would show)
    if type(sum(shape, 0)) is not int or (shape and min(shape) < 0):
        raise ManifestError(f"shape {list(shape)} is not a list of non-negative ints")
    start = v["chunk_start"]
    if type(start) is not int:
        raise ManifestError(f"chunk_start {start!r} is not an int")
    if "grid" not in v and "boxes" not in v:  # one whole chunk: by far the most common record
        codec = v.get("codec")
        return TensorRecord(
            dtype, shape, start, whole_layout(len(shape)), str(codec) if codec else None
        )
    layout: Layout
    if "grid" in v:
        starts = tuple(tuple(int(x) for x in s) for s in v["grid"])
        if len(starts) != len(shape):
            raise ManifestError(
                f"grid has {len(starts)} dims, shape {list(shape)} has {len(shape)}"
            )
        empty = 0 in shape  # no elements: no chunks, whatever the other dims
        for s, dim in zip(starts, shape, strict=True):
            if empty and not s:
                continue
            if dim and (not s or s[0] != 0 or list(s) != sorted(set(s)) or s[-1] >= dim):
                raise ManifestError(f"grid starts {list(s)} do not partition a dimension of {dim}")
        layout = GridLayout(starts)
    else:
        b = v["boxes"]
        n, nd = int(b["count"]), len(shape)
        layout = BoxLayout(
            _unpack(b["offsets"], "<i8").reshape(n, nd).astype(np.int64),
            _unpack(b["shapes"], "<i8").reshape(n, nd).astype(np.int64),
        )
    codec = v.get("codec")
    return TensorRecord(dtype, shape, start, layout, str(codec) if codec else None)


def encode_value(value: Any) -> Any:
    """A plain value as JSON; tuples are tagged so that they come back as tuples."""
    if isinstance(value, tuple):
        return {"tuple": [encode_value(v) for v in value]}
    return value


def decode_value(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(decode_value(v) for v in value["tuple"])
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


def _object_from_json(v: dict[str, Any]) -> ObjectRecord:
    if "pickle" in v:
        p = v["pickle"]
        blob = BlobRef(
            int(p["file"]), int(p["offset"]), int(p["nbytes"]), tuple(int(c) for c in p["crc32c"])
        )
        return ObjectRecord(blob=blob)
    return ObjectRecord(value=decode_value(v["value"]))


def _entry_to_json(e: Entry) -> dict[str, Any]:
    if isinstance(e, TensorRecord):
        return {"tensor": _tensor_to_json(e)}
    return _object_to_json(e)


def _entry_from_json(v: dict[str, Any]) -> Entry:
    if "tensor" in v:
        return _tensor_from_json(v["tensor"])
    return _object_from_json(v)
