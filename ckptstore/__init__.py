"""ckptstore: sharded, checksummed, manifest-committed checkpoints for PyTorch training.

>>> import ckptstore as cs
>>> cs.save(state_dict, "/ckpt/step100")          # collective; returns after commit
>>> cs.load(state_dict, "/ckpt/step100")          # collective; fills in place, reshards
>>> ckpt = cs.open("/ckpt/step100"); ckpt.read("model.w", (slice(0, 8),))
"""

from ckptstore import errors
from ckptstore.backends.tiered import TieredStore as Tiered
from ckptstore.loading.checkpoint import Checkpoint, ObjectMeta, TensorMeta
from ckptstore.loading.checkpoint import open_checkpoint as open
from ckptstore.loading.load import LoadInfo, load
from ckptstore.saving.async_save import AsyncSaveHandle, async_save, prepare_async_save
from ckptstore.saving.save import SaveInfo, prepare_save, save
from ckptstore.state.leaves import PerRank, Sharded
from ckptstore.tiers.replicator import ReplicationHandle, replicate
from ckptstore.tiers.upload import ReplicationInfo
from ckptstore.training.manager import CheckpointManager
from ckptstore.training.policies import (
    AnyOf,
    EveryNSeconds,
    EveryNSteps,
    KeepAll,
    KeepAny,
    KeepEvery,
    KeepLast,
)

__version__ = "0.1.0"


def __getattr__(name: str):  # ``cs.dcp``, imported on first use (it loads torch DCP)
    if name == "dcp":
        import importlib

        return importlib.import_module("ckptstore.dcp")
    raise AttributeError(f"module 'ckptstore' has no attribute {name!r}")


__all__ = [
    "AnyOf",
    "AsyncSaveHandle",
    "Checkpoint",
    "CheckpointManager",
    "EveryNSeconds",
    "EveryNSteps",
    "KeepAll",
    "KeepAny",
    "KeepEvery",
    "KeepLast",
    "LoadInfo",
    "ObjectMeta",
    "PerRank",
    "ReplicationHandle",
    "ReplicationInfo",
    "SaveInfo",
    "Sharded",
    "TensorMeta",
    "Tiered",
    "async_save",
    "dcp",
    "errors",
    "load",
    "open",
    "prepare_async_save",
    "prepare_save",
    "replicate",
    "save",
]
