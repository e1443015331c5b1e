"""Run a function on N real processes joined by a gloo process group (for tests and tools)."""

from __future__ import annotations

import os
import pickle
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    rank: int, world: int, port: int, fn: Callable[..., Any], args: tuple, queue: Any
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
    )
    import torch

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}"
        )
        # Results travel by value (plain pickle): tensors shared through file descriptors
        # would vanish with the process that returned them.
        queue.put((rank, True, pickle.dumps(fn(rank, world, *args))))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class RankFailure(RuntimeError):
    pass


def run_ranks(
    world: int,
    fn: Callable[..., Any],
    *args: Any,
    timeout: float = 240.0,
    dying: tuple[int, ...] = (),
) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` spawned processes; returns each rank's result.

    ``fn`` must be importable (module level). Raises :class:`RankFailure` with every failing
    rank's traceback, or when a rank does not finish within ``timeout`` seconds. Ranks in
    ``dying`` are meant to die (their result is None; nobody waits for them).
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world, port, fn, args, queue)) for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, tuple[bool, Any]] = {}
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout
    try:
        while len(results) < world - len(dying):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = set(range(world)) - set(results) - set(dying)
                raise RankFailure(f"ranks {sorted(missing)} timed out")
            try:
                rank, ok, value = queue.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [
                    i
                    for i, p in enumerate(procs)
                    if p.exitcode not in (None, 0) and i not in results and i not in dying
                ]
                if dead:
                    raise RankFailure(
                        f"ranks {dead} died (exit codes {[procs[i].exitcode for i in dead]})"
                    ) from None
                continue
            results[rank] = (ok, value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
    failures = [f"--- rank {r} ---\n{v}" for r, (ok, v) in sorted(results.items()) if not ok]
    if failures:
        raise RankFailure("\n".join(failures))
    # The payloads come from processes this function just started, never from a checkpoint.
    return [pickle.loads(results[r][1]) if r in results else None for r in range(world)]
