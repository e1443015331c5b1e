"""Saves and loads through a fault-injecting proxy in front of the real S3 server:
they succeed after bounded retries or fail with a clear error -- never with wrong data."""

from __future__ import annotations

import uuid

import pytest
import torch

import ckptstore as cs
from ckptstore.backends.s3 import S3Store
from ckptstore.testing.faultproxy import FaultPlan, FaultProxy
from ckptstore.testing.seaweed import S3_PORT


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(1024, 1536, generator=g),
        "v": torch.randn(5000, generator=g),
        "step": 3,
    }


def _zeros() -> dict:
    return {"w": torch.zeros(1024, 1536), "v": torch.zeros(5000), "step": 0}


def _url(seaweed) -> str:
    bucket = f"faults-{uuid.uuid4().hex[:10]}"
    S3Store(bucket, create_bucket=True, **seaweed.options())
    return f"s3://{bucket}/ckpt"


@pytest.mark.parametrize(
    "fault,every",
    [("503", 3), ("500", 4), ("drop", 5), ("truncate", 3), ("slow", 6)],
)
def test_intermittent_faults_are_retried_and_data_is_exact(seaweed, fault, every) -> None:
    url = _url(seaweed)
    plan = FaultPlan(
        rule=lambda m, p, n: fault if n % every == every - 1 else "pass", slow_seconds=0.2
    )
    with FaultProxy(("127.0.0.1", S3_PORT), plan) as proxy:
        opts = {**seaweed.options(proxy.endpoint), "part_bytes": 5 << 20}
        sd = _state()
        cs.save(sd, url, storage_options=opts)
        out = _zeros()
        cs.load(out, url, storage_options=opts)
    assert plan.counts.get(fault, 0) > 0, "the fault was injected"
    assert torch.equal(out["w"], sd["w"]) and torch.equal(out["v"], sd["v"]) and out["step"] == 3


def test_a_503_burst_is_ridden_out(seaweed) -> None:
    url = _url(seaweed)
    plan = FaultPlan(rule=lambda m, p, n: "503" if 2 <= n < 6 else "pass")
    with FaultProxy(("127.0.0.1", S3_PORT), plan) as proxy:
        opts = seaweed.options(proxy.endpoint)
        cs.save(_state(), url, storage_options=opts)
    assert plan.counts["503"] == 4
    assert torch.equal(cs.open(url, storage_options=seaweed.options()).read("v"), _state()["v"])


def test_a_server_that_keeps_failing_gives_a_clear_error_and_no_checkpoint(seaweed) -> None:
    url = _url(seaweed)
    plan = FaultPlan(rule=lambda m, p, n: "500" if m in ("PUT", "POST") else "pass")
    with FaultProxy(("127.0.0.1", S3_PORT), plan) as proxy:
        opts = {**seaweed.options(proxy.endpoint), "max_attempts": 3}
        with pytest.raises(cs.errors.CkptStoreError) as err:
            cs.save(_state(), url, storage_options=opts)
    assert "s3://" in str(err.value)
    store = S3Store(url[5:], **seaweed.options())
    assert not store.exists("manifest.json")
    assert store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []


def test_reads_that_keep_getting_truncated_fail_cleanly(seaweed) -> None:
    url = _url(seaweed)
    cs.save(_state(), url, storage_options=seaweed.options())
    plan = FaultPlan(rule=lambda m, p, n: "truncate" if m == "GET" and "data/" in p else "pass")
    with FaultProxy(("127.0.0.1", S3_PORT), plan) as proxy:
        out = _zeros()
        with pytest.raises(cs.errors.CkptStoreError):
            cs.load(
                out, url, storage_options={**seaweed.options(proxy.endpoint), "max_attempts": 3}
            )
    assert torch.equal(out["w"], torch.zeros(1024, 1536)), (
        "no partial or wrong data reached a tensor"
    )


def test_a_lost_response_to_the_manifest_put_is_recognised_as_our_own_commit(seaweed) -> None:
    """The server commits the manifest, the response never arrives, the client retries and
    is told the manifest exists: the save reads it back, finds its own, and succeeds."""
    url = _url(seaweed)
    lost = {"n": 0}

    def rule(method: str, path: str, n: int) -> str:
        if method == "PUT" and path.split("?")[0].endswith("/manifest.json") and not lost["n"]:
            lost["n"] += 1
            return "lose"
        return "pass"

    with FaultProxy(("127.0.0.1", S3_PORT), FaultPlan(rule=rule)) as proxy:
        opts = seaweed.options(proxy.endpoint)
        sd = _state()
        cs.save(sd, url, storage_options=opts)
        out = _zeros()
        cs.load(out, url, storage_options=opts)
    assert lost["n"] == 1
    assert torch.equal(out["w"], sd["w"]) and out["step"] == 3


def test_gc_lists_and_aborts_unfinished_multipart_uploads(seaweed) -> None:
    """A writer killed mid-upload leaves a multipart upload that no listing shows; ``ckpt
    gc`` finds it (dry run), and aborts exactly it with --apply."""
    from ckptstore.ops.gc import delete_garbage, find_garbage

    url = _url(seaweed)
    cs.save(_state(), url, storage_options=seaweed.options())
    store = S3Store(url[len("s3://") :], **seaweed.options())
    key = store._key("data/00001-killed0000-0.bin")
    up = store.client.create_multipart_upload(Bucket=store.bucket, Key=key)
    store.client.upload_part(Bucket=store.bucket, Key=key, UploadId=up["UploadId"],
                             PartNumber=1, Body=b"x" * (5 << 20))  # fmt: skip
    assert find_garbage(store, older_than=3600) == []  # young: may be a save in flight
    items = find_garbage(store, older_than=0)
    assert [(i.kind, i.where) for i in items] == [("upload", "data/00001-killed0000-0.bin")]
    delete_garbage(store, items)
    pending = store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
    assert pending == []
    out = _zeros()
    cs.load(out, url, storage_options=seaweed.options())  # the checkpoint is untouched
    assert out["step"] == 3
