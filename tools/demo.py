"""`make demo`: sharded checkpoints end to end.

Part 1 saves a sharded training state on 4 ranks and restores it on 2 with resharding.
Part 2 trains a small transformer LM with FSDP2 on 4 ranks (torchrun, gloo), checkpointing
asynchronously through CheckpointManager into the tiered store: two simulated nodes of 2
ranks, each with its own local directory (tier 0), and an embedded S3 server (SeaweedFS on
127.0.0.1) behind them. It kills one rank with SIGKILL mid-training, deletes node 1's local
tier (the node was "replaced"), restarts on 2 ranks, restores the latest checkpoint
(resharded; node 1's share comes from S3, node 0's from its local disk, and it prints which
bytes came from which tier) and continues; it prints each save's stall and background time,
the resume step and the loss around the crash, lists the checkpoints per tier, and writes
demo-out/training.png.

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
    if train_across_a_crash() != 0:
        return 1
    print(f"demo OK: outputs in {OUT}")
    return 0


def _torchrun(nproc: int, *args: str) -> int:
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_demo.py")
    cmd = [
        torchrun,
        f"--nproc-per-node={nproc}",
        f"--master-port={29500 + nproc * 7}",
        script,
        *args,
    ]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("[") and "ranks]" in line:
            print("   " + line)
    return proc.returncode


def train_across_a_crash(steps: int = 30, every: int = 5, kill_at: int = 23) -> int:
    """Start the embedded S3 server, then train, crash, lose a node's disk and resume."""
    import uuid

    from ckptstore.backends.s3 import S3Store
    from ckptstore.testing.seaweed import SeaweedServer

    print("== start the embedded S3 server (SeaweedFS on 127.0.0.1)")
    server = SeaweedServer(os.path.join(OUT, "seaweed"))
    try:
        opts = server.options()
        bucket = f"demo-{uuid.uuid4().hex[:8]}"
        S3Store(bucket, create_bucket=True, **opts)
        os.environ.update(
            AWS_ENDPOINT_URL=opts["endpoint_url"],
            AWS_ACCESS_KEY_ID=opts["aws_access_key_id"],
            AWS_SECRET_ACCESS_KEY=opts["aws_secret_access_key"],
        )
        code = _train_tiered(f"s3://{bucket}/run", steps, every, kill_at)
        print(
            f"   the shared tier is s3://{bucket}/run; `make s3` starts its server again "
            "(for the examples of docs/cli.md)"
        )
        return code
    finally:
        server.stop()


def _train_tiered(root: str, steps: int, every: int, kill_at: int) -> int:
    """Train on 4 ranks, SIGKILL one rank, drop node 1's disk, resume on 2 ranks."""
    import json

    events, nvme = os.path.join(OUT, "events.jsonl"), os.path.join(OUT, "nvme")
    tiers = ["--local-root", nvme, "--node-size", "2"]
    print(
        f"== train on 4 ranks = 2 nodes (FSDP2, AdamW), async checkpoint every {every} steps to "
        f"{nvme}/node<n> then {root}; rank 1 is SIGKILLed at step {kill_at}"
    )
    code = _torchrun(4, "--root", root, "--steps", str(steps), "--every", str(every),
                     "--kill-at", str(kill_at), "--events", events, *tiers)  # fmt: skip
    print(f"   torchrun exited with {code} (a rank was killed)")
    print("== checkpoints per tier, as node 0 sees them")
    ckpt = os.path.join(os.path.dirname(sys.executable), "ckpt")
    subprocess.run([ckpt, "ls", root, "--local", os.path.join(nvme, "node0")], check=True)
    shutil.rmtree(os.path.join(nvme, "node1"))
    print("== node 1 is replaced: its local tier is gone")
    print("== restart on 2 ranks (node 0): restore the latest checkpoint (resharded), go on")
    code = _torchrun(
        2, "--root", root, "--steps", str(steps), "--every", str(every), "--events", events,
        *tiers,
    )  # fmt: skip
    if code != 0:
        print("demo FAILED: the resumed run did not finish")
        return 1
    with open(events) as f:
        records = [json.loads(line) for line in f]
    starts = [r for r in records if r["event"] == "start"]
    resumed = starts[-1]["resumed"]
    loss = {(r["world"], r["step"]): r["loss"] for r in records if r["event"] == "step"}
    saves = [r for r in records if r["event"] == "save"]
    print(f"== summary: resumed at step {resumed} on 2 ranks after the crash at step {kill_at}")
    before, after = loss.get((4, resumed + 1)), loss.get((2, resumed + 1))
    print(
        f"   loss at step {resumed + 1}: {before:.4f} before the crash (4 ranks), "
        f"{after:.4f} after resuming (2 ranks)"
    )
    for s in saves:
        print(
            f"   save of step {s['step']:3d} on {s['world']} ranks: stall {s['stall_s'] * 1e3:7.1f} ms, "
            f"background {s['background_s'] * 1e3:7.1f} ms"
        )
    _plot(records, kill_at, resumed, os.path.join(OUT, "training.png"))
    print(f"   plot: {os.path.join(OUT, 'training.png')}")
    print("== checkpoints per tier at the end")
    subprocess.run([ckpt, "ls", root, "--local", os.path.join(nvme, "node0")], check=True)
    return 0


