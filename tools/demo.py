"""`make demo`: save a sharded training state on 4 ranks, restore it on 2 with resharding.

Real processes (torch.multiprocessing, gloo, CPU). Ranks 0-3 hold a small transformer-like
state sharded row-wise (DTensor Shard(0)) with AdamW-like moments, replicated norms, a step
counter and per-rank RNG state. The checkpoint is then restored on 2 ranks into column-wise
sharding (Shard(1)), checked bit-exactly against the original, and inspected with `ckpt`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

import ckptstore as cs
from ckptstore.testing.ranks import run_ranks

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo-out")
LAYERS, DIM, FFN, VOCAB = 4, 256, 1024, 4096


def full_model() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    params = {"embed": torch.randn(VOCAB, DIM, generator=g)}
    for i in range(LAYERS):
        params[f"layers.{i}.attn.qkv"] = torch.randn(3 * DIM, DIM, generator=g)
        params[f"layers.{i}.attn.out"] = torch.randn(DIM, DIM, generator=g)
        params[f"layers.{i}.mlp.up"] = torch.randn(FFN, DIM, generator=g)
        params[f"layers.{i}.mlp.down"] = torch.randn(DIM, FFN, generator=g)
    return params


def state(rank: int, world: int, shard_dim: int, empty: bool) -> dict:
    mesh = init_device_mesh("cpu", (world,))
    full = full_model()
    model, exp_avg, exp_avg_sq = {}, {}, {}
    for name, t in full.items():
        src = torch.zeros_like(t) if empty else t
        model[name] = distribute_tensor(src, mesh, [Shard(shard_dim)])
        exp_avg[name] = distribute_tensor(
            torch.zeros_like(t) if empty else t * 0.1, mesh, [Shard(shard_dim)]
        )
        exp_avg_sq[name] = distribute_tensor(
            torch.zeros_like(t) if empty else t * t, mesh, [Shard(shard_dim)]
        )
    norms = {
        f"layers.{i}.norm": torch.zeros(DIM) if empty else torch.ones(DIM) * (i + 1)
        for i in range(LAYERS)
    }
    return {
        "model": {**model, **norms},
        "optim": {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "lr": 0.0 if empty else 3e-4},
        "step": 0 if empty else 1000,
        "rng": cs.PerRank(torch.zeros(5056, dtype=torch.uint8) if empty else torch.get_rng_state()),
    }


def save_on(rank: int, world: int, path: str) -> dict:
    sd = state(rank, world, shard_dim=0, empty=False)
    info = cs.save(sd, path)
    return {"seconds": info.seconds["total"], "bytes": info.rank_bytes_written}


def restore_on(rank: int, world: int, path: str) -> dict:
    sd = state(rank, world, shard_dim=1, empty=True)
    t = time.perf_counter()
    info = cs.load(sd, path, per_rank="keep")  # 4 RNG states cannot map onto 2 ranks
    seconds = time.perf_counter() - t
    full = full_model()
    exact = all(torch.equal(sd["model"][k].full_tensor(), v) for k, v in full.items())
    exact &= all(
        torch.equal(sd["optim"]["exp_avg_sq"][k].full_tensor(), v * v) for k, v in full.items()
    )
    return {
        "seconds": seconds,
        "bytes_read": info.bytes_read,
        "exact": exact,
        "step": sd["step"],
        "lr": sd["optim"]["lr"],
    }


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    path = os.path.join(OUT, "step1000")
    print("== save on 4 ranks (row-sharded DTensors, replicated norms, per-rank RNG state)")
    saved = run_ranks(4, save_on, path)
    for r, s in enumerate(saved):
        print(f"   rank {r}: wrote {s['bytes'] / 2**20:6.2f} MiB in {s['seconds'] * 1000:6.1f} ms")
    print("== restore on 2 ranks, column-sharded (resharded at load time)")
    restored = run_ranks(2, restore_on, path)
    for r, s in enumerate(restored):
        print(
            f"   rank {r}: read {s['bytes_read'] / 2**20:6.2f} MiB in {s['seconds'] * 1000:6.1f} ms; "
            f"bit-exact={s['exact']} step={s['step']} lr={s['lr']}"
        )
    if not all(s["exact"] and s["step"] == 1000 for s in restored):
        print("demo FAILED: restored state differs from the saved one")
        return 1
    ckpt = [os.path.join(os.path.dirname(sys.executable), "ckpt")]
    print("== ckpt inspect")
    subprocess.run([*ckpt, "inspect", path, "--tensors", "*layers.0*"], check=True)
    print("== ckpt verify")
    subprocess.run([*ckpt, "verify", path], check=True)
    print(f"demo OK: checkpoint in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
