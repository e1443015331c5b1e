"""The plan exchange of a save whose plan is not cached: planning split by planning group.

1. One all_gather of two 8-byte keys per rank (declaration key, structure key): every rank
   knows who declares what list, and the plan id.
2. The first rank with each distinct declaration list sends it to the coordinator, which
   forms the planning groups (``plan_groups``) and broadcasts them (a few bytes per list).
3. Every rank sends its boxes to its group's leader (its lowest rank; the declarations
   only from the first rank with that list); each leader plans its group and sends every
   member its writes, and the coordinator the group's plan.
4. The coordinator joins the groups' plans and broadcasts the outcome: every rank raises
   the same error if any group failed, so no rank goes on alone.

A job without pipeline stages is one group led by the coordinator: the same messages as a
gather and a scatter. With S stages each leader plans 1/S of the job, at the same time.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from ckptstore.coordination.collectives import COORDINATOR, Coordinator
from ckptstore.errors import typed
from ckptstore.saving.plan import GlobalPlan, RankPlan, plan_id_of, plan_save
from ckptstore.saving.plan_groups import group_ranks, join_plans, plan_group, plan_groups


class PlanGroup(NamedTuple):
    """This rank's planning group, kept with the cached plan: the commit's chunk indexes
    travel the same way (members to their leader, leaders to the coordinator)."""

    members: list[int]  # the group's ranks in rank order; the first is its leader
    leaders: list[int]  # every group's leader, in group order (the first is the coordinator)

    @property
    def leader(self) -> int:
        return self.members[0]


ALONE = PlanGroup([COORDINATOR], [COORDINATOR])
"""The group of a process that saves by itself."""


def plan_by_groups(
    mine: RankPlan, coord: Coordinator
) -> tuple[int, np.ndarray, GlobalPlan | None, PlanGroup]:
    """This rank's (plan id, writes), on the coordinator the job's plan, and this rank's
    planning group.

    Raises (on every rank, the same error):
        ShardingError: a group's declarations disagree, overlap or leave gaps.
    """
    if not coord.active:
        plan = plan_save([mine])
        return plan.plan_id, plan.writes[0], plan, ALONE
    keys = coord.all_gather((mine.decl_key, mine.structure_key))
    decl_keys = [k for k, _ in keys]
    plan_id = plan_id_of([s for _, s in keys])
    first_with: dict[int, int] = {}
    for rank, key in enumerate(decl_keys):
        first_with.setdefault(key, rank)
    group_of = coord.broadcast(_groups_on_coordinator(mine, coord, first_with))
    groups = group_ranks(decl_keys, group_of)
    members = groups[group_of[mine.decl_key]]
    leaders = [ranks[0] for ranks in groups]
    leader = members[0]
    part: GlobalPlan | BaseException | None = None
    if coord.rank == leader:
        part, writes = _plan_as_leader(mine, coord, members, first_with)
    else:
        sent = mine if first_with[mine.decl_key] == coord.rank else _without_decls(mine)
        coord.finish_sends(coord.post_object(sent, leader))
        writes = coord.receive_object(leader)
    outcome: Any = None
    joined = None
    if coord.is_coordinator:
        parts = [part if r == COORDINATOR else coord.receive_object(r) for r in leaders]
        outcome = next((p for p in parts if isinstance(p, BaseException)), None)
        if outcome is None:
            joined = join_plans(parts, plan_id)
    elif part is not None:  # a leader of another group
        coord.finish_sends(coord.post_object(part, COORDINATOR))
    outcome = coord.broadcast(outcome)
    if isinstance(outcome, BaseException):
        raise outcome
    return plan_id, writes, joined, PlanGroup(members, leaders)


def _groups_on_coordinator(
    mine: RankPlan, coord: Coordinator, first_with: dict[int, int]
) -> dict[int, int] | None:
    """Step 2: every distinct declaration list to the coordinator (once), which groups
    them; None elsewhere."""
    if not coord.is_coordinator:
        if first_with[mine.decl_key] == coord.rank:
            coord.finish_sends(coord.post_object(mine.tensors, COORDINATOR))
        return None
    lists = {
        key: mine.tensors if rank == coord.rank else coord.receive_object(rank)
        for key, rank in first_with.items()
    }
    return plan_groups(lists)


def _plan_as_leader(
    mine: RankPlan, coord: Coordinator, members: list[int], first_with: dict[int, int]
) -> tuple[GlobalPlan | BaseException, np.ndarray]:
    """Step 3 on a leader: its members' plans in, its group planned, every member's writes
    (or the group's error) out. Returns the group's plan (without writes) or its error,
    and the leader's own writes."""
    plans = [mine if r == coord.rank else coord.receive_object(r) for r in members]
    position = {rank: i for i, rank in enumerate(members)}
    for plan in plans:
        if plan.tensors is None:
            plan.tensors = plans[position[first_with[plan.decl_key]]].tensors
    try:
        part: GlobalPlan | BaseException = plan_group(plans, members)
    except Exception as exc:  # sent on, typed: no member waits for an error kept here
        part = typed(exc, f"planning the group of ranks {members[0]}..{members[-1]}")
        part.__cause__ = None  # the message names it; the original may not pickle
    handles = []
    for i, rank in enumerate(members[1:], start=1):
        reply = part if isinstance(part, BaseException) else part.writes[i]
        handles += coord.post_object(reply, rank)
    coord.finish_sends(handles)
    if isinstance(part, BaseException):
        return part, np.zeros(0, dtype=np.int64)
    writes = part.writes[0]
    part.writes = []
    return part, writes


def _without_decls(plan: RankPlan) -> RankPlan:
    """The plan as sent by a rank whose declaration list another rank of its group sends."""
    return dataclasses.replace(plan, tensors=None)
