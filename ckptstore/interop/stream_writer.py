"""Writing a checkpoint entry by entry from one process (conversions: ``ckpt import``).

A save needs the whole state_dict at once; an importer holds one batch of tensors at a time.
:class:`StreamingWriter` appends each tensor to one data file as it comes (checksummed per
block), keeps plain values for the manifest, and commits the manifest last, atomically --
the same format and the same guarantees as :func:`ckptstore.save` from a single rank.
"""

from __future__ import annotations

import json
import os
import pickle
import uuid
from typing import Any

import torch

from ckptstore import knobs
from ckptstore.backends.base import Store, StoreWriter
from ckptstore.errors import (
    CheckpointExistsError,
    PickleNotAllowedError,
    StateDictError,
)
from ckptstore.format.chunk_writer import ChunkRow, ChunkWriter, blob_ref, chunk_table
from ckptstore.format.commit_point import (
    commit_manifest,
    delete_replaced,
    refuse_existing,
    store_for,
)
from ckptstore.format.data_files import data_key, rank_file_name
from ckptstore.format.dtypes import dtype_name
from ckptstore.format.layouts import whole_layout
from ckptstore.format.manifest import (
    Manifest,
    ObjectRecord,
    TensorRecord,
)
from ckptstore.format.regions import bounded_regions
from ckptstore.format.rules import bad_name
from ckptstore.state.leaves import is_plain
from ckptstore.state.tensor_bytes import as_bytes

_MiB = 1 << 20


class StreamingWriter:
    """``add_tensor`` / ``add_value`` entries, then ``commit()`` (or ``abort()``)."""

    def __init__(
        self,
        dst: str | os.PathLike[str] | Store,
        *,
        overwrite: bool = False,
        allow_pickle: bool = False,
        metadata: dict[str, Any] | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.store = store_for(dst, storage_options)
        refuse_existing(self.store, overwrite=overwrite)
        self.overwrite, self.allow_pickle = overwrite, allow_pickle
        self.metadata = dict(metadata or {})
        self.block = knobs.checksum_block_bytes()
        self.key = data_key(rank_file_name(0, uuid.uuid4().hex[:10], 0))
        self._writer: StoreWriter = self.store.open_writer(self.key)
        self._chunks = ChunkWriter(self._writer, 0, self.block)
        self._rows: list[ChunkRow] = []
        self.tensors: dict[str, TensorRecord] = {}
        self.objects: dict[str, ObjectRecord] = {}
        self.bytes = 0

    def _check_name(self, name: str) -> None:
        if name in self.tensors or name in self.objects:
            raise StateDictError(f"entry {name!r} was added twice")
        problem = bad_name([name])
        if problem:
            raise StateDictError(f"entry {problem}")

    def add_tensor(self, name: str, tensor: torch.Tensor, max_memory: int = 256 * _MiB) -> None:
        """Append ``tensor`` (any device, any strides) as one chunk."""
        self._check_name(name)
        try:
            dtype = dtype_name(tensor.dtype)
        except ValueError as exc:
            raise StateDictError(f"tensor {name!r}: {exc}") from None
        shape = tuple(tensor.shape)
        record = TensorRecord(dtype, shape, len(self._rows), whole_layout(len(shape)), None)
        if 0 in shape:
            self.tensors[name] = record
            return
        self._chunks.begin()
        for index in bounded_regions(shape, tensor.element_size(), max_memory):
            piece = tensor[index].detach().to("cpu").contiguous()
            self._chunks.add(as_bytes(piece))
        self._rows.append(self._chunks.end())
        self.tensors[name] = record
        self.bytes += tensor.numel() * tensor.element_size()

    def add(self, name: str, value: Any) -> None:
        """A tensor (:meth:`add_tensor`) or anything else (:meth:`add_value`)."""
        if isinstance(value, torch.Tensor):
            self.add_tensor(name, value)
        else:
            self.add_value(name, value)

    def add_value(self, name: str, value: Any) -> None:
        """A plain value (JSON-able) or, with ``allow_pickle``, any picklable object."""
        if isinstance(value, (list, dict)):  # containers flatten to dotted names, as in save
            from ckptstore.state.leaves import flatten

            for leaf in flatten(value).values():
                self.add(f"{name}.{leaf.name}", leaf.value)
            return
        self._check_name(name)
        plain = is_plain(value)
        if plain:
            try:
                json.dumps(value)
            except (TypeError, ValueError):
                plain = False
        if plain:
            self.objects[name] = ObjectRecord(value=value)
            return
        if not self.allow_pickle:
            raise PickleNotAllowedError(
                f"entry {name!r} is a {type(value).__qualname__}, not a plain value; it needs "
                "pickle (allow_pickle=True)"
            )
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        self.objects[name] = ObjectRecord(blob=blob_ref(self._chunks, data))

    def abort(self) -> None:
        self._writer.abort()

    def commit(self) -> Manifest:
        """Make the data durable, then commit the manifest (create-if-absent)."""
        self._writer.commit()
        table = chunk_table(self._rows, self.block)
        manifest = Manifest(
            1, [self.key], table, self.tensors, self.objects, {}, metadata=self.metadata
        )
        try:
            replaced = commit_manifest(self.store, manifest.to_json(), overwrite=self.overwrite)
        except CheckpointExistsError:
            self.store.delete(self.key)
            raise
        delete_replaced(self.store, replaced, manifest)  # an overwritten checkpoint's data
        return manifest
