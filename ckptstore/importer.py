"""Importing checkpoints written by other tools: a torch DCP directory, a ``torch.save`` file,
or safetensors files (one file, a directory, or a Hugging Face ``*.index.json``).

- safetensors: parsed natively; tensors are views of a memory map (no full copy in memory).
- ``torch.save``: ``torch.load(weights_only=True, mmap=True)`` -- tensors and plain values
  only, no arbitrary code.
- DCP: its ``.metadata`` file is a pickle, so reading it can run code; the caller must opt in
  (``trust=True``, ``ckpt import --trust``). Entries DCP stored as pickled bytes become plain
  values, or pickled objects in the new checkpoint when they are not plain.
"""

from __future__ import annotations

import glob
import json
import mmap
import os
from dataclasses import dataclass
from typing import Any

import torch

from ckptstore.backends.base import Store
from ckptstore.errors import ConversionError, PickleNotAllowedError
from ckptstore.safetensors_format import read_header
from ckptstore.save import save

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
            entries, _ = read_header(f, path)
            size = os.fstat(f.fileno()).st_size
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else b""
        for e in entries:
            if e.end > size or e.begin > e.end:
                raise ConversionError(f"{path}: tensor {e.name!r} lies outside the file")
            if e.name in out:
                raise ConversionError(f"{path}: tensor {e.name!r} appears in two files")
            nbytes = e.end - e.begin
            if nbytes == 0:
                out[e.name] = torch.empty(e.shape, dtype=e.dtype)
                continue
            raw = torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=e.begin)
            t = raw.view(e.dtype)
            if t.numel() != torch.Size(e.shape).numel():
                raise ConversionError(
                    f"{path}: tensor {e.name!r}: {nbytes} bytes do not hold {e.dtype}{list(e.shape)}"
                )
            out[e.name] = t.view(e.shape)
    return out


def load_dcp(src: str, trust: bool) -> dict[str, Any]:
    """A DCP checkpoint's entries by their flattened names (needs ``trust``: pickled metadata)."""
    if not trust:
        raise PickleNotAllowedError(
            f"{src}: a torch DCP checkpoint's .metadata is a Python pickle, which can run code "
            "when read; import it only if you trust its origin (ckpt import --trust)"
        )
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    reader = dcp.FileSystemReader(src)
    metadata = reader.read_metadata()
    sd: dict[str, Any] = {}
    for fqn, meta in metadata.state_dict_metadata.items():
        if isinstance(meta, TensorStorageMetadata):
            sd[fqn] = torch.empty(meta.size, dtype=meta.properties.dtype)
        elif isinstance(meta, BytesStorageMetadata):
            sd[fqn] = None  # replaced by the unpickled object
    dcp.load(sd, storage_reader=reader, no_dist=True)
    return sd


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Dotted names -> nested dicts, so the new checkpoint has the same flattened names."""
    out: dict[str, Any] = {}
    for name, value in flat.items():
        node = out
        parts = name.split(".")
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConversionError(f"entry {name!r} clashes with entry {p!r}")
            node = child
        if parts[-1] in node:
            raise ConversionError(f"entry {name!r} clashes with another entry")
        node[parts[-1]] = value
    return out


def import_checkpoint(
    src: str,
    dst: str | os.PathLike[str] | Store,
    *,
    kind: str | None = None,
    trust: bool = False,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> ImportInfo:
    """Write the checkpoint at ``src`` (another tool's) as a ckptstore checkpoint at ``dst``."""
    kind = kind or detect(src)
    if kind not in KINDS:
        raise ConversionError(f"unknown source kind {kind!r}; use one of {KINDS}")
    allow_pickle = False
    if kind == "safetensors":
        state: dict[str, Any] = _nest(load_safetensors(src))
    elif kind == "dcp":
        state = _nest(load_dcp(src, trust))
        allow_pickle = True  # the caller trusted the source's pickles already
    else:
        try:
            loaded = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise ConversionError(
                f"{src}: not loadable with torch.load(weights_only=True): {exc}"
            ) from None
        if not isinstance(loaded, dict):
            raise ConversionError(f"{src}: holds a {type(loaded).__name__}, not a dict of tensors")
        state = loaded
    info = save(state, dst, allow_pickle=allow_pickle, overwrite=overwrite,
                storage_options=storage_options)  # fmt: skip
    return ImportInfo(src, info.path, kind, info.tensors, info.total_bytes)
