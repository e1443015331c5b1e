"""How checkpoint tensors look as zarr v3 arrays: the dtype zarr stores (raw bits for the
dtypes numpy lacks) and the regular chunk grid a saved layout maps to. Shared by the zarr
view of a checkpoint (``Checkpoint.zarr()``) and the zarr exporter."""

from __future__ import annotations

import itertools

import torch

from ckptstore.format.layouts import GridLayout
from ckptstore.format.manifest import TensorRecord

RAW_BITS = {
    torch.bfloat16: "uint16",
    torch.float8_e4m3fn: "uint8",
    torch.float8_e5m2: "uint8",
    torch.float8_e4m3fnuz: "uint8",
    torch.float8_e5m2fnuz: "uint8",
    torch.complex32: "uint32",
}
for _name in ("float8_e8m0fnu", "float4_e2m1fn_x2"):
    if hasattr(torch, _name):
        RAW_BITS[getattr(torch, _name)] = "uint8"
_INT_VIEW = {"uint8": torch.uint8, "uint16": torch.int16, "uint32": torch.int32}


def zarr_dtype(dtype: torch.dtype) -> tuple[str, bool]:
    """(numpy dtype name zarr stores, whether it holds the raw bits of ``dtype``)."""
    if dtype in RAW_BITS:
        return RAW_BITS[dtype], True
    return str(dtype).replace("torch.", ""), False


def to_numpy(region: torch.Tensor):
    """A numpy array zarr accepts: raw bits for dtypes numpy lacks."""
    import numpy as np

    name, raw = zarr_dtype(region.dtype)
    if raw:
        return region.contiguous().view(_INT_VIEW[name]).numpy().view(np.dtype(name))
    return region.contiguous().numpy()


def regular_chunks(rec: TensorRecord) -> tuple[int, ...] | None:
    """The chunk shape when the saved layout is a grid of identical chunks, else None."""
    layout = rec.layout
    if not isinstance(layout, GridLayout):
        return None
    shape = []
    for starts, n in zip(layout.starts, rec.shape, strict=True):
        bounds = [*starts, n]
        sizes = {b - a for a, b in itertools.pairwise(bounds)}
        if len(sizes) != 1:
            return None
        shape.append(sizes.pop())
    return tuple(shape)


def regular_grid(rec: TensorRecord) -> tuple[int, ...] | None:
    """The chunk shape of zarr's regular grid that the saved layout is, partial edge chunks
    included -- ``torch.chunk`` / DTensor ``Shard(d)`` splits: equal chunks and a smaller
    last one (37 rows over 4 ranks: 10, 10, 10, 7) -- else None (a truly irregular split)."""
    layout = rec.layout
    if not isinstance(layout, GridLayout):
        return None
    shape = []
    for starts, n in zip(layout.starts, rec.shape, strict=True):
        step = starts[1] - starts[0] if len(starts) > 1 else max(n, 1)
        if list(starts) != list(range(0, n, step)):
            return None
        shape.append(step)
    return tuple(shape)
