"""Benchmark: the tiered store against plain boto3 on the same S3 server, in the same run.

One process, a 512 MiB state (8 x 64 MiB fp32), SeaweedFS started here on 127.0.0.1.
Cases (medians of 3):
  tiered_commit_to_s3   -- async_save through cs.Tiered until the manifest is committed on
                           S3, vs one boto3 multipart upload of the same bytes (same part size
                           and concurrency); target <= 1.25x. Also the stall (what the loop
                           waits for) and the time until the tier-0 commit.
  s3_only_restore       -- load with an empty local tier vs parallel ranged GETs of the same
                           bytes (8 threads, 8 MiB ranges); target >= 0.8x the throughput.
  warm_local_restore    -- load with the local tier present vs from S3 only; target >= 5x.
  burst_control         -- peak PUTs in flight and peak PUT rate (per 100 ms) seen by a proxy
                           in front of the server, uncapped vs max_concurrent_uploads=2 and
                           max_upload_bytes_per_second=64 MiB/s.

Run: ``python tools/bench_tiered.py`` (``make bench`` runs it too).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import torch

MiB = 1 << 20
PART = 8 * MiB
CONCURRENCY = 8


def _state(fill: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n = 16 * MiB  # floats: 64 MiB per tensor
    return {
        f"layer{i}.w": torch.randn(n, generator=g) if fill else torch.zeros(n) for i in range(8)
    }


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def run(scratch: str, emit, sink, repeats: int = 3) -> None:
    import boto3
    from boto3.s3.transfer import TransferConfig

    import ckptstore as cs
    from ckptstore.backends.s3 import S3Store
    from ckptstore.testing.faultproxy import FaultProxy, peak_in_flight, peak_rate
    from ckptstore.testing.seaweed import S3_PORT, SeaweedServer

    os.makedirs(scratch, exist_ok=True)
    server = SeaweedServer(os.path.join(scratch, "seaweed"))
    try:
        opts = server.options()
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        S3Store(bucket, create_bucket=True, **opts)
        client = boto3.client("s3", region_name="us-east-1", **opts)
        remote_opts = {**opts, "part_bytes": PART, "concurrency": CONCURRENCY}
        sd = _state(True)
        nbytes = sum(t.nbytes for t in sd.values())
        blob = b"".join(t.numpy().tobytes() for t in sd.values())
        transfer = TransferConfig(
            multipart_threshold=PART, multipart_chunksize=PART, max_concurrency=CONCURRENCY
        )

        boto_up, stall, tier0, to_s3, s3_load, local_load, boto_get = [], [], [], [], [], [], []
        for i in range(repeats):
            t = time.perf_counter()
            client.upload_fileobj(io.BytesIO(blob), bucket, f"plain/{i}.bin", Config=transfer)
            boto_up.append(time.perf_counter() - t)

            local = os.path.join(scratch, "nvme", f"step{i}")
            path = cs.Tiered(
                local=local, remote=f"s3://{bucket}/run/step{i}", remote_options=remote_opts
            )
            t = time.perf_counter()
            handle = cs.async_save(sd, path)
            stall.append(time.perf_counter() - t)
            info = handle.wait()
            tier0.append(time.perf_counter() - t)
            info.replication.wait()
            to_s3.append(time.perf_counter() - t)

            out = _state(False)
            empty = os.path.join(scratch, "empty", f"step{i}")
            t = time.perf_counter()
            loaded = cs.load(
                out,
                cs.Tiered(
                    local=empty, remote=f"s3://{bucket}/run/step{i}", remote_options=remote_opts
                ),
            )
            s3_load.append(time.perf_counter() - t)
            assert loaded.bytes_by_tier["local"] == 0
            assert all(torch.equal(out[k], sd[k]) for k in sd)

            out = _state(False)
            t = time.perf_counter()
            loaded = cs.load(out, path)
            local_load.append(time.perf_counter() - t)
            assert loaded.bytes_by_tier["remote"] == 0

            target = bytearray(nbytes)
            view = memoryview(target)
            key = f"plain/{i}.bin"

            def fetch(lo: int, key: str = key, view: memoryview = view) -> None:
                hi = min(lo + PART, nbytes)
                body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={lo}-{hi - 1}")
                view[lo:hi] = body["Body"].read()

            t = time.perf_counter()
            with ThreadPoolExecutor(CONCURRENCY) as pool:
                list(pool.map(fetch, range(0, nbytes, PART)))
            boto_get.append(time.perf_counter() - t)
            assert bytes(target[:4096]) == blob[:4096]

        up, s3 = _median(boto_up), _median(to_s3)
        emit(
            {
                "case": "tiered_commit_to_s3", "bytes": nbytes,
                "stall_s": round(_median(stall), 3), "tier0_commit_s": round(_median(tier0), 3),
                "commit_to_s3_s": round(s3, 3),
                "boto3_multipart_s": round(up, 3), "ratio_vs_boto3": round(s3 / up, 3),
                "target_ratio_max": 1.25, "meets_target": s3 / up <= 1.25,
            },
            sink,
        )  # fmt: skip
        got, base = nbytes / _median(s3_load), nbytes / _median(boto_get)
        emit(
            {
                "case": "s3_only_restore", "ckptstore_MiB_s": round(got / MiB, 1),
                "ranged_get_MiB_s": round(base / MiB, 1), "ratio": round(got / base, 3),
                "target_ratio_min": 0.8, "meets_target": got / base >= 0.8,
            },
            sink,
        )  # fmt: skip
        warm = _median(s3_load) / _median(local_load)
        emit(
            {
                "case": "warm_local_restore", "local_s": round(_median(local_load), 3),
                "s3_only_s": round(_median(s3_load), 3), "speedup_vs_s3_only": round(warm, 2),
                "target": 5.0, "meets_target": warm >= 5.0,
            },
            sink,
        )  # fmt: skip

        small = {k: v for k, v in list(sd.items())[:2]}  # 128 MiB
        for label, caps in (
            ("uncapped", {}),
            ("capped", {"max_concurrent_uploads": 2, "max_upload_bytes_per_second": 64 * MiB}),
        ):
            with FaultProxy(("127.0.0.1", S3_PORT)) as proxy:
                o = {**server.options(proxy.endpoint), "part_bytes": PART, **caps}
                o["concurrency"] = CONCURRENCY
                path = cs.Tiered(
                    local=os.path.join(scratch, "burst", label),
                    remote=f"s3://{bucket}/burst/{label}",
                    remote_options=o,
                )
                t = time.perf_counter()
                cs.save(small, path).replication.wait()
                seconds = time.perf_counter() - t
                emit(
                    {
                        "case": "burst_control", "setting": label, **caps,
                        "peak_puts_in_flight": peak_in_flight(proxy.requests, "PUT"),
                        "peak_puts_per_s_100ms": peak_rate(proxy.requests, 0.1, "PUT"),
                        "upload_MiB_s": round(128 / seconds, 1),
                    },
                    sink,
                )  # fmt: skip
    finally:
        server.stop()
        shutil.rmtree(os.path.join(scratch, "seaweed"), ignore_errors=True)


def main() -> int:
    out = "bench-out"
    os.makedirs(out, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="ckptstore-bench-tiered-", dir=os.path.abspath(out))

    def emit(record: dict, sink) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        sink.write(line + "\n")
        sink.flush()

    with open(os.path.join(out, "results.jsonl"), "a") as sink:
        emit({"case": "run", "tool": "bench_tiered", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "cpus": os.cpu_count()}, sink)  # fmt: skip
        try:
            run(scratch, emit, sink)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    sys.exit(main())
