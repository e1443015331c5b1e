"""Restores that read every byte from shared storage once: data-parallel replicas share
their reads (ckptstore.loading.shared_reads), on real ranks (gloo) and a real S3 server
whose traffic a proxy counts."""

from __future__ import annotations

import os
import shutil
import uuid

import pytest

from ckptstore.backends.s3 import S3Store
from ckptstore.loading.shared_reads import deal_rounds
from ckptstore.testing.faultproxy import FaultProxy
from ckptstore.testing.ranks import run_ranks
from ckptstore.testing.seaweed import S3_PORT
from tests import shared_read_cases as cases


def _unique_bytes(store: S3Store) -> int:
    return sum(info.size for info in store.list_details(""))


def test_a_restore_of_4_replicas_reads_each_byte_from_s3_once(seaweed) -> None:
    """8 ranks, 4 data-parallel replicas x 2 shards with optimizer state sharded across the
    replicas (ZeRO): the restore's GETs carry 1.0 x the checkpoint's bytes (3 x when every
    rank reads for itself), and it is bit-exact."""
    root = f"ckpt-{uuid.uuid4().hex[:10]}/run/step_1"
    url = f"s3://{root}"
    direct = {**seaweed.options(), "create_bucket": True}
    with (
        FaultProxy(("127.0.0.1", S3_PORT)) as shared,
        FaultProxy(("127.0.0.1", S3_PORT)) as unshared,
    ):
        counts = run_ranks(
            8,
            cases.save_and_restore_twice,
            url,
            4,
            [direct, seaweed.options(shared.endpoint), seaweed.options(unshared.endpoint)],
            timeout=600,
        )
    unique = _unique_bytes(S3Store(root, **seaweed.options()))

    def fetched(proxy: FaultProxy) -> int:
        return sum(r.response_bytes for r in proxy.requests if r.method == "GET")

    # Half the bytes are parameters (each replica needs them), half optimizer shards
    # (each rank's own): read unshared, the parameters leave S3 four times.
    assert fetched(shared) <= 1.05 * unique, (fetched(shared), unique)
    assert fetched(unshared) >= 2.5 * unique, (fetched(unshared), unique)  # the counter counts
    assert sum(c[0]["received"] for c in counts) >= 1.4 * unique  # passed on, not re-read
    assert all(c[1]["received"] == 0 for c in counts)


@pytest.fixture(scope="module")
def hsdp_checkpoint(tmp_path_factory) -> str:
    """A checkpoint saved by 4 ranks: 2 data-parallel replicas x 2 shards."""
    url = str(tmp_path_factory.mktemp("hsdp") / "ck")
    run_ranks(4, cases.save_replicas, url, 2, {}, timeout=300)
    return url


def test_a_resharded_restore_shares_what_replicas_have_in_common(hsdp_checkpoint) -> None:
    """Saved as 2 replicas x 2 shards, loaded as 2 replicas x 3 shards on a local store with
    reads shared: bit-exact, each pair of replicas reads its parameters once between them
    (the optimizer shards are each rank's own; the norms are shared by the three ranks of a
    replica: sets that cross, taken in one order without waiting on each other), and the
    job reads less than unshared."""
    counts = run_ranks(6, cases.restore_resharded, hsdp_checkpoint, timeout=300)
    shared, unshared = [c[0] for c in counts], [c[1] for c in counts]
    assert all(c["received"] > 0 for c in shared), shared
    assert all(c["received"] == 0 for c in unshared)
    for shard in range(3):  # mesh (2, 3): ranks shard and shard + 3 hold the same parameters
        a, b = shared[shard], shared[shard + 3]
        assert a["read"] + b["read"] < unshared[shard]["read"] + unshared[shard + 3]["read"]


def test_a_bad_block_fails_every_rank_of_a_shared_read(hsdp_checkpoint, tmp_path) -> None:
    """The rank that reads a damaged block raises ChecksumError; its replica and the other
    ranks raise too, naming it; none waits for a rank that stopped."""
    url = str(tmp_path / "ck")
    shutil.copytree(hsdp_checkpoint, url)
    biggest = max((tmp_path / "ck" / "data").iterdir(), key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.seek(biggest.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    results = run_ranks(4, cases.restore_with_a_bad_block, url, timeout=300)
    assert sum(r.startswith("ChecksumError") for r in results) == 1, results
    others = [r for r in results if not r.startswith("ChecksumError")]
    assert all(r.startswith("CollectiveError") and "checksum mismatch" in r for r in others)


@pytest.mark.parametrize(
    "sizes, members, round_bytes",
    [([5, 1, 9, 3, 3, 7, 2], 3, 10), ([4] * 10, 4, 4), ([100], 2, 10), ([], 3, 8), ([1, 2], 1, 2)],
)
def test_requests_are_dealt_once_each_in_bounded_rounds(sizes, members, round_bytes) -> None:
    rounds = deal_rounds(sizes, members, round_bytes)
    dealt = [i for shares in rounds for items in shares for i in items]
    assert sorted(dealt) == list(range(len(sizes)))  # every request once
    assert all(len(shares) == members for shares in rounds)
    for shares in rounds:
        for items in shares:  # a round holds at most round_bytes, or one larger request
            assert len(items) <= 1 or sum(sizes[i] for i in items) <= round_bytes
    per_member = [sum(sizes[i] for s in rounds for i in s[m]) for m in range(members)]
    if sizes:
        assert max(per_member) - min(per_member) <= max(sizes)  # balanced by bytes


def test_requests_go_to_members_that_hold_them_locally() -> None:
    sizes = [8, 8, 8, 8, 1]
    local = [[2], [2], [0, 1], [], [1]]  # request 3: on no member's disk
    rounds = deal_rounds(sizes, 3, 100, local)
    owner = {i: m for shares in rounds for m, items in enumerate(shares) for i in items}
    assert owner[0] == owner[1] == 2 and owner[2] in (0, 1) and owner[4] == 1
    assert owner[3] in (0, 1) and owner[3] != owner[2]  # the least loaded of all members
