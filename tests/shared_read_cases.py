"""Worker functions for the shared-read tests: data-parallel replicas of a sharded state
(HSDP's layout: ``Replicate()`` over the replicas, ``Shard(0)`` inside each), run on real
ranks (spawned processes, gloo) by tests/test_scale_restore.py."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import ckptstore as cs
from ckptstore.errors import CkptStoreError


def full_state() -> dict[str, torch.Tensor]:
    """Deterministic full tensors, uneven over 2 and 3 shards; ~4.3 MB in all."""
    g = torch.Generator().manual_seed(7)
    state = {
        "model.emb": torch.randn(1021, 512, generator=g),
        "model.w": torch.randn(37, 19, generator=g).to(torch.bfloat16),
        "optim.emb.exp_avg": torch.randn(1021, 512, generator=g) / 7,
    }
    for i in range(40):  # a model's many small norms
        state[f"model.norm{i}"] = torch.rand(33, generator=g)
    return state


def replica_state(rank: int, world: int, replicas: int, zero: bool = False) -> dict:
    """On a (replicas, world // replicas) mesh: parameters ``[Replicate(), Shard(0)]``
    (HSDP), optimizer state also sharded across the replicas (``[Shard(0), Shard(0)]``, as
    ZeRO does: this rank's alone), norms replicated along the other dim (``[Shard(0),
    Replicate()]``, as TP's: the sets of ranks that read the same bytes cross), a
    replicated step counter, and one per-rank entry."""
    mesh = init_device_mesh("cpu", (replicas, world // replicas))
    state: dict = {}
    for name, full in full_state().items():
        src = torch.zeros_like(full) if zero else full
        if name.startswith("optim."):
            placements = [Shard(0), Shard(0)]
        elif name.startswith("model.norm"):
            placements = [Shard(0), Replicate()]
        else:
            placements = [Replicate(), Shard(0)]
        state[name] = distribute_tensor(src, mesh, placements)
    state["step"] = torch.tensor(0 if zero else 1234)
    state["rank_rng"] = cs.PerRank(torch.full((16,), -1 if zero else rank, dtype=torch.int64))
    return state


def check_equal(out: dict, want: dict) -> None:
    for name, value in want.items():
        got = out[name]
        if isinstance(value, DTensor):
            value, got = value.to_local(), got.to_local()
        elif isinstance(value, cs.PerRank):
            value, got = value.value, got.value
        assert torch.equal(got, value), name


def save_replicas(rank: int, world: int, url: str, replicas: int, options: dict) -> None:
    cs.save(replica_state(rank, world, replicas), url, storage_options=options)


def save_and_restore_twice(
    rank: int, world: int, url: str, replicas: int, options: list[dict]
) -> list[dict[str, int]]:
    """Save with ``options[0]``; restore with ``options[1]`` (reads shared by default: an
    object store) and with ``options[2]`` reads not shared."""
    save_replicas(rank, world, url, replicas, options[0])
    dist.barrier()
    shared = restore_replicas(rank, world, url, replicas, options[1], None)
    dist.barrier()
    return [shared, restore_replicas(rank, world, url, replicas, options[2], False)]


def restore_replicas(
    rank: int, world: int, url: str, replicas: int, options: dict, share: bool | None
) -> dict[str, int]:
    """Load into zeroed tensors, check bit-exact; returns this rank's byte counts."""
    out = replica_state(rank, world, replicas, zero=True)
    info = cs.load(out, url, storage_options=options, share_reads=share)
    check_equal(out, replica_state(rank, world, replicas))
    return {"read": info.bytes_read, "received": info.bytes_received}


def restore_resharded(rank: int, world: int, url: str) -> list[dict[str, int]]:
    """Load a checkpoint of 2 replicas x 2 shards onto 2 replicas x 3 shards (6 ranks), with
    reads shared and then not: the replicated parameters of a replica pair are the same
    plan, its optimizer shards and the plans across pairs are not."""
    counts = []
    for share in (True, False):
        out = replica_state(rank, world, 2, zero=True)
        info = cs.load(out, url, share_reads=share, per_rank="keep")
        want = replica_state(rank, world, 2)
        want.pop("rank_rng")
        check_equal(out, want)
        counts.append({"read": info.bytes_read, "received": info.bytes_received})
    return counts


def restore_with_a_bad_block(rank: int, world: int, url: str) -> str:
    """A replica group whose bytes fail their checksum on the rank that reads them: every
    rank raises (none waits), the reading rank with the ChecksumError."""
    out = replica_state(rank, world, 2, zero=True)
    try:
        cs.load(out, url, share_reads=True)
    except CkptStoreError as exc:
        dist.barrier()
        return type(exc).__name__ + ": " + str(exc)
    return "loaded"
