"""The import contract (``tools/import_contract.py``): the layers, the walls, no cycles. It
holds on the sources, and it fails -- naming the breach -- when one is introduced."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import import_contract  # noqa: E402


def test_the_contract_holds() -> None:
    assert import_contract.check(ROOT) == []


@pytest.fixture
def copy(tmp_path) -> str:
    for folder in ("ckptstore", "backends"):
        shutil.copytree(os.path.join(ROOT, folder), tmp_path / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    return str(tmp_path)


def _append(root: str, module: str, code: str) -> None:
    with open(os.path.join(root, *module.split(".")) + ".py", "a", encoding="utf-8") as f:
        f.write("\n" + code + "\n")


BREACHES = {
    "an upward import inside a function": (
        "ckptstore.format.manifest",
        "def _later():\n    from ckptstore.training import manager\n    return manager",
        "ckptstore.format.manifest imports ckptstore.training.manager: a higher layer",
    ),
    "saving and loading importing each other": (
        "ckptstore.saving.save",
        "from ckptstore.loading.read import ChunkReader",
        "ckptstore.saving and ckptstore.loading are independent",
    ),
    "a Store importing the format": (
        "backends.local",
        "from ckptstore.format.manifest import MANIFEST_KEY",
        "ckptstore.backends.local imports ckptstore.format.manifest: a higher layer",
    ),
    "torch.distributed outside coordination": (
        "ckptstore.loading.load",
        "import torch.distributed as dist",
        "imports torch.distributed (only coordination may)",
    ),
    "a collective called outside coordination": (
        "ckptstore.tiers.upload",
        "def _sync():\n    import torch\n    torch.distributed.barrier()",
        "calls torch.distributed.barrier (only coordination may)",
    ),
    "a test for a concrete Store class": (
        "ckptstore.ops.gc",
        "def _local(store):\n    from ckptstore.backends.local import LocalStore\n"
        "    return isinstance(store, LocalStore)",
        "tests for LocalStore",
    ),
    "a cycle inside one package": (
        "ckptstore.format.layouts",
        "def _m():\n    from ckptstore.format import manifest\n    return manifest",
        "import cycle: ",
    ),
}


@pytest.mark.parametrize("breach", sorted(BREACHES))
def test_a_breach_is_named(copy: str, breach: str) -> None:
    module, code, expected = BREACHES[breach]
    assert import_contract.check(copy) == []
    _append(copy, module, code)
    problems = import_contract.check(copy)
    assert any(expected in p for p in problems), problems
    if expected == "import cycle: ":  # the cycle names both modules
        assert any("format.layouts" in p and "format.manifest" in p for p in problems)


def test_type_only_imports_do_not_count(copy: str) -> None:
    _append(
        copy,
        "ckptstore.format.manifest",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from ckptstore.training.manager import CheckpointManager",
    )
    assert import_contract.check(copy) == []
