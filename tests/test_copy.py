"""ckpt cp / copy_checkpoint: between stores and tiers, verified, manifest last."""

from __future__ import annotations

import json
import os
import uuid

import pytest
import torch

import ckptstore as cs
from ckptstore.backends.s3 import S3Store
from ckptstore.cli.main import main as ckpt_main
from ckptstore.ops.copy import copy_checkpoint


@pytest.fixture
def saved(tmp_path):
    sd = {"w": torch.randn(200, 300), "b": torch.arange(10), "note": "hi"}
    cs.save(sd, tmp_path / "src", files_per_rank=2)
    return tmp_path / "src", sd


def test_cp_local_to_local_with_cli(saved, tmp_path, capsys) -> None:
    src, sd = saved
    assert ckpt_main(["cp", str(src), str(tmp_path / "dst"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["files"] == 2
    ck = cs.open(tmp_path / "dst")
    assert torch.equal(ck.read("w"), sd["w"]) and ck.read("note") == "hi"
    assert ckpt_main(["cp", str(src), str(tmp_path / "dst")]) == 2, (
        "refuses to replace a checkpoint"
    )


def test_cp_through_s3_and_back(saved, tmp_path, seaweed) -> None:
    src, sd = saved
    bucket = f"cp-{uuid.uuid4().hex[:10]}"
    S3Store(bucket, create_bucket=True, **seaweed.options())
    url = f"s3://{bucket}/run/step1"
    copy_checkpoint(src, url, dst_options=seaweed.options())
    copy_checkpoint(url, tmp_path / "back", src_options=seaweed.options())
    out = {"w": torch.zeros(200, 300), "b": torch.zeros(10, dtype=torch.int64), "note": ""}
    cs.load(out, tmp_path / "back")
    assert torch.equal(out["w"], sd["w"]) and torch.equal(out["b"], sd["b"])


def test_cp_of_a_corrupt_source_commits_nothing(saved, tmp_path) -> None:
    src, _ = saved
    data = src / "data"
    path = data / sorted(os.listdir(data))[0]
    raw = bytearray(path.read_bytes())
    raw[10] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(cs.errors.ChecksumError):
        copy_checkpoint(src, tmp_path / "dst")
    assert not (tmp_path / "dst" / "manifest.json").exists()
    assert not any((tmp_path / "dst" / "data").iterdir())
    assert ckpt_main(["cp", str(src), str(tmp_path / "dst2")]) == 1
