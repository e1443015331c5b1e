"""Worker functions for the Hugging Face round trip: a random-init transformers model
trained one step under FSDP2 on real ranks, saved by CheckpointManager."""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import ckptstore as cs

PROMPT = torch.tensor([[1, 5, 9, 2, 7, 3, 8, 4]])


def tiny(kind: str):
    """A small random-init model of ``kind`` (``llama``: ``model.`` names; ``gpt2``:
    ``transformer.`` names, tied embeddings), no downloads."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(
            vocab_size=101, hidden_size=48, intermediate_size=70, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        )  # fmt: skip
        return LlamaForCausalLM(config)
    config = GPT2Config(vocab_size=101, n_embd=48, n_layer=2, n_head=4, n_positions=32)
    return GPT2LMHeadModel(config)


def train_and_save(rank: int, world: int, kind: str, root: str, config_dir: str) -> list:
    """One AdamW step under FSDP2 (shards uneven: 101-row embeddings over 2 ranks), a
    CheckpointManager save; returns the logits of the trained model for PROMPT."""
    model = tiny(kind)
    if rank == 0:
        model.config.save_pretrained(config_dir)
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(model, mesh=mesh)
    optim = torch.optim.AdamW(model.parameters(), lr=0.05)
    model(PROMPT, labels=PROMPT).loss.backward()
    optim.step()
    with cs.CheckpointManager(root, async_save=False) as mgr:
        mgr.save(1, {"model": model, "optim": optim})
    model.eval()  # no dropout (GPT-2 has some), as from_pretrained returns a model
    with torch.no_grad():
        return model(PROMPT).logits.tolist()
