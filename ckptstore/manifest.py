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
from functools import cached_property
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
        return math.prod(self.shape) * itemsize(self.dtype)


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
        return sum(t.nbytes for t in self.tensors.values())

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
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, binascii.Error) as exc:
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
    tensors = _tensor_table_from_json(doc["tensors"])
    per_rank = {str(k): [_entry_from_json(e) for e in v] for k, v in doc["per_rank"].items()}
    records = list(tensors.values())
    records += [e for es in per_rank.values() for e in es if isinstance(e, TensorRecord)]
    if "nbytes" in c:
        nbytes = _unpack(c["nbytes"], "<u8").astype(np.int64)
    else:
        nbytes = _raw_nbytes(records, count)
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
    _check_chunk_ranges(tensors, per_rank, count, where)
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
    tensors: dict[str, TensorRecord], per_rank: dict[str, list[Entry]], count: int, where: str
) -> None:
    """Every tensor's chunks lie inside the chunk table (vectorized: one check per manifest)."""
    all_records = list(tensors.items()) + [
        (n, e) for n, es in per_rank.items() for e in es if isinstance(e, TensorRecord)
    ]
    if not all_records:
        return
    whole_of = [whole_layout(n) for n in range(8)]
    starts = np.fromiter((t.chunk_start for _, t in all_records), np.int64, len(all_records))
    counts = np.fromiter(
        (
            (0 if 0 in t.shape else 1)
            if len(t.shape) < 8 and t.layout is whole_of[len(t.shape)]
            else t.chunk_count
            for _, t in all_records
        ),
        np.int64,
        len(all_records),
    )
    bad = np.flatnonzero((starts < 0) | (starts + counts > count))
    if len(bad):
        name = all_records[int(bad[0])][0]
        raise ManifestError(f"{where}: tensor {name!r} refers to chunks outside the table")


def _raw_nbytes(records: list[TensorRecord], count: int) -> np.ndarray:
    """Stored bytes per chunk of an uncompressed checkpoint (derived, not stored).

    Tensors stored whole (most of a model's) are done in one vectorized assignment.
    """
    nbytes = np.zeros(count, dtype=np.int64)
    whole_of = [whole_layout(n) for n in range(8)]
    starts: list[int] = []
    sizes: list[int] = []
    prod = math.prod
    for t in records:
        shape = t.shape
        if len(shape) < 8 and t.layout is whole_of[len(shape)]:
            numel = prod(shape)
            if numel:
                starts.append(t.chunk_start)
                sizes.append(numel * itemsize(t.dtype))
        else:
            _fill_raw_nbytes(t, nbytes)
    if starts:
        index = np.fromiter(starts, dtype=np.int64, count=len(starts))
        values = np.fromiter(sizes, dtype=np.int64, count=len(sizes))
        inside = (index >= 0) & (index < count)  # the others fail _check_chunk_ranges, by name
        nbytes[index[inside]] = values[inside]
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
    special: dict[str, dict[str, Any]] = {}
    for i, t in enumerate(records):
        if t.codec is not None or t.layout is not whole_layout(len(t.shape)):
            extra = _tensor_to_json(t)
            for key in ("dtype", "shape", "chunk_start"):
                del extra[key]
            if extra:
                special[str(i)] = extra
    return {
        "names": list(tensors),
        "dtypes": [t.dtype for t in records],
        "shapes": [t.shape for t in records],
        "chunk_starts": [t.chunk_start for t in records],
        "layouts": special,
    }


def _tensor_table_from_json(doc: dict[str, Any]) -> dict[str, TensorRecord]:
    names, dtypes, shapes, starts = doc["names"], doc["dtypes"], doc["shapes"], doc["chunk_starts"]
    special = doc["layouts"]
    if not len(names) == len(dtypes) == len(shapes) == len(starts):
        raise ManifestError("tensor table columns have different lengths")
    unknown = set(dtypes) - NAME_TO_DTYPE.keys()
    if unknown:
        raise ManifestError(f"unknown dtype(s) {sorted(map(str, unknown))}")
    if len(set(names)) != len(names):
        raise ManifestError("duplicate tensor names")
    out: dict[str, TensorRecord] = {}
    for i, (name, dtype, shape, start) in enumerate(
        zip(names, dtypes, shapes, starts, strict=True)
    ):
        extra = special.get(str(i)) if special else None
        if extra is not None:
            out[name] = _tensor_from_json(
                {"dtype": dtype, "shape": shape, "chunk_start": start, **extra}
            )
            continue
        shape = tuple(shape)
        # sum() is a cheap check that every dimension is an int (a float or str would show)
        if type(sum(shape, 0)) is not int or (shape and min(shape) < 0) or type(start) is not int:
            raise ManifestError(
                f"tensor {name!r}: malformed shape {list(shape)} or chunk_start {start!r}"
            )
        out[name] = TensorRecord(dtype, shape, start, whole_layout(len(shape)), None)
    return out


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
