"""The tiered store against a real S3 server: tier-0 commit, background replication, reads
from the fastest tier with fallback, simulated nodes losing their local disk, failed uploads
that leave tier 0 intact, burst control, and the manager's per-tier retention."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid

import pytest
import torch

import ckptstore as cs
from ckptstore.backends.s3 import S3Store
from ckptstore.errors import ReplicationError
from ckptstore.testing.faultproxy import FaultPlan, FaultProxy, peak_in_flight
from ckptstore.testing.ranks import run_ranks
from ckptstore.testing.seaweed import S3_PORT
from tests import tiered_cases


def _bucket(seaweed) -> str:
    bucket = f"tier-{uuid.uuid4().hex[:10]}"
    S3Store(bucket, create_bucket=True, **seaweed.options())
    return bucket


def _state() -> dict:
    g = torch.Generator().manual_seed(7)
    return {"w": torch.randn(1500, 2000, generator=g), "b": torch.arange(10), "step": 5}


def _zeros() -> dict:
    return {"w": torch.zeros(1500, 2000), "b": torch.zeros(10, dtype=torch.int64), "step": 0}


def _data_files(local_dir) -> list[str]:
    """The data files of a checkpoint's local tier (spread over data/<hh>/ prefixes)."""
    data = os.path.join(local_dir, "data")
    return sorted(os.path.join(d, f) for d, _, files in os.walk(data) for f in files)


def _data_file(local_dir) -> str:
    return _data_files(local_dir)[0]


@contextlib.contextmanager
def _puts_failing(seaweed):
    """S3 options through a proxy that refuses every PUT while ``failing["on"]`` is true."""
    failing = {"on": True}
    plan = FaultPlan(rule=lambda m, p, n: "503" if failing["on"] and m == "PUT" else "pass")
    with FaultProxy(("127.0.0.1", S3_PORT), plan) as proxy:
        yield failing, {**seaweed.options(proxy.endpoint), "max_attempts": 2}


def test_save_commits_locally_then_replicates_and_loads_from_either_tier(seaweed, tmp_path) -> None:
    remote = f"s3://{_bucket(seaweed)}/run/step5"
    path = cs.Tiered(local=tmp_path / "nvme", remote=remote, remote_options=seaweed.options())
    sd = _state()
    info = cs.save(sd, path)
    assert (tmp_path / "nvme" / "manifest.json").exists()  # committed on tier 0 at return
    replicated = info.replication.wait(timeout=60)
    assert replicated.files == 1 and replicated.bytes > sd["w"].nbytes
    assert info.replication.state == "replicated"
    record = json.loads((tmp_path / "nvme" / "replication.json").read_text())
    assert record["state"] == "replicated" and record["remote"] == remote

    out = _zeros()
    loaded = cs.load(out, path)
    assert torch.equal(out["w"], sd["w"]) and out["step"] == 5
    assert loaded.bytes_by_tier["remote"] == 0 and loaded.bytes_by_tier["local"] > 0

    # The shared tier alone holds a complete, identical checkpoint.
    out = _zeros()
    cs.load(out, remote, storage_options=seaweed.options())
    assert torch.equal(out["w"], sd["w"]) and torch.equal(out["b"], sd["b"])


def test_a_corrupt_local_byte_is_read_from_the_shared_tier(seaweed, tmp_path) -> None:
    remote = f"s3://{_bucket(seaweed)}/step1"
    path = cs.Tiered(local=tmp_path / "nvme", remote=remote, remote_options=seaweed.options())
    sd = _state()
    cs.save(sd, path).replication.wait(timeout=60)
    with open(_data_file(tmp_path / "nvme"), "r+b") as f:  # a bit flips on the local disk
        f.seek(1_000_000)
        byte = f.read(1)
        f.seek(1_000_000)
        f.write(bytes([byte[0] ^ 0x40]))
    out = _zeros()
    info = cs.load(
        out, cs.Tiered(local=tmp_path / "nvme", remote=remote, remote_options=seaweed.options())
    )
    assert torch.equal(out["w"], sd["w"])
    assert info.bytes_by_tier["remote"] > 0


