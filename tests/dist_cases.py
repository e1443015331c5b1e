"""Worker functions run on real ranks (spawned processes, gloo) by the distributed tests."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import ckptstore as cs
from ckptstore.errors import CkptStoreError, StateDictError

LAYOUTS = ("row", "col", "mesh2x2", "sharded", "replicated")


def global_state() -> dict[str, torch.Tensor]:
    """Deterministic full tensors; shapes deliberately not divisible by 2, 3 or 4."""
    g = torch.Generator().manual_seed(1234)
    return {
        "model.w0": torch.randn(37, 19, generator=g),
        "model.w1": torch.randn(64, 48, generator=g).to(torch.bfloat16),
        "model.emb": torch.randn(10, 7, generator=g, dtype=torch.float64),
        "model.vec": torch.randint(-1000, 1000, (13,), generator=g, dtype=torch.int32),
        "optim.state.0.exp_avg": torch.randn(37, 19, generator=g),
        "optim.state.0.exp_avg_sq": torch.rand(37, 19, generator=g),
    }


def _mesh_and_placements(layout: str, world: int, ndim: int):
    if layout == "mesh2x2":
        mesh = init_device_mesh("cpu", (2, world // 2))
        return mesh, ((Shard(0), Shard(1)) if ndim >= 2 else (Shard(0), Replicate()))
    mesh = init_device_mesh("cpu", (world,))
    if layout == "col" and ndim >= 2:
        return mesh, (Shard(1),)
    return mesh, (Shard(0),)


def _sharded_rows(full: torch.Tensor, rank: int, world: int) -> cs.Sharded:
    """Uneven row blocks cut the way a non-DTensor framework might (not torch.chunk)."""
    n = full.shape[0]
    cuts = [0] + [min(n, (i + 1) * (i + 2) * n // (world * (world + 1))) for i in range(world)]
    cuts[-1] = n
    lo, hi = cuts[rank], cuts[rank + 1]
    return cs.Sharded(full[lo:hi].clone(), tuple(full.shape), (lo,) + (0,) * (full.dim() - 1))


def make_leaf(full: torch.Tensor, layout: str, rank: int, world: int, zero: bool = False):
    src = torch.zeros_like(full) if zero else full
    if layout == "replicated":
        return src.clone()
    if layout == "sharded":
        leaf = _sharded_rows(full, rank, world)
        if zero:
            leaf.local_tensor.zero_()
        return leaf
    mesh, placements = _mesh_and_placements(layout, world, full.dim())
    return distribute_tensor(src, mesh, list(placements))


def nest(flat: dict) -> dict:
    out: dict = {}
    for name, v in flat.items():
        parts = name.split(".")
        d = out
        for p in parts[:-1]:
            d = d.setdefault(int(p) if p.isdigit() else p, {})
        d[int(parts[-1]) if parts[-1].isdigit() else parts[-1]] = v
    return out


def build_state(layout: str, rank: int, world: int, zero: bool = False) -> dict:
    flat = {k: make_leaf(v, layout, rank, world, zero) for k, v in global_state().items()}
    sd = nest(flat)
    sd["model"]["bias"] = torch.zeros(1024) if zero else torch.arange(1024, dtype=torch.float32)
    sd["model"]["scale"] = torch.tensor(0.0 if zero else 2.5)
    sd["optim"]["state"][0]["step"] = torch.tensor(0.0 if zero else 17.0)
    sd["optim"]["param_groups"] = [
        {"lr": 0.0 if zero else 1e-3, "betas": (0.9, 0.95), "params": [0]}
    ]
    sd["step"] = 0 if zero else 100
    sd["rng"] = cs.PerRank(-1 if zero else rank * 11)
    return sd


def local_and_box(leaf):
    if isinstance(leaf, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offsets = compute_local_shape_and_global_offset(
            leaf.shape, leaf.device_mesh, leaf.placements
        )  # torch's own answer, not ckptstore's cached one
        return leaf.to_local(), (tuple(offsets), tuple(shape))
    if isinstance(leaf, cs.Sharded):
        return leaf.local_tensor, (leaf.offsets, tuple(leaf.local_tensor.shape))
    return leaf, ((0,) * leaf.dim(), tuple(leaf.shape))


def check_state(sd: dict, rank: int, world_saved: int, world: int) -> list[str]:
    """Differences between a loaded state and the expected values (empty when all match)."""
    bad = []
    full = global_state()
    for name, expected in full.items():
        node = sd
        for p in name.split("."):
            node = node[int(p) if p.isdigit() else p]
        local, (offs, shape) = local_and_box(node)
        want = expected[tuple(slice(o, o + s) for o, s in zip(offs, shape, strict=True))]
        if not torch.equal(local.view(torch.uint8) if local.dtype == torch.bool else local, want):
            bad.append(f"{name} box {offs},{shape}")
    if not torch.equal(sd["model"]["bias"], torch.arange(1024, dtype=torch.float32)):
        bad.append("model.bias")
    if sd["model"]["scale"].item() != 2.5 or sd["optim"]["state"][0]["step"].item() != 17.0:
        bad.append("scalars")
    if sd["optim"]["param_groups"] != [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0]}]:
        bad.append(f"param_groups {sd['optim']['param_groups']}")
    if sd["step"] != 100:
        bad.append("step")
    if world == world_saved and sd["rng"].value != rank * 11:
        bad.append(f"rng {sd['rng'].value}")
    return bad


def save_layouts(rank: int, world: int, root: str) -> list[dict]:
    infos = []
    for layout in LAYOUTS:
        if layout == "mesh2x2" and world % 2:
            continue
        info = cs.save(build_state(layout, rank, world), f"{root}/{layout}")
        infos.append(
            {"layout": layout, "bytes": info.rank_bytes_written, "cached": info.plan_cached}
        )
    # the same structure again: the plan comes from the cache on every rank
    info = cs.save(build_state("row", rank, world), f"{root}/row-again")
    infos.append(
        {"layout": "row-again", "bytes": info.rank_bytes_written, "cached": info.plan_cached}
    )
    return infos


def load_layouts(rank: int, world: int, root: str, saved_world: int) -> dict[str, list[str]]:
    """Load every saved layout into every layout this world size can hold."""
    problems: dict[str, list[str]] = {}
    policy = "error" if world == saved_world else "wrap"
    for src in LAYOUTS:
        for dst in LAYOUTS:
            if dst == "mesh2x2" and world % 2:
                continue
            sd = build_state(dst, rank, world, zero=True)
            cs.load(sd, f"{root}/{src}", per_rank=policy)
            bad = check_state(sd, rank, saved_world, world)
            if world != saved_world and sd["rng"].value != (rank % saved_world) * 11:
                bad.append(f"wrapped rng {sd['rng'].value}")
            if bad:
                problems[f"{src}->{dst}"] = bad
    return problems


def resize_policies(rank: int, world: int, root: str) -> dict[str, str]:
    out = {}
    sd = build_state("row", rank, world, zero=True)
    try:
        cs.load(sd, f"{root}/row")
        out["error"] = "no error"
    except CkptStoreError as exc:
        out["error"] = type(exc).__name__
    sd = build_state("row", rank, world, zero=True)
    cs.load(sd, f"{root}/row", per_rank="keep")
    out["keep"] = str(sd["rng"].value)
    return out


def save_replicated_only(rank: int, world: int, root: str) -> list[int]:
    """Replicated plain tensors and a (Shard, Replicate) 2-D mesh: each byte is written once."""
    torch.manual_seed(0)
    sd = {f"r{i}": torch.full((1000 + i,), float(i)) for i in range(24)}
    mesh = init_device_mesh("cpu", (2, world // 2))
    sd["half"] = distribute_tensor(
        torch.arange(4000.0).reshape(100, 40), mesh, [Shard(0), Replicate()]
    )
    info = cs.save(sd, root)
    return [info.rank_bytes_written, info.total_bytes]


def bad_leaf_on_one_rank(rank: int, world: int, root: str) -> str:
    sd = {"w": torch.ones(4), "obj": object() if rank == 1 else 3}
    try:
        cs.save(sd, root)
    except CkptStoreError as exc:
        return type(exc).__name__
    return "saved"


def mismatch_on_one_rank(rank: int, world: int, root: str) -> str:
    sd = build_state("row", rank, world, zero=True)
    if rank == 2:
        sd["model"]["extra"] = torch.zeros(3)
    try:
        cs.load(sd, f"{root}/row")
    except CkptStoreError as exc:
        return type(exc).__name__
    return "loaded"


def inconsistent_shapes(rank: int, world: int, root: str) -> str:
    sd = {"w": torch.ones(4 + (rank == 3))}
    try:
        cs.save(sd, root)
    except CkptStoreError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "saved"


def barrier_ok(rank: int, world: int) -> int:
    dist.barrier()
    return rank


def async_saves(rank: int, world: int, root: str, persist: str) -> dict:
    """Three async saves of a changing sharded state; each checkpoint holds its own step."""
    import ckptstore as cs

    mesh = init_device_mesh("cpu", (world,))
    w = distribute_tensor(torch.zeros(64, 32), mesh, [Shard(0)])
    stalls, ptrs, infos = [], [], []
    for step in range(3):
        w.to_local().fill_(float(step))
        handle = cs.async_save(
            {"w": w, "step": step, "rng": cs.PerRank(rank)}, f"{root}/s{step}", persist=persist
        )
        w.to_local().fill_(-1.0)  # changing the tensor after return must not affect the save
        stalls.append(handle.stall_seconds)
        infos.append(handle)
    results = [h.wait() for h in infos]
    for step in range(3):
        dest = distribute_tensor(torch.zeros(64, 32), mesh, [Shard(0)])
        sd = {"w": dest, "step": -1, "rng": cs.PerRank(-1)}
        cs.load(sd, f"{root}/s{step}")
        assert torch.equal(dest.to_local(), torch.full_like(dest.to_local(), float(step))), step
        assert sd["step"] == step and sd["rng"].value == rank
    return {"stalls": stalls, "cached": [r.plan_cached for r in results], "ptrs": ptrs}


def async_failure_everywhere(rank: int, world: int, root: str) -> list[str]:
    """A write that fails on one rank fails the save on every rank, via wait() or the next call."""
    import os

    import ckptstore as cs

    if rank == 1:  # a file where the data directory should be: this rank's write fails
        os.makedirs(f"{root}/bad", exist_ok=True)
    dist.barrier()
    if rank == 1:
        with open(f"{root}/bad/data", "w") as f:
            f.write("not a directory")
    dist.barrier()
    out = []
    handle = cs.async_save({"w": torch.ones(8) * rank}, f"{root}/bad")
    try:
        handle.wait()
        out.append("saved")
    except CkptStoreError as exc:
        out.append(type(exc).__name__)
    # already reported through wait(): the next save goes ahead
    cs.async_save({"w": torch.ones(8)}, f"{root}/good").wait()
    out.append("next ok")
    return out


def _fsdp_model(world: int):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train_step(model, optim, step: int) -> float:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(8, 16, generator=g) + 0.01 * torch.rand(8, 16)  # uses the global RNG too
    loss = model(x).pow(2).mean()
    loss.backward()
    optim.step()
    optim.zero_grad()
    return float(loss)


def train_with_manager(rank: int, world: int, root: str, start_steps: int, end_step: int) -> dict:
    """Train to ``end_step``, resuming from ``root`` if it holds a checkpoint."""
    import ckptstore as cs

    model, optim = _fsdp_model(world)
    state = {"model": model, "optim": optim, "meta": {"note": "x"}}
    torch.manual_seed(1000 + rank)  # per-rank RNG streams
    with cs.CheckpointManager(root, every_n_steps=start_steps, keep=2) as mgr:
        resumed = mgr.restore(state) or 0
        losses = [_train_step(model, optim, step) for step in range(resumed + 1, end_step + 1)]
        if resumed == 0:
            mgr.maybe_save(start_steps, state) if end_step == start_steps else None
    params = {k: v.full_tensor() for k, v in model.state_dict().items()}
    return {"resumed": resumed, "losses": losses, "params": params, "rand": torch.rand(3)}


def save_rows(rank: int, world: int, root: str) -> str:
    """Each rank saves its own rows of one tensor; returns the data file it wrote."""
    cs.save({"w": _sharded_rows(torch.arange(64.0).reshape(16, 4), rank, world)}, root)
    return cs.open(root).manifest.files[rank]


def load_rows(rank: int, world: int, root: str) -> str:
    try:
        cs.load({"w": _sharded_rows(torch.zeros(16, 4), rank, world)}, root)
    except CkptStoreError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "loaded"


def save_to_different_paths(rank: int, world: int, root: str) -> str:
    try:
        cs.save({"w": _sharded_rows(torch.arange(64.0).reshape(16, 4), rank, world)},
                f"{root}/r{rank}")  # fmt: skip
    except CkptStoreError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "saved"


def dataless_tensor_on_one_rank(rank: int, world: int, root: str, mode: str) -> str:
    """Rank 1 holds a sparse tensor (sync) or a meta tensor (async): a per-rank entry, so
    the plan agrees and the failure comes while copying, after the other rank went on."""
    bad = torch.ones(3).to_sparse() if mode == "sync" else torch.empty(3, device="meta")
    sd = {"w": torch.ones(4), "r": cs.PerRank(bad if rank == 1 else torch.ones(3))}
    try:
        if mode == "sync":
            cs.save(sd, root)
        else:
            cs.async_save(sd, root).wait()
    except CkptStoreError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "saved"


def one_rank_stops_taking_part(rank: int, world: int, root: str, mode: str) -> str:
    """Rank 1 never calls ckptstore (as if it hung in training): rank 0's call ends with a
    typed timeout after CKPTSTORE_COLLECTIVE_TIMEOUT_S, not at the job's 30-minute one."""
    import time

    os.environ["CKPTSTORE_COLLECTIVE_TIMEOUT_S"] = "4"
    if rank == 1:
        time.sleep(12)
        return "absent"
    t = time.monotonic()
    try:
        if mode == "async":
            cs.async_save({"w": torch.ones(4)}, root).wait()
        elif mode == "load":
            cs.load({"w": torch.ones(4)}, root)
        else:
            cs.save({"w": torch.ones(4)}, root)
    except CkptStoreError as exc:
        return f"{type(exc).__name__} after {time.monotonic() - t:.0f} s: {exc}"
    return "returned"