def _plot(records: list[dict], kill_at: int, resumed: int, path: str) -> None:
    """Three panels: the loss across the crash (the 2-rank run after resuming drawn over the
    4-rank one), the stall of each save (the first one marked as the warm-up), and where
    each rank's restored bytes came from (its node's local tier or S3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))
    style = {
        4: {"color": "tab:blue", "marker": ".", "label": "4 ranks (before the crash)"},
        2: {"color": "tab:orange", "marker": "x", "linestyle": "--",
            "label": f"2 ranks, resumed from step {resumed} (drawn over the 4-rank steps "
                     f"{resumed + 1}..{kill_at})"},
    }  # fmt: skip
    for world in (4, 2):
        pts = [
            (r["step"], r["loss"]) for r in records if r["event"] == "step" and r["world"] == world
        ]
        if pts:
            ax1.plot(*zip(*pts, strict=True), **style[world])
    ax1.axvline(kill_at, color="red", linestyle="--", label=f"SIGKILL of rank 1 (step {kill_at})")
    ax1.axvline(
        resumed, color="green", linestyle=":", label=f"restored checkpoint (step {resumed})"
    )
    ax1.set(xlabel="step", ylabel="loss", title="loss across the crash")
    ax1.legend(fontsize=7)

    saves = [r for r in records if r["event"] == "save"]
    labels = [f"{r['step']}\n({r['world']}r)" for r in saves]
    colors = ["tab:gray" if i == 0 else "tab:purple" for i in range(len(saves))]
    bars = ax2.bar(range(len(saves)), [r["stall_s"] * 1e3 for r in saves], color=colors)
    if saves:
        ax2.annotate("first save:\nwarm-up", (bars[0].get_x() + bars[0].get_width() / 2,
                     bars[0].get_height()), ha="center", va="bottom", fontsize=8)  # fmt: skip
    ax2.set_xticks(range(len(saves)), labels)
    ax2.set(xlabel="checkpoint step (ranks)", ylabel="stall (ms)",
            title="training stall per async save")  # fmt: skip

    restores = [r for r in records if r["event"] == "restore"]
    if restores:
        last = restores[-1]
        ranks = range(len(last["bytes_by_rank"]))
        local = [b[0] / 2**20 for b in last["bytes_by_rank"]]
        remote = [b[1] / 2**20 for b in last["bytes_by_rank"]]
        ax3.bar(ranks, local, color="tab:green", label="node-local tier")
        ax3.bar(ranks, remote, bottom=local, color="tab:red", label="S3 (node 1's lost share)")
        ax3.set_xticks(list(ranks), [f"rank {r}" for r in ranks])
        ax3.legend(fontsize=8)
    ax3.set(ylabel="MiB restored", title=f"where the restore of step {resumed} read from")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