def test_nodes_that_lose_their_local_tier_restore_from_s3(seaweed, tmp_path) -> None:
    remote = f"s3://{_bucket(seaweed)}/run/step1"
    opts = seaweed.options()
    nodes = str(tmp_path / "nodes")
    saved = run_ranks(4, tiered_cases.save_on_nodes, nodes, remote, opts, 2)
    assert [s["state"] for s in saved] == ["replicated"] * 4
    assert all(s["files"] == 1 for s in saved)
    # each node holds its own ranks' files and the manifest
    for node in ("node0", "node1"):
        names = _data_files(os.path.join(nodes, node, "step1"))
        assert len(names) == 2 and (tmp_path / "nodes" / node / "step1" / "manifest.json").exists()

    shutil.rmtree(os.path.join(nodes, "node1"))  # node 1 was replaced
    out = run_ranks(4, tiered_cases.load_on_nodes, nodes, remote, opts, 2, "row")
    assert all(o["problems"] == [] for o in out), out
    # node 0's ranks read their own shards locally (replicated tensors written by node 1's
    # ranks come from S3); node 1's ranks read everything from S3
    assert all(o["by_tier"]["local"] > 0 for o in out[:2]), out
    assert all(o["by_tier"]["local"] == 0 and o["by_tier"]["remote"] > 0 for o in out[2:]), out

    # resharded onto 2 ranks of node 0 with another layout: node 1's files come from S3.
    # Both ranks need every byte (column shards of row chunks): they share the reads, each
    # byte read once, node 0's files locally.
    out = run_ranks(2, tiered_cases.load_on_nodes, nodes, remote, opts, 2, "col")
    assert all(o["problems"] == [] for o in out), out
    assert sum(o["by_tier"]["local"] for o in out) > 0, out
    assert sum(o["by_tier"]["remote"] for o in out) > 0, out