def store_exchange_with_a_silent_rank(rank: int, world: int) -> str:
    """Rank 1 joins a key-value exchange and goes silent (as a dead rank would): rank 0's
    gather ends with a typed error naming it, instead of waiting hours."""
    import time

    from ckptstore.coordination.key_value import Team

    os.environ["CKPTSTORE_COLLECTIVE_TIMEOUT_S"] = "3"
    exchange = Team().next_exchange("test")
    if rank == 1:
        exchange._stop.set()  # no more heartbeats, and it never reports
        time.sleep(10)
        return "silent"
    t = time.monotonic()
    try:
        exchange.gather("report")
    except CkptStoreError as exc:
        return f"{type(exc).__name__} after {time.monotonic() - t:.0f} s: {exc}"
    return "returned"


def third_rank_stops_taking_part(rank: int, world: int, root: str, when: str) -> str:
    """Rank 2 of 3 never calls ckptstore (``when="first"``: before any save, so ckptstore's
    group creation is what waits; ``"later"``: after one save, inside a collective): ranks 0
    and 1 end with a typed timeout naming rank 2 as the one that never arrived."""
    import time

    os.environ["CKPTSTORE_COLLECTIVE_TIMEOUT_S"] = "4"
    if when == "later":
        cs.save({"w": torch.ones(4)}, os.path.join(root, "first"))
    if rank == 2:
        time.sleep(10)
        return "absent"
    try:
        cs.save({"w": torch.ones(4)}, os.path.join(root, "second"))
    except CkptStoreError as exc:
        return f"{type(exc).__name__} {getattr(exc, 'absent_ranks', None)}: {exc}"
    return "returned"


