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
        known = _remember(key, mesh)
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
    Each key is hashed once, whether the cache knows it or not (a job's first load or save
    finds it empty, and a new mesh is a new key): a key met for the first time in this call
    costs one Python call, not each DTensor that has it.
    """
    specs = list(map(_SPEC, values))
    metas = list(map(_META, specs))
    if None in metas:
        return None
    meshes = list(map(_MESH, specs))
    ids = list(map(id, meshes))
    keys = zip(
        ids,
        map(_PLACEMENTS, specs),
        map(_META_SHAPE, metas),
        map(getattr, specs, repeat("shard_order"), repeat(None)),
        strict=True,
    )
    known = list(map(_Known(ids, meshes).__getitem__, keys))
    locals_ = list(map(_LOCAL, values))
    boxes = list(map(_BOX, known))
    if not all(map(eq, map(_SHAPE, locals_), map(_BOX_SHAPE, boxes))):
        bad = next(
            i for i, (t, b) in enumerate(zip(locals_, boxes, strict=True)) if t.shape != b[1]
        )
        raise _out_of_step(values[bad], boxes[bad])
    return locals_, list(map(_GLOBAL_SHAPE, known)), boxes, list(map(_DTYPE, locals_))


class _Known(dict):
    """The boxes of one call's keys: each key is looked up in the cache (or computed) on
    its first use in the call, then found here. The meshes by id (for a key the cache
    lacks) are gathered on the first such key only: a call the cache knows builds nothing."""

    __slots__ = ("ids", "mesh_of", "meshes")

    def __init__(self, ids: list[int], meshes: list[Any]) -> None:
        super().__init__()
        self.ids, self.meshes = ids, meshes
        self.mesh_of: dict[int, Any] | None = None

    def __missing__(self, key: tuple) -> tuple[Any, tuple[int, ...], Box]:
        known = _BOXES.get(key)
        if known is None:
            if self.mesh_of is None:
                self.mesh_of = dict(zip(self.ids, self.meshes, strict=True))
            known = _remember(key, self.mesh_of[key[0]])
        self[key] = known
        return known


_SPEC, _META, _MESH = attrgetter("_spec"), attrgetter("tensor_meta"), attrgetter("mesh")
_PLACEMENTS, _META_SHAPE, _LOCAL = (
    attrgetter("placements"),
    attrgetter("shape"),
    attrgetter("_local_tensor"),
)
_SHAPE, _DTYPE = attrgetter("shape"), attrgetter("dtype")
_GLOBAL_SHAPE, _BOX, _BOX_SHAPE = itemgetter(1), itemgetter(2), itemgetter(1)


def _remember(key: tuple, mesh: Any) -> tuple[Any, tuple[int, ...], Box]:
    """The box of ``key`` (mesh id, placements, global shape, shard order) on ``mesh``,
    computed and cached (with the mesh, so that its id is not reused while cached)."""
    shape = tuple(key[2])
    known = (mesh, shape, _compute_box(shape, mesh, key[1]))
    if len(_BOXES) >= _BOXES_MAX:
        _BOXES.clear()
    _BOXES[key] = known
    return known


def _out_of_step(t: DTensor, box: Box) -> StateDictError:
    return StateDictError(
        f"a DTensor's local tensor has shape {tuple(t._local_tensor.shape)} but its "
        f"placements {t.placements} give {box[1]} on this rank"
    )


def _compute_box(shape: tuple[int, ...], mesh: Any, placements: Any) -> Box:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local, offsets = compute_local_shape_and_global_offset(shape, mesh, placements)
    return tuple(int(o) for o in offsets), tuple(int(s) for s in local)
