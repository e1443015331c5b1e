"""Worker functions for the tiered-store tests: ranks grouped into simulated nodes, each
node with its own local directory (tier 0) and one shared S3 bucket behind them."""

from __future__ import annotations

import ckptstore as cs
from tests.dist_cases import build_state, check_state


def node_dir(nodes_root: str, rank: int, per_node: int) -> str:
    """The local directory of the simulated node that ``rank`` runs on."""
    return f"{nodes_root}/node{rank // per_node}"


def tiered_path(nodes_root: str, remote: str, opts: dict, rank: int, per_node: int) -> cs.Tiered:
    return cs.Tiered(
        local=f"{node_dir(nodes_root, rank, per_node)}/step1", remote=remote, remote_options=opts
    )


def save_on_nodes(
    rank: int, world: int, nodes_root: str, remote: str, opts: dict, per_node: int
) -> dict:
    info = _save_row_state(rank, world, nodes_root, remote, opts, per_node)
    replicated = info.replication.wait(timeout=120)
    return {"files": replicated.files, "bytes": replicated.bytes, "state": info.replication.state}


def _save_row_state(
    rank: int, world: int, nodes_root: str, remote: str, opts: dict, per_node: int
) -> cs.SaveInfo:
    info = cs.save(
        build_state("row", rank, world), tiered_path(nodes_root, remote, opts, rank, per_node)
    )
    assert info.replication is not None
    return info


def load_on_nodes(
    rank: int, world: int, nodes_root: str, remote: str, opts: dict, per_node: int, layout: str
) -> dict:
    path = tiered_path(nodes_root, remote, opts, rank, per_node)
    sd = build_state(layout, rank, world, zero=True)
    info = cs.load(sd, path, per_rank="wrap")
    return {"problems": check_state(sd, rank, 4, world), "by_tier": info.bytes_by_tier}


def manager_run(
    rank: int, world: int, nodes_root: str, remote: str, opts: dict, per_node: int, steps: int
) -> dict:
    """Train-like loop: save every step through the tiered manager, then list the tiers."""
    import torch

    local_dir = node_dir(nodes_root, rank, per_node)
    state = {"w": torch.zeros(64, 64), "step": 0}
    with cs.CheckpointManager(
        remote, local_dir=local_dir, keep=2, keep_local=1, storage_options=opts
    ) as mgr:
        start = mgr.restore(state) or 0
        for step in range(start + 1, start + steps + 1):
            state["w"].fill_(float(step))
            state["step"] = step
            mgr.maybe_save(step, state)
        mgr.wait_replicated()
        torch.distributed.barrier()  # the coordinator's retention is done on every rank's view
        return {
            "start": start,
            "tiers": {e.step: (e.local, e.remote) for e in mgr.checkpoints()},
            "w": float(state["w"][0, 0]),
        }


def manager_restore(
    rank: int, world: int, nodes_root: str, remote: str, opts: dict, per_node: int
) -> dict:
    import torch

    local_dir = node_dir(nodes_root, rank, per_node)
    state = {"w": torch.zeros(64, 64), "step": 0}
    with cs.CheckpointManager(remote, local_dir=local_dir, storage_options=opts) as mgr:
        step = mgr.restore(state)
        return {"step": step, "w": float(state["w"][0, 0]), "by_tier": mgr.last_load.bytes_by_tier}


def save_failing_replication(
    rank: int, world: int, nodes_root: str, remote: str, opts: dict, per_node: int
) -> str:
    """A tiered save whose upload fails (the proxy refuses PUTs); returns the error."""
    info = _save_row_state(rank, world, nodes_root, remote, opts, per_node)
    try:
        info.replication.wait(timeout=120)
    except cs.errors.ReplicationError as exc:
        return str(exc)
    return "replicated"


def independent_subgroups(
    rank: int, world: int, root: str, remote: str, opts: dict, stagger_s: float
) -> list[float]:
    """Two pairs of ranks, each with its own subgroup, save (async, tiered, replicated) on
    their own schedules: the second pair starts only after the first has finished twice."""
    import time

    import torch
    import torch.distributed as dist

    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # the job's own groups
    pair = rank // 2
    if pair == 1:
        time.sleep(stagger_s)
    seen = []
    for step in range(2):
        state = {"w": torch.full((8,), float(10 * pair + step)), "step": step}
        path = cs.Tiered(
            local=f"{root}/pair{pair}/node/step{step}",
            remote=f"{remote}/pair{pair}/step{step}",
            remote_options=opts,
        )
        info = cs.async_save(state, path, process_group=pairs[pair]).wait(timeout=60)
        info.replication.wait(timeout=60)
        out = {"w": torch.zeros(8), "step": -1}
        cs.load(out, f"{remote}/pair{pair}/step{step}", process_group=pairs[pair],
                storage_options=opts)  # fmt: skip
        seen.append(float(out["w"][0]))
    dist.barrier()  # rank 0 hosts the job's store: it stays until the second pair is done
    return seen
