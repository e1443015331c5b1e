"""Reads shared among replicas: ranks that need the same bytes read each of them once from
the store and hand them to each other over the network of the job.

The data-parallel replicas of a job restore identical shards: read naively, a checkpoint
is fetched from the shared tier once per replica (26 x its size at 16,384 ranks). Here
every rank signs its read plan (the file byte ranges of its requests, in order); ranks with
the same signature form a group (:meth:`Coordinator.split`). The group's requests are dealt
out by size (largest first, each to the member with the fewest bytes so far, among the
members whose own disk holds the bytes when some do: a warm local tier is read where it
is) and moved in rounds: each member reads its share of the round from the store -- verifying and copying
into its own tensors exactly as an unshared read does -- then each member's bytes are
broadcast to the others, which verify every block again before copying (a byte is trusted
only once this rank has checked it). Memory: two buffers of at most
``knobs.shared_read_round_bytes()`` (this rank's share of a round and one received share).

Ranks whose plans differ (sharded state, per-rank entries, a partial overlap after
resharding) read for themselves. Failure: a rank whose read or copy fails says so in the
next round's agreement (one all_reduce of the group) and every member stops there; the
failing rank raises, the others return, and the agreement of :func:`ckptstore.load`
that follows raises on every rank.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from ckptstore import knobs
from ckptstore.coordination.collectives import Coordinator
from ckptstore.loading.read import ChunkReader
from ckptstore.loading.read_plan import ReadPlan, Request


def fill_shared(reader: ChunkReader, plan: ReadPlan | None, coord: Coordinator) -> None:
    """Run ``plan`` with the ranks of ``coord`` that need the same bytes (a collective over
    ``coord``: every rank calls it, with ``plan`` None where planning failed)."""
    requests = plan.groups if plan is not None else []
    group = coord.split(signature(requests, coord.rank))
    if group is None or plan is None:
        if plan is not None:
            reader.run(plan)
        return
    sizes = [g.end - g.start for g in requests]
    local = _local_holders(reader, requests, group)
    rounds = deal_rounds(sizes, group.world_size, knobs.shared_read_round_bytes(), local)
    failure: BaseException | None = None
    for shares in rounds:
        mine = shares[group.rank]
        own = np.empty(sum(sizes[i] for i in mine), dtype=np.uint8)
        try:
            parts = _cut(own, mine, sizes)
            reader.fetch(plan, [(requests[i], part) for i, part in zip(mine, parts, strict=True)])
        except Exception as exc:
            failure = exc
        if group.max_ints([failure is not None])[0]:
            break  # every member stops here; load's agreement names the failure
        for member, items in enumerate(shares):
            nbytes = sum(sizes[i] for i in items)
            if not nbytes:
                continue
            buf = own if member == group.rank else np.empty(nbytes, dtype=np.uint8)
            group.broadcast_bytes(torch.from_numpy(buf), member)
            if member == group.rank or failure is not None:
                continue
            try:
                for i, part in zip(items, _cut(buf, items, sizes), strict=True):
                    reader.copy_received(requests[i], part, plan)
            except Exception as exc:
                failure = exc
    if failure is not None:
        raise failure


def signature(requests: list[Request], rank: int) -> bytes:
    """What identifies a read plan across ranks: its requests' (file, start, end). A rank
    with nothing to read signs with its rank, so that it joins no group."""
    if not requests:
        return b"nothing to read on rank %d" % rank
    spans = np.array([(g.file, g.start, g.end) for g in requests], dtype="<i8")
    return hashlib.blake2b(spans.tobytes(), digest_size=16).digest()


def _local_holders(reader: ChunkReader, requests: list[Request], group: Coordinator) -> list:
    """Per request, the members whose own disk holds its bytes (a warm local tier)."""
    mine = np.fromiter(
        (reader.holds_locally(g.file, g.end) for g in requests), dtype=bool, count=len(requests)
    )
    held = [np.unpackbits(np.frombuffer(b, np.uint8), count=len(requests)).astype(bool)
            for b in group.all_gather(np.packbits(mine).tobytes())]  # fmt: skip
    return [[m for m in range(len(held)) if held[m][i]] for i in range(len(requests))]


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
