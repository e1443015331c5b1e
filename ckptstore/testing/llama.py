"""A Llama-style decoder and the ways training jobs shard it (FSDP2; tensor parallelism plus
FSDP2 on a 2-D mesh, as torchtitan builds it), for tests and the benchmark: the state dicts
that real jobs checkpoint, from ``get_state_dict``, without downloads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LlamaShape:
    vocab: int = 256
    dim: int = 64
    layers: int = 2
    heads: int = 4
    ffn: int = 176

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


class Attention(nn.Module):
    def __init__(self, shape: LlamaShape) -> None:
        super().__init__()
        self.head_dim = shape.head_dim
        self.wq = nn.Linear(shape.dim, shape.dim, bias=False)
        self.wk = nn.Linear(shape.dim, shape.dim, bias=False)
        self.wv = nn.Linear(shape.dim, shape.dim, bias=False)
        self.wo = nn.Linear(shape.dim, shape.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds heads / tp of them
        q, k, v = (
            w(x).view(b, s, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, shape: LlamaShape) -> None:
        super().__init__()
        self.w1 = nn.Linear(shape.dim, shape.ffn, bias=False)
        self.w3 = nn.Linear(shape.dim, shape.ffn, bias=False)
        self.w2 = nn.Linear(shape.ffn, shape.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, shape: LlamaShape) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(shape.dim)
        self.attention = Attention(shape)
        self.ffn_norm = nn.RMSNorm(shape.dim)
        self.feed_forward = FeedForward(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self, shape: LlamaShape) -> None:
        super().__init__()
        self.shape = shape
        self.tok_embeddings = nn.Embedding(shape.vocab, shape.dim)
        self.layers = nn.ModuleDict({str(i): Block(shape) for i in range(shape.layers)})
        self.norm = nn.RMSNorm(shape.dim)
        self.output = nn.Linear(shape.dim, shape.vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            x = layer(x)
        return self.output(self.norm(x))


def shard_fsdp(model: Llama, mesh) -> Llama:
    """FSDP2 as training scripts apply it: each block, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers.values():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def shard_tp_fsdp(model: Llama, mesh) -> Llama:
    """Tensor parallelism on ``mesh["tp"]`` (attention and MLP projections column- then
    row-wise, as torchtitan), then FSDP2 on ``mesh["dp"]``: column-wise weights end up with
    ``_StridedShard`` placements."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    plan = {
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(),
    }
    for layer in model.layers.values():
        parallelize_module(layer, mesh["tp"], plan)
    return shard_fsdp(model, mesh["dp"])


def build(shape: LlamaShape, layout: str, world: int, seed: int = 0):
    """A sharded model and its AdamW after one training step: ``layout`` is ``fsdp`` (a
    1-D mesh of ``world``) or ``tp-fsdp`` (a 2 x world/2 mesh, dp x tp)."""
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(seed)
    model = Llama(shape)
    if layout == "fsdp":
        shard_fsdp(model, init_device_mesh("cpu", (world,)))
    elif layout == "tp-fsdp":
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "tp"))
        shard_tp_fsdp(model, mesh)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, optim, seed)
    return model, optim


def train_step(model: Llama, optim: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, model.shape.vocab, (2, 16), generator=g)
    logits = model(tokens)
    F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten()).backward()
    optim.step()
    optim.zero_grad()


def training_state(model: Llama, optim: torch.optim.Optimizer) -> dict:
    """What a training loop checkpoints: ``get_state_dict``'s model and optimizer parts."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optim)
    return {"model": model_sd, "optim": optim_sd}


def full_tensors(state: dict) -> dict[str, torch.Tensor]:
    """Every tensor of a training state, gathered whole (a collective), by flattened name."""
    from ckptstore.state.leaves import DTensor, flatten

    out = {}
    for name, leaf in flatten(state).items():
        value = leaf.container[leaf.key] if leaf.container is not None else leaf.value
        if isinstance(value, DTensor):
            out[name] = value.full_tensor()
        elif isinstance(value, torch.Tensor):
            out[name] = value.clone()
    return out
