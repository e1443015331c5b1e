"""A small transformer language model trained with FSDP2 on CPU ranks, checkpointed by
CheckpointManager. Launched by tools/demo.py through torchrun (see there).

    torchrun --nproc-per-node 4 tools/train_demo.py --root demo-out/run --steps 40 \
        [--kill-at 23] --events FILE [--local-root DIR --node-size 2]

With ``--local-root`` checkpoints go through the tiered store: ranks are grouped into
simulated nodes of ``--node-size`` ranks, node ``n`` writes to ``DIR/node<n>`` (tier 0) and
``--root`` (e.g. ``s3://bucket/run``, endpoint and credentials from the environment) is the
shared tier the checkpoints are replicated to in the background.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import ckptstore as cs

VOCAB, DIM, HEADS, LAYERS, SEQ = 256, 256, 4, 4, 64


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.attn = nn.MultiheadAttention(DIM, HEADS, batch_first=True)
        self.norm2 = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Parameter(torch.zeros(SEQ, DIM))
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def corpus() -> torch.Tensor:
    """The project's own documentation as bytes: deterministic, with structure to learn."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parts = []
    for path in sorted(glob.glob(os.path.join(here, "docs", "*.md"))):
        with open(path, "rb") as f:
            parts.append(f.read())
    text = b"".join(parts)
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def batch(data: torch.Tensor, step: int, rank: int, world: int, size: int = 16) -> torch.Tensor:
    """The same global batch for a step whatever the world size; this rank's share of it."""
    g = torch.Generator().manual_seed(step)
    starts = torch.randint(0, len(data) - SEQ - 1, (size,), generator=g)
    rows = torch.stack([data[s : s + SEQ + 1] for s in starts.tolist()])
    return rows.tensor_split(world)[rank]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--events", required=True)
    parser.add_argument("--local-root", default=None)
    parser.add_argument("--node-size", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = TinyLM()
    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = corpus()
    state = {"model": model, "optim": optim}
    log = open(args.events, "a") if rank == 0 else None  # noqa: SIM115 - closed at the end

    local_dir = None
    if args.local_root:
        local_dir = os.path.join(args.local_root, f"node{rank // args.node_size}")
    mgr = cs.CheckpointManager(
        args.root, every_n_steps=args.every, keep=3, local_dir=local_dir, keep_local=2
    )
    t = time.perf_counter()
    resumed = mgr.restore(state) or 0
    if resumed and local_dir is not None:
        by_rank = _report_tiers(mgr, rank, world)
        if rank == 0:
            log.write(json.dumps({"event": "restore", "world": world, "step": resumed,
                                  "bytes_by_rank": by_rank}) + "\n")  # fmt: skip
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        how = (
            f"resumed at step {resumed} in {time.perf_counter() - t:.2f} s"
            if resumed
            else "fresh start"
        )
        print(
            f"[{world} ranks] TinyLM with {params / 1e6:.1f} M parameters (FSDP2), {how}",
            flush=True,
        )
        log.write(json.dumps({"event": "start", "world": world, "resumed": resumed}) + "\n")
    for step in range(resumed + 1, args.steps + 1):
        tokens = batch(data, step, rank, world)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
        loss.backward()
        optim.step()
        optim.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        mean = float(mean) / world
        saved = mgr.maybe_save(step, state)
        mgr.poll()
        if rank == 0:
            log.write(
                json.dumps({"event": "step", "world": world, "step": step, "loss": mean}) + "\n"
            )
            log.flush()
            print(
                f"[{world} ranks] step {step:3d}  loss {mean:.4f}"
                + ("  (checkpoint)" if saved else ""),
                flush=True,
            )
        for h in mgr.history:
            if rank == 0 and not h.get("logged"):
                h["logged"] = True
                log.write(json.dumps({"event": "save", "world": world, **h}) + "\n")
                print(
                    f"[{world} ranks]   save of step {h['step']}: stall {h['stall_s'] * 1e3:.1f} ms, "
                    f"background {h['background_s'] * 1e3:.1f} ms",
                    flush=True,
                )
        if args.kill_at == step and rank == 1:
            print(f"[{world} ranks] rank 1: SIGKILL at step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    mgr.close()
    if rank == 0:
        for h in mgr.history:
            if not h.get("logged"):
                log.write(json.dumps({"event": "save", "world": world, **h}) + "\n")
        log.close()
    dist.destroy_process_group()


def _report_tiers(mgr: cs.CheckpointManager, rank: int, world: int) -> list[list[int]]:
    """Print, per simulated node, how many restored bytes came from each tier (and from
    other ranks that read them: shared reads); returns [local, remote] bytes per rank."""
    assert mgr.last_load is not None and mgr.last_load.bytes_by_tier is not None
    load = mgr.last_load
    mine = torch.tensor(
        [load.bytes_by_tier["local"], load.bytes_by_tier["remote"], load.bytes_received],
        dtype=torch.int64,
    )
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    by_rank = [[int(x) for x in t.tolist()[:2]] for t in every]
    if rank == 0:
        for r, t in enumerate(every):
            local, remote, received = (int(x) for x in t.tolist())
            print(
                f"[{world} ranks]   rank {r} restored {local / 2**20:6.2f} MiB from its node's "
                f"local tier, {remote / 2**20:6.2f} MiB from S3, {received / 2**20:6.2f} MiB "
                "from ranks that read them",
                flush=True,
            )
    return by_rank


if __name__ == "__main__":
    main()
