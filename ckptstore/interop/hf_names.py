"""The names a Hugging Face model expects, found in a training checkpoint.

A checkpoint written by ``CheckpointManager`` or as ``{"model": model.state_dict(),
"optim": ...}`` holds the model under ``model.``; Hugging Face wants the model's own names
(``model.layers.0...`` for a Llama, ``transformer.h.0...`` for GPT-2). A checkpoint of the
model's state_dict alone already has them. Wrappers' prefixes -- ``_orig_mod.`` of
``torch.compile``, ``module.`` of DDP -- are dropped.
"""

from __future__ import annotations

from collections.abc import Iterable

from ckptstore.interop.key_map import KeyMap

TRAINING_STATE = frozenset(
    {
        "optim",
        "optimizer",
        "optimizers",
        "lr_scheduler",
        "lr_schedulers",
        "scheduler",
        "dataloader",
        "data",
        "train_state",
        "rng",
        "step",
        "extra",
        "_ckptstore",
    }
)
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def hf_key_map(tensor_names: Iterable[str]) -> KeyMap:
    """The sub-tree and prefixes to drop so that the model's tensors get the model's names:
    ``model`` when the checkpoint is training state (``model`` next to optimizer, scheduler,
    ... entries only), nothing when it is a model's own state_dict."""
    tops = {name.split(".", 1)[0] for name in tensor_names}
    wrapped = "model" in tops and tops - {"model"} <= TRAINING_STATE
    return KeyMap(subtree="model" if wrapped else "", strip=WRAPPER_PREFIXES)
