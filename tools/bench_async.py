"""Asynchronous-save benchmark cases (imported by tools/bench.py).

- stall: on the large workload (4 ranks), how long async_save blocks the caller, first and
  steady state, against DCP's save and DCP's async_save in the same run, and against the
  floor of any stall that takes a host copy: the ranks' memcpy of the same tensors into
  reused buffers, timed right before each steady save;
- memory: peak RSS above the resting RSS during async saves, and RSS after each of 30
  consecutive async saves (no growth);
- interference: how much a CPU-bound training step slows down while a save is in flight,
  with the background writer in a thread and in a helper process.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from bench import _median, _timed, large_state, small_state


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRss:
    """Samples this process's RSS every few milliseconds in a thread."""

    def __init__(self) -> None:
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def async_stalls(
    sd: dict, root: str, saves: int = 6, floor: Callable[[], float] | None = None
) -> tuple[float, float, object, float]:
    """Prepared as a training loop prepares (``prepare_async_save`` at least a training
    step before the first checkpoint step; here: until its buffer is ready), ``saves``
    async saves: the first stall, the median of the others, the last save's SaveInfo, and
    -- with ``floor`` (a timed copy of the same bytes) -- the median of ``floor`` measured
    right before each of the later saves, as the machine stands for them (the previous
    save's write has just ended), else 0."""
    import gc

    import ckptstore as cs

    cs.prepare_async_save(sd).result()  # a training step would pass meanwhile
    # The cases before this one (DCP's saves and loads in the same processes) leave cyclic
    # garbage a training loop's own steps would have collected long before a checkpoint:
    # collected here, not in the middle of a stall (a full collection of it took ~0.3 s).
    gc.collect()
    stalls, floors = [], []
    for i in range(saves):
        if floor is not None and i:
            floors.append(floor())
        dist.barrier()
        t = time.perf_counter()
        handle = cs.async_save(sd, f"{root}/cs{i}")
        stalls.append(time.perf_counter() - t)
        info = handle.wait()
    return stalls[0], _median(stalls[1:]), info, _median(floors) if floors else 0.0


def stall_and_memory(rank: int, world: int, root: str) -> dict:
    import torch.distributed.checkpoint as dcp

    sd = large_state(rank, world)
    out: dict = {}
    out["dcp_save"] = _median(
        [_timed(lambda i=i: dcp.save(sd, checkpoint_id=f"{root}/dcp{i}")) for i in range(2)]
    )
    stalls = []
    for i in range(3):
        dist.barrier()
        t = time.perf_counter()
        fut = dcp.async_save(sd, checkpoint_id=f"{root}/dcpa{i}")
        stalls.append(time.perf_counter() - t)
        fut.result()
    out["dcp_async_stall_first"], out["dcp_async_stall_steady"] = stalls[0], _median(stalls[1:])

    from bench_training import MemcpyFloor

    floor = MemcpyFloor(sd)  # its buffers are part of the resting RSS, not of the saves'
    resting = rss_bytes()
    with PeakRss() as peak:
        first, steady, info, out["memcpy_floor"] = async_stalls(sd, root, floor=floor)
    out["cs_async_stall_first"], out["cs_async_stall_steady"] = first, steady
    written = info.rank_bytes_written
    out["rss_resting"], out["rss_peak"], out["rank_bytes"] = resting, peak.peak, written
    return out


def rss_over_saves(rank: int, world: int, root: str, saves: int = 30) -> dict:
    import ckptstore as cs

    sd = small_state(rank, world)
    rss = []
    for i in range(saves):
        cs.async_save(sd, f"{root}/s", overwrite=True).wait()
        rss.append(rss_bytes())
        del i
    return {"first": rss[0], "last": rss[-1], "max": max(rss)}


