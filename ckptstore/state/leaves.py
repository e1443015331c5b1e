"""Flattening a nested state_dict into named leaves, and the leaf wrappers users declare.

Dicts and lists are walked and their keys joined with ``.``; what remains is a leaf:

* ``torch.Tensor``  -- replicated across ranks (every rank holds the same values), as in DCP;
* ``DTensor``       -- its local shard, placed by the device mesh and placements;
* :class:`Sharded`  -- an explicitly declared shard of a global tensor (Megatron, custom TP);
* :class:`PerRank`  -- a value or tensor that differs per rank (RNG state, loader position);
* a plain value (int, float, str, bool, None, tuples of them) -- rank 0's copy is saved;
* anything else needs pickling, which the caller must opt in to.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

import torch

from ckptstore.errors import StateDictError

try:  # DTensor moved between torch releases; both spellings are public.
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch < 2.4
    from torch.distributed._tensor import DTensor  # type: ignore[no-redef]


Box = tuple[tuple[int, ...], tuple[int, ...]]
"""(offsets, shape) of a region of a global tensor."""


@dataclass(frozen=True)
class Sharded:
    """An explicitly declared shard: ``local_tensor`` sits at ``offsets`` in ``global_shape``.

    Use it for tensors sharded by a framework that does not use DTensor. Shards on
    different ranks may repeat (replicas are written once) but must tile the tensor.
    """

    local_tensor: torch.Tensor
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]

    def __post_init__(self) -> None:
        shape, offs = tuple(self.global_shape), tuple(self.offsets)
        object.__setattr__(self, "global_shape", tuple(int(s) for s in shape))
        object.__setattr__(self, "offsets", tuple(int(o) for o in offs))
        local = tuple(self.local_tensor.shape)
        if not isinstance(self.local_tensor, torch.Tensor):
            raise StateDictError("Sharded.local_tensor must be a torch.Tensor")
        if len(local) != len(shape) or len(offs) != len(shape):
            raise StateDictError(
                f"Sharded: local shape {local}, global shape {shape} and offsets {offs} "
                "must have the same number of dimensions"
            )
        for d, (o, n, s) in enumerate(zip(offs, local, shape, strict=True)):
            if o < 0 or o + n > s:
                raise StateDictError(
                    f"Sharded: dimension {d}: shard [{o}, {o + n}) lies outside global size {s}"
                )


@dataclass(frozen=True)
class PerRank:
    """A value that differs per rank; each rank gets back the value it saved.

    When the world size changes at load time, what happens is chosen by the ``per_rank``
    option of :func:`ckptstore.load`: ``"error"`` (default), ``"keep"`` (leave the caller's
    value) or ``"wrap"`` (rank r takes the value saved by rank ``r % saved_world_size``).
    """

    value: Any


PLAIN_SCALARS = (bool, int, float, str, type(None))


def is_plain(value: Any) -> bool:
    """True for JSON-representable values: scalars and (nested) tuples of them."""
    if isinstance(value, PLAIN_SCALARS):
        return True
    if isinstance(value, tuple):
        return all(is_plain(v) for v in value)
    return False


class Leaf(NamedTuple):
    """One named leaf of a flattened state_dict (a tuple: a model has tens of thousands).

    ``kind`` is ``tensor`` (global, possibly sharded), ``value`` (plain), ``object`` (needs
    pickle), ``rank_tensor`` / ``rank_value`` / ``rank_object`` (per-rank variants).
    """

    name: str
    kind: str
    value: Any
    global_shape: tuple[int, ...] = ()
    box: Box = ((), ())
    container: Any = None
    """Where the leaf sits (its dict or list, or its PerRank wrapper), for :meth:`set_value`."""
    key: Any = None

    def __repr__(self) -> str:  # not the container: it may be a whole state_dict
        return f"Leaf({self.name!r}, {self.kind!r}, shape={list(self.global_shape)})"

    def set_value(self, new: Any) -> None:
        """Replace this leaf in the caller's state_dict (plain values are not filled in place)."""
        if isinstance(self.container, PerRank):
            object.__setattr__(self.container, "value", new)
        else:
            self.container[self.key] = new

    @property
    def local(self) -> torch.Tensor:
        """The tensor holding this rank's data for :attr:`box`."""
        return self.value


_NEW_LEAF = partial(tuple.__new__, Leaf)  # C-level construction, for the common leaf


_BOXES: dict[tuple, tuple[Any, tuple[int, ...], Box]] = {}  # key -> (mesh, shape, box)
_BOXES_MAX = 1 << 16


def dtensor_local_and_box(t: DTensor) -> tuple[torch.Tensor, tuple[int, ...], Box]:
    """A DTensor's local tensor, its global shape and the box of the global tensor this rank
    holds, at the cost of a dict lookup in steady state.

    The local tensor is read without an autograd node (``to_local`` builds one per call,
    the largest per-tensor cost of a model's state_dict). The box depends only on the mesh,
    the placements (and their shard order) and the global shape -- and on this process's
    coordinate in the mesh, which a process never changes. Boxes are cached under exactly
    those, read from the spec at each call (a spec changed in place gets its new box): the
    thousands of same-shaped norms of a model cost one computation, and a fresh state_dict
    costs a tuple hash per DTensor, not a DTensorSpec comparison. The mesh is keyed by
    identity and kept alive by its entry (its id cannot be reused meanwhile); the cache is
    bounded (cleared past 65,536 entries).
    """
    spec = t._spec
    meta = spec.tensor_meta
    mesh, shape = spec.mesh, (meta.shape if meta is not None else t.shape)
    key = (id(mesh), spec.placements, shape, getattr(spec, "shard_order", None))
    known = _BOXES.get(key)
    if known is None:
        known = (mesh, tuple(shape), _compute_box(t))
        if len(_BOXES) >= _BOXES_MAX:
            _BOXES.clear()
        _BOXES[key] = known
    local = t._local_tensor
    if local.shape != known[2][1]:  # a spec out of step with its data
        raise StateDictError(
            f"a DTensor's local tensor has shape {tuple(local.shape)} but its placements "
            f"{t.placements} give {known[2][1]} on this rank"
        )
    return local, known[1], known[2]


