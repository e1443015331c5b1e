"""Importing checkpoints written by other tools: a torch DCP directory, a ``torch.save`` file,
or safetensors files (one file, a directory, or a Hugging Face ``*.index.json``).

- safetensors: parsed natively; tensors are views of a memory map (no full copy in memory).
- ``torch.save``: ``torch.load(weights_only=True, mmap=True)`` -- tensors and plain values
  only, no arbitrary code.
- DCP: its ``.metadata`` file is a pickle, so reading it can run code; the caller must opt in
  (``trust=True``, ``ckpt import --trust``). Tensors are read in batches of bounded size.
  Entries DCP stored as pickled bytes become plain values, or pickled objects in the new
  checkpoint when they are not plain.
"""

from __future__ import annotations

import glob
import json
import mmap
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ckptstore.backends.base import Store
from ckptstore.errors import ConversionError, PickleNotAllowedError
from ckptstore.format.safetensors import read_entries
from ckptstore.interop.stream_writer import StreamingWriter

KINDS = ("dcp", "torch", "safetensors")


@dataclass(frozen=True)
class ImportInfo:
    src: str
    dst: str
    kind: str
    tensors: int
    bytes: int


def detect(src: str) -> str:
    """Which kind of checkpoint ``src`` is."""
    if os.path.isdir(src):
        if os.path.exists(os.path.join(src, ".metadata")):
            return "dcp"
        if glob.glob(os.path.join(src, "*.safetensors")):
            return "safetensors"
        raise ConversionError(
            f"{src}: a directory with neither a DCP .metadata file nor *.safetensors files"
        )
    if not os.path.exists(src):
        raise ConversionError(f"{src}: no such file or directory")
    if src.endswith(".safetensors") or src.endswith(".safetensors.index.json"):
        return "safetensors"
    return "torch"


def _safetensors_files(src: str) -> list[str]:
    if os.path.isdir(src):
        index = os.path.join(src, "model.safetensors.index.json")
        if os.path.exists(index):
            src = index
        else:
            return sorted(glob.glob(os.path.join(src, "*.safetensors")))
    if src.endswith(".index.json"):
        with open(src) as f:
            weight_map = json.load(f)["weight_map"]
        base = os.path.dirname(src)
        return [os.path.join(base, name) for name in sorted(set(weight_map.values()))]
    return [src]


def load_safetensors(src: str) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors file(s) at ``src``, as views of memory maps."""
    out: dict[str, torch.Tensor] = {}
    for path in _safetensors_files(src):
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else b""
        entries, _ = read_entries(mapped, path)  # validated: offsets inside, sizes exact
        for e in entries:
            if e.name in out:
                raise ConversionError(f"{path}: tensor {e.name!r} appears in two files")
            nbytes = e.end - e.begin
            if nbytes == 0:
                out[e.name] = torch.empty(e.shape, dtype=e.dtype)
                continue
            raw = torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=e.begin)
            out[e.name] = raw.view(e.dtype).view(e.shape)
    return out


def _dcp_load(batch: dict[str, Any], src: str) -> None:
    """DCP's single-process load, without its warning that torch.distributed is not
    initialized (an import is one process on purpose)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*distributed is disabled.*")
        warnings.filterwarnings("ignore", message=".*assuming the intent is to.*")
        dcp.load(batch, storage_reader=dcp.FileSystemReader(src), no_dist=True)


def _dcp_batches(src: str, trust: bool, max_memory: int):
    """A DCP checkpoint's entries, a batch of at most ``max_memory`` tensor bytes at a time
    (needs ``trust``: its metadata is a pickle)."""
    if not trust:
        raise PickleNotAllowedError(
            f"{src}: a torch DCP checkpoint's .metadata is a Python pickle, which can run code "
            "when read; import it only if you trust its origin (ckpt import --trust)"
        )
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    metadata = dcp.FileSystemReader(src).read_metadata()
    batch: dict[str, Any] = {}
    size = 0
    values: dict[str, Any] = {}
    for fqn, meta in metadata.state_dict_metadata.items():
        if isinstance(meta, BytesStorageMetadata):
            values[fqn] = None  # replaced by the unpickled object
            continue
        if not isinstance(meta, TensorStorageMetadata):
            continue
        nbytes = torch.Size(meta.size).numel() * meta.properties.dtype.itemsize
        if batch and size + nbytes > max_memory:
            _dcp_load(batch, src)
            yield batch
            batch, size = {}, 0
        batch[fqn] = torch.empty(meta.size, dtype=meta.properties.dtype)
        size += nbytes
    if batch:
        _dcp_load(batch, src)
        yield batch
    if values:
        dcp.load(values, storage_reader=dcp.FileSystemReader(src), no_dist=True)
        yield values


def _flat_entries(tree: Any):
    """(dotted name, tensor or value) of a nested dict/list as torch.load returns it."""
    from ckptstore.state.leaves import flatten

    for leaf in flatten(tree).values():
        yield leaf.name, leaf.value


def import_checkpoint(
    src: str,
    dst: str | os.PathLike[str] | Store,
    *,
    kind: str | None = None,
    trust: bool = False,
    overwrite: bool = False,
    max_memory: int = 1 << 30,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> ImportInfo:
    """Write the checkpoint at ``src`` (another tool's) as a ckptstore checkpoint at ``dst``.

    Entries are written one by one as they are read (safetensors and torch.save files through
    memory maps; DCP in batches of at most ``max_memory`` bytes), so a checkpoint larger than
    memory can be imported. The result is committed only once everything is written.
    ``progress(n)`` is told the bytes of each tensor written.
    """
    done = progress or (lambda n: None)
    kind = kind or detect(src)
    if kind not in KINDS:
        raise ConversionError(f"unknown source kind {kind!r}; use one of {KINDS}")
    if kind == "dcp" and not trust:
        next(_dcp_batches(src, trust, max_memory))  # raises with the reason
    writer = StreamingWriter(
        dst,
        overwrite=overwrite,
        allow_pickle=kind == "dcp",
        metadata={"imported_from": {"path": src, "kind": kind}},
        storage_options=storage_options,
    )
    try:
        if kind == "safetensors":
            for name, tensor in load_safetensors(src).items():
                writer.add_tensor(name, tensor)
                done(tensor.nbytes)
        elif kind == "dcp":
            for batch in _dcp_batches(src, trust, max_memory):
                for name, value in batch.items():
                    writer.add(name, value)
                    done(value.nbytes if isinstance(value, torch.Tensor) else 0)
        else:
            try:
                loaded = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise ConversionError(
                    f"{src}: not loadable with torch.load(weights_only=True): {exc}"
                ) from None
            if not isinstance(loaded, dict):
                raise ConversionError(
                    f"{src}: holds a {type(loaded).__name__}, not a dict of tensors"
                )
            for name, value in _flat_entries(loaded):
                writer.add(name, value)
                done(value.nbytes if isinstance(value, torch.Tensor) else 0)
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    return ImportInfo(src, writer.store.url, kind, len(writer.tensors), writer.bytes)
