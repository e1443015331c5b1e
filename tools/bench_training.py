"""Benchmark cases on what training jobs hold (imported by tools/bench.py), each against torch
DCP in the same run:

- small-dtensor: 20,000 norms of 1,024 floats as DTensors -- ``Replicate()``, and
  ``Shard(0)`` as FSDP2 shards 1-D parameters (over 4 ranks, and unevenly over 3) -- plus
  one 64 MiB ``Shard(0)`` matrix: save (first, steady; against the ranks writing and
  fsyncing the bytes each writes, between the saves) and load into existing tensors;
- model: a 24-layer Llama-style decoder under FSDP2 (``fully_shard``) with AdamW after one
  step, state from ``get_state_dict`` as a training loop takes it (~1.3 GB): save (against
  the ranks writing and fsyncing their own bytes at once, the disk's floor, measured between
  the saves), load 4 -> 4, load 4 -> 2 (resharded), and the async stall against the time
  the same ranks need to memcpy their bytes into reused buffers (the floor, measured in the
  same run);
- tp-fsdp: tensor parallelism plus FSDP2 on a 2 x 2 mesh, as torchtitan builds it
  (``_StridedShard`` placements): save (with its parallel write floor), and load onto a 1-D
  mesh of 2;
- flatten + match: one process, 20,000 DTensors, microseconds per tensor.

Every load is checked bit-exact (against the saved tensors, or against DCP's own load).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist
from bench import _equal, _median, _sharded, _timed
from bench_async import async_stalls

NORMS = 20_000
MODEL = {"vocab": 32_000, "dim": 512, "layers": 24, "heads": 8, "ffn": 1408}
TP_MODEL = {"vocab": 32_000, "dim": 512, "layers": 8, "heads": 8, "ffn": 1408}


# -- small-dtensor ---------------------------------------------------------------------------
def dtensor_norms(rank: int, world: int, placement: str, fill: bool = True) -> dict:
    """20,000 1-D norms as DTensors (every rank builds the same full values) and a 64 MiB
    matrix ``Shard(0)``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(11)
    full = torch.rand(NORMS, 1024, generator=g) if fill else torch.zeros(NORMS, 1024)
    params = {}
    for i in range(NORMS):
        if placement == "replicate":
            params[f"layers.{i}.norm.weight"] = DTensor.from_local(
                full[i].clone(), mesh, [Replicate()], run_check=False
            )
        else:  # FSDP2's Shard(0) of a 1-D parameter: torch.chunk sizes, the last one short
            piece = full[i].chunk(world)[rank]
            params[f"layers.{i}.norm.weight"] = DTensor.from_local(
                piece.clone(), mesh, [Shard(0)], run_check=False, shape=(1024,), stride=(1,)
            )
    return {"model": params, "sharded": _sharded((4096, 4096), 0, world, rank, 99, fill)}


def small_dtensor(rank: int, world: int, root: str, placement: str) -> dict[str, float]:
    import torch.distributed.checkpoint as dcp

    import ckptstore as cs

    sd = dtensor_norms(rank, world, placement)
    times: dict[str, list[float]] = {}
    own = _bytes_written_by(sd, rank, world, placement)

    def run(name: str, fn) -> None:
        times.setdefault(name, []).append(_timed(fn))

    run("dcp_save", lambda: dcp.save(sd, checkpoint_id=f"{root}/dcp"))
    # The first save of a job that does not prepare it, then that of a job that does
    # (``cs.prepare_save`` before its first checkpoint step, untimed, as CheckpointManager
    # does): on a fresh process group, which has no plan cached, as a new job has none;
    # then the steady saves.
    fresh = dist.new_group(backend="gloo")
    saves = [("cs_save", None), ("cs_save_prepared", fresh)]
    saves += [("cs_save_steady", None)] * 2
    for i, (name, group) in enumerate(saves):
        if group is not None:
            cs.prepare_save(sd, process_group=group)
        run(name, lambda i=i, group=group: cs.save(sd, f"{root}/cs{i}", process_group=group))
        floor = write_own_bytes(own, f"{root}/floor")  # the disk's floor, between the saves
        times.setdefault("parallel_write_floor", []).append(floor)
    dest = dtensor_norms(rank, world, placement, fill=False)
    run("dcp_load", lambda: dcp.load(dest, checkpoint_id=f"{root}/dcp"))
    assert _equal(dest, sd), "DCP load mismatch"
    for _ in range(3):
        dest = dtensor_norms(rank, world, placement, fill=False)
        run("cs_load", lambda d=dest: cs.load(d, f"{root}/cs0"))
        assert _equal(dest, sd), "ckptstore load mismatch"
    out = {k: _median(v) for k, v in times.items()}
    out["cs_save"] = times["cs_save"][0]
    return out


