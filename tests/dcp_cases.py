"""Worker functions for the DCP storage-layer tests (spawned ranks, gloo)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import ckptstore as cs


def trained_fsdp(world: int, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A small model under FSDP2 (dims not divisible by 3 or 4: uneven shards), AdamW after
    one step."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(10, 30), nn.ReLU(), nn.Linear(30, 7), nn.LayerNorm(7))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=0.01 * (seed + 1))
    model(torch.randn(4, 10)).sum().backward()
    optim.step()
    return model, optim


def full_state(model: nn.Module, optim: torch.optim.Optimizer) -> dict[str, Any]:
    """Every tensor as a full (unsharded) CPU tensor, for comparison across world sizes."""
    msd, osd = get_state_dict(model, optim)
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif hasattr(value, "full_tensor"):
            out[prefix] = value.full_tensor().clone()
        elif isinstance(value, torch.Tensor):
            out[prefix] = value.clone()
        else:
            out[prefix] = value

    walk("model", msd)
    walk("optim", osd)
    return out


def save_through_dcp(rank: int, world: int, path: str, mode: str) -> dict[str, Any]:
    """Save model + optimizer with DCP through ckptstore's writer (``sync``, or
    ``async_save`` in ``thread`` / ``process`` mode); returns the full state saved."""
    model, optim = trained_fsdp(world)
    msd, osd = get_state_dict(model, optim)
    state = {"model": msd, "optim": osd, "step": 7}
    writer = cs.dcp.Writer(path)
    if mode == "sync":
        dcp.save(state, storage_writer=writer)
    else:
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        kind = AsyncCheckpointerType.PROCESS if mode == "process" else AsyncCheckpointerType.THREAD
        _wait(dcp.async_save(state, storage_writer=writer, async_checkpointer_type=kind))
    return full_state(model, optim)


def load_through_dcp(rank: int, world: int, path: str) -> dict[str, Any]:
    """Load model + optimizer (another seed: every value must come from the checkpoint)
    with DCP through ckptstore's reader, on ``world`` ranks; the full state loaded."""
    model, optim = trained_fsdp(world, seed=5)
    msd, osd = get_state_dict(model, optim)
    state = {"model": msd, "optim": osd, "step": 0}
    dcp.load(state, storage_reader=cs.dcp.Reader(path))
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    out = full_state(model, optim)
    out["step"] = state["step"]
    return out


def load_with_ckptstore(rank: int, world: int, path: str) -> dict[str, Any]:
    """Load what DCP wrote with cs.load itself."""
    model, optim = trained_fsdp(world, seed=5)
    msd, osd = get_state_dict(model, optim)
    state = {"model": msd, "optim": osd, "step": 0}
    cs.load(state, path)
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    out = full_state(model, optim)
    out["step"] = state["step"]
    return out


def torchtitan_save(rank: int, world: int, root: str) -> dict[str, Any]:
    """The calls torchtitan's CheckpointManager makes, with ckptstore underneath: the TP x
    FSDP layout (``_StridedShard`` placements), ``get_model_state_dict`` / the optimizer's
    flattened state dict, ``dcp.save`` and ``dcp.async_save`` with a ``checkpoint_id``."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    from ckptstore.testing import llama

    model, optim = llama.build(llama.LlamaShape(), "tp-fsdp", world)
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    state = {
        "model": get_model_state_dict(model),
        "optimizer": get_optimizer_state_dict(model, optim, options=flat),
        "train_state": {"step": 10},
    }
    step10 = f"{root}/step-10"
    dcp.save(state, checkpoint_id=step10, storage_writer=cs.dcp.Writer(step10))
    step20 = f"{root}/step-20"
    _wait(dcp.async_save(state, checkpoint_id=step20, storage_writer=cs.dcp.Writer(step20)))
    return llama.full_tensors({"model": state["model"]})


def torchtitan_load(rank: int, world: int, root: str) -> dict[str, Any]:
    """torchtitan's restore (``dcp.load`` by ``checkpoint_id``), onto FSDP over ``world``."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from ckptstore.testing import llama

    model, _ = llama.build(llama.LlamaShape(), "fsdp", world, seed=3)
    state = {"model": get_model_state_dict(model)}
    step20 = f"{root}/step-20"
    dcp.load(state, checkpoint_id=step20, storage_reader=cs.dcp.Reader(step20))
    return llama.full_tensors(state)


def _wait(result: Any) -> None:
    """DCP's async_save returns a Future, or (newer torch) a response holding one."""
    (result.upload_completion if hasattr(result, "upload_completion") else result).result()
