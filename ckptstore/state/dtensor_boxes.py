"""Where a DTensor's local data sits in its global tensor, at the cost of a dict lookup.

A box depends only on the mesh, the placements (and their shard order) and the global
shape -- and on this process's coordinate in the mesh, which a process never changes.
Boxes are cached under exactly those, read from each DTensor's spec at each call (a spec
changed in place gets its new box): the thousands of same-shaped norms of a model cost one
computation, and a fresh state_dict costs a tuple hash per DTensor, not a DTensorSpec
comparison. The mesh is keyed by identity and kept alive by its entry (its id cannot be
reused meanwhile); the cache is bounded (cleared past 65,536 entries).

Local tensors are read without an autograd node (``to_local`` builds one per call, the
largest per-tensor cost of a model's state_dict).
"""

from __future__ import annotations

from itertools import repeat
from operator import attrgetter, eq, itemgetter
from typing import Any

import torch

from ckptstore.errors import StateDictError

try:  # DTensor moved between torch releases; both spellings are public.
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch < 2.4
    from torch.distributed._tensor import DTensor  # type: ignore[no-redef]

Box = tuple[tuple[int, ...], tuple[int, ...]]

_BOXES: dict[tuple, tuple[Any, tuple[int, ...], Box]] = {}  # key -> (mesh, shape, box)
_BOXES_MAX = 1 << 16


def dtensor_local_and_box(t: DTensor) -> tuple[torch.Tensor, tuple[int, ...], Box]:
    """A DTensor's local tensor, its global shape and the box of the global tensor this rank
    holds (see the module docstring)."""
    spec = t._spec
    meta = spec.tensor_meta
    mesh, shape = spec.mesh, (meta.shape if meta is not None else t.shape)
    key = (id(mesh), spec.placements, shape, getattr(spec, "shard_order", None))
    known = _BOXES.get(key)
    if known is None:
        known = _remember(key, t, shape)
    local = t._local_tensor
    if local.shape != known[2][1]:
        raise _out_of_step(t, known[2])
    return local, known[1], known[2]


def dtensor_columns(
    values: list[DTensor],
) -> tuple[list[torch.Tensor], list[tuple[int, ...]], list[Box], list[torch.dtype]] | None:
    """:func:`dtensor_local_and_box` of many DTensors at once, in C-level passes (one per
    attribute) instead of a Python call each: their local tensors, global shapes, boxes and
    dtypes. None when one of them has no tensor metadata (the caller takes them one by one).
    """
    specs = list(map(_SPEC, values))
    metas = list(map(_META, specs))
    if None in metas:
        return None
    keys = list(
        zip(
            map(id, map(_MESH, specs)),
            map(_PLACEMENTS, specs),
            map(_META_SHAPE, metas),
            map(getattr, specs, repeat("shard_order"), repeat(None)),
            strict=True,
        )
    )
    known = list(map(_BOXES.get, keys))
    if None in known:  # the first DTensor of a spec: computed once, then looked up
        for i in [i for i, k in enumerate(known) if k is None]:
            known[i] = _BOXES.get(keys[i]) or _remember(keys[i], values[i], keys[i][2])
    locals_ = list(map(_LOCAL, values))
    boxes = list(map(_BOX, known))
    if not all(map(eq, map(_SHAPE, locals_), map(_BOX_SHAPE, boxes))):
        bad = next(
            i for i, (t, b) in enumerate(zip(locals_, boxes, strict=True)) if t.shape != b[1]
        )
        raise _out_of_step(values[bad], boxes[bad])
    return locals_, list(map(_GLOBAL_SHAPE, known)), boxes, list(map(_DTYPE, locals_))


_SPEC, _META, _MESH = attrgetter("_spec"), attrgetter("tensor_meta"), attrgetter("mesh")
_PLACEMENTS, _META_SHAPE, _LOCAL = (
    attrgetter("placements"),
    attrgetter("shape"),
    attrgetter("_local_tensor"),
)
_SHAPE, _DTYPE = attrgetter("shape"), attrgetter("dtype")
_GLOBAL_SHAPE, _BOX, _BOX_SHAPE = itemgetter(1), itemgetter(2), itemgetter(1)


def _remember(key: tuple, t: DTensor, shape: Any) -> tuple[Any, tuple[int, ...], Box]:
    known = (t._spec.mesh, tuple(shape), _compute_box(t))
    if len(_BOXES) >= _BOXES_MAX:
        _BOXES.clear()
    _BOXES[key] = known
    return known


def _out_of_step(t: DTensor, box: Box) -> StateDictError:
    return StateDictError(
        f"a DTensor's local tensor has shape {tuple(t._local_tensor.shape)} but its "
        f"placements {t.placements} give {box[1]} on this rank"
    )


def _compute_box(t: DTensor) -> Box:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(int(o) for o in offsets), tuple(int(s) for s in shape)
