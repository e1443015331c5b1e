"""torch DCP with ckptstore as its storage layer (``cs.dcp.Writer`` / ``cs.dcp.Reader``)
against DCP's own ``FileSystemWriter`` / ``FileSystemReader``, in the same run (imported by
tools/bench.py): the model workload of bench_training (a 24-layer decoder under FSDP2 with
AdamW, 4 ranks), ``dcp.save`` and ``dcp.load`` 4 -> 4, alternating, median of 3; every load
checked bit-exact."""

from __future__ import annotations

import os

from bench import _equal, _median, _timed
from bench_training import MODEL, _state


def dcp_layer(rank: int, world: int, root: str) -> dict[str, float]:
    import torch.distributed.checkpoint as dcp

    import ckptstore as cs

    state = _state("fsdp", world, MODEL)
    times: dict[str, list[float]] = {}

    def run(name: str, fn) -> None:
        times.setdefault(name, []).append(_timed(fn))

    for i in range(3):
        run("fs_save", lambda i=i: dcp.save(state, checkpoint_id=f"{root}/fs{i}"))
        writer = cs.dcp.Writer(f"{root}/cs{i}")
        run("cs_save", lambda w=writer: dcp.save(state, storage_writer=w))
    by_fs = _state("fsdp", world, MODEL, seed=1)
    by_cs = _state("fsdp", world, MODEL, seed=2)
    for _ in range(3):
        run("fs_load", lambda: dcp.load(by_fs, checkpoint_id=f"{root}/fs0"))
        reader = cs.dcp.Reader(f"{root}/cs0")
        run("cs_load", lambda r=reader: dcp.load(by_cs, storage_reader=r))
    assert _equal(by_fs, state) and _equal(by_cs, state), "a DCP load differs from the save"
    return {k: _median(v) for k, v in times.items()}


def run(scratch: str, emit, case, sink) -> None:
    from ckptstore.testing.ranks import run_ranks

    root = os.path.join(scratch, "dcp-layer")
    os.makedirs(root)
    results = run_ranks(4, dcp_layer, root, timeout=3600)
    r = {k: max(x[k] for x in results) for k in results[0]}
    emit(
        case("dcp_layer_save", r["cs_save"], r["fs_save"], 1.0, reference="FileSystemWriter"), sink
    )
    emit(
        case("dcp_layer_load", r["cs_load"], r["fs_load"], 1.0, reference="FileSystemReader"), sink
    )
