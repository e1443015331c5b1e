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

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from itertools import repeat
from operator import attrgetter
from typing import Any, NamedTuple

import torch

from ckptstore.errors import StateDictError
from ckptstore.state.dtensor_boxes import Box, DTensor, dtensor_columns, dtensor_local_and_box

__all__ = [
    "Box",
    "DTensor",
    "FlatState",
    "Leaf",
    "PerRank",
    "Sharded",
    "TensorBlock",
    "flatten",
    "flatten_columns",
    "is_plain",
    "is_stateful",
]


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
    dtype: torch.dtype | None = None
    """A tensor leaf's dtype, read while flattening (when the tensor is in cache): the passes
    after it over tens of thousands of leaves need not touch each tensor again."""

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


class TensorBlock(NamedTuple):
    """The tensor leaves of one dict whose entries are all DTensors or all plain tensors (a
    model's or an optimizer's state), as columns: what a :class:`Leaf` per entry would
    hold, without building one per tensor (save and load read the columns)."""

    names: list[str]
    locals: list[torch.Tensor]
    shapes: list[tuple[int, ...]]
    boxes: list[Box]
    dtypes: list[torch.dtype]
    container: dict
    keys: list[str]

    def leaf(self, i: int) -> Leaf:
        """Entry ``i`` as a :class:`Leaf` (for the few that need one: a mismatch, say)."""
        return Leaf(
            self.names[i],
            "tensor",
            self.locals[i],
            self.shapes[i],
            self.boxes[i],
            self.container,
            self.keys[i],
            self.dtypes[i],
        )

    def leaves(self) -> Iterator[tuple[str, Leaf]]:
        """``(name, Leaf)`` of every entry, in order."""
        fields = zip(
            self.names,
            repeat("tensor"),
            self.locals,
            self.shapes,
            self.boxes,
            repeat(self.container),
            self.keys,
            self.dtypes,
        )
        return zip(self.names, map(_NEW_LEAF, fields), strict=True)


class FlatState:
    """A flattened state_dict as :func:`flatten_columns` returns it: the leaves outside
    tensor blocks by name (in traversal order), and the tensor blocks."""

    __slots__ = ("block_names", "blocks", "leaves")

    def __init__(self) -> None:
        self.leaves: dict[str, Leaf] = {}
        self.blocks: list[TensorBlock] = []
        self.block_names: set[str] = set()

    def __len__(self) -> int:
        return len(self.leaves) + len(self.block_names)

    def names(self) -> list[str]:
        """Every leaf's name: the other leaves', then each block's."""
        return [*self.leaves, *itertools.chain.from_iterable(b.names for b in self.blocks)]

    def locate(self) -> dict[str, tuple[Any, Any]]:
        """Where every tensor leaf sits: name -> (its container, its key)."""
        out = {name: (leaf.container, leaf.key) for name, leaf in self.leaves.items()}
        for b in self.blocks:
            out.update(zip(b.names, zip(repeat(b.container), b.keys), strict=True))
        return out


class _Walk:
    """What a walk adds to: the leaves, the Stateful objects met, and (for
    :func:`flatten_columns`) the tensor blocks with their names (None: a Leaf each)."""

    __slots__ = ("blocks", "leaves", "statefuls", "taken")

    def __init__(
        self,
        leaves: dict[str, Leaf],
        statefuls: list[tuple[Any, Any]] | None,
        flat: FlatState | None,
    ) -> None:
        self.leaves = leaves
        self.statefuls = statefuls
        self.blocks = None if flat is None else flat.blocks
        self.taken: set[str] = set() if flat is None else flat.block_names  # names in blocks


_BULK_MIN = 8
_SHAPE, _DTYPE = attrgetter("shape"), attrgetter("dtype")
_ZEROS = [(0,) * d for d in range(65)]  # the offsets of a whole tensor, by dimensions


def _tensor_dict_leaves(walk: _Walk, inner: dict, dot: str) -> bool:
    """The leaves of a dict whose entries are all DTensors or all plain tensors under
    string keys (a model's state_dict, FSDP2's or TP's), taken in C-level passes, one per
    attribute, instead of a Python loop per entry: added to the walk's leaves, or as one
    :class:`TensorBlock`. False (nothing added) for any other dict: the caller walks it
    entry by entry."""
    kinds = set(map(type, inner.values()))
    if len(kinds) != 1 or set(map(type, inner)) != {str} or (not dot and "" in inner):
        return False
    values = list(inner.values())
    if kinds == {DTensor}:
        columns = dtensor_columns(values)
        if columns is None:
            return False
        locals_, shapes, boxes, dtypes = columns
    elif kinds == {torch.Tensor}:
        locals_ = values
        shapes = list(map(tuple, map(_SHAPE, values)))
        if max(map(len, shapes)) >= len(_ZEROS):
            return False
        boxes = list(zip(map(_ZEROS.__getitem__, map(len, shapes)), shapes, strict=True))
        dtypes = list(map(_DTYPE, values))
    else:
        return False
    keys = list(inner)
    names = list(map(dot.__add__, keys))
    leaves, taken = walk.leaves, walk.taken
    if not leaves.keys().isdisjoint(names) or not taken.isdisjoint(names):
        raise _clash(next(name for name in names if name in leaves or name in taken))
    block = TensorBlock(names, locals_, shapes, boxes, dtypes, inner, keys)
    if walk.blocks is None:
        leaves.update(block.leaves())
    else:  # (a dict's keys are distinct, so are its names)
        taken.update(names)
        walk.blocks.append(block)
    return True