def dtensor_boxes_against_torch(rank: int, world: int) -> list[str]:
    """Flatten DTensors of many specs -- same global shape under different placements, the
    same placements on other shapes (uneven, empty), a redistributed one, a spec changed in
    place -- twice (the second time from the box cache): every box and local tensor must be
    torch's."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    from ckptstore.state.leaves import flatten

    mesh = init_device_mesh("cpu", (world,))
    sd = {}
    for shape in [(7, 3), (3, 7), (1025,), (0, 5), (1, 1)]:
        full = torch.arange(int(torch.Size(shape).numel()), dtype=torch.float32).reshape(shape)
        for placements in ([Shard(0)], [Shard(len(shape) - 1)], [Replicate()]):
            sd[f"{shape}-{placements}"] = distribute_tensor(full, mesh, placements)
    bad = []
    for attempt in range(2):
        leaves = flatten(sd)
        for name, t in sd.items():
            shape, offsets = compute_local_shape_and_global_offset(t.shape, mesh, t.placements)
            leaf = leaves[name]
            if leaf.box != (tuple(offsets), tuple(shape)) or leaf.global_shape != tuple(t.shape):
                bad.append(f"{name} (pass {attempt}): {leaf.box} != {(offsets, shape)}")
            if leaf.value.data_ptr() != t.to_local().data_ptr() and t.to_local().numel():
                bad.append(f"{name}: not the DTensor's own local tensor")
            if leaf.dtype != t.dtype:
                bad.append(f"{name}: dtype {leaf.dtype}")
    # Many DTensors that share a few specs, on a mesh the cache has not met (a new mesh is a
    # new key: a job's first load): each key is worked out once, every box is torch's.
    other = init_device_mesh("cpu", (world,))
    specs = [((1025,), [Shard(0)]), ((7, 3), [Shard(1)]), ((1025,), [Replicate()])]
    many = {}
    for i in range(40):
        shape, placements = specs[i % 3]
        full = torch.full(shape, float(i))
        many[f"m{i}"] = distribute_tensor(full, other, placements)
    leaves = flatten(many)
    for name, t in many.items():
        shape, offsets = compute_local_shape_and_global_offset(t.shape, other, t.placements)
        leaf = leaves[name]
        if leaf.box != (tuple(offsets), tuple(shape)) or not torch.equal(leaf.value, t.to_local()):
            bad.append(f"{name} on a new mesh: {leaf.box} != {(offsets, shape)}")
    # A local tensor out of step with its spec is refused, in a dict of many (taken in column
    # passes) as on its own.
    wrong = distribute_tensor(torch.zeros(8, 3), mesh, [Shard(0)])
    wrong._local_tensor = torch.zeros(5, 3)
    for state in (dict(sd, wrong=wrong), {"wrong": wrong}):
        try:
            flatten(state)
            bad.append(f"a stale local tensor was taken ({len(state)} entries)")
        except StateDictError as exc:
            if "(5, 3)" not in str(exc):
                bad.append(f"stale local tensor: {exc}")
    moved = sd["(7, 3)-[Shard(dim=0)]"].redistribute(mesh, [Shard(1)])  # a new spec
    leaf = flatten({"m": moved})["m"]
    shape, offsets = compute_local_shape_and_global_offset(moved.shape, mesh, moved.placements)
    if leaf.box != (tuple(offsets), tuple(shape)):
        bad.append(f"redistributed: {leaf.box}")
    # The same spec object changed in place (its placements, and the data to match them):
    # the box cache must not answer with the old box.
    t = sd["(3, 7)-[Shard(dim=0)]"]
    t._local_tensor = torch.arange(21.0).reshape(3, 7).chunk(world, dim=1)[rank].clone()
    t._spec.placements = (Shard(1),)
    leaf = flatten({"t": t})["t"]
    shape, offsets = compute_local_shape_and_global_offset(t.shape, mesh, t.placements)
    if leaf.box != (tuple(offsets), tuple(shape)):
        bad.append(f"spec changed in place: {leaf.box} != {(offsets, shape)}")
    return bad


def dtensor_columns_both_ways(rank: int, world: int) -> list[str]:
    """Many DTensors' columns (local tensors, global shapes, boxes, dtypes) from the compiled
    loop and from the Python passes, on a cold and on a warm box cache: the same objects and
    values, every box torch's. Placements shared by a whole dict (fresh ``Replicate()`` and
    ``Shard(0)`` objects), mixed in one (``Shard(1)`` among ``Shard(0)``, a ``Shard``
    subclass), on a 2-D mesh (``_StridedShard``, ``Partial``); a local tensor out of step
    and a spec without tensor metadata are refused or handed back alike."""
    import gc
    import weakref

    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import Partial, _StridedShard

    from ckptstore.state import dtensor_boxes, tensor_fields

    class OwnShard(Shard):  # a subclass: compared by its own rules, never assumed equal
        pass

    flat = init_device_mesh("cpu", (world,))
    square = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "tp"))

    def make(mesh, shape, placements, i):
        size, _ = compute_local_shape_and_global_offset(shape, mesh, placements)
        local = torch.full(size, float(i))
        stride = torch.empty(shape).stride()
        return DTensor.from_local(
            local, mesh, placements, run_check=False, shape=shape, stride=stride
        )

    dicts = {
        "replicate": [make(flat, (1024,), [Replicate()], i) for i in range(50)],
        "shard(0), uneven": [make(flat, (1025,), [Shard(0)], i) for i in range(50)],
        "mixed": [make(flat, (7, 3), [Shard(1) if i == 20 else Shard(0)], i) for i in range(40)]
        + [make(flat, (9, 5), [OwnShard(0)], 0), make(flat, (3, 7), [Replicate()], 0)],
        "2-D mesh": [make(square, (6, 4), [Replicate(), Shard(0)], i) for i in range(10)]
        + [make(square, (6, 4), [Shard(0), Replicate()], 0)]
        + [make(square, (8, 4), [_StridedShard(0, split_factor=2), Shard(0)], 0)]
        + [make(square, (6, 4), [Partial(), Replicate()], 0)],
    }
    compiled = tensor_fields.compiled
    impls = {"python": None} if compiled is None else {"compiled": compiled, "python": None}
    bad = []
    for label, values in dicts.items():
        got = {}
        for impl, module in impls.items():
            tensor_fields.compiled = module
            for cache in ("cold", "warm"):
                if cache == "cold":
                    dtensor_boxes._BOXES.clear()
                got[impl, cache] = dtensor_boxes.dtensor_columns(values)
        tensor_fields.compiled = compiled
        for (impl, cache), (locals_, shapes, boxes, dtypes) in got.items():
            for i, t in enumerate(values):
                size, offsets = compute_local_shape_and_global_offset(
                    t.shape, t.device_mesh, t.placements
                )
                want = (tuple(offsets), tuple(size))
                if boxes[i] != want or shapes[i] != tuple(t.shape) or dtypes[i] != t.dtype:
                    bad.append(f"{label} {impl} {cache} {i}: {boxes[i]} != {want}")
                if locals_[i] is not t._local_tensor:
                    bad.append(f"{label} {impl} {cache} {i}: not the DTensor's local tensor")
    wrong = dicts["replicate"][:]
    wrong[7] = make(flat, (1024,), [Replicate()], 0)
    wrong[7]._local_tensor = torch.zeros(5)
    headless = dicts["replicate"][:]
    headless[9] = make(flat, (1024,), [Replicate()], 0)
    headless[9]._spec.tensor_meta = None
    for impl, module in impls.items():
        tensor_fields.compiled = module
        try:
            dtensor_boxes.dtensor_columns(wrong)
            bad.append(f"{impl}: a local tensor out of step was taken")
        except StateDictError as exc:
            if "(5,)" not in str(exc):
                bad.append(f"{impl}: out of step: {exc}")
        if dtensor_boxes.dtensor_columns(headless) is not None:
            bad.append(f"{impl}: a spec without tensor metadata was not handed back")
        # Nothing is kept: once the caller drops the DTensors and the columns, every local
        # tensor is freed (a reference the compiled loop failed to drop would keep it).
        fresh = [make(flat, (64,), [Shard(0)], i) for i in range(30)]
        alive = [weakref.ref(t._local_tensor) for t in fresh]
        columns = dtensor_boxes.dtensor_columns(fresh)
        del fresh, columns
        gc.collect()
        if any(ref() is not None for ref in alive):
            bad.append(f"{impl}: local tensors outlived the DTensors and their columns")
    tensor_fields.compiled = compiled
    return bad


def _llama_shape():
    from ckptstore.testing.llama import LlamaShape

    return LlamaShape(vocab=250, dim=64, layers=2, heads=4, ffn=172)  # 3 divides none


def llama_save(rank: int, world: int, root: str) -> dict | None:
    """Training states of an FSDP2 and a TP+FSDP2 model (``get_state_dict``, AdamW after a
    step) saved by ckptstore under ``root/<layout>``; rank 0 returns their tensors gathered
    whole, by layout."""
    from ckptstore.testing import llama

    out = {}
    for layout in LLAMA_LAYOUTS:
        model, optim = llama.build(_llama_shape(), layout, world)
        state = llama.training_state(model, optim)
        cs.save(state, os.path.join(root, layout))
        out[layout] = llama.full_tensors(state)
    return out if rank == 0 else None


def llama_load(rank: int, world: int, root: str) -> dict | None:
    """Load each saved training state into a freshly initialized FSDP2 model on ``world``
    ranks (resharded); rank 0 returns, by layout, the loaded tensors gathered whole and the
    model's parameters gathered whole (the load must reach the model itself)."""
    from ckptstore.testing import llama

    out = {}
    for layout in LLAMA_LAYOUTS:
        model, optim = llama.build(_llama_shape(), "fsdp", world, seed=1)
        state = llama.training_state(model, optim)
        cs.load(state, os.path.join(root, layout))
        params = {f"model.{k}": v.full_tensor() for k, v in model.state_dict().items()}
        out[layout] = {"state": llama.full_tensors(state), "params": params}
    return out if rank == 0 else None


