"""Where a DTensor's local data sits in its global tensor, at the cost of a dict lookup.

A box depends only on the mesh, the placements (and their shard order) and the global
shape -- and on this process's coordinate in the mesh, which a process never changes.
Boxes are cached under exactly those, read from each DTensor's spec at each call (a spec
changed in place gets its new box): the thousands of same-shaped norms of a model cost one
computation, and a fresh state_dict costs a tuple hash per DTensor, not a DTensorSpec
comparison. The mesh is keyed by identity and kept alive by its entry (its id cannot be
reused meanwhile); the cache is bounded (cleared past 65,536 entries).

A Placement's hash is a Python call and its ``==`` a pybind11 call: together the largest
cost of a cache lookup when every DTensor has its own ``Replicate()`` or ``Shard(0)``
objects (as ``from_local`` and FSDP2 make them). A DTensor whose placements are shown
equal to those of the call's first DTensor without either call (the same classes, and the
same ``dim`` of each ``Shard``) is looked up with None in their place.

Local tensors are read without an autograd node (``to_local`` builds one per call, the
largest per-tensor cost of a model's state_dict).
"""

from __future__ import annotations

from itertools import repeat
from operator import attrgetter, eq, itemgetter
from typing import Any

import torch

from ckptstore.errors import StateDictError
from ckptstore.state import tensor_fields

try:  # DTensor moved between torch releases; both spellings are public.
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch < 2.4
    from torch.distributed._tensor import (  # type: ignore[no-redef]
        DTensor,
        Replicate,
        Shard,
    )

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
    """:func:`dtensor_local_and_box` of many DTensors at once: their local tensors, global
    shapes, boxes and dtypes. None when one of them has no tensor metadata (the caller takes
    them one by one). One compiled loop reads each DTensor's attributes where the helper is
    built (:mod:`ckptstore.state.tensor_fields`), else C-level passes, one per attribute.
    Each key is hashed once, whether the cache knows it or not (a job's first load or save
    finds it empty, and a new mesh is a new key): a key met for the first time in this call
    costs one Python call, not each DTensor that has it.
    """
    if not values:
        return [], [], [], []
    if tensor_fields.compiled is not None:
        rows = tensor_fields.compiled.dtensor_rows(values, _Known(values), Replicate, Shard)
        if type(rows) is int:  # that DTensor's local tensor is out of step with its spec
            dtensor_local_and_box(values[rows])  # raises, naming it
            raise StateDictError(f"DTensor {rows} of a dict changed while it was flattened")
        return rows
    specs = list(map(_SPEC, values))
    metas = list(map(_META, specs))
    if None in metas:
        return None
    ids = list(map(id, map(_MESH, specs)))
    placements = list(map(_PLACEMENTS, specs))
    keys = zip(
        ids,
        placements if shared_placements(placements) is None else [None] * len(values),
        map(_META_SHAPE, metas),
        map(getattr, specs, repeat("shard_order"), repeat(None)),
        strict=True,
    )
    known = list(map(_Known(values).__getitem__, keys))
    locals_ = list(map(_LOCAL, values))
    boxes = list(map(_BOX, known))
    if not all(map(eq, map(_SHAPE, locals_), map(_BOX_SHAPE, boxes))):
        bad = next(
            i for i, (t, b) in enumerate(zip(locals_, boxes, strict=True)) if t.shape != b[1]
        )
        raise _out_of_step(values[bad], boxes[bad])
    return locals_, list(map(_GLOBAL_SHAPE, known)), boxes, list(map(_DTYPE, locals_))


def shared_placements(placements: list[tuple[Any, ...]]) -> tuple[Any, ...] | None:
    """``placements[0]`` when every tuple of ``placements`` equals it, shown with C-level
    passes: at each mesh dimension, all ``Replicate``, or all ``Shard`` of one tensor
    dimension (exactly those classes: a subclass may compare otherwise). None when that
    does not hold or cannot be shown so (``_StridedShard``, ``Partial``, mixed)."""
    first = placements[0] if placements else None
    if type(first) is not tuple or set(map(len, placements)) != {len(first)}:
        return None
    for dim, placement in enumerate(first):
        column = list(map(itemgetter(dim), placements))
        kinds = set(map(type, column))
        if kinds == {Replicate}:
            continue
        if kinds != {Shard} or set(map(_DIM, column)) != {placement.dim}:
            return None
    return first


class _Known(dict):
    """The boxes of one call's keys, ``(mesh id, placements, global shape, shard order)``:
    each key is looked up in the cache (or computed) on its first use in the call, then
    found here. Placements None stand for those of the call's first DTensor (see the
    module docstring). A mesh is found by its id among the call's DTensors, for a key the
    cache lacks: a call the cache knows builds nothing."""

    __slots__ = ("mesh_of", "values")

    def __init__(self, values: list[DTensor]) -> None:
        super().__init__()
        self.values = values
        self.mesh_of: dict[int, Any] = {}

    def __missing__(self, key: tuple) -> tuple[Any, tuple[int, ...], Box]:
        mesh_id, placements, shape, order = key
        if placements is None:
            placements = self.values[0]._spec.placements
        full = (mesh_id, placements, shape, order)
        known = _BOXES.get(full)
        if known is None:
            known = _remember(full, self._mesh(mesh_id))
        self[key] = known
        return known

    def _mesh(self, mesh_id: int) -> Any:
        """The mesh of that id: the first DTensor's on it (a state_dict uses a few meshes)."""
        if mesh_id not in self.mesh_of:
            for value in self.values:
                mesh = value._spec.mesh
                self.mesh_of.setdefault(id(mesh), mesh)
                if id(mesh) == mesh_id:
                    break
        return self.mesh_of[mesh_id]


_SPEC, _META, _MESH = attrgetter("_spec"), attrgetter("tensor_meta"), attrgetter("mesh")
_PLACEMENTS, _META_SHAPE, _LOCAL = (
    attrgetter("placements"),
    attrgetter("shape"),
    attrgetter("_local_tensor"),
)
_SHAPE, _DTYPE, _DIM = attrgetter("shape"), attrgetter("dtype"), attrgetter("dim")
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
