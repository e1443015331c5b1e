"""The ckpt CLI in full and interop, on a checkpoint sharded on 4 real ranks: diff, export
(read back with safetensors / torch.load / zarr), import (torch DCP, torch.save,
safetensors), reshard (loaded on 2 ranks with sequential reads), gc, the zarr view, and the
same commands against S3."""

from __future__ import annotations

import base64
import glob
import json
import os
import time

import numpy as np
import pytest
import torch

import ckptstore as cs
from ckptstore.cli.main import main as ckpt
from ckptstore.errors import ConversionError
from ckptstore.loading.zarr_view import CheckpointZarrMap
from ckptstore.ops.gc import delete_garbage, find_garbage
from ckptstore.testing.ranks import run_ranks
from ckptstore.training import catalog
from tests import cli_cases
from tests.dist_cases import global_state

FULL = {**global_state(), "model.bias": torch.arange(1024, dtype=torch.float32)}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("cli") / "step100")
    run_ranks(4, cli_cases.save_sharded, path)
    return path


def _json(capsys) -> object:
    return json.loads(capsys.readouterr().out)


def test_inspect_tree_and_table_fit_80_columns(sharded, capsys) -> None:
    assert ckpt(["inspect", sharded, "--tree"]) == 0
    tree = capsys.readouterr().out
    assert "└─ " in tree and "w1  bfloat16 64x48" in tree
    assert ckpt(["inspect", sharded]) == 0
    text = capsys.readouterr().out
    assert max(len(line) for line in text.splitlines()) <= 80
    assert ckpt(["inspect", sharded, "--json"]) == 0
    doc = _json(capsys)
    assert doc["world_size"] == 4 and {t["name"] for t in doc["tensors"]} >= set(FULL)


def test_diff_by_checksums_then_by_values(sharded, tmp_path, capsys) -> None:
    copy = str(tmp_path / "copy")
    assert ckpt(["cp", sharded, copy, "--json"]) == 0
    capsys.readouterr()
    assert ckpt(["diff", sharded, copy, "--json"]) == 0
    doc = _json(capsys)
    assert doc["same"] and all(
        e["how"] == "checksums" for e in doc["entries"] if e["max_abs"] is not None
    )
    changed = {k: v.clone() for k, v in FULL.items()}
    changed["model.w0"][5, 3] += 0.5
    changed["model.emb"] = torch.zeros(3, dtype=torch.float64)
    del changed["model.vec"]
    single = str(tmp_path / "single")
    cs.save(changed, single)  # one rank: other chunk geometry, so values are compared
    assert ckpt(["diff", sharded, single, "--json"]) == 1
    entries = {e["name"]: e for e in _json(capsys)["entries"]}
    assert entries["model.w0"]["status"] == "differs"
    assert entries["model.w0"]["mismatched"] == 1
    assert entries["model.w0"]["max_abs"] == pytest.approx(0.5, rel=1e-5)
    assert entries["model.w1"]["status"] == "equal" and entries["model.w1"]["how"] == "values"
    assert entries["model.emb"]["status"] == "shape"
    assert entries["model.vec"]["status"] == "only_a"
    assert ckpt(["diff", sharded, single, "--tensors", "model.w0", "--atol", "1"]) == 0
    assert "within atol" in capsys.readouterr().out


def test_export_safetensors_split_with_index(sharded, tmp_path, capsys) -> None:
    from safetensors.torch import load_file

    out = str(tmp_path / "hf")
    assert ckpt(["export", sharded, out, "--format", "safetensors", "--max-shard-size", "8KB",
                 "--max-memory", "1KB", "--json"]) == 0  # fmt: skip
    info = _json(capsys)
    files = sorted(glob.glob(os.path.join(out, "*.safetensors")))
    assert len(files) > 1 and info["tensors"] == len(FULL) + 2
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    got: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(f)
        assert all(index["weight_map"][k] == os.path.basename(f) for k in part)
        got.update(part)
    for name, expected in FULL.items():
        assert torch.equal(got[name], expected), name
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in got.values())