LLAMA_LAYOUTS = ("fsdp", "tp-fsdp")


def store_host_dies_during_an_exchange(rank: int, world: int) -> str:
    """Rank 0 hosts the job's key-value store and dies while rank 1 waits in an exchange:
    rank 1 gets a typed error, not torch's network error."""
    import time

    from ckptstore.coordination.key_value import Team

    os.environ["CKPTSTORE_COLLECTIVE_TIMEOUT_S"] = "3"
    exchange = Team().next_exchange("test")
    if rank == 0:
        time.sleep(1)
        os._exit(0)  # the store goes with this process
    try:
        exchange.broadcast(None)
    except CkptStoreError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "returned"


def prepared_async_save(rank: int, world: int, root: str) -> dict:
    """prepare_async_save, then the first async_save: nothing written by the preparation, a
    staging buffer of exactly this rank's bytes faulted in ahead and reused by the save,
    whose plan comes from the cache."""
    from ckptstore.saving.async_save import _state

    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(1000 * 24, dtype=torch.float32).reshape(1000, 24)
    sd = {"w": distribute_tensor(full, mesh, [Shard(0)]), "b": torch.ones(77), "step": 3}
    cs.prepare_async_save(sd)
    written = os.listdir(root)
    dist.barrier()  # no rank's save below may start before every rank has looked
    pool = _state().pool
    pool.wait_prefaulted()
    sizes = [b.numel() for b in pool._free]
    before = {b.data_ptr() for b in pool._free}
    info = cs.async_save(sd, os.path.join(root, "c")).wait()
    after = {b.data_ptr() for b in pool._free}
    return {"written": written, "sizes": sizes, "plan_cached": info.plan_cached,
            "reused": bool(before) and before == after}  # fmt: skip


