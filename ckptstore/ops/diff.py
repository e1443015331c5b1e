"""Comparing two checkpoints tensor by tensor (``ckpt diff``).

Tensors saved with the same chunk geometry are compared by their chunk checksums first --
equal checksums mean equal bytes, and nothing is read. The others are read region by region
(bounded memory) and reduced to the largest absolute and relative difference. Different
dtypes or shapes and keys present on one side only are listed, never read.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ckptstore.backends.base import Store
from ckptstore.format.dtypes import dtype_from_name
from ckptstore.format.manifest import ObjectRecord, TensorRecord
from ckptstore.format.regions import bounded_regions
from ckptstore.loading.checkpoint import Checkpoint, open_checkpoint

_MiB = 1 << 20


@dataclass(frozen=True)
class EntryDiff:
    name: str
    status: str
    """``equal``, ``close`` (within atol), ``differs``, ``dtype``, ``shape``, ``only_a``,
    ``only_b``, ``ranks`` (a per-rank entry saved by different numbers of ranks)."""
    how: str = ""
    """How it was decided: ``checksums`` or ``values``; or what differs."""
    max_abs: float | None = None
    max_rel: float | None = None
    mismatched: int | None = None
    """Elements that differ (bitwise)."""


@dataclass
class DiffReport:
    a: str
    b: str
    entries: list[EntryDiff] = field(default_factory=list)

    @property
    def same(self) -> bool:
        return all(e.status in ("equal", "close") for e in self.entries)


def _same_geometry(ra: TensorRecord, rb: TensorRecord) -> bool:
    if ra.codec != rb.codec or ra.chunk_count != rb.chunk_count:
        return False
    la, lb = ra.layout, rb.layout
    if type(la) is not type(lb):
        return False
    if hasattr(la, "starts"):
        return la.starts == lb.starts  # type: ignore[union-attr]
    return bool(
        np.array_equal(la.offsets, lb.offsets) and np.array_equal(la.shapes, lb.shapes)  # type: ignore[union-attr]
    )


def _crcs(ck: Checkpoint, rec: TensorRecord) -> tuple[np.ndarray, np.ndarray]:
    t = ck.manifest.chunks
    lo, hi = rec.chunk_start, rec.chunk_start + rec.chunk_count
    a, b = int(t.crc_first[lo]), int(t.crc_first[hi])
    return t.nbytes[lo:hi], t.crc32c[a:b]


def _compare_values(
    ca: Checkpoint, cb: Checkpoint, name: str, rec: TensorRecord, atol: float, max_memory: int
) -> EntryDiff:
    dtype = dtype_from_name(rec.dtype)
    size = dtype.itemsize
    max_abs = max_rel = 0.0
    mismatched = 0
    floating = dtype.is_floating_point or dtype.is_complex
    for index in bounded_regions(rec.shape, 2 * size, max_memory):
        x, y = ca.read(name, index), cb.read(name, index)
        bits_x = x.reshape(-1).view(torch.uint8).view(-1, size)
        bits_y = y.reshape(-1).view(torch.uint8).view(-1, size)
        diff_mask = (bits_x != bits_y).any(dim=1)
        n = int(diff_mask.sum())
        if not n:
            continue
        mismatched += n
        if x.dtype == torch.bool:
            max_abs = max(max_abs, 1.0)
            continue
        xv = x.reshape(-1)[diff_mask]
        yv = y.reshape(-1)[diff_mask]
        wide = torch.complex128 if x.is_complex() else torch.float64
        d = (xv.to(wide) - yv.to(wide)).abs()
        both_nan = xv.to(wide).isnan() & yv.to(wide).isnan() if floating else None
        if both_nan is not None:
            d = torch.where(both_nan, torch.zeros_like(d), d)
            mismatched -= int(both_nan.sum())
        if d.numel():
            d = torch.nan_to_num(d, nan=float("inf"))
            max_abs = max(max_abs, float(d.max()))
            ref = yv.to(wide).abs().clamp_min(torch.finfo(torch.float64).tiny)
            max_rel = max(max_rel, float((d / ref).max()))
    if mismatched == 0:
        return EntryDiff(name, "equal", "values", 0.0, 0.0, 0)
    status = "close" if max_abs <= atol else "differs"
    return EntryDiff(name, status, "values", max_abs, max_rel, mismatched)


def diff_checkpoints(
    a: str | os.PathLike[str] | Store,
    b: str | os.PathLike[str] | Store,
    *,
    tensors: str | None = None,
    atol: float = 0.0,
    max_memory: int = 128 * _MiB,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> DiffReport:
    """Which tensors, values and per-rank entries (names matching the glob ``tensors``)
    differ between a and b. ``progress(n)`` is told the bytes of each tensor compared."""
    ca = open_checkpoint(a, storage_options=storage_options)
    cb = open_checkpoint(b, storage_options=storage_options)
    done = progress or (lambda n: None)
    report = DiffReport(ca.url, cb.url)

    def wanted(name: str) -> bool:
        return tensors is None or fnmatch.fnmatchcase(name, tensors)

    ta, tb = ca.manifest.tensors, cb.manifest.tensors
    for name in sorted(n for n in set(ta) | set(tb) if wanted(n)):
        if name not in tb:
            report.entries.append(EntryDiff(name, "only_a"))
            continue
        if name not in ta:
            report.entries.append(EntryDiff(name, "only_b"))
            continue
        ra, rb = ta[name], tb[name]
        done(ra.nbytes)
        if ra.dtype != rb.dtype:
            report.entries.append(EntryDiff(name, "dtype", f"{ra.dtype} vs {rb.dtype}"))
            continue
        if ra.shape != rb.shape:
            report.entries.append(EntryDiff(name, "shape", f"{list(ra.shape)} vs {list(rb.shape)}"))
            continue
        if _same_geometry(ra, rb):
            na, crc_a = _crcs(ca, ra)
            nb, crc_b = _crcs(cb, rb)
            if np.array_equal(na, nb) and np.array_equal(crc_a, crc_b):
                report.entries.append(EntryDiff(name, "equal", "checksums", 0.0, 0.0, 0))
                continue
        report.entries.append(_compare_values(ca, cb, name, ra, atol, max_memory))
    oa, ob = ca.manifest.objects, cb.manifest.objects
    for name in sorted(n for n in set(oa) | set(ob) if wanted(n)):
        if name not in ob:
            report.entries.append(EntryDiff(name, "only_a"))
        elif name not in oa:
            report.entries.append(EntryDiff(name, "only_b"))
        elif oa[name].blob is not None or ob[name].blob is not None:
            same = (
                oa[name].blob is not None
                and ob[name].blob is not None
                and (
                    oa[name].blob.crc32c == ob[name].blob.crc32c  # type: ignore[union-attr]
                )
            )
            report.entries.append(EntryDiff(name, "equal" if same else "differs", "checksums"))
        else:
            va, vb = oa[name].value, ob[name].value
            report.entries.append(
                EntryDiff(name, "equal", "values")
                if va == vb
                else EntryDiff(name, "differs", f"{va!r} vs {vb!r}"[:120])
            )
    pa, pb = ca.manifest.per_rank, cb.manifest.per_rank
    for name in sorted(n for n in set(pa) | set(pb) if wanted(n)):
        if name not in pb:
            report.entries.append(EntryDiff(name, "only_a", "per-rank"))
        elif name not in pa:
            report.entries.append(EntryDiff(name, "only_b", "per-rank"))
        elif len(pa[name]) != len(pb[name]):
            report.entries.append(
                EntryDiff(name, "ranks", f"saved by {len(pa[name])} vs {len(pb[name])} ranks")
            )
        else:
            report.entries.append(_compare_per_rank(ca, cb, name))
    return report


def _compare_per_rank(ca: Checkpoint, cb: Checkpoint, name: str) -> EntryDiff:
    """One per-rank entry, rank by rank: tensors by their checksums, values by value."""
    for rank, (ea, eb) in enumerate(
        zip(ca.manifest.per_rank[name], cb.manifest.per_rank[name], strict=True)
    ):
        if isinstance(ea, TensorRecord) and isinstance(eb, TensorRecord):
            if ea.dtype != eb.dtype or ea.shape != eb.shape:
                what = f"rank {rank}: {ea.dtype}{list(ea.shape)} vs {eb.dtype}{list(eb.shape)}"
                return EntryDiff(name, "differs", what)
            na, crc_a = _crcs(ca, ea)
            nb, crc_b = _crcs(cb, eb)
            if ea.codec == eb.codec:
                same = np.array_equal(na, nb) and np.array_equal(crc_a, crc_b)
            else:  # stored differently: compare what they decode to
                same = torch.equal(ca.read(name, rank=rank), cb.read(name, rank=rank))
            if not same:
                return EntryDiff(name, "differs", f"rank {rank}: checksums")
        elif isinstance(ea, ObjectRecord) and isinstance(eb, ObjectRecord):
            if ea.blob is not None or eb.blob is not None:
                same = (
                    ea.blob is not None and eb.blob is not None and ea.blob.crc32c == eb.blob.crc32c
                )
            else:
                same = ea.value == eb.value
            if not same:
                return EntryDiff(name, "differs", f"rank {rank}: values")
        else:
            return EntryDiff(name, "differs", f"rank {rank}: a tensor vs a value")
    return EntryDiff(name, "equal", "per-rank")
