"""``open``: read-only access to a committed checkpoint, no process group needed."""

from __future__ import annotations

import difflib
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ckptstore.backends.base import Store
from ckptstore.errors import (
    AllocationError,
    CheckpointNotFoundError,
    EntryNotFoundError,
    PickleNotAllowedError,
)
from ckptstore.format.commit_point import read_manifest, store_for
from ckptstore.format.dtypes import dtype_from_name
from ckptstore.format.manifest import Manifest, ObjectRecord, TensorRecord
from ckptstore.format.safetensors_manifest import or_safetensors
from ckptstore.loading.load import read_blob
from ckptstore.loading.read import ChunkReader, Target


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: int
    nbytes: int
    stored_nbytes: int
    codec: str | None
    layout: str
    per_rank: bool = False


@dataclass(frozen=True)
class ObjectMeta:
    name: str
    pickled: bool
    per_rank: bool = False


def _index_to_box(index: Any, shape: tuple[int, ...], name: str):
    if index is None:
        return ((0,) * len(shape), shape), []
    if not isinstance(index, tuple):
        index = (index,)
    if len(index) > len(shape):
        raise IndexError(f"{name}: {len(index)} indices for a {len(shape)}-d tensor")
    offs, shp, squeeze = [], [], []
    for d, size in enumerate(shape):
        ix = index[d] if d < len(index) else slice(None)
        if isinstance(ix, int):
            i = ix + size if ix < 0 else ix
            if not 0 <= i < size:
                raise IndexError(
                    f"{name}: index {ix} out of range for dimension {d} of size {size}"
                )
            offs.append(i)
            shp.append(1)
            squeeze.append(d)
        elif isinstance(ix, slice):
            start, stop, step = ix.indices(size)
            if step != 1:
                raise IndexError(f"{name}: only step-1 slices are supported, got {ix}")
            offs.append(start)
            shp.append(max(0, stop - start))
        else:
            raise IndexError(f"{name}: unsupported index {ix!r} (use ints and slices)")
    return (tuple(offs), tuple(shp)), squeeze


