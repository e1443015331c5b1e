"""Planning at scale, simulated in one process: a Llama-3-405B-like job on up to 16,384 ranks.

126 layers (hidden 16384, FFN 53248, 8 KV heads), vocab 128256; TP 8 x PP 16 x DP up to 128.
Parameters (bf16) are TP-sharded (column- or row-parallel) and replicated across DP; the two
Adam moments (fp32) are additionally sharded across DP (ZeRO-1). Every rank's declaration is
built from the same chunk math DTensor uses (nested ``torch.chunk`` splits), then the real
planning (by planning group: one leader per pipeline stage), manifest assembly and one
rank's load planning run on it.

Run: ``python tools/scale_sim.py [--ranks 8 128 1024 16384]`` (prints one JSON line per size).
"""

from __future__ import annotations

import argparse
import json
import pickle
import time

import numpy as np
import torch

from ckptstore.backends import MemoryStore
from ckptstore.format.data_files import data_key, rank_file_name
from ckptstore.format.manifest import ChunkTable, Manifest, TensorRecord
from ckptstore.loading.read_plan import Target, chunks_needed, plan_reads
from ckptstore.saving.commit import write_chunk_index
from ckptstore.saving.plan import RankPlan, TensorDecl, plan_id_of
from ckptstore.saving.plan_groups import group_ranks, join_plans, plan_group, plan_groups

LAYERS, HIDDEN, FFN, KV, VOCAB = 126, 16384, 53248, 1024, 128256
TP = 8
SIZES = {8: (1, 1), 128: (16, 1), 1024: (16, 8), 16384: (16, 128), 100352: (16, 784)}
"""ranks -> (PP, DP)"""
PART = 64 << 20  # S3Store's multipart part size (one request per part)
RANGE = 8 << 20  # S3Store's ranged GET size
READ_WINDOW = 8 * RANGE  # S3Store's read window (range size x concurrency 8)


def chunk_range(size: int, parts: int, index: int) -> tuple[int, int]:
    """[start, length) of piece ``index`` when ``torch.chunk`` splits ``size`` into ``parts``."""
    step = -(-size // parts)
    start = min(size, index * step)
    return start, max(0, min(size, start + step) - start)


def nested_box(shape, splits):
    """Box after applying ``splits`` = [(dim, parts, index), ...] one after another."""
    offs, shp = [0] * len(shape), list(shape)
    for dim, parts, index in splits:
        start, n = chunk_range(shp[dim], parts, index)
        offs[dim] += start
        shp[dim] = n
    return tuple(offs), tuple(shp)


def layer_params(layer: int) -> list[tuple[str, tuple[int, ...], int | None]]:
    """(name, shape, TP shard dim or None for replicated) of one transformer layer."""
    p = f"layers.{layer}."
    return [
        (p + "attention.wq", (HIDDEN, HIDDEN), 0),
        (p + "attention.wk", (KV, HIDDEN), 0),
        (p + "attention.wv", (KV, HIDDEN), 0),
        (p + "attention.wo", (HIDDEN, HIDDEN), 1),
        (p + "feed_forward.w1", (FFN, HIDDEN), 0),
        (p + "feed_forward.w3", (FFN, HIDDEN), 0),
        (p + "feed_forward.w2", (HIDDEN, FFN), 1),
        (p + "attention_norm", (HIDDEN,), None),
        (p + "ffn_norm", (HIDDEN,), None),
    ]


def stage_params(pp_rank: int, pp: int) -> list[tuple[str, tuple[int, ...], int | None]]:
    layers = np.array_split(np.arange(LAYERS), pp)[pp_rank]
    out = [q for layer in layers for q in layer_params(int(layer))]
    if pp_rank == 0:
        out.append(("tok_embeddings", (VOCAB, HIDDEN), 0))
    if pp_rank == pp - 1:
        out += [("norm", (HIDDEN,), None), ("output", (VOCAB, HIDDEN), 0)]
    return out


def rank_plan(rank: int, pp: int, dp: int, cache: dict) -> RankPlan:
    tp_rank, rest = rank % TP, rank // TP
    dp_rank, pp_rank = rest % dp, rest // dp
    key = (pp_rank, tp_rank)
    if key not in cache:
        cache[key] = stage_params(pp_rank, pp)
    decls, boxes = [], []
    for name, shape, tp_dim in cache[key]:
        tp_split = [(tp_dim, TP, tp_rank)] if tp_dim is not None else []
        decls.append(TensorDecl("model." + name, "bfloat16", shape, 2))
        boxes.append(nested_box(shape, tp_split))
        for moment in ("exp_avg", "exp_avg_sq"):
            decls.append(TensorDecl(f"optim.{moment}.{name}", "float32", shape, 4))
            boxes.append(nested_box(shape, [*tp_split, (0, dp, dp_rank)]))
    return RankPlan.build(decls, boxes)


def dtensor_state(rank: int, pp: int, dp: int) -> dict:
    """Rank ``rank``'s state as a training job holds it: DTensors (meta device) on the job's
    (PP, DP, TP) mesh -- parameters TP-sharded and replicated across DP, Adam moments
    additionally sharded across DP (``_StridedShard`` where DP shards the dimension TP
    already split, as torchtitan's FSDP2 + TP does). Needs the fake process group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh = init_device_mesh("cpu", (pp, dp, TP), mesh_dim_names=("pp", "dp", "tp"))["dp", "tp"]
    pp_rank = rank // TP // dp
    state: dict = {}

    def dtensor(shape, dtype, placements):
        local, _ = compute_local_shape_and_global_offset(shape, mesh, placements)
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(torch.empty(local, dtype=dtype, device="meta"), mesh,
                                  placements, shape=torch.Size(shape), stride=stride,
                                  run_check=False)  # fmt: skip

    for name, shape, tp_dim in stage_params(pp_rank, pp):
        tp = Shard(tp_dim) if tp_dim is not None else Replicate()
        moment_dp = _StridedShard(0, split_factor=TP) if tp_dim == 0 else Shard(0)
        state["model." + name] = dtensor(shape, torch.bfloat16, [Replicate(), tp])
        for moment in ("exp_avg", "exp_avg_sq"):
            state[f"optim.{moment}.{name}"] = dtensor(shape, torch.float32, [moment_dp, tp])
    return state


def rank_flatten(rank: int, pp: int, dp: int) -> tuple[float, RankPlan]:
    """A save's per-rank declaration on the real DTensors of ``rank``: ckptstore's flatten
    and ``_prepare`` (boxes from the DTensor placements), timed; and the plan it declares."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from ckptstore.saving.save import _prepare
    from ckptstore.state.leaves import flatten_columns

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=pp * dp * TP)
    try:
        state = dtensor_state(rank, pp, dp)
        t = time.perf_counter()
        plan = _prepare(flatten_columns(state), False, False).declared.rank_plan()  # as on a miss
        return time.perf_counter() - t, plan
    finally:
        dist.destroy_process_group()


