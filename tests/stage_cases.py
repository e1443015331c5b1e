"""Worker functions for pipeline-stage jobs: ranks that hold disjoint tensors (two stages of
two ranks each, interleaved so that stage 1's leader is rank 1)."""

from __future__ import annotations

import contextlib
import os

import torch

import ckptstore as cs
from ckptstore.errors import CkptStoreError

STAGES = 2


def full_tensors(stage: int) -> dict[str, torch.Tensor]:
    """A stage's tensors, whole (deterministic; row counts not divisible by 2)."""
    g = torch.Generator().manual_seed(100 + stage)
    out = {}
    for i in range(3):
        layer = stage * 3 + i
        out[f"layers.{layer}.w"] = torch.randn(37 + 2 * i, 11, generator=g)
        out[f"layers.{layer}.norm"] = torch.rand(11, generator=g).to(torch.bfloat16)
    if stage == STAGES - 1:
        out["output.weight"] = torch.randn(29, 5, generator=g, dtype=torch.float64)
    return out


def stage_state(rank: int, world: int, gap: bool = False) -> dict:
    """This rank's share: its stage's matrices cut into uneven row blocks over the stage's
    ranks (explicit shards), its norms held whole (replicated within the stage). ``gap``:
    stage 1's last rank leaves out its rows of one matrix."""
    stage, place = rank % STAGES, rank // STAGES
    per_stage = world // STAGES
    sd = {}
    for name, full in full_tensors(stage).items():
        if full.dim() == 1:
            sd[name] = full.clone()
            continue
        n = full.shape[0]
        cuts = [n * k * (k + 1) // (per_stage * (per_stage + 1)) for k in range(per_stage + 1)]
        lo, hi = cuts[place], cuts[place + 1]
        if gap and stage == 1 and place == per_stage - 1 and name == "layers.3.w":
            hi = lo + 1
        sd[name] = cs.Sharded(full[lo:hi].clone(), tuple(full.shape), (lo, 0))
    return sd


def save_stages(rank: int, world: int, root: str) -> list[bool]:
    """A save, the same structure again (cached plan), and an async save; with per-rank
    entries (their rows reach the coordinator in their stage's bundle)."""
    sd = stage_state(rank, world)
    sd["rng"] = cs.PerRank(torch.full((3,), float(rank)))
    sd["step"] = cs.PerRank(10 + rank)
    cached = [cs.save(sd, f"{root}/a").plan_cached, cs.save(sd, f"{root}/b").plan_cached]
    handle = cs.async_save(sd, f"{root}/c")
    handle.wait()
    return cached


def save_stages_with_a_gap(rank: int, world: int, root: str) -> str:
    try:
        cs.save(stage_state(rank, world, gap=True), root)
    except CkptStoreError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "saved"


def failed_saves(rank: int, world: int, root: str) -> tuple[str, str]:
    """A gap in stage 1's shards, then a failed copy on a stage member: each save's outcome."""
    return (
        save_stages_with_a_gap(rank, world, f"{root}/gap"),
        save_stages_with_a_dataless_tensor(rank, world, f"{root}/copy"),
    )


def save_stages_with_a_dataless_tensor(rank: int, world: int, root: str) -> str:
    """Rank 3 (stage 1, not its leader) holds a sparse per-rank tensor: the plan agrees, the
    copy fails, and the failure reaches the coordinator inside stage 1's bundle."""
    sd = stage_state(rank, world)
    sd["rng"] = cs.PerRank(torch.ones(3).to_sparse() if rank == 3 else torch.ones(3))
    try:
        cs.save(sd, root)
    except CkptStoreError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "saved"


def _sockets() -> int:
    """Sockets this process has open (gloo holds one per connected peer and group)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # closed while listing (the listing's own)
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


def sockets_of_a_save(rank: int, world: int, root: str) -> tuple[int, int]:
    """Sockets opened by creating ckptstore's control group, and by a pipeline job's first
    save over it (plan exchange, commit)."""
    from ckptstore.coordination.collectives import own_group

    before = _sockets()
    own_group(None, "control")
    created = _sockets()
    cs.save(stage_state(rank, world), root)
    return created - before, _sockets() - created
