"""Format 4: the chunk table in a chunk index file, read in parts.

Saves here force the index (``CKPTSTORE_INDEX_MIN_CHUNKS=1``) with parts of a few chunks,
so that small checkpoints exercise what a large job's does: every layout saved on 4 ranks
and loaded on 3, a rank reading only the parts its tensors need, the tools reading it
whole, and every way the index can be damaged or crafted.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import ckptstore as cs
from ckptstore.backends.s3 import S3Store
from ckptstore.errors import ManifestError
from ckptstore.format.checksum import crc32c
from ckptstore.format.chunk_index import encode_index, encode_names
from ckptstore.format.manifest import Manifest
from ckptstore.format.verify import verify_checkpoint
from ckptstore.ops.copy import copy_checkpoint
from ckptstore.ops.gc import find_garbage
from ckptstore.testing import hostile
from ckptstore.testing.ranks import run_ranks
from tests import dist_cases, tiered_cases

PART = 3


@pytest.fixture
def indexed(monkeypatch):
    monkeypatch.setenv("CKPTSTORE_INDEX_MIN_CHUNKS", "1")
    monkeypatch.setenv("CKPTSTORE_INDEX_PART_CHUNKS", str(PART))


def _state(zero: bool = False) -> dict:
    g = torch.Generator().manual_seed(5)
    sd = {f"layers.{i}.w": torch.rand(16, 4, generator=g) for i in range(24)}
    sd["emb"] = torch.rand(64, 32, generator=g)
    sd["step"] = 7
    if zero:
        sd = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0) for k, v in sd.items()}
    return sd


def _saved(path: str) -> str:
    cs.save(_state(), path)
    return path


def _index_path(ckpt: str) -> str:
    return os.path.join(ckpt, hostile.read_doc(ckpt)["chunks"]["index"]["key"])


def test_a_large_table_goes_to_a_chunk_index_and_loads_bit_exact(tmp_path, indexed) -> None:
    ckpt = _saved(str(tmp_path / "c"))
    doc = hostile.read_doc(ckpt)
    assert doc["format_version"] == 4
    assert set(doc["chunks"]) == {"count", "block_bytes", "index"}
    assert doc["chunks"]["index"]["key"].endswith("-index.bin")
    assert doc["files"]["count"] == 2  # the data file and the index: their keys in the index
    dest = _state(zero=True)
    info = cs.load(dest, ckpt)
    expected = _state()
    assert all(torch.equal(dest[k], expected[k]) for k in expected if k != "step")
    assert dest["step"] == 7
    assert 0 < info.index_bytes_read < os.path.getsize(_index_path(ckpt))  # all chunk parts
    manifest = cs.open(ckpt).manifest  # the tools read the whole table
    assert len(manifest.chunks) == doc["chunks"]["count"] == 25
    assert sorted(manifest.files) == sorted(f"data/{f}" for f in os.listdir(f"{ckpt}/data"))
    assert manifest.files[-1] == doc["chunks"]["index"]["key"]
    ck = cs.open(ckpt)
    assert verify_checkpoint(ck.store, ck.manifest).chunks == 25


def test_a_rank_reads_only_the_parts_its_tensors_need(tmp_path, indexed) -> None:
    ckpt = _saved(str(tmp_path / "c"))
    whole = os.path.getsize(_index_path(ckpt))
    dest = {"layers.3": {"w": torch.zeros(16, 4)}}
    info = cs.load(dest, ckpt, partial=True)
    assert torch.equal(dest["layers.3"]["w"], _state()["layers.3.w"])
    assert 0 < info.index_bytes_read < whole / 4  # one part of nine


def test_every_layout_saved_on_4_loads_on_3(tmp_path, indexed) -> None:
    root = str(tmp_path / "dist")
    run_ranks(4, dist_cases.save_layouts, root)
    for layout in dist_cases.LAYOUTS:
        assert hostile.read_doc(f"{root}/{layout}")["format_version"] == 4, layout
    assert run_ranks(3, dist_cases.load_layouts, root, 4) == [{}] * 3


def test_copy_and_gc_keep_the_index(tmp_path, indexed) -> None:
    ckpt = _saved(str(tmp_path / "run" / "step_00000001"))
    assert find_garbage(str(tmp_path / "run"), older_than=0) == []
    copy_checkpoint(ckpt, str(tmp_path / "copy"))
    dest = _state(zero=True)
    cs.load(dest, str(tmp_path / "copy"))
    assert torch.equal(dest["emb"], _state()["emb"])


# -- damage and crafted indexes ---------------------------------------------------------------
def _load_fails(ckpt: str, *needles: str) -> None:
    for attempt in (lambda: cs.load(_state(zero=True), ckpt), lambda: cs.open(ckpt)):
        with pytest.raises(ManifestError) as caught:
            attempt()
        for needle in needles:
            assert needle in str(caught.value)


def test_a_flipped_byte_in_the_index_is_refused(tmp_path, indexed) -> None:
    ckpt = _saved(str(tmp_path / "c"))
    path = _index_path(ckpt)
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0x10
    Path(path).write_bytes(bytes(data))
    _load_fails(ckpt, "chunk index part", "crc32c")


def test_a_truncated_or_missing_index_is_refused(tmp_path, indexed) -> None:
    ckpt = _saved(str(tmp_path / "c"))
    path = _index_path(ckpt)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:-5])
    _load_fails(ckpt, "truncated")
    os.unlink(path)
    _load_fails(ckpt, "missing")


def _recrafted(ckpt: str, change) -> None:
    """Re-encode the index with ``change(file, offset, nbytes, crcs)`` applied and sign both
    the parts and the manifest anew: damage that every checksum agrees with."""
    m = cs.open(ckpt).manifest
    t = m.chunks
    cols = [t.file.copy(), t.offset.copy(), t.nbytes.copy(), t.crc32c.copy()]
    cols = change(*cols) or cols
    first = np.zeros(len(cols[2]) + 1, dtype=np.int64)
    np.cumsum(np.maximum(1, -(-cols[2] // t.block_bytes)), out=first[1:])
    data, d = encode_index(*cols, first, PART, m.index.file, m.index.key)
    names, nd = encode_names(list(m.files), PART, len(data))
    Path(_index_path(ckpt)).write_bytes(data + names)
    doc = hostile.read_doc(ckpt)
    doc["chunks"]["index"] = d.to_json(hostile.pack)
    doc["files"] = nd.to_json(hostile.pack)
    hostile.write_doc(ckpt, doc)


def test_a_chunk_in_a_file_outside_the_list_is_refused(tmp_path, indexed) -> None:
    ckpt = _saved(str(tmp_path / "c"))

    def outside(file, offset, nbytes, crcs):
        file[4] = 99

    _recrafted(ckpt, outside)
    _load_fails(ckpt, "names a file outside files[]")


def test_a_chunk_that_points_into_the_index_itself_is_refused(tmp_path, indexed) -> None:
    ckpt = _saved(str(tmp_path / "c"))

    def into_index(file, offset, nbytes, crcs):
        file[0] = hostile.read_doc(ckpt)["chunks"]["index"]["file"]

    _recrafted(ckpt, into_index)
    _load_fails(ckpt, "names a file outside files[]")


def test_a_stored_size_that_is_not_the_box_is_refused_before_a_copy(tmp_path, indexed) -> None:
    ckpt = _saved(str(tmp_path / "c"))
    emb = cs.open(ckpt).manifest.tensors["emb"].chunk_start

    def larger(file, offset, nbytes, crcs):
        nbytes[emb] += 256  # still one checksum block

    _recrafted(ckpt, larger)
    _load_fails(ckpt, "stores", "bytes")
    dest = {"emb": torch.zeros(64, 32)}  # a rank that reads this chunk's part alone
    with pytest.raises(ManifestError, match="stores 8448 bytes, its box has 8192"):
        cs.load(dest, ckpt, partial=True)
    assert not dest["emb"].any()


def test_offsets_out_of_range_are_refused(tmp_path, indexed) -> None:
    ckpt = _saved(str(tmp_path / "c"))

    def negative(file, offset, nbytes, crcs):
        offset[1] = -8

    _recrafted(ckpt, negative)
    _load_fails(ckpt, "offset is out of range")


def _rewrite_part(ckpt: str, part: int, columns: bytes, crcs: bytes) -> None:
    """Replace part ``part`` with ``columns`` deflated and ``crcs``, all signed."""
    doc = hostile.read_doc(ckpt)
    ix = doc["chunks"]["index"]
    at = hostile.unpack(ix["at"], "<u8").astype(np.int64)
    deflated = hostile.unpack(ix["deflated"], "<u4").astype(np.int64)
    sums = hostile.unpack(ix["crc32c"], "<u4").copy()
    data = Path(_index_path(ckpt)).read_bytes()
    body = zlib.compress(columns) + crcs
    new = data[: at[part]] + body + data[at[part + 1] :]
    grow = len(body) - int(at[part + 1] - at[part])
    at[part + 1 :] += grow
    deflated[part] = len(body) - len(crcs)
    sums[part] = crc32c(body)
    Path(_index_path(ckpt)).write_bytes(new)
    ix.update(at=hostile.pack(at, "<u8"), deflated=hostile.pack(deflated, "<u4"))
    ix["crc32c"] = hostile.pack(sums, "<u4")
    names_at = hostile.unpack(doc["files"]["at"], "<u8").astype(np.int64) + grow
    doc["files"]["at"] = hostile.pack(names_at, "<u8")
    hostile.write_doc(ckpt, doc)


def test_a_part_that_inflates_past_its_size_is_refused(tmp_path, indexed) -> None:
    ckpt = _saved(str(tmp_path / "c"))
    bomb = bytes(50 << 20)  # 50 MiB of zeros where 60 bytes are due
    _rewrite_part(ckpt, 0, bomb, b"\0" * 4 * PART)
    _load_fails(ckpt, "does not inflate to exactly 60 bytes")


def test_a_part_with_the_wrong_checksum_count_is_refused(tmp_path, indexed) -> None:
    ckpt = _saved(str(tmp_path / "c"))
    columns = zlib.decompress(
        Path(_index_path(ckpt)).read_bytes()[
            : int(hostile.unpack(hostile.read_doc(ckpt)["chunks"]["index"]["deflated"], "<u4")[0])
        ]
    )
    _rewrite_part(ckpt, 0, columns, b"\0" * 4 * (PART + 1))
    _load_fails(ckpt, "checksums, its chunks need")


def test_a_directory_that_does_not_fit_the_chunk_count_is_refused(tmp_path, indexed) -> None:
    ckpt = _saved(str(tmp_path / "c"))
    doc = hostile.read_doc(ckpt)
    doc["chunks"]["count"] += PART  # one part more than the directory lists
    hostile.write_doc(ckpt, doc)
    with pytest.raises(ManifestError, match="directory does not describe"):
        cs.open(ckpt)


def test_small_checkpoints_keep_the_table_inline_as_format_3(tmp_path) -> None:
    ckpt = _saved(str(tmp_path / "c"))
    doc = json.loads(Path(os.path.join(ckpt, "manifest.json")).read_bytes())
    assert doc["format_version"] == 3 and "offset" in doc["chunks"]


def test_a_damaged_or_hostile_file_name_part_is_refused(tmp_path, indexed) -> None:
    ckpt = _saved(str(tmp_path / "c"))
    m = cs.open(ckpt).manifest
    doc = hostile.read_doc(ckpt)
    data = Path(_index_path(ckpt)).read_bytes()
    start = int(hostile.unpack(doc["files"]["at"], "<u8")[0])
    Path(_index_path(ckpt)).write_bytes(data[:start] + bytes([data[start] ^ 1]) + data[start + 1 :])
    _load_fails(ckpt, "file name part 0", "crc32c")
    keys = list(m.files)
    keys[0] = "data/../../outside.bin"  # signed as if the save had written it
    names, nd = encode_names(keys, PART, start)
    Path(_index_path(ckpt)).write_bytes(data[:start] + names)
    doc["files"] = nd.to_json(hostile.pack)
    hostile.write_doc(ckpt, doc)
    _load_fails(ckpt, "data/../../outside.bin", "is not of the form data/NAME")


def test_tiered_nodes_each_hold_the_index_and_s3_gets_it(seaweed, tmp_path, indexed) -> None:
    """Two simulated nodes of two ranks: the coordinator writes the index on its node, the
    commit's broadcast puts it on the other node before its manifest, replication uploads
    it, and every tier loads (node 1's tier lost: from S3)."""
    bucket = f"index-{uuid.uuid4().hex[:10]}"
    S3Store(bucket, create_bucket=True, **seaweed.options())
    remote, opts, nodes = f"s3://{bucket}/step1", seaweed.options(), str(tmp_path / "nodes")
    saved = run_ranks(4, tiered_cases.save_on_nodes, nodes, remote, opts, 2)
    assert [s["state"] for s in saved] == ["replicated"] * 4
    for node in ("node0", "node1"):
        local = os.path.join(nodes, node, "step1")
        assert os.path.exists(_index_path(local)), node
    assert cs.open(remote, storage_options=opts).manifest.index is not None
    out = run_ranks(4, tiered_cases.load_on_nodes, nodes, remote, opts, 2, "row")
    assert all(o["problems"] == [] for o in out), out
    shutil.rmtree(os.path.join(nodes, "node1"))
    out = run_ranks(4, tiered_cases.load_on_nodes, nodes, remote, opts, 2, "col")
    assert all(o["problems"] == [] for o in out), out
    assert all(o["by_tier"]["local"] == 0 for o in out[2:]), out


def test_a_read_manifest_writes_back_the_same_bytes_without_reading_its_keys(
    tmp_path, indexed
) -> None:
    ckpt = _saved(str(tmp_path / "c"))
    data = Path(ckpt, "manifest.json").read_bytes()
    head = Manifest.from_json(data)  # no store: the keys are not read
    assert head.to_json() == data
