"""A directory of safetensors files (a Hugging Face model) read as a checkpoint: ``cs.load``
fills a state_dict from it through the same read path -- resharded onto whatever DTensors
or shards the caller holds, every block verified.

safetensors files carry no checksums, so the manifest is built by reading each tensor's
bytes once to take their crc32c (from the page cache: a memory map of the local file); the
reads that fill the tensors then check them, so a file that changes in between is caught.
Every header is validated as a manifest is: offsets inside the file, sizes that match the
dtype and shape, names unique across files.
"""

from __future__ import annotations

import json

from ckptstore import knobs
from ckptstore.backends.base import Store
from ckptstore.errors import CheckpointNotFoundError, ConversionError
from ckptstore.format.checksum import block_crcs
from ckptstore.format.dtypes import DTYPE_TO_NAME
from ckptstore.format.layouts import whole_layout
from ckptstore.format.manifest import ChunkTable, Manifest, TensorRecord
from ckptstore.format.safetensors import read_entries

INDEX = "model.safetensors.index.json"


def or_safetensors(store: Store, missing: CheckpointNotFoundError) -> Manifest:
    """For a store without a manifest: the manifest of its safetensors files when it is a
    local directory of them, else ``missing`` raised. Called only once a manifest was not
    found, so a checkpoint's load pays nothing for it."""
    if store.reads_are_local and is_safetensors_dir(store):
        return safetensors_manifest(store)
    raise missing


def is_safetensors_dir(store: Store) -> bool:
    """Whether ``store`` holds a Hugging Face model's safetensors (and no checkpoint)."""
    return any(key.endswith(".safetensors") and "/" not in key for key in store.list(""))


def safetensors_manifest(store: Store) -> Manifest:
    """The manifest of the safetensors files of ``store`` (a local directory)."""
    if not store.reads_are_local:
        raise CheckpointNotFoundError(
            f"{store.url}: safetensors files are read as a checkpoint from local disk only; "
            "`ckpt import` them first"
        )
    files = _files(store)
    block = knobs.checksum_block_bytes()
    tensors: dict[str, TensorRecord] = {}
    cols: dict[str, list[int]] = {"file": [], "offset": [], "nbytes": [], "crc": []}
    for index, key in enumerate(files):
        view = store.map(key)
        data = memoryview(view) if view is not None else memoryview(store.read(key))
        for name, dtype, shape, begin, end in _entries(data, f"{store.url}/{key}"):
            if name in tensors:
                raise ConversionError(f"{store.url}: tensor {name!r} appears in two files")
            start = len(cols["file"])
            tensors[name] = TensorRecord(dtype, shape, start, whole_layout(len(shape)))
            if 0 in shape:
                continue
            cols["file"].append(index)
            cols["offset"].append(begin)
            cols["nbytes"].append(end - begin)
            cols["crc"].extend(block_crcs(data[begin:end], block))
    table = ChunkTable.from_lists(cols["file"], cols["offset"], cols["nbytes"], cols["crc"], block)
    return Manifest(
        world_size=1,
        files=files,
        chunks=table,
        tensors=tensors,
        objects={},
        per_rank={},
        metadata={"source": "safetensors"},
    )


def _files(store: Store) -> list[str]:
    """The files of the model: those its index names, else every top-level *.safetensors."""
    keys = set(store.list(""))
    if INDEX in keys:
        try:
            weight_map = json.loads(store.read(INDEX))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConversionError(f"{store.url}/{INDEX}: not a safetensors index ({exc})") from None
        missing = [f for f in files if f not in keys]
        if missing or any(not isinstance(f, str) or "/" in f for f in files):
            raise ConversionError(
                f"{store.url}/{INDEX}: names files that are not here: {missing[:3]}"
            )
        return files
    files = sorted(k for k in keys if k.endswith(".safetensors") and "/" not in k)
    if not files:
        raise CheckpointNotFoundError(f"{store.url}: no checkpoint and no *.safetensors here")
    return files


def _entries(data: memoryview, where: str) -> list[tuple[str, str, tuple[int, ...], int, int]]:
    """(name, dtype name, shape, begin, end) of every tensor of one file, validated."""
    out = []
    for e in read_entries(data, where)[0]:
        if e.dtype not in DTYPE_TO_NAME:
            raise ConversionError(f"{where}: tensor {e.name!r}: unsupported dtype {e.dtype}")
        out.append((e.name, DTYPE_TO_NAME[e.dtype], e.shape, e.begin, e.end))
    return out
