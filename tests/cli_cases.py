"""Worker functions for the CLI / interop tests (real ranks, gloo)."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import ckptstore as cs
from tests.dist_cases import build_state, global_state


def save_sharded(rank: int, world: int, path: str) -> None:
    cs.save(build_state("row", rank, world), path)


def load_resharded(rank: int, world: int, path: str) -> dict:
    """Load a checkpoint written by ``ckpt reshard`` with row-sharded DTensors."""
    mesh = init_device_mesh("cpu", (world,))
    full = global_state()
    sd = {
        name: distribute_tensor(torch.zeros_like(t), mesh, [Shard(0)]) for name, t in full.items()
    }
    sd["model.bias"] = torch.zeros(1024)
    sd["model.scale"] = torch.tensor(0.0)
    sd["optim.state.0.step"] = torch.tensor(0.0)
    info = cs.load(sd, path, strict=False)
    bad = [
        n for n, t in full.items() if not torch.equal(sd[n].full_tensor(), t)
    ]  # fmt: skip
    if not torch.equal(sd["model.bias"], torch.arange(1024, dtype=torch.float32)):
        bad.append("model.bias")
    if sd["model.scale"].item() != 2.5 or sd["optim.state.0.step"].item() != 17.0:
        bad.append("scalars")
    return {"bad": bad, "requests": info.read_requests, "bytes": info.bytes_read}


def save_irregular(rank: int, world: int, path: str) -> None:
    """Two ranks hold 3 and 7 rows of a 10-row tensor (not a torch.chunk split) and the two
    halves of an even one."""
    g = torch.arange(40.0).reshape(10, 4)
    rows = (slice(0, 3), slice(3, 10))[rank]
    even = torch.arange(16.0).reshape(8, 2)
    cs.save(
        {
            "odd": cs.Sharded(g[rows].clone(), (10, 4), (rows.start, 0)),
            "even": cs.Sharded(even[4 * rank : 4 * rank + 4].clone(), (8, 2), (4 * rank, 0)),
        },
        path,
    )


def save_edge(rank: int, world: int, path: str) -> None:
    """A 5-row tensor split as torch.chunk splits it over 2 ranks: 3 rows and 2."""
    w = torch.arange(10.0).reshape(5, 2)
    part = w.chunk(2)[rank]
    cs.save({"w": cs.Sharded(part.clone(), (5, 2), (3 * rank, 0))}, path)
