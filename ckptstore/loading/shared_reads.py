"""Reads shared among replicas: ranks that need the same bytes read each of them once from
the store and hand them to each other over the network of the job.

The data-parallel replicas of a job restore identical shards: read naively, a checkpoint
is fetched from the shared tier once per replica (26 x its size at 16,384 ranks). Here a
rank's targets are split by replica class (``state.replicas``: the ranks that hold the same
data -- a DTensor's ``Replicate()`` mesh dims, every rank for a plain tensor), each class is
planned apart and signed (class and requests' file byte ranges), and one all_gather of the
signatures tells every rank which ranks share each of its plans -- so ZeRO-style optimizer
shards that are this rank's alone do not stop its replicated parameters from being shared.
Each set of ranks with one plan in common exchanges bytes point to point over the load's
own gloo group -- no group to create: torch names a new group by how many groups its
process made, which ranks of different sets would not agree on -- and the sets are taken
in one global order. A set's requests are dealt out by size (largest first, each to the
member with the fewest bytes so far, among the members whose own disk holds the bytes when
some do: a warm local tier is read where it is) and moved in rounds: each member reads its
share of the round from the store -- verifying and copying into its own tensors exactly as
an unshared read does -- then sends the others a status and its bytes, which they verify
block by block again before copying (a byte is trusted only once this rank has checked it). Memory: two buffers of at most
``knobs.shared_read_round_bytes()`` (this rank's share of a round and one received share).

Plans that overlap only in part (a reshard onto another shard count) are read by each rank
for itself. Failure: a rank whose read or copy fails says so in its next status and every
member stops after that round; the failing rank raises, the others return, and the
agreement of :func:`ckptstore.load` that follows raises on every rank.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ckptstore import knobs
from ckptstore.byte_buffers import byte_buffer
from ckptstore.coordination.collectives import Coordinator
from ckptstore.loading.read import ChunkReader
from ckptstore.loading.read_plan import ReadPlan, Request, Target


def fill_shared(reader: ChunkReader, parts: dict[str, list[Target]], coord: Coordinator) -> None:
    """Fill the targets of ``parts`` (by replica class, see ``state.replicas``), sharing
    with the ranks of ``coord`` whose plan for a class is the same as this rank's. A
    collective over ``coord``: every rank calls it (with no parts where it has none)."""
    plans: dict[bytes, ReadPlan] = {}
    failure: BaseException | None = None
    try:
        for cls, targets in parts.items():
            # No gap filling: the bytes between two spans of a class belong to another
            # class (another rank's optimizer shard), which its own reader reads anyway.
            plan = reader.plan(targets, gap=0)
            if plan.groups:
                plans[signature(cls, plan.groups)] = plan
    except Exception as exc:  # this rank still takes part in the exchange below (with none)
        failure, plans = exc, {}
    # Who holds each plan, and which of its requests each of them has on its own disk.
    mine = sorted((key, _local_bits(reader, plan.groups)) for key, plan in plans.items())
    holders: dict[bytes, list[tuple[int, bytes]]] = {}
    for rank, offered in enumerate(coord.all_gather(mine)):
        for key, bits in offered:
            holders.setdefault(key, []).append((rank, bits))
    try:
        for key, plan in plans.items():
            if len(holders[key]) == 1:
                reader.run(plan)
    except Exception as exc:  # the groups below still hear of it, at their first round
        failure = failure or exc
    # One global order of the groups: a rank in several never waits on a group whose other
    # members wait on one it has not reached yet.
    for key in sorted(k for k in plans if len(holders[k]) > 1):
        failure = _share(reader, plans[key], coord, holders[key], failure)
    if failure is not None:
        raise failure


def _share(
    reader: ChunkReader,
    plan: ReadPlan,
    coord: Coordinator,
    holders: list[tuple[int, bytes]],
    failure: BaseException | None,
) -> BaseException | None:
    """One group's rounds, point to point among its members over ``coord``'s group (no
    group of their own to create); returns this rank's first failure (an earlier one
    included). In each round every member sends the others a status and, if it is well,
    its bytes: a member that failed says so, and all stop after that round."""
    requests = plan.groups
    sizes = [g.end - g.start for g in requests]
    members = [rank for rank, _ in holders]
    me = members.index(coord.rank)
    local = _local_members(holders, len(requests))
    rounds = deal_rounds(sizes, len(members), knobs.shared_read_round_bytes(), local)
    for shares in rounds:
        own = byte_buffer(sum(sizes[i] for i in shares[me]))
        if failure is None:
            try:
                mine = shares[me]
                work = [(requests[i], v) for i, v in zip(mine, _cut(own, mine, sizes), strict=True)]
                reader.fetch(plan, work)
            except Exception as exc:
                failure = exc
        status = torch.tensor([0 if failure is None else 1], dtype=torch.int64)
        sending = [coord.post_send(status, peer) for peer in members if peer != coord.rank]
        if failure is None and len(own):
            data = torch.from_numpy(own)
            sending += [coord.post_send(data, peer) for peer in members if peer != coord.rank]
        stop = failure is not None
        for member, peer in enumerate(members):
            if peer == coord.rank:
                continue
            theirs = torch.empty(1, dtype=torch.int64)
            coord.receive(theirs, peer)
            failed = bool(theirs.item())
            stop = stop or failed
            nbytes = sum(sizes[i] for i in shares[member])
            if failed or not nbytes:
                continue
            buf = byte_buffer(nbytes)
            coord.receive(torch.from_numpy(buf), peer)
            if failure is not None:
                continue
            try:
                items = shares[member]
                for i, part in zip(items, _cut(buf, items, sizes), strict=True):
                    reader.copy_received(requests[i], part, plan)
            except Exception as exc:
                failure = exc
        coord.finish_sends(sending)
        if stop:
            break  # every member saw the same statuses: all stop here
    return failure


def signature(cls: str, requests: list[Request]) -> bytes:
    """What identifies a read plan across ranks: its replica class and its requests'
    (file, start, end)."""
    spans = np.array([(g.file, g.start, g.end) for g in requests], dtype="<i8")
    return hashlib.blake2b(cls.encode() + spans.tobytes(), digest_size=16).digest()


def _local_bits(reader: ChunkReader, requests: list[Request]) -> bytes:
    """Which of ``requests`` this node's own disk holds (a warm local tier), packed."""
    held = [reader.holds_locally(g.file, g.end) for g in requests]
    return np.packbits(np.array(held, dtype=bool)).tobytes()