def _bytes_written_by(sd: dict, rank: int, world: int, placement: str) -> list[torch.Tensor]:
    """What a rank of a deduplicating save writes of :func:`dtensor_norms`: its shard of the
    matrix and of every sharded norm, or every ``world``-th replicated norm (each replica is
    written once, by one of its holders)."""
    norms = [t._local_tensor for t in sd["model"].values()]
    if placement == "replicate":  # one writer per norm
        norms = norms[rank::world]
    return [*norms, sd["sharded"]._local_tensor]


# -- model and tp-fsdp -------------------------------------------------------------------------
def _shape(spec: dict):
    from ckptstore.testing.llama import LlamaShape

    return LlamaShape(**spec)


def _state(layout: str, world: int, spec: dict, seed: int = 0) -> dict:
    from ckptstore.testing import llama

    model, optim = llama.build(_shape(spec), layout, world, seed=seed)
    return llama.training_state(model, optim)


def _local_tensors(state: dict) -> list[torch.Tensor]:
    from ckptstore.state.leaves import flatten

    return [leaf.value for leaf in flatten(state).values() if isinstance(leaf.value, torch.Tensor)]


class MemcpyFloor:
    """Every rank at once copies its tensors of ``state`` into buffers that already exist
    (warm): what any stall that takes a host copy must pay. Each call times one copy,
    between barriers (the slowest rank's time)."""

    def __init__(self, state: dict) -> None:
        self.tensors = _local_tensors(state)
        self.buffers = [torch.empty_like(t) for t in self.tensors]
        self._copy()

    def _copy(self) -> None:
        for b, t in zip(self.buffers, self.tensors, strict=True):
            b.copy_(t)

    def __call__(self) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        self._copy()
        dist.barrier()
        return time.perf_counter() - t0