def _compute_box(t: DTensor) -> Box:
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(int(o) for o in offsets), tuple(int(s) for s in shape)


def _classify(name: str, value: Any, per_rank: bool) -> Leaf:
    if type(value) is torch.Tensor:  # the common case, without the isinstance chain
        shape = tuple(value.shape)
        kind = "rank_tensor" if per_rank else "tensor"
        return Leaf(name, kind, value, shape, ((0,) * len(shape), shape))
    if isinstance(value, DTensor):
        if per_rank:
            raise StateDictError(f"{name}: a DTensor cannot be PerRank")
        return Leaf(name, "tensor", *dtensor_local_and_box(value))
    if isinstance(value, Sharded):
        if per_rank:
            raise StateDictError(f"{name}: a Sharded shard cannot be PerRank")
        local = value.local_tensor
        return Leaf(name, "tensor", local, value.global_shape, (value.offsets, tuple(local.shape)))
    if isinstance(value, torch.Tensor):
        shape = tuple(value.shape)
        kind = "rank_tensor" if per_rank else "tensor"
        return Leaf(name, kind, value, shape, ((0,) * len(shape), shape))
    if is_plain(value):
        return Leaf(name, "rank_value" if per_rank else "value", value)
    return Leaf(name, "rank_object" if per_rank else "object", value)


def _clash(name: str) -> StateDictError:
    return StateDictError(f"two entries of the state_dict flatten to the same name {name!r}")


def is_stateful(value: Any) -> bool:
    """``value`` has ``state_dict()`` and ``load_state_dict()`` (the ``Stateful`` protocol of
    torch.distributed.checkpoint): a module, an optimizer, a scheduler, an app's own state
    object. Its state dict is saved in its place and handed back to it on load."""
    cls = type(value)
    return (
        not isinstance(value, torch.Tensor)
        and callable(getattr(cls, "state_dict", None))
        and callable(getattr(cls, "load_state_dict", None))
    )


def flatten(
    state_dict: Any, statefuls: list[tuple[Any, Any]] | None = None, prefix: str = ""
) -> dict[str, Leaf]:
    """Named leaves of ``state_dict`` in traversal order.

    Args:
        state_dict: nested dicts and lists ending in leaves (see the module docstring).
            A Stateful object (:func:`is_stateful`) stands for its ``state_dict()``.
        statefuls: if given, each Stateful met is appended with the state dict flattened in
            its place, as ``(object, state_dict)`` (a load hands the filled dict back).
        prefix: the name of ``state_dict`` itself: its leaves are named ``prefix.<path>``
            (a sub-tree of a larger state, as ``load(prefix=...)`` reads it).

    Raises:
        StateDictError: two paths flatten to the same name, or a key is not a str/int.
    """
    leaves: dict[str, Leaf] = {}
    new_leaf = _NEW_LEAF

    def visit(prefix: str, value: Any, container: Any, key: Any) -> None:
        if type(value) is torch.Tensor and prefix:  # fast path for the most common leaf
            if prefix in leaves:
                raise _clash(prefix)
            shape = tuple(value.shape)
            leaves[prefix] = Leaf(
                prefix, "tensor", value, shape, ((0,) * len(shape), shape), container, key
            )
            return
        per_rank = isinstance(value, PerRank)
        inner = value.value if per_rank else value
        if isinstance(inner, dict) and not per_rank:
            dot = f"{prefix}." if prefix else ""
            for k, child in inner.items():
                if type(child) is torch.Tensor and type(k) is str and (k or prefix):  # most leaves
                    name = dot + k
                    if name in leaves:
                        raise _clash(name)
                    shape = tuple(child.shape)
                    leaves[name] = new_leaf(
                        (name, "tensor", child, shape, ((0,) * len(shape), shape), inner, k)
                    )
                    continue
                if type(child) is DTensor and type(k) is str and (k or prefix):  # FSDP2, TP
                    name = dot + k
                    if name in leaves:
                        raise _clash(name)
                    local, shape, box = dtensor_local_and_box(child)
                    leaves[name] = new_leaf((name, "tensor", local, shape, box, inner, k))
                    continue
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise StateDictError(f"{prefix or '<root>'}: key {k!r} is not a str or int")
                visit(f"{prefix}.{k}" if prefix else str(k), child, inner, k)
            return
        if isinstance(inner, list) and not per_rank:
            for i, child in enumerate(inner):
                visit(f"{prefix}.{i}" if prefix else str(i), child, inner, i)
            return
        if not per_rank and is_stateful(inner):
            own = inner.state_dict()
            if statefuls is not None:
                statefuls.append((inner, own))
            visit(prefix, own, container, key)
            return
        if not prefix:
            raise StateDictError("state_dict must be a dict (or list) of leaves")
        if prefix in leaves:
            raise _clash(prefix)
        leaf = _classify(prefix, inner, per_rank)
        where = (value, None) if per_rank else (container, key)
        leaves[prefix] = leaf._replace(container=where[0], key=where[1])

    visit(prefix, state_dict, None, None)
    return leaves
