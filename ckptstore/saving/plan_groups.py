"""Planning group by group: ranks that share no tensor are planned apart, by different ranks.

Ranks are in one planning group when their declaration lists share a tensor name, directly
or through other ranks (a pipeline-parallel job: one group per stage; a job without
pipeline stages: one group). A group's chunks, writers and layouts depend on its own ranks'
declarations only, so each group is planned by its leader (its lowest rank) and the
coordinator only joins the groups' plans: the planning work is split by the number of
stages instead of landing on one rank.

Pure functions on plain numbers; the exchange between ranks is ``plan_exchange``.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter

import numpy as np

from ckptstore.saving.plan import GlobalPlan, RankPlan, TensorDecl, plan_save


def plan_groups(decl_lists: dict[int, list[TensorDecl]]) -> dict[int, int]:
    """The planning group of every declaration list (by its ``decl_key``): lists that share
    a tensor name, directly or through others, are in one group. Groups are numbered in the
    order of their first list in ``decl_lists``. Each list costs C-level passes over its
    names (most jobs have one list, or disjoint ones: one per pipeline stage), not a Python
    step per tensor."""
    keys = list(decl_lists)
    parent = list(range(len(keys)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}  # name -> a list that declares it
    for i, key in enumerate(keys):
        names = list(map(_NAME, decl_lists[key]))
        shared = owner.keys() & names
        for j in set(map(owner.__getitem__, shared)):
            a, b = root(i), root(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
        owner.update(dict.fromkeys(names, i))  # shared names: now one group either way
    number: dict[int, int] = {}
    return {key: number.setdefault(root(i), len(number)) for i, key in enumerate(keys)}


_NAME = attrgetter("name")


def group_ranks(decl_keys: Sequence[int], group_of: dict[int, int]) -> list[list[int]]:
    """The ranks of every group, each in rank order (``decl_keys[r]``: rank r's key)."""
    groups: list[list[int]] = [[] for _ in range(max(group_of.values(), default=-1) + 1)]
    for rank, key in enumerate(decl_keys):
        groups[group_of[key]].append(rank)
    return groups


def plan_group(rank_plans: list[RankPlan], ranks: list[int]) -> GlobalPlan:
    """One group's plan (``rank_plans[i]`` is rank ``ranks[i]``'s): chunks numbered from 0,
    writers as job ranks, ``writes[i]`` for ``ranks[i]``.

    Raises:
        ShardingError: as :func:`plan_save`, for the group's tensors.
    """
    plan = plan_save(rank_plans)
    plan.chunk_writer = np.asarray(ranks, dtype=np.int32)[plan.chunk_writer]
    return plan


def join_plans(parts: list[GlobalPlan], plan_id: int) -> GlobalPlan:
    """The job's plan from its groups' plans (in group order): tensors group after group,
    each group's chunks numbered on from the previous group's. Writes stay with the ranks
    (a rank writes for one group only: the slots are unchanged)."""
    if len(parts) == 1:
        (only,) = parts
        only.plan_id = plan_id
        return only
    tensors: list[TensorDecl] = []
    chunk_start: list[int] = []
    layouts = []
    base = 0
    for part in parts:  # a part's chunk_start ends with its chunk count: one end for all
        tensors += part.tensors
        chunk_start += [base + s for s in part.chunk_start[:-1]]
        layouts += part.layouts
        base += part.chunk_count
    chunk_start.append(base)
    return GlobalPlan(
        plan_id=plan_id,
        tensors=tensors,
        chunk_start=chunk_start,
        layouts=layouts,
        chunk_nbytes=np.concatenate([p.chunk_nbytes for p in parts]),
        chunk_writer=np.concatenate([p.chunk_writer for p in parts]),
        chunk_slot=np.concatenate([p.chunk_slot for p in parts]),
        writes=[],
    )


__all__ = ["group_ranks", "join_plans", "plan_group", "plan_groups"]