def _classify(name: str, value: Any, per_rank: bool) -> Leaf:
    if type(value) is torch.Tensor:  # the common case, without the isinstance chain
        shape = tuple(value.shape)
        kind = "rank_tensor" if per_rank else "tensor"
        return Leaf(name, kind, value, shape, ((0,) * len(shape), shape), dtype=value.dtype)
    if isinstance(value, DTensor):
        if per_rank:
            raise StateDictError(f"{name}: a DTensor cannot be PerRank")
        local, shape, box = dtensor_local_and_box(value)
        return Leaf(name, "tensor", local, shape, box, dtype=local.dtype)
    if isinstance(value, Sharded):
        if per_rank:
            raise StateDictError(f"{name}: a Sharded shard cannot be PerRank")
        local = value.local_tensor
        box = (value.offsets, tuple(local.shape))
        return Leaf(name, "tensor", local, value.global_shape, box, dtype=local.dtype)
    if isinstance(value, torch.Tensor):
        shape = tuple(value.shape)
        kind = "rank_tensor" if per_rank else "tensor"
        return Leaf(name, kind, value, shape, ((0,) * len(shape), shape), dtype=value.dtype)
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
    _visit(_Walk(leaves, statefuls, None), prefix, state_dict, None, None)
    return leaves


def flatten_columns(
    state_dict: Any, statefuls: list[tuple[Any, Any]] | None = None, prefix: str = ""
) -> FlatState:
    """:func:`flatten`, with the dicts of many tensors (a model's, an optimizer's) kept as
    :class:`TensorBlock` columns instead of a :class:`Leaf` each: what save and load take
    (tens of thousands of tensors). The same leaves, the same errors."""
    flat = FlatState()
    _visit(_Walk(flat.leaves, statefuls, flat), prefix, state_dict, None, None)
    return flat


def _visit(walk: _Walk, prefix: str, value: Any, container: Any, key: Any) -> None:
    """Add the leaves of ``value`` (named ``prefix``, held at ``container[key]``) to the
    walk. A module-level function, not a closure: a closure that calls itself is a
    reference cycle, which would keep every leaf (and the caller's tensors they hold) alive
    until the cyclic collector finds it."""
    leaves, taken = walk.leaves, walk.taken
    if type(value) is torch.Tensor and prefix:  # fast path for the most common leaf
        if prefix in leaves or prefix in taken:
            raise _clash(prefix)
        shape = tuple(value.shape)
        box = ((0,) * len(shape), shape)
        leaves[prefix] = Leaf(prefix, "tensor", value, shape, box, container, key, value.dtype)
        return
    per_rank = isinstance(value, PerRank)
    inner = value.value if per_rank else value
    if isinstance(inner, dict) and not per_rank:
        dot = f"{prefix}." if prefix else ""
        if len(inner) >= _BULK_MIN and _tensor_dict_leaves(walk, inner, dot):
            return
        new_leaf = _NEW_LEAF
        for k, child in inner.items():
            if type(child) is torch.Tensor and type(k) is str and (k or prefix):  # most leaves
                name = dot + k
                if name in leaves or name in taken:
                    raise _clash(name)
                shape = tuple(child.shape)
                box = ((0,) * len(shape), shape)
                leaves[name] = new_leaf((name, "tensor", child, shape, box, inner, k, child.dtype))
                continue
            if type(child) is DTensor and type(k) is str and (k or prefix):  # FSDP2, TP
                name = dot + k
                if name in leaves or name in taken:
                    raise _clash(name)
                local, shape, box = dtensor_local_and_box(child)
                leaves[name] = new_leaf((name, "tensor", local, shape, box, inner, k, local.dtype))
                continue
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise StateDictError(f"{prefix or '<root>'}: key {k!r} is not a str or int")
            _visit(walk, f"{prefix}.{k}" if prefix else str(k), child, inner, k)
        return
    if isinstance(inner, list) and not per_rank:
        for i, child in enumerate(inner):
            _visit(walk, f"{prefix}.{i}" if prefix else str(i), child, inner, i)
        return
    if not per_rank and is_stateful(inner):
        own = inner.state_dict()
        if walk.statefuls is not None:
            walk.statefuls.append((inner, own))
        _visit(walk, prefix, own, container, key)
        return
    if not prefix:
        raise StateDictError("state_dict must be a dict (or list) of leaves")
    if prefix in leaves or prefix in taken:
        raise _clash(prefix)
    leaf = _classify(prefix, inner, per_rank)
    where = (value, None) if per_rank else (container, key)
    leaves[prefix] = leaf._replace(container=where[0], key=where[1])