def write_own_bytes(tensors: list[torch.Tensor], directory: str) -> float:
    """Seconds for every rank at once to write ``tensors`` (its own, contiguous) to a new
    file of its own and fsync it: the floor of a durable save of those bytes on this disk
    with the job's parallelism (one sequential write per rank, in the system calls this
    kernel copies cheapest -- at most ``WRITE_SLICE`` bytes each, see ``backends/local.py``
    --; no checksum, manifest or commit). Run between the tools' saves; its files stay, as
    theirs do (deleting them would hand the next writer free page-cache memory the others
    had to reclaim)."""
    from ckptstore.backends.local import WRITE_SLICE

    os.makedirs(directory, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix=f"floor-{dist.get_rank()}-", dir=directory)
    os.close(fd)
    dist.barrier()
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        for t in tensors:
            view = memoryview(t.view(-1).view(torch.uint8).numpy())
            while view:
                view = view[os.write(fd, view[:WRITE_SLICE]) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    dist.barrier()
    return time.perf_counter() - t0


def page_cache_floor(
    checkpoint: str, rank: int, verify: bool, repeats: int = 3, world: int = 0
) -> float:
    """Seconds for every rank at once to read the data files it wrote of ``checkpoint``
    (warm in the page cache) into buffers that already exist -- with ``verify``, also
    taking their crc32c: the least a load of those bytes can cost, with and without the
    checksum pass ckptstore makes before any byte reaches a tensor. With ``world`` (a
    smaller job loading it), rank r reads the files of writers r, r + world, ...: its
    share of the same bytes."""
    from ckptstore.format.checksum import crc32c

    data = os.path.join(checkpoint, "data")
    files = sorted(
        os.path.join(data, f)
        for f in os.listdir(data)
        if f[:5].isdigit() and (int(f[:5]) % world == rank if world else int(f[:5]) == rank)
    )
    buffers = [bytearray(os.path.getsize(f)) for f in files]
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        t0 = time.perf_counter()
        for f, buf in zip(files, buffers, strict=True):
            with open(f, "rb", buffering=0) as fh:
                view = memoryview(buf)
                while view:
                    view = view[fh.readinto(view) :]
            if verify:
                crc32c(buf)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return _median(times[1:])


def model_save_load(rank: int, world: int, root: str) -> dict[str, float]:
    """FSDP2 decoder + AdamW: save and load 4 -> 4 (both tools, alternating), the async stall
    and the memcpy floor."""
    import torch.distributed.checkpoint as dcp

    import ckptstore as cs

    state = _state("fsdp", world, MODEL)
    times: dict[str, list[float]] = {}

    def run(name: str, fn) -> None:
        times.setdefault(name, []).append(_timed(fn))

    own = [t.contiguous() for t in _local_tensors(state)]
    for i in range(3):
        run("dcp_save", lambda i=i: dcp.save(state, checkpoint_id=f"{root}/dcp{i}"))
        run("cs_save", lambda i=i: cs.save(state, f"{root}/cs{i}"))
        times.setdefault("parallel_write_floor", []).append(write_own_bytes(own, f"{root}/floor"))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(f"{root}/floor", ignore_errors=True)
    dest = _state("fsdp", world, MODEL, seed=1)
    for _ in range(3):
        run("dcp_load", lambda: dcp.load(dest, checkpoint_id=f"{root}/dcp0"))
        run("cs_load", lambda: cs.load(dest, f"{root}/cs0"))
    assert _equal(dest, state), "model load 4 -> 4 mismatch"
    out = {k: _median(v) for k, v in times.items()}
    out["cs_save_first"] = times["cs_save"][0]
    first, steady, _, floor = async_stalls(state, f"{root}/async", floor=MemcpyFloor(state))
    out["cs_async_stall_first"], out["cs_async_stall_steady"] = first, steady
    out["memcpy_floor"] = floor
    out["page_cache_read"] = page_cache_floor(f"{root}/cs0", rank, verify=False)
    out["page_cache_read_crc"] = page_cache_floor(f"{root}/cs0", rank, verify=True)
    out["rank_bytes"] = float(sum(t.numel() * t.element_size() for t in _local_tensors(state)))
    out["state_bytes"] = float(cs.open(f"{root}/cs0").manifest.stored_bytes())
    return out


def load_resharded(rank: int, world: int, root: str, layout: str) -> dict[str, float]:
    """Load a checkpoint saved by 4 ranks onto an FSDP2 model of ``world`` ranks, with DCP
    and with ckptstore (each into its own fresh state, checked equal)."""
    import torch.distributed.checkpoint as dcp

    import ckptstore as cs

    spec = MODEL if layout == "fsdp" else TP_MODEL
    times: dict[str, list[float]] = {}
    by_dcp = _state("fsdp", world, spec, seed=1)
    by_cs = _state("fsdp", world, spec, seed=2)
    for _ in range(3):
        times.setdefault("dcp_load", []).append(
            _timed(lambda: dcp.load(by_dcp, checkpoint_id=f"{root}/dcp0"))
        )
        times.setdefault("cs_load", []).append(_timed(lambda: cs.load(by_cs, f"{root}/cs0")))
    assert _equal(by_cs, by_dcp), f"{layout}: ckptstore and DCP loaded different values"
    out = {k: _median(v) for k, v in times.items()}
    out["page_cache_read_crc"] = page_cache_floor(f"{root}/cs0", rank, True, world=world)
    return out


def tp_fsdp_save(rank: int, world: int, root: str) -> dict[str, float]:
    import torch.distributed.checkpoint as dcp

    import ckptstore as cs

    state = _state("tp-fsdp", world, TP_MODEL)
    times: dict[str, list[float]] = {}
    own = [t.contiguous() for t in _local_tensors(state)]
    for i in range(3):
        times.setdefault("dcp_save", []).append(
            _timed(lambda i=i: dcp.save(state, checkpoint_id=f"{root}/dcp{i}"))
        )
        times.setdefault("cs_save", []).append(_timed(lambda i=i: cs.save(state, f"{root}/cs{i}")))
        times.setdefault("parallel_write_floor", []).append(write_own_bytes(own, f"{root}/floor"))
    out = {k: _median(v) for k, v in times.items()}
    out["state_bytes"] = float(cs.open(f"{root}/cs0").manifest.stored_bytes())
    return out


# -- flatten + match -------------------------------------------------------------------------
def flatten_and_match(rank: int, world: int, root: str) -> dict[str, float]:
    """Microseconds per tensor to flatten a state_dict and match it to a manifest, for 20,000
    DTensors and for 20,000 plain tensors (one process)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    import ckptstore as cs
    from ckptstore.coordination.collectives import Coordinator
    from ckptstore.loading.load import _match, _Scope
    from ckptstore.state.leaves import flatten

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    for kind in ("dtensor", "plain"):

        def make(kind=kind):
            if kind == "plain":
                return {f"layers.{i}.norm.weight": torch.zeros(1024) for i in range(NORMS)}
            return {
                f"layers.{i}.norm.weight": DTensor.from_local(
                    torch.zeros(1024), mesh, [Shard(0)], run_check=False
                )
                for i in range(NORMS)
            }

        sd = make()
        path = os.path.join(root, kind)
        cs.save(sd, path)
        manifest = cs.open(path).manifest
        coord = Coordinator()
        flat, matched = [], []
        for _ in range(5):
            sd = make()  # a fresh state_dict, as each load of a training loop gets
            t = time.perf_counter()
            flatten(sd)
            flat.append(time.perf_counter() - t)
            t = time.perf_counter()
            _match(sd, manifest, coord, True, False, "error", [], _Scope("", False, ()))
            matched.append(time.perf_counter() - t)
        out[f"{kind}_flatten_us"] = _median(flat) / NORMS * 1e6
        out[f"{kind}_flatten_match_us"] = _median(matched) / NORMS * 1e6
    return out


# -- driver ----------------------------------------------------------------------------------
def _disk_floor(r: dict[str, float], disk_bw: float, save: str = "cs_save") -> dict[str, float]:
    """The save ``r[save]`` against the disk: the seconds one fsync'd sequential stream of
    the same bytes takes, the seconds the ranks take to write and fsync their own bytes all
    at once (the floor of a durable save with the job's parallelism), and the save against
    each; and the ratio to DCP that the parallel floor itself would reach."""
    out: dict[str, float] = {}
    if disk_bw:
        floor = r["state_bytes"] / disk_bw
        out |= {
            "disk_floor_s": round(floor, 4),
            "fraction_of_disk_bw": round(floor / r[save], 3),
        }
    if "parallel_write_floor" in r:
        par = r["parallel_write_floor"]
        out |= {
            "parallel_write_floor_s": round(par, 4),
            "vs_parallel_write_floor": round(r[save] / par, 3),
            "floor_vs_dcp": round(r["dcp_save"] / par, 2),
        }
    return out


def run(scratch: str, emit, case, sink, disk_bw: float = 0.0) -> None:
    """Every case; ``disk_bw`` (bytes/s, fsync'd sequential writes measured in the same run)
    puts the saves next to the disk's floor."""
    from ckptstore.testing.ranks import run_ranks

    def worst(results: list[dict]) -> dict[str, float]:
        return {k: max(r[k] for r in results) for k in results[0]}

    root = os.path.join(scratch, "training")
    os.makedirs(root)
    fm = run_ranks(1, flatten_and_match, os.path.join(root, "flatten"), timeout=1800)[0]
    emit({"case": "flatten_match_20000_dtensors", **{k: round(v, 2) for k, v in fm.items()},
          "target_us": 10.0, "meets_target": fm["dtensor_flatten_match_us"] <= 10.0}, sink)  # fmt: skip
    for placement, world in (("replicate", 4), ("shard", 4), ("shard", 3)):
        where = os.path.join(root, f"small-{placement}-{world}")
        r = worst(run_ranks(world, small_dtensor, where, placement, timeout=3600))
        name = f"small_dtensor_{placement}_{world}_ranks"
        floor = _disk_floor(r, 0.0)
        emit(case(f"{name}_save", r["cs_save"], r["dcp_save"], 30.0, **floor), sink)
        floor = _disk_floor(r, 0.0, save="cs_save_prepared")
        emit(case(f"{name}_save_prepared", r["cs_save_prepared"], r["dcp_save"], 30.0, **floor),
             sink)  # fmt: skip
        floor = _disk_floor(r, 0.0, save="cs_save_steady")
        emit(case(f"{name}_save_steady", r["cs_save_steady"], r["dcp_save"], 30.0, **floor), sink)
        emit(case(f"{name}_load", r["cs_load"], r["dcp_load"], 60.0), sink)
        shutil.rmtree(where, ignore_errors=True)  # each case's checkpoints go once measured
    where = os.path.join(root, "model")
    r = worst(run_ranks(4, model_save_load, where, timeout=3600))
    emit(
        case("model_save", r["cs_save"], r["dcp_save"], 3.0, first_s=round(r["cs_save_first"], 4),
             GiB=round(r["state_bytes"] / 2**30, 3), **_disk_floor(r, disk_bw)),
        sink,
    )  # fmt: skip
    emit(
        case("model_load_4_to_4", r["cs_load"], r["dcp_load"], 10.0,
             page_cache_read_s=round(r["page_cache_read"], 4),
             page_cache_read_crc32c_s=round(r["page_cache_read_crc"], 4),
             vs_page_cache_read=round(r["cs_load"] / r["page_cache_read"], 2),
             vs_page_cache_read_crc32c=round(r["cs_load"] / r["page_cache_read_crc"], 2)),
        sink,
    )  # fmt: skip
    few = worst(run_ranks(2, load_resharded, where, "fsdp", timeout=3600))
    emit(
        case("model_load_4_to_2", few["cs_load"], few["dcp_load"], 10.0,
             page_cache_read_crc32c_s=round(few["page_cache_read_crc"], 4),
             vs_page_cache_read_crc32c=round(few["cs_load"] / few["page_cache_read_crc"], 2)),
        sink,
    )  # fmt: skip
    stall, floor = r["cs_async_stall_steady"], r["memcpy_floor"]
    emit({"case": "model_async_stall", "stall_first_s": round(r["cs_async_stall_first"], 4),
          "stall_steady_s": round(stall, 4), "memcpy_floor_s": round(floor, 4),
          "rank_MiB": round(r["rank_bytes"] / 2**20, 1),
          "stall_vs_floor": round(stall / floor, 3), "first_vs_steady": round(r["cs_async_stall_first"] / stall, 3),
          "targets": {"vs_floor": 1.3, "first_vs_steady": 2.0},
          "meets_target": stall <= 1.3 * floor and r["cs_async_stall_first"] <= 2 * stall}, sink)  # fmt: skip
    shutil.rmtree(where, ignore_errors=True)
    where = os.path.join(root, "tp-fsdp")
    r = worst(run_ranks(4, tp_fsdp_save, where, timeout=3600))
    emit(
        case("tp_fsdp_save", r["cs_save"], r["dcp_save"], 2.0,
             GiB=round(r["state_bytes"] / 2**30, 3), **_disk_floor(r, disk_bw)),
        sink,
    )  # fmt: skip
    few = worst(run_ranks(2, load_resharded, where, "tp-fsdp", timeout=3600))
    emit(case("tp_fsdp_load_onto_fsdp_2", few["cs_load"], few["dcp_load"], 2.0), sink)
    shutil.rmtree(where, ignore_errors=True)
