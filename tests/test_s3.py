"""The S3 backend against a real server (SeaweedFS): conformance, checkpoints, commit race."""

from __future__ import annotations

import threading
import uuid

import pytest
import torch

import ckptstore as cs
from ckptstore.backends.base import Store
from ckptstore.backends.s3 import S3Store
from ckptstore.testing.store_tests import StoreTests


def new_store(seaweed, **kw) -> S3Store:
    return S3Store(
        f"test-{uuid.uuid4().hex[:12]}/some/prefix", create_bucket=True, **seaweed.options(), **kw
    )


class TestS3Store(StoreTests):
    @pytest.fixture
    def store(self, seaweed) -> Store:
        return new_store(seaweed)

    def raw_get(self, store: Store, key: str) -> bytes:
        return store.client.get_object(Bucket=store.bucket, Key=f"{store.prefix}/{key}")[
            "Body"
        ].read()


def test_multipart_upload_and_parallel_ranged_reads(seaweed) -> None:
    store = new_store(seaweed, part_bytes=5 << 20, concurrency=4)
    data = bytes(range(256)) * (23 << 12)  # ~23.5 MiB: five parts
    with store.open_writer("big.bin") as w:
        for i in range(0, len(data), 3_000_000):
            w.write(data[i : i + 3_000_000])
    assert store.size("big.bin") == len(data)
    out = bytearray(12 << 20)
    store.read_into("big.bin", 7 << 20, memoryview(out))
    assert bytes(out) == data[7 << 20 : 19 << 20]
    uploads = store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
    assert uploads == []


def test_aborted_upload_leaves_nothing(seaweed) -> None:
    store = new_store(seaweed, part_bytes=5 << 20)
    w = store.open_writer("x.bin")
    w.write(b"\0" * (11 << 20))
    w.abort()
    assert not store.exists("x.bin")
    assert store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []


def test_save_and_load_a_checkpoint_on_s3(seaweed) -> None:
    opts = seaweed.options()
    url = f"s3://ckpt-{uuid.uuid4().hex[:10]}/runs/step1"
    S3Store(url[5:], create_bucket=True, **opts)
    sd = {"w": torch.randn(300, 100), "b": torch.arange(7, dtype=torch.int16), "step": 1}
    cs.save(sd, url, storage_options=opts, codec="zstd")
    out = {"w": torch.zeros(300, 100), "b": torch.zeros(7, dtype=torch.int16), "step": 0}
    cs.load(out, url, storage_options=opts)
    assert torch.equal(out["w"], sd["w"]) and torch.equal(out["b"], sd["b"]) and out["step"] == 1
    ck = cs.open(url, storage_options=opts)
    assert torch.equal(ck.read("w", (slice(10, 20),)), sd["w"][10:20])
    with pytest.raises(cs.errors.CheckpointExistsError):
        cs.save(sd, url, storage_options=opts)


def test_two_writers_of_one_manifest_exactly_one_wins(seaweed) -> None:
    store = new_store(seaweed)
    wins, losses = [], []

    def commit(i: int) -> None:
        try:
            store.write_if_absent("manifest.json", f"writer {i}".encode())
            wins.append(i)
        except cs.errors.KeyExistsError:
            losses.append(i)

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(losses) == 5
    assert store.read("manifest.json") == f"writer {wins[0]}".encode()


def test_data_files_spread_over_prefixes(seaweed) -> None:
    opts = seaweed.options()
    store = new_store(seaweed)
    url = f"s3://{store.bucket}/{store.prefix}"
    sd = {f"w{i}": torch.randn(64, 64) for i in range(8)}
    info = cs.save(sd, url, storage_options=opts, spread_prefixes=16, files_per_rank=4)
    keys = list(store.list("data/"))
    assert len(keys) == info.files == 4
    assert all(k.count("/") == 2 and len(k.split("/")[1]) == 2 for k in keys), keys
    out = {k: torch.zeros(64, 64) for k in sd}
    cs.load(out, url, storage_options=opts)
    assert all(torch.equal(out[k], sd[k]) for k in sd)


def test_retention_deletes_a_checkpoint_in_batches(seaweed) -> None:
    """A retired checkpoint costs one DELETE (its manifest, first) and DeleteObjects batches,
    not one DELETE per data file (a 16k-rank checkpoint has 16k files)."""
    from ckptstore.testing.faultproxy import FaultProxy
    from ckptstore.testing.seaweed import S3_PORT
    from ckptstore.training import catalog

    root = f"s3://ret-{uuid.uuid4().hex[:10]}/run"
    opts = {**seaweed.options(), "create_bucket": True}
    cs.save(
        {"w": torch.ones(1 << 16)}, f"{root}/step_00000001", storage_options=opts, files_per_rank=8
    )
    with FaultProxy(("127.0.0.1", S3_PORT)) as proxy:
        store = S3Store(root[5:], **seaweed.options(proxy.endpoint))
        catalog.delete_checkpoint(store, 1)
    methods = [r.method for r in proxy.requests]
    assert methods.count("DELETE") == 1 and methods.count("POST") == 1, methods
    assert list(S3Store(root[5:], **seaweed.options()).list("")) == []
