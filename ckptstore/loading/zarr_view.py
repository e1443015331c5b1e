"""A read-only zarr v3 view of a checkpoint, without copying data.

Every tensor whose saved layout is zarr's regular chunk grid is a zarr array: every tensor
saved whole, and every ``torch.chunk`` / DTensor ``Shard(d)`` split -- equal chunks and a
smaller last one, as FSDP2 shards a dimension the ranks do not divide (zarr's partial edge
chunk). zarr's chunk keys map onto byte ranges of the data files, read through the
checkpoint's own Store (local, S3, any backend) and verified against their crc32c before zarr
sees a byte; interior chunks are handed over as read, edge chunks padded to the chunk shape
(zarr ignores the padding). bfloat16, float8 and complex32, which zarr v3 has no type for,
appear as their raw bits (uint16 / uint8 / uint32) with the torch dtype in the array
attributes (``torch_dtype``, ``raw_bits``). A truly irregular split (or a compressed tensor
with edge chunks) cannot be a zarr array: it is left out and listed in the group attribute
``ckptstore.not_viewable``; ``ckpt export --format zarr`` writes a real copy instead.

:meth:`references` gives the same mapping as fsspec reference-filesystem JSON
(``{key: json | [url, offset, length]}``) for other tools.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

from ckptstore.backends.base import ByteRange
from ckptstore.errors import ChecksumError, ConversionError
from ckptstore.format.checksum import block_crcs
from ckptstore.format.dtypes import dtype_from_name
from ckptstore.format.manifest import TensorRecord
from ckptstore.format.zarr import regular_chunks, regular_grid, zarr_dtype

if TYPE_CHECKING:
    from ckptstore.loading.checkpoint import Checkpoint

_CODECS = {None: [], "zstd": [{"name": "zstd", "configuration": {"level": 0, "checksum": False}}]}


def viewable(rec: TensorRecord) -> str | None:
    """Why ``rec`` cannot be a zarr array over the saved bytes, or None if it can."""
    codec = (rec.codec or "").split(":")[0] or None
    if codec not in _CODECS:
        return f"its chunks are compressed with {rec.codec}, which zarr v3 cannot decode"
    if 0 in rec.shape:
        return None
    if regular_grid(rec) is None:
        return "its chunks do not form a regular grid (an irregular split)"
    if codec and regular_chunks(rec) is None:
        return "its edge chunks are compressed (zarr would need them padded before encoding)"
    return None


def _array_doc(rec: TensorRecord) -> dict[str, Any]:
    dtype = dtype_from_name(rec.dtype)
    zdt, raw = zarr_dtype(dtype)
    chunks = regular_grid(rec) if 0 not in rec.shape else tuple(max(1, n) for n in rec.shape)
    codec = (rec.codec or "").split(":")[0] or None
    return {
        "zarr_format": 3,
        "node_type": "array",
        "shape": list(rec.shape),
        "data_type": zdt if zdt != "bool" else "bool",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(chunks or ())}},
        "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
        "fill_value": False if zdt == "bool" else 0,
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, *_CODECS[codec]],
        "attributes": {"torch_dtype": rec.dtype, "raw_bits": raw},
        "dimension_names": None,
    }


class CheckpointZarrMap:
    """zarr keys -> metadata documents or (file, offset, nbytes, chunk) of a checkpoint."""

    def __init__(self, ckpt: Checkpoint, tensors: Iterable[str] | None, strict: bool) -> None:
        self.ckpt = ckpt
        m = ckpt.manifest
        names = list(tensors) if tensors is not None else list(m.tensors)
        self.skipped = {n: why for n in names if (why := viewable(m.tensors[n]))}
        # Chunks smaller than the grid's chunk shape (edge chunks): key -> (box, chunk) shape.
        self.edges: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        if self.skipped and strict and tensors is not None:
            listed = "; ".join(f"{n}: {why}" for n, why in list(self.skipped.items())[:5])
            raise ConversionError(
                f"{ckpt.url}: {len(self.skipped)} tensor(s) cannot be viewed as zarr arrays "
                f"without copying ({listed}); use `ckpt export --format zarr` for a real copy, "
                "or zarr(strict=False) to view the others"
            )
        self.docs: dict[str, bytes] = {}
        self.chunks: dict[str, int] = {}  # zarr chunk key -> row of the chunk table
        attrs = {
            "ckptstore": {
                "path": ckpt.url,
                "world_size": m.world_size,
                "not_viewable": self.skipped,
            }
        }
        self.docs["zarr.json"] = _json(
            {"zarr_format": 3, "node_type": "group", "attributes": attrs}
        )
        for name in names:
            if name in self.skipped:
                continue
            rec = m.tensors[name]
            self.docs[f"{name}/zarr.json"] = _json(_array_doc(rec))
            if 0 in rec.shape:
                continue
            starts = rec.layout.starts  # type: ignore[union-attr]
            grid = [len(s) for s in starts]
            chunk_shape = regular_grid(rec) or ()
            for flat in range(rec.chunk_count):
                idx, rest = [], flat
                for n in reversed(grid):
                    idx.append(rest % n)
                    rest //= n
                idx.reverse()
                key = f"{name}/" + ("/".join(["c", *map(str, idx)]) if grid else "c")
                self.chunks[key] = rec.chunk_start + flat
                box = tuple(
                    min(c, dim - s[i])
                    for c, dim, s, i in zip(chunk_shape, rec.shape, starts, idx, strict=True)
                )
                if box != chunk_shape:
                    self.edges[key] = (box, chunk_shape)

    def read_chunk(self, key: str) -> bytes:
        row = self.chunks[key]
        t = self.ckpt.manifest.chunks
        file, off, n = int(t.file[row]), int(t.offset[row]), int(t.nbytes[row])
        data = self.ckpt.store.read(self.ckpt.manifest.files[file], ByteRange(off, off + n))
        a, b = t.crc_range(row)
        if len(data) != n or block_crcs(memoryview(data), t.block_bytes) != t.crc32c[a:b].tolist():
            raise ChecksumError(
                f"{self.ckpt.url}: zarr chunk {key} (file {self.ckpt.manifest.files[file]}, "
                f"bytes {off}..{off + n}) does not match its crc32c",
                bad=[key.split("/c")[0]],
            )
        if key in self.edges:
            return _padded(data, *self.edges[key])
        return data

    def references(self) -> dict[str, Any]:
        """fsspec reference-filesystem mapping (URLs of the data files, offsets, lengths)."""
        m = self.ckpt.manifest
        t = m.chunks
        refs: dict[str, Any] = {k: v.decode() for k, v in self.docs.items()}
        base = self.ckpt.store.url.rstrip("/")
        for key, row in self.chunks.items():
            if key in self.edges:  # padded: no byte range of a file holds it
                refs[key] = "base64:" + base64.b64encode(self.read_chunk(key)).decode()
                continue
            refs[key] = [
                f"{base}/{m.files[int(t.file[row])]}",
                int(t.offset[row]),
                int(t.nbytes[row]),
            ]
        return {"version": 1, "refs": refs}


def _padded(data: bytes, box: tuple[int, ...], chunk: tuple[int, ...]) -> bytes:
    """An edge chunk's bytes (C order over ``box``) inside a zero chunk of shape ``chunk``."""
    import numpy as np

    itemsize = len(data) // max(1, int(np.prod(box)))
    src = np.frombuffer(data, dtype=np.uint8).reshape(*box, itemsize)
    out = np.zeros((*chunk, itemsize), dtype=np.uint8)
    out[tuple(slice(0, n) for n in box)] = src
    return out.tobytes()


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


