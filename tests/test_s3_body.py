"""Ranged GET bodies read straight into the caller's buffer (``backends/s3_body.py``), against
the real S3 server behind a pass-through proxy that counts the client's connections."""

from __future__ import annotations

import uuid

import pytest
import urllib3.response
from botocore.response import StreamingBody

from ckptstore.backends.s3 import S3Store
from ckptstore.backends.s3_body import read_body_into
from ckptstore.testing.faultproxy import FaultPlan, FaultProxy
from ckptstore.testing.seaweed import S3_PORT

MiB = 1 << 20
DATA = bytes(range(251)) * (12 * MiB // 251 + 1)  # a period that no power of two divides


@pytest.fixture
def proxied(seaweed):
    bucket = f"body-{uuid.uuid4().hex[:10]}"
    S3Store(bucket, create_bucket=True, **seaweed.options()).client.put_object(
        Bucket=bucket, Key="p/blob", Body=DATA
    )
    with FaultProxy(("127.0.0.1", S3_PORT), FaultPlan()) as proxy:
        # concurrency 1: one GET at a time, so a client that reuses its connection needs one
        store = S3Store(
            f"{bucket}/p", range_bytes=MiB, concurrency=1, **seaweed.options(proxy.endpoint)
        )
        yield store, proxy


def _get(store: S3Store, lo: int, hi: int):
    return store.client.get_object(Bucket=store.bucket, Key="p/blob", Range=f"bytes={lo}-{hi - 1}")


@pytest.fixture
def urllib3_reads(monkeypatch) -> list[int]:
    """Counts urllib3's own body reads (the path that reads a bytes object and copies it)."""
    calls: list[int] = []
    read = urllib3.response.HTTPResponse.read

    def counted(self, *args, **kwargs):
        calls.append(1)
        return read(self, *args, **kwargs)

    monkeypatch.setattr(urllib3.response.HTTPResponse, "read", counted)
    return calls


def test_ranged_reads_land_in_the_buffer_without_urllib3_and_reuse_one_connection(
    proxied, urllib3_reads
) -> None:
    store, proxy = proxied
    out = bytearray(10 * MiB + 12345)
    store.read_into("blob", 777, memoryview(out))  # eleven ranged GETs, one after another
    assert bytes(out) == DATA[777 : 777 + len(out)]
    assert urllib3_reads == [], "the bodies went through urllib3's read-and-copy"
    assert sum(r.method == "GET" for r in proxy.requests) == 11
    assert proxy.connections == 1, "a connection was not handed back after its body was read"


def test_a_body_botocore_wraps_takes_its_public_read_and_gives_the_same_bytes(proxied) -> None:
    store, proxy = proxied

    class Wrapped(StreamingBody):  # e.g. botocore's checksum-validating body
        pass

    for lo, hi in ((0, MiB), (5, 3 * MiB + 7), (MiB, 2 * MiB)):
        body = _get(store, lo, hi)["Body"]
        wrapped = Wrapped(body._raw_stream, hi - lo)
        out = bytearray(hi - lo)
        assert read_body_into(wrapped, memoryview(out)) == hi - lo
        assert bytes(out) == DATA[lo:hi]
    assert proxy.connections == 1


def test_a_body_left_half_read_closes_its_connection_and_the_next_get_is_exact(
    proxied,
) -> None:
    store, proxy = proxied
    out = bytearray(1000)
    assert read_body_into(_get(store, 0, 2 * MiB)["Body"], memoryview(out)) == 1000
    assert bytes(out) == DATA[:1000]
    # The rest of that body is still on its connection: the next GET must read its own
    # bytes, on a new connection.
    again = bytearray(MiB)
    assert read_body_into(_get(store, 3 * MiB, 4 * MiB)["Body"], memoryview(again)) == MiB
    assert bytes(again) == DATA[3 * MiB : 4 * MiB]
    assert proxy.connections == 2


def test_a_body_cut_short_by_the_server_reads_short_and_is_not_reused(seaweed) -> None:
    bucket = f"body-{uuid.uuid4().hex[:10]}"
    S3Store(bucket, create_bucket=True, **seaweed.options()).client.put_object(
        Bucket=bucket, Key="p/blob", Body=DATA
    )
    plan = FaultPlan(rule=lambda m, p, n: "truncate" if n == 0 else "pass")
    with FaultProxy(("127.0.0.1", S3_PORT), plan) as proxy:
        store = S3Store(f"{bucket}/p", concurrency=1, **seaweed.options(proxy.endpoint))
        out = bytearray(2 * MiB)
        got = read_body_into(_get(store, 0, 2 * MiB)["Body"], memoryview(out))
        assert got == MiB and bytes(out[:got]) == DATA[:MiB]
        out = bytearray(2 * MiB)
        assert read_body_into(_get(store, 0, 2 * MiB)["Body"], memoryview(out)) == 2 * MiB
        assert bytes(out) == DATA[: 2 * MiB]
    assert proxy.connections == 2