def prepared_save(rank: int, world: int, root: str) -> dict:
    """prepare_save, then the first save: nothing written by the preparation, the plan
    and (on the coordinator) the manifest's tensor table ready before the save, which
    takes the cached plan and loads back bit-exactly; a state that cannot be saved is
    refused by the preparation on every rank."""
    from ckptstore.saving.save import _PLAN_CACHE

    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(101 * 6, dtype=torch.float32).reshape(101, 6)  # uneven rows
    sd = {"w": distribute_tensor(full, mesh, [Shard(0)]), "b": torch.ones(77), "step": 3}
    sd["norms"] = {f"n{i}": distribute_tensor(torch.full((5,), float(i)), mesh, [Replicate()])
                   for i in range(20)}  # fmt: skip
    cs.prepare_save(sd)
    written = os.listdir(root)
    tables = [t for c in _PLAN_CACHE.values() if c.global_plan for t in
              c.global_plan.tensor_tables.values()]  # fmt: skip
    table_ready = any(("json", True) in t.derived for t in tables)
    dist.barrier()  # no rank's save below may start before every rank has looked
    info = cs.save(sd, os.path.join(root, "c"))
    back = {"w": distribute_tensor(torch.zeros(101, 6), mesh, [Shard(0)]), "b": torch.zeros(77),
            "step": 0, "norms": {f"n{i}": distribute_tensor(torch.zeros(5), mesh, [Replicate()])
                                 for i in range(20)}}  # fmt: skip
    cs.load(back, os.path.join(root, "c"))
    exact = torch.equal(back["w"].full_tensor(), full) and back["step"] == 3
    exact &= all(torch.equal(back["norms"][f"n{i}"].to_local(), torch.full((5,), float(i)))
                 for i in range(20))  # fmt: skip
    try:
        cs.prepare_save({**sd, "obj": object()})
        refused = "no error"
    except CkptStoreError as exc:
        refused = type(exc).__name__
    return {"written": written, "table_ready": table_ready, "plan_cached": info.plan_cached,
            "exact": exact, "refused": refused}  # fmt: skip


