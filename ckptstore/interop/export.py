"""Consolidated exports of a checkpoint: safetensors (Hugging Face layout), one ``torch.save``
file, or a zarr v3 group. Every format is written tensor by tensor, region by region
(:mod:`ckptstore.format.regions`), so memory stays bounded by ``max_memory`` whatever the size.

Per-rank entries and plain values are not tensors of the model and are not exported (they
are listed in :attr:`ExportInfo.skipped`).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ckptstore.backends.base import Store
from ckptstore.backends.local import WRITE_SLICE
from ckptstore.errors import ConversionError
from ckptstore.format.dtypes import dtype_from_name
from ckptstore.format.manifest import TensorRecord
from ckptstore.format.regions import bounded_regions
from ckptstore.format.safetensors import encode_header, st_dtype
from ckptstore.format.zarr import regular_chunks, to_numpy, zarr_dtype
from ckptstore.interop.hf_names import hf_key_map
from ckptstore.interop.key_map import KeyMap
from ckptstore.loading.checkpoint import Checkpoint, open_checkpoint
from ckptstore.state.tensor_bytes import as_bytes

FORMATS = ("hf", "safetensors", "torch", "zarr")
DTYPE_ALIASES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp64": torch.float64,
    "float64": torch.float64,
}
_MiB = 1 << 20


@dataclass
class ExportInfo:
    out: str
    format: str
    tensors: int
    bytes: int
    files: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def parse_dtype(text: str | None) -> torch.dtype | None:
    if text is None:
        return None
    try:
        return DTYPE_ALIASES[text.lower()]
    except KeyError:
        raise ConversionError(f"--dtype {text!r}: use one of {sorted(DTYPE_ALIASES)}") from None


def selected(ckpt: Checkpoint, pattern: str | None) -> list[tuple[str, TensorRecord]]:
    """The checkpoint's global tensors whose names match ``pattern`` (all without one)."""
    items = [
        (n, r)
        for n, r in ckpt.manifest.tensors.items()
        if pattern is None or fnmatch.fnmatchcase(n, pattern)
    ]
    if pattern is not None and not items:
        raise ConversionError(f"{ckpt.url}: no tensor matches {pattern!r}")
    return items


def _out_dtype(rec: TensorRecord, cast: torch.dtype | None) -> torch.dtype:
    dtype = dtype_from_name(rec.dtype)
    return cast if cast is not None and dtype.is_floating_point else dtype


def stream_tensor(
    ckpt: Checkpoint, name: str, rec: TensorRecord, out_dtype: torch.dtype, max_memory: int
):
    """(index, region) of tensor ``name`` in C order, each region at most ``max_memory``."""
    itemsize = max(dtype_from_name(rec.dtype).itemsize, out_dtype.itemsize)
    for index in bounded_regions(rec.shape, itemsize, max_memory):
        region = ckpt.read(name, index)
        yield index, region if region.dtype == out_dtype else region.to(out_dtype)


def export_checkpoint(
    path: str | os.PathLike[str] | Store | Checkpoint,
    out: str | os.PathLike[str],
    *,
    format: str,
    tensors: str | None = None,
    dtype: str | torch.dtype | None = None,
    max_shard_bytes: int = 5 << 30,
    max_memory: int = 256 * _MiB,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
    key_map: KeyMap | None = None,
) -> ExportInfo:
    """Write the checkpoint's tensors (matching the glob ``tensors``) consolidated to ``out``.

    Args:
        format: ``"hf"`` (safetensors as Hugging Face's ``from_pretrained`` reads it, under
            the model's own names: see :mod:`ckptstore.interop.hf_names`; ``key_map``
            overrides the names), ``"safetensors"`` (``out`` is a directory: ``model.safetensors``, or
            ``model-0000k-of-0000n.safetensors`` files of at most ``max_shard_bytes`` and a
            ``model.safetensors.index.json``), ``"torch"`` (``out`` is one ``torch.save``
            file of ``{name: tensor}``, loadable with ``torch.load(weights_only=True)``) or
            ``"zarr"`` (``out`` is a zarr v3 group; bfloat16/float8 as raw bits, see docs).
        dtype: cast floating-point tensors (``"bf16"``, ``"fp16"``, ``"fp32"``).
        max_memory: the largest region held in memory at a time.
        key_map: which entries go out under which names (a sub-tree such as ``model`` of a
            training checkpoint, prefixes stripped, renamed or added); ``tensors`` matches
            the checkpoint's names.
    """
    if format not in FORMATS:
        raise ConversionError(f"unknown export format {format!r}; use one of {FORMATS}")
    cast = parse_dtype(dtype) if isinstance(dtype, str) or dtype is None else dtype
    ckpt = open_checkpoint(path, storage_options=storage_options)
    items = selected(ckpt, tensors)
    skipped = [*ckpt.manifest.objects, *ckpt.manifest.per_rank]
    source: Any = ckpt
    if format == "hf" and not key_map:
        key_map = hf_key_map(name for name, _ in items)
    if key_map:
        names = key_map.apply([name for name, _ in items], ckpt.url)
        records = dict(items)
        skipped += [name for name, _ in items if not key_map.selects(name)]
        items = [(new, records[old]) for new, old in names.items()]
        source = _Renamed(ckpt, names)
    writer = {"hf": _safetensors, "safetensors": _safetensors, "torch": _torch_file, "zarr": _zarr}[
        format
    ]
    files, nbytes = writer(source, items, str(out), cast, max_shard_bytes, max_memory, progress)
    return ExportInfo(str(out), format, len(items), nbytes, files, skipped)