def test_failed_upload_leaves_tier0_usable_and_is_retried_on_demand(
    seaweed, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("CKPTSTORE_REPLICATION_RETRIES", "0")
    bucket = _bucket(seaweed)
    remote = f"s3://{bucket}/step1"
    every_put_fails = FaultPlan(rule=lambda m, p, n: "503" if m == "PUT" else "pass")
    sd = _state()
    with FaultProxy(("127.0.0.1", S3_PORT), every_put_fails) as proxy:
        opts = {**seaweed.options(proxy.endpoint), "max_attempts": 2}
        path = cs.Tiered(local=tmp_path / "nvme", remote=remote, remote_options=opts)
        info = cs.save(sd, path)
        with pytest.raises(ReplicationError, match="local checkpoint is intact"):
            info.replication.wait(timeout=60)
    assert info.replication.state == "failed"
    record = json.loads((tmp_path / "nvme" / "replication.json").read_text())
    assert record["state"] == "failed" and "SlowDown" in record["error"], record
    store = S3Store(f"{bucket}/step1", **seaweed.options())
    assert not store.exists("manifest.json")
    assert store.client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []

    direct = cs.Tiered(local=tmp_path / "nvme", remote=remote, remote_options=seaweed.options())
    out = _zeros()
    cs.load(out, direct)  # tier 0 is intact and loadable
    assert torch.equal(out["w"], sd["w"])

    again = cs.replicate(direct)  # on demand, once the store is reachable again
    assert again.files == 1
    out = _zeros()
    cs.load(out, remote, storage_options=seaweed.options())
    assert torch.equal(out["w"], sd["w"])
    assert json.loads((tmp_path / "nvme" / "replication.json").read_text())["state"] == "replicated"


def test_burst_control_caps_requests_in_flight(seaweed, tmp_path) -> None:
    remote = f"s3://{_bucket(seaweed)}"
    g = torch.Generator().manual_seed(3)
    sd = {"w": torch.randn(12 << 20, generator=g)}  # 48 MiB: ten 5 MiB parts
    peaks = {}
    for cap in (None, 2):
        with FaultProxy(("127.0.0.1", S3_PORT)) as proxy:
            opts = {**seaweed.options(proxy.endpoint), "part_bytes": 5 << 20, "concurrency": 8}
            if cap:
                opts["max_concurrent_uploads"] = cap
            path = cs.Tiered(
                local=tmp_path / f"nvme{cap}", remote=f"{remote}/cap{cap}", remote_options=opts
            )
            cs.save(sd, path).replication.wait(timeout=120)
            peaks[cap] = peak_in_flight(proxy.requests, "PUT")
    assert peaks[2] <= 2 < peaks[None], peaks


def test_manager_keeps_per_tier_retention_and_restores_without_local(seaweed, tmp_path) -> None:
    remote = f"s3://{_bucket(seaweed)}/run42"
    opts = seaweed.options()
    nodes = str(tmp_path / "nodes")
    out = run_ranks(2, tiered_cases.manager_run, nodes, remote, opts, 1, 4)
    # keep=2 on S3, keep_local=1 on each node; older ones are gone from both tiers
    for rank in out:
        assert rank["tiers"] == {3: ("absent", "replicated"), 4: ("committed", "replicated")}
    shutil.rmtree(os.path.join(nodes, "node1"))
    restored = run_ranks(2, tiered_cases.manager_restore, nodes, remote, opts, 1)
    assert [r["step"] for r in restored] == [4, 4]
    assert [r["w"] for r in restored] == [4.0, 4.0]
    assert restored[0]["by_tier"]["remote"] == 0 and restored[1]["by_tier"]["local"] == 0


def test_ckpt_ls_shows_the_state_on_each_tier(seaweed, tmp_path, monkeypatch, capsys) -> None:
    from ckptstore.cli.main import main

    bucket = _bucket(seaweed)
    remote = f"s3://{bucket}/run"
    local = str(tmp_path / "nvme")
    mgr = cs.CheckpointManager(
        remote, local_dir=local, keep_local=1, async_save=False, storage_options=seaweed.options()
    )
    state = {"w": torch.ones(256, 256)}
    for step in (10, 20):
        mgr.save(step, state)
    assert mgr.wait_replicated() == {20: "replicated"} or mgr.replication_errors == []
    mgr.close()

    opts = seaweed.options()
    monkeypatch.setenv("AWS_ENDPOINT_URL", opts["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", opts["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", opts["aws_secret_access_key"])
    assert main(["ls", remote, "--local", local, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["step"], r["local"], r["remote"]) for r in rows] == [
        (10, "absent", "replicated"),
        (20, "committed", "replicated"),
    ]
    assert main(["ls", remote, "--local", local]) == 0
    text = capsys.readouterr().out
    assert "local" in text and "remote" in text and "replicated" in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert main(["ls", local]) == 0
    text = capsys.readouterr().out
    assert "replication" in text.splitlines()[0] and "replicated" in text.splitlines()[2]


@pytest.mark.parametrize("codec", [None, "zstd"])  # compressed chunks go up from tier 0
def test_async_save_to_the_tiered_store(seaweed, tmp_path, codec) -> None:
    remote = f"s3://{_bucket(seaweed)}/step1"
    path = cs.Tiered(local=tmp_path / "nvme", remote=remote, remote_options=seaweed.options())
    sd = _state()
    expected = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sd.items()}
    handle = cs.async_save(sd, path, codec=codec)
    sd["w"].zero_()  # the caller may change its tensors once async_save returns
    info = handle.wait(timeout=60)
    replicated = info.replication.wait(timeout=60)
    assert replicated.files == 1
    out = _zeros()
    cs.load(out, remote, storage_options=seaweed.options())
    assert torch.equal(out["w"], expected["w"]) and torch.equal(out["b"], expected["b"])
    assert sorted(cs.open(remote, storage_options=seaweed.options()).keys()) == sorted(expected)


def test_a_failed_replication_is_retried_before_the_next_one(seaweed, tmp_path) -> None:
    bucket = _bucket(seaweed)
    with _puts_failing(seaweed) as (failing, opts):
        first = cs.save(
            _state(), cs.Tiered(tmp_path / "a", f"s3://{bucket}/a", remote_options=opts)
        )
        with pytest.raises(ReplicationError):
            first.replication.wait(timeout=60)
        failing["on"] = False  # the store recovers
        second = cs.save(
            _state(), cs.Tiered(tmp_path / "b", f"s3://{bucket}/b", remote_options=opts)
        )
        second.replication.wait(timeout=60)
    assert first.replication.state == "replicated"  # retried before the second job
    assert first.replication.wait(timeout=1).files == 1
    for name in ("a", "b"):
        assert S3Store(f"{bucket}/{name}", **seaweed.options()).exists("manifest.json")


def test_manager_reports_a_failed_upload_and_replicates_on_demand(seaweed, tmp_path) -> None:
    bucket = _bucket(seaweed)
    with _puts_failing(seaweed) as (failing, opts):
        mgr = cs.CheckpointManager(
            f"s3://{bucket}/run", local_dir=str(tmp_path / "nvme"), async_save=False,
            keep_local=1, storage_options=opts,
        )  # fmt: skip
        state = {"w": torch.full((64, 64), 7.0)}
        mgr.save(7, state)
        with pytest.warns(UserWarning, match="replication failed"):
            assert mgr.wait_replicated() == {7: "failed"}
        assert [s for s, _ in mgr.replication_errors] == [7]
        assert [(e.step, e.local, e.remote) for e in mgr.checkpoints()] == [
            (7, "committed", "failed")
        ]
        out = {"w": torch.zeros(64, 64)}
        assert mgr.restore(out) == 7 and out["w"][0, 0] == 7.0  # tier 0 is usable
        failing["on"] = False
        assert mgr.replicate() == [7]
        assert [(e.step, e.local, e.remote) for e in mgr.checkpoints()] == [
            (7, "committed", "replicated")
        ]
        mgr.close()


def test_replicate_from_a_smaller_job_commits_only_when_every_file_is_there(
    seaweed, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("CKPTSTORE_REPLICATION_RETRIES", "0")
    refuse = FaultPlan(rule=lambda m, p, n: "503" if m == "PUT" else "pass")
    one_node, two_nodes = f"s3://{_bucket(seaweed)}/a", f"s3://{_bucket(seaweed)}/b"
    with FaultProxy(("127.0.0.1", S3_PORT), refuse) as proxy:
        opts = {**seaweed.options(proxy.endpoint), "max_attempts": 1}
        for remote, per_node, nodes in ((one_node, 2, "a"), (two_nodes, 1, "b")):
            errors = run_ranks(2, tiered_cases.save_failing_replication, str(tmp_path / nodes),
                               remote, opts, per_node)  # fmt: skip
            assert all("replication failed" in e for e in errors)
    direct = seaweed.options()
    # Two ranks saved on node 0: a one-process job there holds every file and replicates.
    ok = cs.replicate(cs.Tiered(tmp_path / "a/node0/step1", one_node, remote_options=direct))
    assert ok.files == 2
    # Ranks on two nodes: node 0 alone lacks rank 1's files, so nothing may be committed.
    with pytest.raises(ReplicationError, match="not on the shared tier"):
        cs.replicate(cs.Tiered(tmp_path / "b/node0/step1", two_nodes, remote_options=direct))
    assert not S3Store(two_nodes[5:], **seaweed.options()).exists("manifest.json")


def test_a_failed_streamed_upload_falls_back_to_tier0(seaweed, tmp_path) -> None:
    refused: list[str] = []

    def first_multipart_start_fails(method: str, path: str, n: int) -> str:
        if method == "POST" and "uploads" in path and not refused:
            refused.append(path)
            return "500"
        return "pass"

    remote = f"s3://{_bucket(seaweed)}/step1"
    with FaultProxy(("127.0.0.1", S3_PORT), FaultPlan(rule=first_multipart_start_fails)) as proxy:
        opts = {**seaweed.options(proxy.endpoint), "max_attempts": 1, "part_bytes": 5 << 20}
        path = cs.Tiered(local=tmp_path / "nvme", remote=remote, remote_options=opts)
        sd = _state()  # 12 MB: a multipart upload of 5 MiB parts
        info = cs.async_save(sd, path).wait(timeout=60)
        assert info.replication.wait(timeout=60).files == 1
    assert len(refused) == 1  # the streamed upload failed; the replication re-sent from tier 0
    out = _zeros()
    cs.load(out, remote, storage_options=seaweed.options())
    assert torch.equal(out["w"], sd["w"])


def test_a_failed_tier0_write_leaves_nothing_on_s3(seaweed, tmp_path) -> None:
    from ckptstore.errors import SaveError

    remote = f"s3://{_bucket(seaweed)}/step1"
    (tmp_path / "nvme").mkdir()
    (tmp_path / "nvme" / "data").write_bytes(b"")  # a file where the data directory goes
    path = cs.Tiered(local=tmp_path / "nvme", remote=remote, remote_options=seaweed.options())
    with pytest.raises(SaveError):
        cs.async_save(_state(), path).wait(timeout=60)
    # the next async save gets the staging buffer only once the streamed upload has ended
    cs.async_save({"x": torch.zeros(4)}, tmp_path / "other").wait(timeout=60)
    store = S3Store(remote[5:], **seaweed.options())
    deadline = time.monotonic() + 10
    while list(store.list("")) and time.monotonic() < deadline:
        time.sleep(0.1)  # then its files are deleted
    assert list(store.list("")) == []


def test_subgroups_that_start_saving_at_different_times(seaweed, tmp_path) -> None:
    # The background machinery (a gloo group for async commits, replication agreement) is set
    # up by the ranks of each subgroup alone: the second pair's first save comes long after
    # the first pair's. A job-wide collective in that set-up would hang here.
    remote = f"s3://{_bucket(seaweed)}/sub"
    seen = run_ranks(
        4, tiered_cases.independent_subgroups, str(tmp_path), remote, seaweed.options(), 3.0,
        timeout=150,
    )  # fmt: skip
    assert seen == [[0.0, 1.0], [0.0, 1.0], [10.0, 11.0], [10.0, 11.0]]


def test_checkpointing_goes_on_locally_while_s3_is_down(tmp_path, monkeypatch) -> None:
    """Nothing listens at the S3 endpoint: every save still commits on the local tier,
    the failed uploads are reported (typed), nothing raises a botocore error, and the job
    restores from the local tier."""
    from ckptstore.errors import CkptStoreError
    from ckptstore.testing.ranks import free_port

    monkeypatch.setenv("CKPTSTORE_REPLICATION_RETRIES", "0")
    opts = {"endpoint_url": f"http://127.0.0.1:{free_port()}", "max_attempts": 1,
            "aws_access_key_id": "x", "aws_secret_access_key": "y"}  # fmt: skip
    model = torch.nn.Linear(4, 4)
    state = {"model": model, "optim": torch.optim.SGD(model.parameters(), lr=0.1)}
    with pytest.warns(UserWarning):  # the unreachable shared tier is reported, not raised
        mgr = cs.CheckpointManager(
            "s3://down/run", local_dir=tmp_path / "nvme", every_n_steps=1, keep=2,
            keep_local=3, storage_options=opts,
        )  # fmt: skip
        assert mgr.restore(state) is None
        for step in (1, 2, 3):
            assert mgr.maybe_save(step, state)
        states = mgr.wait_replicated()
        with pytest.raises(CkptStoreError):
            mgr.replicate()
        mgr.close()
    assert set(states.values()) == {"failed"}
    assert sorted(os.listdir(tmp_path / "nvme")) == [f"step_0000000{s}" for s in (1, 2, 3)]
    with pytest.warns(UserWarning):
        again = cs.CheckpointManager(
            "s3://down/run", local_dir=tmp_path / "nvme", storage_options=opts
        )
        before = model.weight.detach().clone()
        with torch.no_grad():
            model.weight.zero_()
        assert again.restore(state) == 3
    assert torch.equal(model.weight, before)


def test_a_byte_that_rots_on_tier0_before_the_upload_never_reaches_s3(
    seaweed, tmp_path, monkeypatch
) -> None:
    """The upload checks every chunk against the block checksums of the rank's own write
    (the numbers its manifest rows were made of) before a byte leaves the node."""
    from ckptstore import failpoints

    monkeypatch.setenv("CKPTSTORE_REPLICATION_RETRIES", "0")
    remote = f"s3://{_bucket(seaweed)}/rot"
    path = cs.Tiered(local=tmp_path / "nvme", remote=remote, remote_options=seaweed.options())

    def rot() -> None:  # after the tier-0 commit, before the background upload
        with open(_data_file(tmp_path / "nvme"), "r+b") as f:
            f.seek(4096)
            byte = f.read(1)
            f.seek(4096)
            f.write(bytes([byte[0] ^ 0x01]))

    failpoints.on("committed", rot)
    try:
        info = cs.save(_state(), path)
    finally:
        failpoints.on("committed", None)
    with pytest.raises(ReplicationError, match="fail their crc32c on the local tier"):
        info.replication.wait(timeout=60)
    assert not S3Store(remote[len("s3://") :], **seaweed.options()).exists("manifest.json")