def save_rows_uneven(rank: int, world: int, root: str) -> None:
    """Rows of a 40 x 6 tensor cut unevenly over 3 ranks (14, 14, 12), saved as ``w``."""
    full = torch.arange(40 * 6, dtype=torch.float32).reshape(40, 6)
    cuts = [0, 14, 28, 40]
    a, b = cuts[rank], cuts[rank + 1]
    cs.save({"w": cs.Sharded(full[a:b].clone(), (40, 6), (a, 0))}, root)


def mismatch_messages(rank: int, world: int, root: str) -> str:
    """Every rank loads a state_dict whose optimizer is named differently from the saved
    one; returns this rank's error message (rank 0 lists the problems, the others say so)."""
    state = {"model": {"w": torch.ones(4)}, "optim": {"m": torch.ones(4)}}
    cs.save(state, f"{root}/ckpt")
    try:
        cs.load(
            {"model": {"w": torch.zeros(4)}, "optimizer": {"m": torch.zeros(4)}}, f"{root}/ckpt"
        )
    except CkptStoreError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def load_hf_directory(rank: int, world: int, path: str) -> dict:
    """Fill row-sharded DTensors from a directory of safetensors files (resharded)."""
    mesh = init_device_mesh("cpu", (world,))
    sd = {
        "embed.weight": distribute_tensor(torch.zeros(37, 8), mesh, [Shard(0)]),
        "head.bias": distribute_tensor(torch.zeros(11), mesh, [Replicate()]),
    }
    info = cs.load(sd, path)
    return {
        "embed.weight": sd["embed.weight"].full_tensor(),
        "head.bias": sd["head.bias"].full_tensor(),
        "bytes_read": info.bytes_read,
    }