class Checkpoint:
    """A committed checkpoint opened for reading. Get one with :func:`ckptstore.open`."""

    def __init__(self, store: Store, manifest: Manifest) -> None:
        self.store = store
        self.manifest = manifest
        self.url = store.url

    @property
    def world_size(self) -> int:
        """The number of ranks that saved it."""
        return self.manifest.world_size

    @property
    def metadata(self) -> dict[str, Any]:
        """The ``metadata=`` dict given to the save."""
        return self.manifest.metadata

    def keys(self) -> list[str]:
        """Every entry's name: tensors, then plain values, then per-rank entries."""
        m = self.manifest
        return [*m.tensors, *m.objects, *m.per_rank]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        m = self.manifest
        return len(m.tensors) + len(m.objects) + len(m.per_rank)

    def __contains__(self, name: str) -> bool:
        m = self.manifest
        return name in m.tensors or name in m.objects or name in m.per_rank

    def _record(self, name: str, rank: int | None) -> TensorRecord | ObjectRecord:
        m = self.manifest
        if name in m.tensors:
            return m.tensors[name]
        if name in m.objects:
            return m.objects[name]
        if name in m.per_rank:
            entries = m.per_rank[name]
            if rank is None:
                raise EntryNotFoundError(
                    f"{self.url}: {name!r} is saved per rank; pass rank=0..{len(entries) - 1}",
                    name,
                    [],
                )
            return entries[rank]
        raise self._not_found(name)

    def _not_found(self, name: str) -> EntryNotFoundError:
        """The error for an unknown name, with the nearest names the checkpoint holds."""
        keys = self.keys()
        top = name.split(".", 1)[0]
        pool = [k for k in keys if k.split(".", 1)[0] == top] or keys
        near = difflib.get_close_matches(name, pool[:50_000], n=3, cutoff=0.6)
        if not near and top not in {k.split(".", 1)[0] for k in keys}:
            tops = list(dict.fromkeys(k.split(".", 1)[0] for k in keys))
            near = [f"{t}.*" for t in difflib.get_close_matches(top, tops, n=3, cutoff=0.6)]
        hint = f"; did you mean {', '.join(map(repr, near))}?" if near else ""
        return EntryNotFoundError(
            f"{self.url}: no entry {name!r} in this checkpoint ({len(keys)} entries; "
            f"`ckpt inspect {self.url}` lists them){hint}",
            name,
            near,
        )

    def meta(self, name: str, rank: int | None = None) -> TensorMeta | ObjectMeta:
        """What is saved under ``name`` (dtype, global shape, chunks, bytes; or an object's
        kind), without reading data."""
        per_rank = name in self.manifest.per_rank
        rec = self._record(name, 0 if per_rank and rank is None else rank)
        if isinstance(rec, ObjectRecord):
            return ObjectMeta(name, rec.blob is not None, per_rank)
        start, n = rec.chunk_start, rec.chunk_count
        return TensorMeta(
            name=name,
            dtype=dtype_from_name(rec.dtype),
            shape=rec.shape,
            chunks=n,
            nbytes=rec.nbytes,
            stored_nbytes=int(self.manifest.chunks.nbytes[start : start + n].sum()),
            codec=rec.codec,
            layout="grid" if hasattr(rec.layout, "starts") else "boxes",
            per_rank=per_rank,
        )

    def read(
        self, name: str, index: Any = None, *, rank: int | None = None, allow_pickle: bool = False
    ) -> Any:
        """A tensor (whole, or the region ``index``: ints and step-1 slices), or a value."""
        rec = self._record(name, rank)
        if isinstance(rec, ObjectRecord):
            if rec.blob is None:
                return rec.value
            if not allow_pickle:
                raise PickleNotAllowedError(
                    f"{self.url}: {name!r} is pickled; pass allow_pickle=True"
                )
            return pickle.loads(read_blob(self.store, self.manifest, name, rec))
        box, squeeze = _index_to_box(index, rec.shape, name)
        try:
            out = torch.empty(box[1], dtype=dtype_from_name(rec.dtype))
        except (RuntimeError, MemoryError) as exc:
            raise AllocationError(
                f"{self.url}: cannot allocate {name!r} {rec.dtype}{list(box[1])}: {exc}"
            ) from None
        ChunkReader(self.store, self.manifest, self.url).fill([Target(name, rec, box, out)])
        for d in reversed(squeeze):
            out = out.squeeze(d)
        return out

    def zarr(self, tensors: list[str] | None = None, *, strict: bool = True) -> Any:
        """A read-only zarr v3 group over this checkpoint, without copying data.

        Tensors saved as zarr's regular chunk grid -- whole, or split as ``torch.chunk`` and
        DTensor ``Shard(d)`` split (uneven FSDP2 shards included: a partial edge chunk) --
        are arrays named like the checkpoint's entries; bfloat16 / float8 are their raw bits
        (see ``ckptstore.loading.zarr_view``). A tensor that cannot be viewed (an irregular
        split) is left out and listed in the group attribute ``ckptstore.not_viewable``;
        with ``strict``, naming such a tensor in ``tensors`` raises ``ConversionError``.
        """
        from ckptstore.loading.zarr_view import open_zarr

        return open_zarr(self, tensors, strict)

    def __repr__(self) -> str:
        return f"Checkpoint({self.url!r}, tensors={len(self.manifest.tensors)}, world_size={self.world_size})"


def open_checkpoint(
    path: str | os.PathLike[str] | Store | Checkpoint,
    *,
    storage_options: dict[str, Any] | None = None,
) -> Checkpoint:
    """Open the committed checkpoint at ``path`` read-only (an open one is returned as is);
    a local directory of safetensors files (a Hugging Face model) opens as one too.

    Raises:
        CheckpointNotFoundError / IncompleteCheckpointError / ManifestError.
    """
    if isinstance(path, Checkpoint):
        return path
    store = store_for(path, storage_options)
    try:
        return Checkpoint(store, read_manifest(store))
    except CheckpointNotFoundError as missing:  # perhaps a Hugging Face directory
        return Checkpoint(store, or_safetensors(store, missing))