class _Renamed:
    """A checkpoint read under the exported names (what the writers see)."""

    def __init__(self, ckpt: Checkpoint, source_of: dict[str, str]) -> None:
        self._ckpt, self._source_of = ckpt, source_of
        self.url = ckpt.url

    def read(self, name: str, index: Any = None) -> Any:
        return self._ckpt.read(self._source_of[name], index)


def _safetensors(ckpt, items, out, cast, max_shard_bytes, max_memory, progress):
    plan = []
    for name, rec in items:
        odt = _out_dtype(rec, cast)
        st_dtype(odt, name)  # fail before writing anything
        plan.append((name, rec, odt, rec.numel * odt.itemsize))
    shards: list[list[tuple]] = [[]]
    size = 0
    for entry in plan:
        if shards[-1] and size + entry[3] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry[3]
    os.makedirs(out, exist_ok=True)
    n = len(shards)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    total = 0
    weight_map = {}
    for fname, shard in zip(names, shards, strict=True):
        header = encode_header(
            [(name, odt, rec.shape, nb) for name, rec, odt, nb in shard], {"format": "pt"}
        )
        tmp = os.path.join(out, f".{fname}.partial")
        with open(tmp, "wb") as f:
            f.write(header)
            for name, rec, odt, nb in shard:
                for _, region in stream_tensor(ckpt, name, rec, odt, max_memory):
                    dense = region.contiguous()  # alive while its bytes are written
                    data = as_bytes(dense)
                    for at in range(0, len(data), WRITE_SLICE):  # the kernel's cheapest size
                        f.write(data[at : at + WRITE_SLICE])
                    if progress:
                        progress(region.numel() * region.element_size())
                weight_map[name] = fname
                total += nb
        os.replace(tmp, os.path.join(out, fname))
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
        names.append("model.safetensors.index.json")
    return names, total


def _torch_file(ckpt, items, out, cast, max_shard_bytes, max_memory, progress):
    """``torch.save`` of ``{name: tensor}`` whose tensors live in file-backed memory while they
    are filled and saved: the page cache holds them, not the process's anonymous memory."""
    directory = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(directory, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=".ckpt-export-", dir=directory)
    total = 0
    try:
        result: dict[str, torch.Tensor] = {}
        for i, (name, rec) in enumerate(items):
            odt = _out_dtype(rec, cast)
            numel = rec.numel
            if numel == 0:
                result[name] = torch.empty(rec.shape, dtype=odt)
                continue
            backing = os.path.join(scratch, f"{i}.bin")
            with open(backing, "wb") as f:
                f.truncate(numel * odt.itemsize)
            flat = torch.from_file(backing, shared=True, size=numel, dtype=odt)
            target = flat.view(rec.shape)
            for index, region in stream_tensor(ckpt, name, rec, odt, max_memory):
                target[index].copy_(region)
                if progress:
                    progress(region.numel() * region.element_size())
            result[name] = target
            total += numel * odt.itemsize
        tmp = f"{out}.partial"
        torch.save(result, tmp)
        del result
        os.replace(tmp, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return [str(out)], total


# -- zarr ---------------------------------------------------------------------------------
def _default_chunks(rec: TensorRecord, itemsize: int, target: int = 64 * _MiB) -> tuple[int, ...]:
    if not rec.shape:
        return ()
    row = max(1, rec.numel // max(rec.shape[0], 1)) * itemsize
    return (max(1, min(rec.shape[0], target // max(row, 1))), *rec.shape[1:])


def _zarr(ckpt, items, out, cast, max_shard_bytes, max_memory, progress):
    import zarr

    group = zarr.open_group(out, mode="w", zarr_format=3)
    group.attrs.update({"ckptstore_source": ckpt.url, "world_size": ckpt.world_size})
    total = 0
    for name, rec in items:
        odt = _out_dtype(rec, cast)
        zdt, raw = zarr_dtype(odt)
        chunks = regular_chunks(rec) or _default_chunks(rec, odt.itemsize)
        if 0 in chunks:
            chunks = tuple(max(1, c) for c in chunks)
        arr = group.create_array(
            name,
            shape=rec.shape,
            chunks=chunks,
            dtype=zdt,
            compressors=None,
            fill_value=0,
            attributes={"torch_dtype": str(odt).replace("torch.", ""), "raw_bits": raw},
        )
        # write slabs of whole chunk rows along dim 0, each within max_memory
        if not rec.shape:
            arr[...] = to_numpy(ckpt.read(name).to(odt))
            total += odt.itemsize
            continue
        row = max(1, rec.numel // max(rec.shape[0], 1)) * odt.itemsize
        step = chunks[0] * max(1, max_memory // max(row * chunks[0], 1))
        for lo in range(0, rec.shape[0], step):
            hi = min(lo + step, rec.shape[0])
            region = ckpt.read(name, (slice(lo, hi),)).to(odt)
            arr[lo:hi] = to_numpy(region)
            if progress:
                progress(region.numel() * region.element_size())
        total += rec.numel * odt.itemsize
    return [str(out)], total
