"""A Hugging Face model directory (safetensors files, sharded with an index) read as a
checkpoint: ``cs.open`` and ``cs.load`` through the same read path, resharded onto DTensors,
every block verified; malformed files refused with a typed error naming them."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import ckptstore as cs
from ckptstore.errors import ConversionError
from ckptstore.testing.ranks import run_ranks
from tests import dist_cases

TENSORS = {
    "embed.weight": torch.arange(37 * 8, dtype=torch.float32).reshape(37, 8),
    "head.bias": torch.linspace(-1, 1, 11),
}


def _hf_dir(tmp_path) -> str:
    """Two shard files and their index, written by the safetensors library itself."""
    out = str(tmp_path / "hf")
    os.makedirs(out)
    files = {
        "embed.weight": "model-00001-of-00002.safetensors",
        "head.bias": "model-00002-of-00002.safetensors",
    }
    for name, fname in files.items():
        save_file({name: TENSORS[name]}, os.path.join(out, fname), metadata={"format": "pt"})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": files}, f)
    return out


def test_open_and_load_a_safetensors_directory(tmp_path) -> None:
    path = _hf_dir(tmp_path)
    ckpt = cs.open(path)
    assert set(ckpt) == set(TENSORS)
    assert torch.equal(ckpt.read("embed.weight", (slice(3, 9),)), TENSORS["embed.weight"][3:9])
    sd = {k: torch.zeros_like(v) for k, v in TENSORS.items()}
    cs.load(sd, path)
    assert all(torch.equal(sd[k], v) for k, v in TENSORS.items())


def test_a_safetensors_directory_loads_resharded_on_2_ranks(tmp_path) -> None:
    path = _hf_dir(tmp_path)
    for got in run_ranks(2, dist_cases.load_hf_directory, path):
        assert torch.equal(got["embed.weight"], TENSORS["embed.weight"])
        assert torch.equal(got["head.bias"], TENSORS["head.bias"])
        assert got["bytes_read"] <= 37 * 8 * 4 + 11 * 4  # nothing read twice (small: coalesced)


def test_a_changed_or_malformed_file_is_refused(tmp_path) -> None:
    path = _hf_dir(tmp_path)
    shard = os.path.join(path, "model-00001-of-00002.safetensors")
    with open(shard, "r+b") as f:  # a header that claims more bytes than the file has
        f.seek(8)
        header = f.read(200)
        f.seek(8)
        f.write(header.replace(b"[0,1184]", b"[0,9184]"))
    with pytest.raises(ConversionError, match=r"model-00001-of-00002\.safetensors"):
        cs.open(path)
