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
import math

from ckptstore import knobs
from ckptstore.backends.base import Store
from ckptstore.errors import CheckpointNotFoundError, ConversionError
from ckptstore.format.checksum import block_crcs
from ckptstore.format.dtypes import DTYPE_TO_NAME
from ckptstore.format.layouts import whole_layout
from ckptstore.format.manifest import ChunkTable, Manifest, TensorRecord
from ckptstore.format.safetensors import ST_TO_TORCH

INDEX = "model.safetensors.index.json"
_MAX_HEADER = 100 << 20


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
    if len(data) < 8:
        raise ConversionError(f"{where}: not a safetensors file (shorter than 8 bytes)")
    n = int.from_bytes(data[:8], "little")
    if n > min(_MAX_HEADER, len(data) - 8):
        raise ConversionError(f"{where}: a header of {n} bytes is not plausible")
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
    except ValueError as exc:
        raise ConversionError(f"{where}: the header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{where}: the header is not a JSON object")
    header.pop("__metadata__", None)
    base, out = 8 + n, []
    for name, info in header.items():
        try:
            dtype = ST_TO_TORCH[info["dtype"]]
            begin, end = (base + int(x) for x in info["data_offsets"])
            shape = tuple(int(x) for x in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{where}: tensor {name!r}: unsupported entry") from None
        if dtype not in DTYPE_TO_NAME or any(d < 0 for d in shape):
            raise ConversionError(f"{where}: tensor {name!r}: unsupported dtype or shape")
        if not base <= begin <= end <= len(data):
            raise ConversionError(f"{where}: tensor {name!r} lies outside the file")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ConversionError(
                f"{where}: tensor {name!r}: {end - begin} bytes do not hold {dtype}{list(shape)}"
            )
        out.append((name, DTYPE_TO_NAME[dtype], shape, begin, end))
    return out