def _same_declaration(a: RankPlan, b: RankPlan) -> bool:
    return (
        a.tensors == b.tensors
        and np.array_equal(a.offsets, b.offsets)
        and np.array_equal(a.shapes, b.shapes)
    )


def simulate(ranks: int) -> dict[str, float | int]:
    pp, dp = SIZES[ranks]
    cache: dict = {}
    t = time.perf_counter()
    plans = [rank_plan(r, pp, dp, cache) for r in range(ranks)]
    build_s = time.perf_counter() - t
    # The boxes above are the chunk math; the real flatten of the same ranks' DTensors must
    # declare exactly them (the last rank, and the first of stage 1).
    flatten_s = 0.0
    for probe in {ranks - 1, min(ranks - 1, dp * TP)}:
        seconds, declared = rank_flatten(probe, pp, dp)
        if not _same_declaration(declared, plans[probe]):
            raise AssertionError(f"rank {probe}: the DTensor flatten declares other boxes")
        flatten_s = max(flatten_s, seconds)

    # The plan exchange (``plan_exchange``): the coordinator groups the distinct declaration
    # lists; each group's leader plans its group (at the same time: the slowest counts);
    # the coordinator joins the groups' plans.
    t = time.perf_counter()
    keys = [p.decl_key for p in plans]
    first_with: dict[int, int] = {}
    for rank, key in enumerate(keys):
        first_with.setdefault(key, rank)
    members = group_ranks(keys, plan_groups({k: plans[r].tensors for k, r in first_with.items()}))
    grouping_s = time.perf_counter() - t
    parts, leader_s = [], []
    for group in members:
        t = time.perf_counter()
        parts.append(plan_group([plans[r] for r in group], group))
        leader_s.append(time.perf_counter() - t)
    t = time.perf_counter()
    plan = join_plans(parts, plan_id_of([p.structure_key for p in plans]))
    join_s = time.perf_counter() - t
    planning_s = grouping_s + max(leader_s) + join_s

    # The manifest the coordinator would commit (format 4: the chunk table in a chunk
    # index): real layouts; real offsets (each writer's chunks back to back in its file, in
    # table order); random checksums (they do not compress); file names as a save spreads
    # them over 64 prefixes.
    t = time.perf_counter()
    n = plan.chunk_count
    block = 4 << 20
    nblocks = np.maximum(1, -(-plan.chunk_nbytes // block))
    writer = plan.chunk_writer.astype(np.int64)
    table = ChunkTable(
        file=writer, offset=_file_offsets(writer, plan.chunk_nbytes), nbytes=plan.chunk_nbytes,
        crc32c=np.random.default_rng(0).integers(0, 1 << 32, int(nblocks.sum()), dtype=np.uint32),
        block_bytes=block,
    )  # fmt: skip
    tensors = {
        d.name: TensorRecord(d.dtype, d.shape, plan.chunk_start[g], plan.layouts[g])
        for g, d in enumerate(plan.tensors)
    }
    files = [data_key(rank_file_name(r, f"{r * 2654435761 % (1 << 40):010x}", 0), 64)
             for r in range(ranks)]  # fmt: skip
    store = MemoryStore(f"scale-sim-{ranks}")
    manifest, (index_key, index_bytes) = write_chunk_index(
        store, Manifest(ranks, files, table, tensors, {}, {}), 64
    )
    directory = manifest.index
    data = manifest.to_json()
    assemble_s = time.perf_counter() - t

    # What one rank fetches and parses to restore: the manifest, then the parts of the
    # chunk index its own boxes need. Measured for the last rank (the output layer's stage)
    # and the first rank of stage 1 (a full stage of layers, with data in every moment
    # shard); the larger of the two is reported.
    torch.empty((4, 4), device="meta")[1:2, 0:1].is_contiguous()  # warm torch's dispatcher
    fetched, parsed, parts_read = 0, 0.0, 0
    for me in (plans[-1], plans[min(len(plans) - 1, dp * TP)]):
        times = []
        for _ in range(3):  # the median of three: tens of milliseconds on a shared machine
            t = time.perf_counter()
            head = Manifest.from_json(data, store=store)
            parse_s = time.perf_counter() - t
            targets = _targets(me, head)
            t = time.perf_counter()
            needed = chunks_needed(targets)
            loaded = head.with_index(store, needed)
            for file in np.unique(loaded.chunks.file[needed]).tolist():
                loaded.files[file]  # the keys of the files it reads (as its reader will)
            times.append(parse_s + time.perf_counter() - t)
        parts = loaded.chunks.loaded
        part_bytes = int(sum(int(directory.at[p + 1] - directory.at[p]) for p in parts))
        part_bytes += head.files.fetched_bytes  # the name parts of the files it reads
        fetched = max(fetched, len(data) + part_bytes)
        parsed = max(parsed, sorted(times)[1])
        parts_read = max(parts_read, len(parts))
    targets = _targets(plans[-1], head)  # the load plan below: the last rank's
    loaded = head.with_index(store, chunks_needed(targets))

    # One rank's load plan: the last rank (the output layer) re-loading its own shards.
    t = time.perf_counter()
    groups = plan_reads(loaded, targets, 64 << 20, 256 << 10).groups
    load_plan_s = time.perf_counter() - t
    restore = _restore(plans, manifest, pp, dp)
    store.delete(index_key)
    return {
        "case": "scale_sim",
        "ranks": ranks,
        "tensors": len(plan.tensors),
        "declared_chunks": int(sum(len(p.tensors) for p in plans)),
        "unique_chunks": n,
        "unique_bytes": int(plan.chunk_nbytes.sum()),
        "manifest_bytes": len(data) + len(index_bytes),
        "manifest_mb": round((len(data) + len(index_bytes)) / 1e6, 2),
        "manifest_json_bytes": len(data),
        # a load's broadcast of the manifest to every rank (the chunk index parts are not
        # broadcast: each rank reads the ones it needs)
        "manifest_broadcast_bytes": len(pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL)),
        "chunk_index_bytes": len(index_bytes),
        "rank_restore_fetch_bytes": fetched,
        "rank_restore_parse_s": round(parsed, 3),
        "rank_restore_index_parts": parts_read,
        "rank_flatten_ms": round(flatten_s * 1000, 2),
        "plan_s": round(planning_s, 3),
        "plan_groups": len(members),
        "plan_slowest_leader_s": round(max(leader_s), 3),
        "plan_all_groups_s": round(sum(leader_s), 3),
        "plan_group_and_join_s": round(grouping_s + join_s, 3),
        "manifest_assemble_s": round(assemble_s, 3),
        "rank_load_plan_ms": round(load_plan_s * 1000, 2),
        "rank_read_requests": len(groups),
        **restore,
        "requests_per_save": _save_requests(plan),
        "sim_build_s": round(build_s, 2),
    }


def _file_offsets(file: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    """Each chunk's offset when every file holds its chunks back to back in table order."""
    order = np.argsort(file, kind="stable")
    sizes = nbytes[order]
    ends = np.cumsum(sizes)
    first = np.flatnonzero(np.r_[True, file[order][1:] != file[order][:-1]])
    base = np.repeat(ends[first] - sizes[first], np.diff(np.r_[first, len(order)]))
    out = np.empty_like(nbytes)
    out[order] = ends - sizes - base
    return out


def _targets(me: RankPlan, loaded: Manifest, names: set[str] | None = None) -> list[Target]:
    """``me``'s own boxes as load targets (meta tensors: planning only), optionally only the
    tensors named in ``names``."""
    targets = []
    for i, decl in enumerate(me.tensors):
        if names is not None and decl.name not in names:
            continue
        nd = len(decl.shape)
        box = (tuple(int(x) for x in me.offsets[i, :nd]), tuple(int(x) for x in me.shapes[i, :nd]))
        dtype = torch.bfloat16 if decl.dtype == "bfloat16" else torch.float32
        dest = torch.empty(box[1], dtype=dtype, device="meta")
        targets.append(Target(decl.name, loaded.tensors[decl.name], box, dest))
    return targets


def _gets(groups: list) -> int:
    """Ranged GETs of a plan's requests on S3 (each request is cut into ranges)."""
    return sum(-(-(g.end - g.start) // RANGE) for g in groups)


def _restore(plans: list[RankPlan], loaded: Manifest, pp: int, dp: int) -> dict[str, float | int]:
    """Bytes and requests of a restore from the shared tier onto the same layout, with reads
    shared among replicas (``loading/shared_reads.py``: the parameters, replicated across DP,
    are one plan per (PP, TP) position read once by the DP group; the Adam moments, sharded
    across DP, are each rank's own) and without. Plans are made for the DP rank 0 and the
    last DP rank of every (PP, TP) position (their moment plans stand for the DP ranks in
    between: the same tensors, boxes of torch.chunk sizes); bytes are exact for every rank."""
    itemsize = {"bfloat16": 2, "float32": 4}
    param_bytes = moment_bytes = 0
    rank_bytes = []
    for p in plans:
        sizes = np.prod(p.shapes, axis=1) * np.array([itemsize[d.dtype] for d in p.tensors])
        is_param = np.array([d.name.startswith("model.") for d in p.tensors])
        rank_bytes.append((int(sizes[is_param].sum()), int(sizes[~is_param].sum())))
    shared_gets = unshared_gets = 0
    for pp_rank in range(pp):
        for tp_rank in range(TP):
            first = (pp_rank * dp) * TP + tp_rank  # rank = (pp * dp + dp_rank) * TP + tp
            last = (pp_rank * dp + dp - 1) * TP + tp_rank
            me = plans[first]
            names = {d.name for d in me.tensors if d.name.startswith("model.")}
            params = plan_reads(loaded, _targets(me, loaded, names), READ_WINDOW, 0).groups
            moments = [
                plan_reads(loaded, _targets(plans[r], loaded, _others(plans[r], names)),
                           READ_WINDOW, 0).groups
                for r in {first, last}
            ]  # fmt: skip
            per_rank_moment_gets = sum(map(_gets, moments)) / len(moments)
            shared_gets += _gets(params) + dp * per_rank_moment_gets
            whole = plan_reads(loaded, _targets(me, loaded), READ_WINDOW, 256 << 10).groups
            unshared_gets += dp * _gets(whole)
            param_bytes += rank_bytes[first][0]
            moment_bytes += sum(rank_bytes[(pp_rank * dp + d) * TP + tp_rank][1] for d in range(dp))
    unique = param_bytes + moment_bytes
    unshared = sum(a + b for a, b in rank_bytes)
    return {
        "restore_read_ratio": round((param_bytes + moment_bytes) / unique, 4),
        "restore_read_ratio_unshared": round(unshared / unique, 2),
        "requests_per_restore": int(shared_gets) + 1,  # + the manifest, read once
        "requests_per_restore_unshared": int(unshared_gets) + 1,
    }


def _others(me: RankPlan, names: set[str]) -> set[str]:
    return {d.name for d in me.tensors if d.name not in names}


def _save_requests(plan) -> int:
    """S3 requests of a save: each rank's data file (one PUT, or a multipart upload: create,
    one per part, complete), plus the in-flight marker (PUT, DELETE) and the manifest."""
    per_rank = np.bincount(plan.chunk_writer, weights=plan.chunk_nbytes).astype(np.int64)
    parts = -(-per_rank // PART)
    return int(np.where(parts > 1, parts + 2, 1).sum()) + 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ranks", type=int, nargs="+", default=sorted(SIZES), choices=sorted(SIZES)
    )
    for ranks in parser.parse_args().ranks:
        print(json.dumps(simulate(ranks)), flush=True)


if __name__ == "__main__":
    main()
