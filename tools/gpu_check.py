"""One script for a GPU machine: the CUDA tests, then the async stall on device tensors
against torch DCP in the same run. Prints one JSON line per measurement.

    python tools/gpu_check.py            # needs a CUDA device; ~2 minutes
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"case": "gpu_check", "error": "no CUDA device"}))
        return 2
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", os.path.join(here, "tests", "test_cuda_staging.py")],
        cwd=here,
    )
    print(json.dumps({"case": "cuda_tests", "rc": tests.returncode}), flush=True)

    import torch.distributed.checkpoint as dcp

    import ckptstore as cs

    root = tempfile.mkdtemp(prefix="gpu-check-")
    try:
        sd = {f"w{i}": torch.randn(64, 1024, 1024, device="cuda") for i in range(4)}  # 1 GiB
        out = {"device": torch.cuda.get_device_name(), "bytes": 1 << 30}
        for label, kwargs in (("ckptstore", {}), ("ckptstore_stage_async", {"stage_async": True})):
            stalls = []
            for i in range(4):
                torch.cuda.synchronize()
                t = time.perf_counter()
                handle = cs.async_save(sd, f"{root}/{label}{i}", **kwargs)
                if kwargs:
                    handle.staged()
                stalls.append(time.perf_counter() - t)
                handle.wait()
            out[f"{label}_stall_first_s"] = round(stalls[0], 4)
            out[f"{label}_stall_steady_s"] = round(sorted(stalls[1:])[1], 4)
        stalls = []
        for i in range(4):
            torch.cuda.synchronize()
            t = time.perf_counter()
            fut = dcp.async_save(sd, checkpoint_id=f"{root}/dcp{i}", no_dist=True)
            stalls.append(time.perf_counter() - t)
            fut.result()
        out["dcp_async_stall_steady_s"] = round(sorted(stalls[1:])[1], 4)
        t = time.perf_counter()
        dcp.save(sd, checkpoint_id=f"{root}/dcpsync", no_dist=True)
        out["dcp_save_s"] = round(time.perf_counter() - t, 4)
        out["stall_vs_dcp_save"] = round(out["ckptstore_stall_steady_s"] / out["dcp_save_s"], 4)
        out["stall_vs_dcp_async"] = round(
            out["ckptstore_stall_steady_s"] / out["dcp_async_stall_steady_s"], 4
        )
        print(json.dumps({"case": "cuda_async_stall", **out}), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return tests.returncode


if __name__ == "__main__":
    sys.exit(main())