def interference(rank: int, world: int, root: str) -> dict:
    """Step time of a CPU-bound loop alone, and while a save is in flight (thread, process)."""
    import ckptstore as cs

    torch.set_num_threads(1)
    a, b = torch.randn(384, 384), torch.randn(384, 384)
    state = {f"w{i}": torch.randn(1024, 1024) for i in range(128)}  # 512 MiB

    def steps(until) -> float:
        times = []
        while not until() or len(times) < 5:
            t = time.perf_counter()
            for _ in range(20):
                torch.mm(a, b)
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    deadline = time.perf_counter() + 2.0
    out = {"alone": steps(lambda: time.perf_counter() > deadline)}
    for persist in ("thread", "process"):
        cs.async_save(state, f"{root}/warm-{persist}", persist=persist).wait()  # start helpers
        handle = cs.async_save(state, f"{root}/{persist}", persist=persist)
        out[persist] = steps(handle.done)
        handle.wait()
    return out


def run(scratch: str, emit, sink) -> None:
    from ckptstore.testing.ranks import run_ranks

    root = os.path.join(scratch, "async")
    os.makedirs(root)
    per_rank = run_ranks(4, stall_and_memory, root, timeout=1800)
    r = {k: max(p[k] for p in per_rank) for k in per_rank[0] if not k.startswith("rss")}
    stall = r["cs_async_stall_steady"]
    emit(
        {
            "case": "large_async_stall",
            "ckptstore_stall_first_s": round(r["cs_async_stall_first"], 4),
            "ckptstore_stall_steady_s": round(stall, 4),
            "dcp_save_s": round(r["dcp_save"], 4),
            "dcp_async_stall_first_s": round(r["dcp_async_stall_first"], 4),
            "dcp_async_stall_steady_s": round(r["dcp_async_stall_steady"], 4),
            "stall_vs_dcp_save": round(stall / r["dcp_save"], 4),
            "stall_vs_dcp_async_stall": round(stall / r["dcp_async_stall_steady"], 4),
            "memcpy_floor_s": round(r["memcpy_floor"], 4),
            "stall_vs_memcpy_floor": round(stall / r["memcpy_floor"], 3),
            "memcpy_floor_vs_dcp_save": round(r["memcpy_floor"] / r["dcp_save"], 4),
            "targets": {"vs_dcp_save": 0.05, "vs_dcp_async_stall": 0.15},
            "meets_target": stall <= 0.05 * r["dcp_save"]
            and stall <= 0.15 * r["dcp_async_stall_steady"],
        },
        sink,
    )
    worst = max((p["rss_peak"] - p["rss_resting"]) / p["rank_bytes"] for p in per_rank)
    emit(
        {
            "case": "large_async_peak_rss",
            "peak_above_resting_MiB": [
                round((p["rss_peak"] - p["rss_resting"]) / 2**20, 1) for p in per_rank
            ],
            "rank_bytes_MiB": [round(p["rank_bytes"] / 2**20, 1) for p in per_rank],
            "worst_ratio": round(worst, 3),
            "target": 1.1,
            "meets_target": worst <= 1.1,
        },
        sink,
    )
    growth = run_ranks(4, rss_over_saves, os.path.join(root, "rss"), timeout=1800)
    emit(
        {
            "case": "rss_over_30_async_saves",
            "first_MiB": [round(g["first"] / 2**20, 1) for g in growth],
            "last_MiB": [round(g["last"] / 2**20, 1) for g in growth],
            "growth_MiB": [round((g["last"] - g["first"]) / 2**20, 1) for g in growth],
        },
        sink,
    )
    inter = run_ranks(1, interference, os.path.join(root, "inter"), timeout=1800)[0]
    emit(
        {
            "case": "interference_cpu_bound_step",
            "step_alone_ms": round(inter["alone"] * 1e3, 2),
            "step_during_thread_save_ms": round(inter["thread"] * 1e3, 2),
            "step_during_process_save_ms": round(inter["process"] * 1e3, 2),
            "slowdown_thread": round(inter["thread"] / inter["alone"], 3),
            "slowdown_process": round(inter["process"] / inter["alone"], 3),
        },
        sink,
    )
