"""Which ranks hold the same data as this one for a leaf of a state_dict: the replicas a
load may share its reads with (``ckptstore.loading.shared_reads``)."""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor

EVERY_RANK = "every rank"
"""A plain tensor: saved as replicated, the same on every rank."""
THIS_RANK = "this rank"
"""Data no other rank is known to hold (an explicitly declared shard, a per-rank entry)."""

_RANKS: dict[tuple[int, Any], tuple[Any, str]] = {}  # (id(mesh), placements) -> (mesh, ranks)
_RANKS_MAX = 1 << 12


def replica_class(value: Any) -> str:
    """A name for the set of ranks that hold what this rank holds of ``value``: for a DTensor
    the ranks of its mesh that differ from this one only along its ``Replicate()`` dims (a
    data-parallel group for HSDP's parameters, a TP group for a norm); for a plain tensor
    :data:`EVERY_RANK`; else :data:`THIS_RANK`. Ranks of one class name it alike."""
    if isinstance(value, DTensor):
        spec = value._spec
        key = (id(spec.mesh), spec.placements)
        known = _RANKS.get(key)
        if known is None:
            known = (spec.mesh, _replica_ranks(spec.mesh, spec.placements))
            if len(_RANKS) >= _RANKS_MAX:
                _RANKS.clear()
            _RANKS[key] = known  # the mesh stays alive with its entry: its id is not reused
        return known[1]
    if isinstance(value, torch.Tensor):
        return EVERY_RANK
    return THIS_RANK


def _replica_ranks(mesh: Any, placements: tuple[Any, ...]) -> str:
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the mesh
        return THIS_RANK
    index = tuple(
        slice(None) if p.is_replicate() else c for p, c in zip(placements, coordinate, strict=True)
    )
    ranks = sorted(int(r) for r in mesh.mesh[index].flatten().tolist())
    return "ranks " + ",".join(map(str, ranks)) if len(ranks) > 1 else THIS_RANK
