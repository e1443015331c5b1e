"""ckptstore as PyTorch Lightning's ``CheckpointIO``: Lightning's checkpoints (model, optimizer
states, loops, callbacks, hyper-parameters) become ckptstore checkpoints -- crc32c per block,
a manifest committed last, any store (``s3://`` included), nothing pickled unless allowed.

    from ckptstore.integrations.lightning import CkptStoreIO
    trainer = Trainer(plugins=[CkptStoreIO()], ...)

Lightning calls ``save_checkpoint`` on rank 0 with the full (consolidated) state of the
strategies that gather it (single device, DDP); each ``*.ckpt`` path becomes a checkpoint
directory (or prefix). Any number of processes loads it back. Lightning's FSDP and
ModelParallel strategies save sharded state themselves, through torch DCP, without a
``CheckpointIO``: they are not covered here (docs/integrations.md).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from lightning.pytorch.plugins.io import CheckpointIO

from ckptstore.backends.registry import open_store
from ckptstore.integrations.tree import rebuild, skeleton
from ckptstore.loading.checkpoint import open_checkpoint
from ckptstore.saving.save import save

TREE_KEY = "lightning_tree"  # manifest metadata: the containers of Lightning's dict


class CkptStoreIO(CheckpointIO):
    """Lightning ``CheckpointIO`` over ckptstore.

    Args:
        storage_options: backend options for the checkpoint paths (S3 endpoint, ...).
        allow_pickle: store (and load) entries that are not tensors or plain values
            pickled -- hyper-parameters of custom types, for example. Off: such an entry is
            refused with its name.
    """

    def __init__(
        self, storage_options: dict[str, Any] | None = None, allow_pickle: bool = False
    ) -> None:
        self.storage_options = dict(storage_options or {})
        self.allow_pickle = allow_pickle

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Write Lightning's checkpoint dict at ``path`` (replacing one saved there: Lightning
        saves ``last.ckpt`` again and again)."""
        save(
            checkpoint,
            os.fspath(path),
            no_dist=True,  # Lightning calls this on rank 0 only
            overwrite=True,
            allow_pickle=self.allow_pickle,
            metadata={TREE_KEY: skeleton(checkpoint)},
            storage_options={**self.storage_options, **(storage_options or {})} or None,
        )

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Lightning's checkpoint dict, rebuilt from the checkpoint at ``path`` (tensors on
        the CPU; Lightning moves them)."""
        ckpt = open_checkpoint(os.fspath(path), storage_options=self.storage_options or None)
        tree = ckpt.metadata.get(TREE_KEY)
        if tree is None:  # not written by this plugin: every entry at the top level
            return {name: ckpt.read(name, allow_pickle=self.allow_pickle) for name in ckpt}
        return rebuild(tree, lambda name: ckpt.read(name, allow_pickle=self.allow_pickle))

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the checkpoint at ``path`` (Lightning's ``save_top_k`` retention)."""
        path = os.fspath(path)
        if "://" not in path:
            shutil.rmtree(path, ignore_errors=True)
            return
        open_store(path, **self.storage_options).delete_prefix("")