def _local_members(holders: list[tuple[int, bytes]], n: int) -> list[list[int]]:
    """Per request, the members (indexes into ``holders``) whose own disk holds it."""
    held = [np.unpackbits(np.frombuffer(b, np.uint8), count=n).astype(bool) for _, b in holders]
    return [[m for m in range(len(held)) if held[m][i]] for i in range(n)]


def deal_rounds(
    sizes: list[int], members: int, round_bytes: int, local: list[list[int]] | None = None
) -> list[list[list[int]]]:
    """Request indexes per round per member: dealt largest first, each to the member with
    the fewest bytes so far (ties to the lowest member) among those that hold its bytes on
    their own disk (``local[i]``; all members when none does); then each member's
    requests, in order, cut into rounds of at most ``round_bytes`` (at least one request
    each). The same on every member, which computes it from the same inputs."""
    totals = [0] * members
    owned: list[list[int]] = [[] for _ in range(members)]
    everyone = range(members)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        m = min((local[i] if local and local[i] else everyone), key=totals.__getitem__)
        owned[m].append(i)
        totals[m] += sizes[i]
    runs: list[list[list[int]]] = []
    for items in owned:
        items.sort()
        member_runs: list[list[int]] = []
        filled = 0
        for i in items:
            if not member_runs or (filled and filled + sizes[i] > round_bytes):
                member_runs.append([])
                filled = 0
            member_runs[-1].append(i)
            filled += sizes[i]
        runs.append(member_runs)
    count = max(map(len, runs), default=0)
    return [[r[k] if k < len(r) else [] for r in runs] for k in range(count)]


def _cut(buf: np.ndarray, items: list[int], sizes: list[int]) -> list[np.ndarray]:
    """``buf`` split into consecutive views of ``sizes[i]`` bytes, for each of ``items``."""
    out, at = [], 0
    for i in items:
        out.append(buf[at : at + sizes[i]])
        at += sizes[i]
    return out