def async_early_staging(rank: int, world: int, root: str) -> dict:
    """Async saves whose host copy is made while the agreement is in flight (a cached plan):
    kept when every rank holds the plan, made again when one rank's cache misses, given
    back when the agreement fails (the checkpoint exists). Returns, per save, how many
    copies this rank made, and the pool's buffers in use afterwards."""
    from ckptstore.saving import save as save_module
    from ckptstore.saving.async_save import _state

    mesh = init_device_mesh("cpu", (world,))
    w = distribute_tensor(torch.zeros(96, 40), mesh, [Shard(0)])
    sd = {"w": w, "b": torch.zeros(33), "step": 0}
    pool = _state().pool
    copies: list[int] = []
    stage = pool.stage

    def counted(*args, **kwargs):
        copies[-1] += 1
        return stage(*args, **kwargs)

    pool.stage = counted
    out: dict = {"copies": copies, "errors": [], "in_use": []}
    for step in range(4):
        copies.append(0)
        w.to_local().fill_(float(step * 10 + rank))
        sd["b"].fill_(float(step))
        sd["step"] = step
        if step == 2 and rank == 1:  # this rank plans again: the others' early copies go
            save_module._PLAN_CACHE.clear()
        path = f"{root}/s{min(step, 2)}"  # step 3: s2 again, committed: the save fails
        try:
            handle = cs.async_save(sd, path)
            w.to_local().fill_(-1.0)
            handle.wait()
        except CkptStoreError as exc:
            out["errors"].append((step, type(exc).__name__))
        out["in_use"].append(pool._in_use)
    pool.stage = stage
    for step in range(3):
        dest = {"w": distribute_tensor(torch.zeros(96, 40), mesh, [Shard(0)]), "b": torch.ones(33)}
        dest["step"] = -1
        cs.load(dest, f"{root}/s{step}")
        full = dest["w"].full_tensor()
        rows = [torch.full((96 // world, 40), float(step * 10 + r)) for r in range(world)]
        assert torch.equal(full, torch.cat(rows)), f"s{step}: wrong tensor data"
        assert torch.equal(dest["b"], torch.full((33,), float(step))) and dest["step"] == step
    return out