def zarr_store(view: CheckpointZarrMap):
    """A read-only zarr v3 Store over ``view``."""
    from zarr.abc.store import (
        ByteRequest,
        OffsetByteRequest,
        RangeByteRequest,
        Store,
        SuffixByteRequest,
    )
    from zarr.core.buffer import Buffer, BufferPrototype

    def cut(data: bytes, byte_range: ByteRequest | None) -> bytes:
        if byte_range is None:
            return data
        if isinstance(byte_range, RangeByteRequest):
            return data[byte_range.start : byte_range.end]
        if isinstance(byte_range, OffsetByteRequest):
            return data[byte_range.offset :]
        if isinstance(byte_range, SuffixByteRequest):
            return data[-byte_range.suffix :]
        raise TypeError(f"unexpected byte range {byte_range!r}")

    class CheckpointZarrStore(Store):
        supports_writes = False
        supports_deletes = False
        supports_partial_writes = False
        supports_listing = True

        def __init__(self) -> None:
            super().__init__(read_only=True)
            self.view = view

        def __eq__(self, other: object) -> bool:
            return isinstance(other, CheckpointZarrStore) and other.view is self.view

        def __hash__(self) -> int:
            return id(self.view)

        def _bytes(self, key: str) -> bytes | None:
            if key in self.view.docs:
                return self.view.docs[key]
            if key in self.view.chunks:
                return self.view.read_chunk(key)
            return None

        async def get(
            self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
        ) -> Buffer | None:
            data = self._bytes(key)
            return None if data is None else prototype.buffer.from_bytes(cut(data, byte_range))

        async def get_partial_values(self, prototype, key_ranges):
            return [await self.get(k, prototype, r) for k, r in key_ranges]

        async def exists(self, key: str) -> bool:
            return key in self.view.docs or key in self.view.chunks

        async def set(self, key: str, value: Buffer) -> None:
            raise PermissionError("a checkpoint's zarr view is read-only")

        async def delete(self, key: str) -> None:
            raise PermissionError("a checkpoint's zarr view is read-only")

        async def list(self) -> AsyncIterator[str]:
            for key in [*self.view.docs, *self.view.chunks]:
                yield key

        async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
            for key in [*self.view.docs, *self.view.chunks]:
                if key.startswith(prefix):
                    yield key

        async def list_dir(self, prefix: str) -> AsyncIterator[str]:
            prefix = prefix.rstrip("/")
            base = f"{prefix}/" if prefix else ""
            seen = set()
            for key in [*self.view.docs, *self.view.chunks]:
                if key.startswith(base):
                    child = key[len(base) :].split("/", 1)[0]
                    if child not in seen:
                        seen.add(child)
                        yield child

    return CheckpointZarrStore()


def open_zarr(ckpt: Checkpoint, tensors: Iterable[str] | None = None, strict: bool = True):
    """The checkpoint as a read-only ``zarr.Group`` (see the module doc)."""
    import zarr

    view = CheckpointZarrMap(ckpt, tensors, strict)
    return zarr.open_group(store=zarr_store(view), mode="r", zarr_format=3)