def test_export_torch_with_dtype_and_zarr(sharded, tmp_path) -> None:
    import zarr

    pt = str(tmp_path / "model.pt")
    assert ckpt(["export", sharded, pt, "--format", "torch", "--dtype", "bf16"]) == 0
    loaded = torch.load(pt, weights_only=True)
    assert loaded["model.w0"].dtype == torch.bfloat16
    assert torch.equal(loaded["model.w0"], FULL["model.w0"].to(torch.bfloat16))
    assert torch.equal(loaded["model.vec"], FULL["model.vec"])  # ints are not cast

    out = str(tmp_path / "z")
    assert ckpt(["export", sharded, out, "--format", "zarr", "--tensors", "model.*"]) == 0
    group = zarr.open_group(out, mode="r")
    assert np.array_equal(group["model.w0"][:], FULL["model.w0"].numpy())
    w1 = group["model.w1"]
    assert w1.attrs["torch_dtype"] == "bfloat16" and w1.attrs["raw_bits"] is True
    assert torch.equal(
        torch.from_numpy(w1[:].view(np.int16)).view(torch.bfloat16), FULL["model.w1"]
    )
    assert "optim.state.0.exp_avg" not in group


def test_zarr_view_reads_the_saved_bytes(sharded) -> None:
    ck = cs.open(sharded)
    group = ck.zarr()  # uneven FSDP-style shards too: zarr's partial edge chunk
    assert group.attrs["ckptstore"]["not_viewable"] == {}
    w0 = group["model.w0"]  # 37 rows over 4 ranks: chunks of 10, 10, 10 and an edge of 7
    assert w0.chunks == (10, 19)
    assert np.array_equal(w0[:], FULL["model.w0"].numpy())
    assert np.array_equal(w0[25:37, 3:9], FULL["model.w0"][25:37, 3:9].numpy())
    w1 = group["model.w1"]  # 64 rows over 4 ranks: a regular grid of 16-row chunks
    assert w1.chunks == (16, 48)
    region = w1[10:40, 5:20]
    expected = ck.read("model.w1", (slice(10, 40), slice(5, 20)))
    assert torch.equal(torch.from_numpy(region.view(np.int16)).view(torch.bfloat16), expected)
    assert np.array_equal(
        group["model.bias"][100:200], ck.read("model.bias", (slice(100, 200),)).numpy()
    )
    refs = CheckpointZarrMap(ck, ["model.w1"], strict=True).references()["refs"]
    second = ck.manifest.tensors["model.w1"].chunk_start + 1  # rows 16..31, written by rank 1
    url, offset, length = refs["model.w1/c/1/0"]
    assert url.endswith(ck.manifest.files[int(ck.manifest.chunks.file[second])])
    assert (offset, length) == (int(ck.manifest.chunks.offset[second]), 16 * 48 * 2)


def test_zarr_view_leaves_out_an_irregular_split_only(tmp_path) -> None:
    path = str(tmp_path / "irregular")
    run_ranks(2, cli_cases.save_irregular, path)
    ck = cs.open(path)
    group = ck.zarr()
    assert "irregular split" in group.attrs["ckptstore"]["not_viewable"]["odd"]
    assert np.array_equal(group["even"][:], torch.arange(16.0).reshape(8, 2).numpy())
    with pytest.raises(ConversionError, match="odd"):
        ck.zarr(["odd"])  # asked for by name: refused
    edge = CheckpointZarrMap(cs.open(sharded_edge_case(tmp_path)), None, strict=True)
    padded = edge.references()["refs"]["w/c/1/0"]  # rows 3..4 of 3-row chunks: inline, padded
    assert padded.startswith("base64:")
    values = np.frombuffer(base64.b64decode(padded[len("base64:") :]), dtype=np.float32)
    assert values.tolist() == [6.0, 7.0, 8.0, 9.0, 0.0, 0.0]


def sharded_edge_case(tmp_path) -> str:
    """A 5-row tensor saved as torch.chunk's 3 + 2 rows (one process, two Sharded boxes)."""
    path = str(tmp_path / "edge")
    run_ranks(2, cli_cases.save_edge, path)
    return path


def test_import_dcp_needs_trust_then_loads(tmp_path, capsys) -> None:
    import torch.distributed.checkpoint as dcp

    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))
    optim = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    optim.step()
    sd = {"model": model.state_dict(), "optim": optim.state_dict(), "step": 12}
    src = str(tmp_path / "dcp")
    dcp.save(sd, checkpoint_id=src, no_dist=True)
    dst = str(tmp_path / "imported")
    assert ckpt(["import", src, dst]) == 2
    assert "--trust" in capsys.readouterr().err
    assert not os.path.exists(dst)
    assert ckpt(["import", src, dst, "--trust", "--max-memory", "200B"]) == 0  # many batches
    fresh = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))
    target = {"model": fresh.state_dict(), "step": 0}
    cs.load(target, dst, strict=False)
    assert target["step"] == 12
    for k, v in model.state_dict().items():
        assert torch.equal(target["model"][k], v), k
    assert torch.equal(
        cs.open(dst).read("optim.state.0.exp_avg"), optim.state_dict()["state"][0]["exp_avg"]
    )


