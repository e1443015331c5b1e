"""ckptstore as the storage layer of torch DCP: ``dcp.save(sd, storage_writer=Writer(url))``,
``dcp.async_save(...)`` and ``dcp.load(sd, storage_reader=Reader(url))``, unchanged.

DCP plans (which rank writes which chunk of which tensor, replicas once) and moves the
tensors; this module puts the bytes where ckptstore puts them -- one data file per rank,
crc32c per block, any Store (local, S3, tiered) -- and commits a ckptstore manifest, last
and atomically, from DCP's coordinator. What it writes is a ckptstore checkpoint: it opens
with ``cs.open``, ``ckpt`` and ``cs.load``; and any ckptstore checkpoint loads through
:class:`Reader`.

DCP's own metadata is a pickle; here it is the JSON manifest. Non-tensor entries must be
plain values (numbers, strings, None, and lists/tuples of them: DCP keeps an optimizer's
``params`` lists as such; a list is stored element by element, ``name.0``, ``name.1``, ...,
as ``cs.save`` stores lists) unless the caller passes ``allow_pickle=True``; so must the
planner's data (the default planner's is a map of names to key paths). Anything else is
refused with the entry's name.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from ckptstore import knobs
from ckptstore.backends.base import Store
from ckptstore.backends.registry import open_store
from ckptstore.errors import ConversionError, PickleNotAllowedError
from ckptstore.format.checksum import block_crcs
from ckptstore.format.commit_point import commit_manifest, read_manifest, refuse_existing
from ckptstore.format.data_files import data_key, rank_file_name
from ckptstore.format.dtypes import DTYPE_TO_NAME, dtype_from_name
from ckptstore.format.layouts import BoxLayout, GridLayout, Layout, overlaps, whole_layout
from ckptstore.format.manifest import (
    BlobRef,
    ChunkTable,
    Manifest,
    ObjectRecord,
    TensorRecord,
)
from ckptstore.loading.load import read_blob
from ckptstore.loading.read import ChunkReader, Target
from ckptstore.state.leaves import is_plain
from ckptstore.state.tensor_bytes import as_bytes, host_contiguous

_LISTS = "lists"  # metadata["dcp"][_LISTS]: DCP entry -> its list's shape (see _skeleton)


@dataclass(frozen=True)
class _Stored:
    """Where one DCP write item went (a WriteResult's ``storage_data``)."""

    file: str  # data key
    offset: int
    nbytes: int
    crcs: tuple[int, ...]
    pickled: bool = False
    value: Any = None  # a plain value, stored in the manifest
    is_value: bool = False


class _AtPath:
    """A checkpoint path (or DCP's ``checkpoint_id``) and its store, opened on first use and
    left behind when pickled (DCP's process-based ``async_save`` sends the object to a helper
    process)."""

    path: str | None
    storage_options: dict[str, Any]
    _store: Store | None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None}

    @property
    def store(self) -> Store:
        """The store of the checkpoint (opened on first use)."""
        if self.path is None:
            raise ConversionError(
                f"ckptstore.dcp.{type(self).__name__}: no path (pass one, or checkpoint_id)"
            )
        if self._store is None:
            self._store = open_store(self.path, **self.storage_options)
        return self._store

    def _at(self, checkpoint_id: str | os.PathLike[str] | None) -> None:
        if checkpoint_id:
            self.path, self._store = str(checkpoint_id), None