def test_import_torch_save_and_safetensors(tmp_path, sharded) -> None:
    pt = str(tmp_path / "m.pt")
    torch.save({"w": FULL["model.w0"], "nested": {"b": FULL["model.bias"]}}, pt)
    assert ckpt(["import", pt, str(tmp_path / "from_pt")]) == 0
    assert torch.equal(cs.open(str(tmp_path / "from_pt")).read("nested.b"), FULL["model.bias"])
    hf = str(tmp_path / "hf")
    assert ckpt(["export", sharded, hf, "--format", "safetensors", "--max-shard-size", "8KB"]) == 0
    assert ckpt(["import", hf, str(tmp_path / "back")]) == 0
    assert ckpt(["diff", sharded, str(tmp_path / "back"), "--tensors", "model.*"]) == 0


def test_reshard_output_loads_on_2_ranks_with_sequential_reads(sharded, tmp_path, capsys) -> None:
    out = str(tmp_path / "for2")
    assert ckpt(["reshard", sharded, out, "--world-size", "2", "--max-memory", "4KB",
                 "--placement", "model.bias=replicate", "--json"]) == 0  # fmt: skip
    info = _json(capsys)
    assert info["world_size"] == 2 and info["dropped"] == ["rng"]
    manifest = cs.open(out).manifest
    sizes = {f: os.path.getsize(os.path.join(out, f)) for f in manifest.files}
    results = run_ranks(2, cli_cases.load_resharded, out)
    for rank, r in enumerate(results):
        assert r["bad"] == [], r
        # one request for the rank's own file and one for the replicated tensors, each read
        # front to back exactly once
        own = sizes[manifest.files[rank]]
        replicated = sizes[manifest.files[-1]]
        assert r["requests"] == 2 and r["bytes"] == own + replicated, (r, sizes)
    assert ckpt(["verify", out]) == 0


def test_gc_deletes_only_what_it_listed(tmp_path, capsys) -> None:
    root = tmp_path / "run"
    cs.save({"w": torch.ones(8)}, root / "step_00000001")
    cs.save({"w": torch.ones(8)}, root / "step_00000002")
    (root / "step_00000003" / "data").mkdir(parents=True)
    (root / "step_00000003" / "data" / "00000-abc-0.bin").write_bytes(b"x" * 100)  # killed save
    (root / "step_00000002" / "data" / "00001-old-0.bin").write_bytes(b"y" * 50)  # orphan
    (root / "step_00000002" / "data" / ".tmp-00000-t-0.bin.1234").write_bytes(b"z" * 10)
    assert ckpt(["gc", str(root), "--older-than", "1h", "--json"]) == 0
    assert _json(capsys)["items"] == []  # all of it is too young
    assert ckpt(["gc", str(root), "--older-than", "0s", "--json"]) == 0
    listed = _json(capsys)
    assert sorted((i["kind"], i["where"]) for i in listed["items"]) == [
        ("incomplete", "step_00000003"),
        ("orphan", "step_00000002/data/00001-old-0.bin"),
        ("temp", "step_00000002/data/.tmp-00000-t-0.bin.1234"),
    ]
    assert os.path.exists(root / "step_00000003")  # a dry run deletes nothing
    items = find_garbage(str(root), older_than=0)
    time.sleep(0.01)
    late = root / "step_00000002" / "data" / "00002-late-0.bin"
    late.write_bytes(b"w" * 5)  # appears after the listing: must survive
    assert delete_garbage(str(root), items) == 160
    assert late.exists()
    assert not (root / "step_00000003").exists()
    assert ckpt(["verify", str(root / "step_00000002")]) == 0
    assert [e.step for e in catalog.scan(str(root))] == [1, 2]


def test_the_commands_against_s3(sharded, seaweed, tmp_path, monkeypatch, capsys) -> None:
    import uuid

    from ckptstore.backends.s3 import S3Store

    opts = seaweed.options()
    monkeypatch.setenv("AWS_ENDPOINT_URL", opts["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", opts["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", opts["aws_secret_access_key"])
    bucket = f"cli-{uuid.uuid4().hex[:10]}"
    S3Store(bucket, create_bucket=True)
    root = f"s3://{bucket}/run"
    remote = f"{root}/step_00000100"
    assert ckpt(["cp", sharded, remote]) == 0
    capsys.readouterr()
    assert ckpt(["ls", root, "--json"]) == 0
    assert [(e["step"], e["state"]) for e in _json(capsys)] == [(100, "committed")]
    assert ckpt(["inspect", remote, "--tree"]) == 0
    assert ckpt(["verify", remote, "--jobs", "2"]) == 0
    assert ckpt(["diff", sharded, remote]) == 0
    capsys.readouterr()
    assert ckpt(["export", remote, str(tmp_path / "hf"), "--format", "safetensors"]) == 0
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in FULL.items())
    assert ckpt(["reshard", remote, f"{root}/step_00000101", "--world-size", "2"]) == 0
    assert ckpt(["diff", remote, f"{root}/step_00000101", "--tensors", "model.*"]) == 0
    group = cs.open(remote).zarr(["model.w1", "model.bias"])
    assert np.array_equal(group["model.bias"][:], FULL["model.bias"].numpy())
    store = S3Store(f"{bucket}/run")
    store.write("step_00000102/data/00000-x-0.bin", b"partial")  # a save that never committed
    capsys.readouterr()
    assert ckpt(["gc", root, "--older-than", "0s", "--apply", "--json"]) == 0
    doc = _json(capsys)
    assert [(i["kind"], i["where"]) for i in doc["items"]] == [("incomplete", "step_00000102")]
    assert [e.step for e in catalog.scan(store)] == [100, 101]


def test_reshard_checksums_cut_at_block_boundaries(tmp_path, monkeypatch) -> None:
    from ckptstore.format.verify import verify_checkpoint
    from ckptstore.ops.reshard import reshard_checkpoint

    sd = {"w": torch.randn(50, 30), "b": torch.randn(7, 3).to(torch.bfloat16), "n": 4}
    cs.save(sd, tmp_path / "a")
    monkeypatch.setenv("CKPTSTORE_CHECKSUM_BLOCK_BYTES", "100")  # blocks split every chunk
    reshard_checkpoint(tmp_path / "a", tmp_path / "b", world_size=3, max_memory=64)
    ck = cs.open(tmp_path / "b")
    assert ck.manifest.chunks.block_bytes == 100 and len(ck.manifest.chunks.crc32c) > 20
    assert verify_checkpoint(ck.store, ck.manifest).ok
    assert torch.equal(ck.read("w"), sd["w"]) and torch.equal(ck.read("b"), sd["b"])
    assert ck.read("w", (slice(20, 40), slice(3, 9))).equal(sd["w"][20:40, 3:9])


def test_bad_input_gets_a_clear_error_and_exit_code_2(tmp_path, capsys) -> None:
    ck = str(tmp_path / "c")
    cs.save({"z": torch.zeros(4, dtype=torch.complex128), "w": torch.ones(3, 2)}, ck)
    cases = [
        (["export", ck, str(tmp_path / "o"), "--format", "safetensors"], "'z'"),
        (["export", ck, str(tmp_path / "o"), "--format", "zarr", "--dtype", "fp8"], "--dtype"),
        (["export", ck, str(tmp_path / "o"), "--format", "torch", "--tensors", "nope*"], "nope"),
        (["reshard", ck, str(tmp_path / "r"), "--world-size", "2", "--placement", "w=split"],
         "shard(d)"),
        (["reshard", ck, str(tmp_path / "r"), "--world-size", "2", "--placement", "w=shard(5)"],
         "'w'"),
        (["gc", str(tmp_path), "--older-than", "soon"], "duration"),
        (["import", str(tmp_path / "missing.pt"), str(tmp_path / "i")], "missing.pt"),
        (["diff", ck, str(tmp_path / "absent")], "absent"),
        (["export", ck, str(tmp_path / "o"), "--format", "torch", "--max-memory", "lots"],
         "size"),
    ]  # fmt: skip
    for argv, named in cases:
        assert ckpt(argv) == 2, argv
        err = capsys.readouterr().err
        assert named in err, (argv, err)
    assert not os.path.exists(tmp_path / "r" / "manifest.json")