class Writer(_AtPath, StorageWriter):
    """A torch DCP ``StorageWriter`` that writes a ckptstore checkpoint at ``path`` (or at
    the ``checkpoint_id`` DCP passes). Picklable (DCP's process-based ``async_save`` sends
    it to a helper process): the store is opened where it is used.

    Args:
        path: a directory or URL (``s3://...``, ``file://...``, any fsspec URL).
        storage_options: backend options (the S3 endpoint, credentials, ...).
        allow_pickle: store non-plain entries and planner data pickled (loading them needs
            ``allow_pickle=True`` too).
        overwrite: replace a committed checkpoint at the path.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
        allow_pickle: bool = False,
        overwrite: bool = False,
        checksum_block_bytes: int | None = None,
    ) -> None:
        self.path = None if path is None else str(path)
        self.storage_options = dict(storage_options or {})
        self.allow_pickle = allow_pickle
        self.overwrite = overwrite
        self.block = checksum_block_bytes or knobs.checksum_block_bytes()
        self.is_coordinator = False
        self.tag = uuid.uuid4().hex[:10]
        self._store: Store | None = None

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """A new checkpoint: at ``checkpoint_id`` when DCP passes one."""
        self._at(checkpoint_id)
        self.tag = uuid.uuid4().hex[:10]

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        """Refuse a committed checkpoint at the path up front (unless ``overwrite``)."""
        self.is_coordinator = is_coordinator
        if is_coordinator:
            refuse_existing(self.store, overwrite=self.overwrite)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        """Nothing to add locally."""
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Each rank's plan learns its rank (its data file's name)."""
        return [dataclasses.replace(p, storage_data=rank) for rank, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """This rank's items into one data file: tensors as raw bytes with a crc32c per
        block, plain values kept for the manifest, other objects pickled (opt-in)."""
        key = data_key(rank_file_name(int(plan.storage_data or 0), self.tag, 0))
        writer = self.store.open_writer(key)
        results: list[WriteResult] = []
        offset = 0
        try:
            for item in plan.items:
                if item.type == WriteItemType.BYTE_IO:
                    value = _object_of(planner, item)
                    if _is_plain_value(value):
                        stored = _Stored("", 0, 0, (), value=value, is_value=True)
                        results.append(WriteResult(item.index, 0, stored))
                        continue
                    if not self.allow_pickle:
                        raise PickleNotAllowedError(
                            f"DCP entry {item.index.fqn!r} is a {type(value).__qualname__}, not "
                            "a plain value; pass allow_pickle=True to ckptstore.dcp.Writer to "
                            "store it pickled"
                        )
                    data = memoryview(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
                    pickled = True
                else:
                    tensor = host_contiguous(planner.resolve_data(item).detach())
                    data = as_bytes(tensor)
                    pickled = False
                crcs = tuple(block_crcs(data, self.block))
                writer.write(data)
                stored = _Stored(key, offset, len(data), crcs, pickled=pickled)
                results.append(WriteResult(item.index, len(data), stored))
                offset += len(data)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        done: Future[list[WriteResult]] = Future()
        done.set_result(results)
        return done

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """On DCP's coordinator, after every rank wrote: the manifest, committed last."""
        located = {r.index: r.storage_data for rank in results for r in rank}
        manifest = _manifest(metadata, located, len(results), self.block, self.allow_pickle)
        commit_manifest(self.store, manifest.to_json(), overwrite=self.overwrite)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """Any path or URL ckptstore can open."""
        return bool(str(checkpoint_id))

    def storage_meta(self) -> StorageMeta | None:
        """The checkpoint's id and this save's tag."""
        return StorageMeta(checkpoint_id=self.path, save_id=self.tag)


def _object_of(planner: SavePlanner, item: Any) -> Any:
    """A BYTE_IO item's object itself (DCP's default planner can look it up), else the
    object its serialized bytes hold."""
    lookup = getattr(planner, "lookup_object", None)
    if lookup is not None:
        return lookup(item.index)
    data = planner.resolve_data(item)
    data.seek(0)
    return torch.load(data, weights_only=True)


def _is_plain_value(value: Any) -> bool:
    if isinstance(value, list):
        return all(_is_plain_value(v) for v in value)
    return is_plain(value)


def _skeleton(value: list) -> list:
    """A list's shape: None for each element, a nested skeleton for each inner list."""
    return [_skeleton(v) if isinstance(v, list) else None for v in value]


def _elements(name: str, value: list) -> Iterable[tuple[str, Any]]:
    """A list's elements under the names ``cs.save`` gives them (``name.0``, ``name.1.0``)."""
    for i, v in enumerate(value):
        if isinstance(v, list):
            yield from _elements(f"{name}.{i}", v)
        else:
            yield f"{name}.{i}", v


def _rebuild(name: str, skeleton: Any, objects: dict[str, ObjectRecord]) -> list:
    """The list stored element by element under ``name``, from its skeleton."""
    if not isinstance(skeleton, list):
        raise ConversionError(f"DCP entry {name!r}: malformed list shape in the manifest")
    out = []
    for i, inner in enumerate(skeleton):
        element = f"{name}.{i}"
        if inner is not None:
            out.append(_rebuild(element, inner, objects))
        elif element in objects and objects[element].blob is None:
            out.append(objects[element].value)
        else:
            raise ConversionError(f"DCP entry {name!r}: element {element!r} is missing")
    return out


def _manifest(
    metadata: Metadata,
    located: dict[MetadataIndex, _Stored],
    world_size: int,
    block: int,
    allow_pickle: bool,
) -> Manifest:
    """DCP's metadata and where each item went, as a ckptstore manifest."""
    files: list[str] = sorted({s.file for s in located.values() if s.file})
    file_index = {f: i for i, f in enumerate(files)}
    cols: dict[str, list[int]] = {"file": [], "offset": [], "nbytes": [], "crc": []}
    tensors: dict[str, TensorRecord] = {}
    objects: dict[str, ObjectRecord] = {}
    lists: dict[str, list] = {}
    for fqn, meta in metadata.state_dict_metadata.items():
        if isinstance(meta, BytesStorageMetadata):
            stored = located[MetadataIndex(fqn)]
            if stored.is_value and isinstance(stored.value, list):
                lists[fqn] = _skeleton(stored.value)
                for name, element in _elements(fqn, stored.value):
                    objects[name] = ObjectRecord(value=element)
            elif stored.is_value:
                objects[fqn] = ObjectRecord(value=stored.value)
            else:
                blob = BlobRef(file_index[stored.file], stored.offset, stored.nbytes, stored.crcs)
                objects[fqn] = ObjectRecord(blob=blob)
            continue
        dtype = DTYPE_TO_NAME.get(meta.properties.dtype)
        if dtype is None:
            raise ConversionError(f"DCP entry {fqn!r}: dtype {meta.properties.dtype} unsupported")
        shape = tuple(int(d) for d in meta.size)
        chunks = [(tuple(map(int, c.offsets)), tuple(map(int, c.sizes))) for c in meta.chunks]
        if 0 in shape:  # no elements, no chunks
            tensors[fqn] = TensorRecord(dtype, shape, len(cols["file"]), whole_layout(len(shape)))
            continue
        layout, order = _layout(chunks, shape)
        start = len(cols["file"])
        for i in order:
            stored = located[MetadataIndex(fqn, torch.Size(chunks[i][0]))]
            cols["file"].append(file_index[stored.file])
            cols["offset"].append(stored.offset)
            cols["nbytes"].append(stored.nbytes)
            cols["crc"].extend(stored.crcs)
        tensors[fqn] = TensorRecord(dtype, shape, start, layout)
    table = ChunkTable.from_lists(cols["file"], cols["offset"], cols["nbytes"], cols["crc"], block)
    extra = {_LISTS: lists, "planner_data": _planner_data(metadata.planner_data, allow_pickle)}
    return Manifest(
        world_size=world_size,
        files=files,
        chunks=table,
        tensors=tensors,
        objects=objects,
        per_rank={},
        metadata={"dcp": extra},
    )


def _layout(
    chunks: list[tuple[tuple[int, ...], tuple[int, ...]]], shape: tuple[int, ...]
) -> tuple[Layout, list[int]]:
    """The chunks as a grid when they form one (in C order of cells), else as boxes (in
    the order given); and the order of ``chunks`` in the checkpoint's chunk table."""
    starts = tuple(tuple(sorted({c[0][d] for c in chunks})) for d in range(len(shape)))
    cells = 1
    for s in starts:
        cells *= len(s)
    if cells == len(chunks):
        ends = [(*s[1:], dim) for s, dim in zip(starts, shape, strict=True)]
        position = {}
        ok = True
        for i, (offs, sizes) in enumerate(chunks):
            index = 0
            for d, (o, n) in enumerate(zip(offs, sizes, strict=True)):
                k = starts[d].index(o)
                ok = ok and ends[d][k] - o == n
                index = index * len(starts[d]) + k
            position[index] = i
        if ok and len(position) == len(chunks):
            return GridLayout(starts), [position[k] for k in range(cells)]
    offsets = np.array([c[0] for c in chunks], dtype=np.int64).reshape(len(chunks), len(shape))
    sizes = np.array([c[1] for c in chunks], dtype=np.int64).reshape(len(chunks), len(shape))
    return BoxLayout(offsets, sizes), list(range(len(chunks)))


def _planner_data(data: Any, allow_pickle: bool) -> Any:
    """The planner's data as JSON (the default planner's: names -> key paths)."""
    if data is None:
        return None
    if isinstance(data, dict) and all(
        isinstance(k, str) and isinstance(v, tuple) and all(isinstance(p, (str, int)) for p in v)
        for k, v in data.items()
    ):
        return {"paths": {k: list(v) for k, v in data.items()}}
    if not allow_pickle:
        raise PickleNotAllowedError(
            f"the DCP planner's data is a {type(data).__qualname__} that JSON cannot hold (a "
            "custom planner?); pass allow_pickle=True to ckptstore.dcp.Writer to store it pickled"
        )
    return {"pickle": pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL).hex()}


class Reader(_AtPath, StorageReader):
    """A torch DCP ``StorageReader`` over any ckptstore checkpoint (written through
    :class:`Writer`, by ``cs.save`` or by ``ckpt import``): DCP's load plans against the
    manifest's tensors and chunks; the bytes are read, checksum-verified and copied by
    ckptstore's reader (parallel ranged reads, coalesced).

    Args:
        path: a directory or URL.
        storage_options: backend options.
        allow_pickle: unpickle entries (and planner data) that were stored pickled.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        storage_options: dict[str, Any] | None = None,
        allow_pickle: bool = False,
    ) -> None:
        self.path = None if path is None else str(path)
        self.storage_options = dict(storage_options or {})
        self.allow_pickle = allow_pickle
        self._store: Store | None = None
        self._manifest: Manifest | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "_manifest": None}

    @property
    def manifest(self) -> Manifest:
        """The checkpoint's manifest, read and validated once."""
        if self._manifest is None:
            self._manifest = read_manifest(self.store)  # validated whole before any byte moves
        return self._manifest

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Read the checkpoint at ``checkpoint_id`` when DCP passes one."""
        self._at(checkpoint_id)
        self._manifest = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The manifest as DCP's metadata: every tensor with its chunks, every value."""
        m = self.manifest
        entries: dict[str, Any] = {}
        for name, rec in m.tensors.items():
            chunks = [
                ChunkStorageMetadata(torch.Size(box[0]), torch.Size(box[1]))
                for box in _chunk_boxes(rec)
            ]
            props = TensorProperties(dtype=dtype_from_name(rec.dtype))
            entries[name] = TensorStorageMetadata(props, torch.Size(rec.shape), chunks)
        for name in [*self._lists(), *m.objects]:
            entries[name] = BytesStorageMetadata()
        dcp_meta = m.metadata.get("dcp", {}) if isinstance(m.metadata, dict) else {}
        return Metadata(
            state_dict_metadata=entries,
            planner_data=self._planner_data(dcp_meta.get("planner_data")),
            storage_data={},
            storage_meta=StorageMeta(checkpoint_id=self.path, load_id=uuid.uuid4().hex[:10]),
        )

    def _planner_data(self, data: Any) -> Any:
        if not isinstance(data, dict):
            return None
        if "paths" in data:
            return {k: tuple(v) for k, v in data["paths"].items()}
        if "pickle" in data:
            if not self.allow_pickle:
                raise PickleNotAllowedError(
                    f"{self.store.url}: the DCP planner's data was stored pickled; pass "
                    "allow_pickle=True to ckptstore.dcp.Reader (only for checkpoints you trust)"
                )
            return pickle.loads(bytes.fromhex(data["pickle"]))
        return None

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        """Nothing to set up: the manifest is read."""

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        """Nothing to add."""
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """Nothing to add."""
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Values handed over as DCP expects them; tensor regions read in one batch by
        ckptstore's reader into the planner's tensors (through a host buffer when those are
        on a device, or of another dtype), then committed."""
        m = self.manifest
        lists = self._lists()
        targets: list[Target] = []
        commits: list[tuple[Any, torch.Tensor, bool]] = []  # (item, its tensor, read directly)
        for item in plan.items:
            fqn = item.storage_index.fqn
            if item.type == LoadItemType.BYTE_IO:
                planner.load_bytes(item, io.BytesIO(self._object_bytes(fqn, lists.get(fqn))))
                continue
            rec = m.tensors[fqn]
            chunk_offsets = tuple(int(o) for o in item.storage_index.offset)
            box = (
                tuple(c + int(o) for c, o in zip(chunk_offsets, item.storage_offsets, strict=True)),
                tuple(int(n) for n in item.lengths),
            )
            # The planner hands the destination region itself (narrowed to dest_offsets).
            dest = planner.resolve_tensor(item).detach()
            dtype = dtype_from_name(rec.dtype)
            direct = dest.is_cpu and dest.dtype == dtype
            targets.append(
                Target(fqn, rec, box, dest if direct else torch.empty(box[1], dtype=dtype))
            )
            commits.append((item, dest, direct))
        if targets:
            ChunkReader(self.store, m, self.store.url).fill(targets)
        for (item, dest, direct), target in zip(commits, targets, strict=True):
            if not direct:  # through a host buffer: a device tensor, or another dtype
                dest.copy_(target.dest)
            planner.commit_tensor(item, dest)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _lists(self) -> dict[str, Any]:
        """Lists stored element by element: DCP entry -> skeleton. Those a DCP save recorded,
        and those of a ``cs.save`` (values ``X.0 .. X.n-1`` and no ``X``): a DCP state_dict
        holds a list of values as one entry."""
        m = self.manifest
        dcp_meta = m.metadata.get("dcp", {}) if isinstance(m.metadata, dict) else {}
        recorded = dcp_meta.get(_LISTS, {}) if isinstance(dcp_meta, dict) else {}
        found: dict[str, set[int]] = {}
        for name, rec in m.objects.items():
            parent, _, last = name.rpartition(".")
            if parent and last.isdigit() and rec.blob is None and str(int(last)) == last:
                found.setdefault(parent, set()).add(int(last))
        inferred = {
            parent: [None] * len(indexes)
            for parent, indexes in found.items()
            if indexes == set(range(len(indexes))) and parent not in m.objects
        }
        return {**inferred, **(recorded if isinstance(recorded, dict) else {})}

    def _object_bytes(self, name: str, skeleton: Any) -> bytes:
        """An entry as the bytes DCP's planner loads (``torch.save`` of the object); a list
        stored element by element is put back together from its ``skeleton``."""
        if skeleton is not None:
            value: Any = _rebuild(name, skeleton, self.manifest.objects)
            out = io.BytesIO()
            torch.save(value, out)
            return out.getvalue()
        rec = self.manifest.objects[name]
        if rec.blob is not None:
            if not self.allow_pickle:
                raise PickleNotAllowedError(
                    f"{self.store.url}: {name!r} was stored pickled; pass allow_pickle=True to "
                    "ckptstore.dcp.Reader (only for checkpoints you trust)"
                )
            value = pickle.loads(read_blob(self.store, self.manifest, name, rec))
        else:
            value = rec.value
        out = io.BytesIO()
        torch.save(value, out)
        return out.getvalue()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """Any path or URL ckptstore can open."""
        return bool(str(checkpoint_id))


def _chunk_boxes(rec: TensorRecord) -> Iterable[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The boxes of a tensor's chunks (none for a tensor without elements)."""
    if 0 in rec.shape:
        return []
    whole = (tuple(0 for _ in rec.shape), rec.shape)
    return [cbox for _, cbox, _ in overlaps(rec.layout, rec.shape, whole)]
