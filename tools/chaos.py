"""The crash campaign: kill ranks at named phases and at seeded random moments of sync, async,
CheckpointManager and tiered saves, then check that every committed checkpoint loads
bit-exactly.

Each trial runs a 2-rank job (real processes, gloo; for tiered saves two simulated nodes with
a local directory each and a SeaweedFS bucket behind them, which the campaign starts) that
saves steps 1..STEPS with a state
that is a function of the step (sharded rows, a replicated tensor, values, per-rank values).
One rank is killed with SIGKILL: at the n-th time it reaches a named phase
(``CKPTSTORE_FAILPOINT``, ``ckptstore/failpoints.py``) or after a seeded delay. The other rank
must end within the collective timeout (no hang). Then, in a fresh process:

* every step with a committed manifest loads and equals its step's state (bit-exact) and
  passes ``verify`` (for the manager, whose keys are its own, the model part is compared);
* every step before the one the kill hit is committed (retention aside);
* ``ckpt gc --older-than 0s --apply`` afterwards leaves every committed step loadable.

Every fourth trial is a concurrency or fault scenario instead: two processes overwriting one
path at once (the result must be one writer's whole state); a writer saving while ``gc
--older-than 0s --apply`` runs in a loop (a save may fail; nothing broken may be committed);
or a tiered job whose S3 requests go through a proxy that fails 8 % of them at random (503,
500, dropped connections, truncated or lost responses, delays): whatever is committed on
either tier loads, and no multipart upload survives ``gc``.

``python tools/chaos.py --trials 200 --seed 1`` prints a table of trials (mode, kill, seed,
committed steps, outcome) and the seeds of the failures, to replay one with ``--only ID``.
``make chaos`` runs the full campaign; ``tests/test_chaos.py`` a seeded subset.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

STEPS = 5
MODES = ("sync", "async", "manager", "tiered")
PHASES = {
    "sync": ("planned", "written", "before_commit", "committed"),
    "async": ("planned", "staged", "written", "before_commit", "committed"),
    "manager": ("planned", "staged", "written", "before_commit", "committed", "retention"),
    "tiered": ("planned", "staged", "written", "before_commit", "committed", "replicated"),
}
TIMEOUT_S = 4  # the job's collective timeout: a survivor must give up within it
TRIAL_LIMIT_S = 120
HANG_DUMP_S = 60


@dataclass
class Trial:
    id: int
    mode: str
    kill: str  # "phase@rank#n" or "after:SECONDS@rank"
    seed: int
    committed: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def trials(count: int, seed: int) -> list[Trial]:
    """Named-phase kills for every mode, phase, rank and a spread of steps (two trials in
    four), a concurrency scenario (the third) and a kill at a seeded random moment (the
    fourth); deterministic for a seed."""
    rng = random.Random(seed)
    named = [
        (mode, f"{phase}@{rank}#{n}")
        for mode in MODES
        for phase in PHASES[mode]
        for rank in (0, 1)
        for n in (1, 3)
        if not (phase in ("before_commit", "committed", "retention") and rank == 1)
    ]
    rng.shuffle(named)
    out = []
    for i in range(count):
        if i % 4 == 2:  # a concurrency or fault scenario (no kill)
            mode = SCENARIOS[(i // 4) % len(SCENARIOS)]
            out.append(Trial(i, mode, "none@0", rng.randrange(1 << 30)))
            continue
        if i % 4 == 3:
            mode = rng.choice(MODES)
            kill = f"after:{rng.uniform(0.05, 1.2):.2f}@{rng.randrange(2)}"
        else:
            mode, kill = named[(i - 2 * (i // 4)) % len(named)]
        out.append(Trial(i, mode, kill, rng.randrange(1 << 30)))
    return out


# -- the job ---------------------------------------------------------------------------------
def state_for(step: int, rank: int, world: int) -> dict:
    import torch

    import ckptstore as cs

    rows = torch.arange(48 * 32, dtype=torch.float32).reshape(48, 32) * step
    cut = [0, 20, 48]  # uneven shards
    lo, hi = cut[rank], cut[rank + 1]
    return {
        "model": {"w": cs.Sharded(rows[lo:hi].clone(), (48, 32), (lo, 0)),
                  "b": torch.full((1000,), float(step))},
        "step": step,
        "where": cs.PerRank(f"rank {rank} step {step}"),
    }  # fmt: skip


def worker(rank: int, world: int, port: int, root: str, mode: str) -> None:
    import faulthandler

    import torch.distributed as dist

    faulthandler.dump_traceback_later(HANG_DUMP_S, exit=True)  # where a hang hangs, on stderr
    from datetime import timedelta

    import ckptstore as cs

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=30),
                            init_method=f"tcp://127.0.0.1:{port}")  # fmt: skip
    open(os.path.join(root, f".ready-{rank}"), "w").close()  # the job is up: kills may start
    if mode == "tiered":  # two simulated nodes (a local directory each), one S3 bucket
        import json

        opts, remote = json.loads(os.environ["CHAOS_S3_OPTIONS"]), os.environ["CHAOS_S3_ROOT"]
        handles = []
        for step in range(1, STEPS + 1):
            name = f"step_{step:08d}"
            path = cs.Tiered(local=os.path.join(root, f"node{rank}", name),
                             remote=f"{remote}/{name}", remote_options=opts)  # fmt: skip
            handles.append(cs.async_save(state_for(step, rank, world), path))
        for h in handles:
            info = h.wait()
            info.replication.wait(timeout=60)
    elif mode == "manager":
        mgr = cs.CheckpointManager(root, every_n_steps=1, keep=3, async_save=True)
        for step in range(1, STEPS + 1):
            mgr.save(step, state_for(step, rank, world))
        mgr.close()
    else:
        handle = None
        for step in range(1, STEPS + 1):
            path = os.path.join(root, f"step_{step:08d}")
            if mode == "sync":
                cs.save(state_for(step, rank, world), path)
            else:
                handle = cs.async_save(state_for(step, rank, world), path)
        if handle is not None:
            handle.wait()
    dist.destroy_process_group()


def check_tiered(root: str, remote: str, opts: dict) -> tuple[list[int], list[str]]:
    """Every step committed on S3 loads from S3 alone; every step committed on every node's
    local tier (what restore uses) is whole across the nodes' local files and S3; returns
    the steps committed in either sense."""
    import torch

    import ckptstore as cs
    from ckptstore.backends.s3 import S3Store
    from ckptstore.errors import CkptStoreError
    from ckptstore.verify import verify_checkpoint

    committed, problems = set(), []
    nodes = sorted(d for d in os.listdir(root) if d.startswith("node"))
    for step in range(1, STEPS + 1):
        name = f"step_{step:08d}"
        s3 = S3Store(f"{remote[len('s3://') :]}/{name}", **opts)
        if s3.exists("manifest.json"):
            committed.add(step)
            try:
                ck = cs.open(f"{remote}/{name}", storage_options=opts)
                want = torch.arange(48 * 32, dtype=torch.float32).reshape(48, 32) * step
                if not torch.equal(ck.read("model.w"), want):
                    problems.append(f"{name} on S3: model.w differs")
                if not verify_checkpoint(ck.store, ck.manifest, jobs=2).ok:
                    problems.append(f"{name} on S3: verify found bad chunks")
            except CkptStoreError as exc:
                problems.append(f"{name}: committed on S3 but does not load: {exc}")
        local = [os.path.join(root, n, name) for n in nodes]
        manifests = [p for p in local if os.path.exists(os.path.join(p, "manifest.json"))]
        if not manifests or len(manifests) < len(local):
            # Committed on some nodes only (a crash between the coordinator's tier-0 commit
            # and the others'): what restore skips (it needs every node's tier 0, or S3).
            continue
        committed.add(step)
        merged = tempfile.mkdtemp(prefix="chaos-merged-")  # the nodes' files side by side
        try:
            shutil.copy(os.path.join(manifests[0], "manifest.json"), merged)
            ck = cs.open(merged)
            os.makedirs(os.path.join(merged, "data"))
            for key in ck.manifest.files:
                sources = [os.path.join(p, key) for p in local]
                found = [x for x in sources if os.path.exists(x)]
                if found:
                    shutil.copy(found[0], os.path.join(merged, key))
                else:  # replicated already and dropped from tier 0? then S3 has it
                    s3 = S3Store(f"{remote[len('s3://') :]}/{name}", **opts)
                    with open(os.path.join(merged, key), "wb") as f:
                        f.write(s3.read(key))
            ck = cs.open(merged)
            want = torch.arange(48 * 32, dtype=torch.float32).reshape(48, 32) * step
            if not torch.equal(ck.read("model.w"), want):
                problems.append(f"{name} on the local tiers: model.w differs")
        except CkptStoreError as exc:
            problems.append(f"{name}: committed locally but its files are not whole: {exc}")
        finally:
            shutil.rmtree(merged, ignore_errors=True)
    return sorted(committed), problems


def check_root(root: str, mode: str) -> tuple[list[int], list[str]]:
    """Every committed step loads and equals its state; returns (committed steps, problems)."""
    import torch

    import ckptstore as cs
    from ckptstore.errors import CkptStoreError
    from ckptstore.verify import verify_checkpoint

    committed, problems = [], []
    steps = sorted(int(d[5:]) for d in os.listdir(root) if d.startswith("step_"))  # not .ready
    for step in steps:
        path = os.path.join(root, f"step_{step:08d}")
        if not os.path.exists(os.path.join(path, "manifest.json")):
            continue
        committed.append(step)
        try:
            ck = cs.open(path)
            want = torch.arange(48 * 32, dtype=torch.float32).reshape(48, 32) * step
            if not torch.equal(ck.read("model.w"), want):
                problems.append(f"step {step}: model.w differs")
            if not torch.equal(ck.read("model.b"), torch.full((1000,), float(step))):
                problems.append(f"step {step}: model.b differs")
            if not verify_checkpoint(ck.store, ck.manifest, jobs=2).ok:
                problems.append(f"step {step}: verify found bad chunks")
        except CkptStoreError as exc:
            problems.append(f"step {step}: committed but does not load: {exc}")
    return committed, problems


def run_trial(trial: Trial, s3: dict | None = None, python: str = sys.executable) -> Trial:
    import json

    from ckptstore.testing.ranks import free_port

    root = tempfile.mkdtemp(prefix=f"chaos-{trial.id}-")
    remote, job_s3, proxy = "", s3, None
    if trial.mode in ("tiered", "s3-faults"):
        from ckptstore.backends.s3 import S3Store

        assert s3 is not None
        bucket = f"chaos-{trial.id}-{trial.seed}"
        S3Store(bucket, create_bucket=True, **s3)
        remote = f"s3://{bucket}/run"
    if trial.mode == "s3-faults":  # the job's S3 requests go through a faulty proxy
        from urllib.parse import urlparse

        from ckptstore.testing.faultproxy import FaultPlan, FaultProxy

        rng = random.Random(trial.seed)
        lock = threading.Lock()

        def rule(method: str, path: str, n: int) -> str:
            with lock:
                return rng.choice(FAULTS) if rng.random() < 0.08 else "pass"

        up = urlparse(s3["endpoint_url"])
        proxy = FaultProxy((up.hostname, up.port), FaultPlan(rule=rule, slow_seconds=0.2))
        proxy.__enter__()
        job_s3 = {**s3, "endpoint_url": proxy.endpoint, "max_attempts": 4}
    port = free_port()
    victim = int(trial.kill.rsplit("@", 1)[1].split("#")[0])
    procs = []
    for rank in range(2):
        env = dict(os.environ, CKPTSTORE_COLLECTIVE_TIMEOUT_S=str(TIMEOUT_S), OMP_NUM_THREADS="1",
                   CHAOS_S3_OPTIONS=json.dumps(job_s3 or {}), CHAOS_S3_ROOT=remote,
                   CKPTSTORE_REPLICATION_RETRIES="0")  # fmt: skip
        env.pop("CKPTSTORE_FAILPOINT", None)
        if rank == victim and not trial.kill.startswith("after:"):
            env["CKPTSTORE_FAILPOINT"] = trial.kill
        procs.append(subprocess.Popen(
            [python, __file__, "--worker", str(rank), "--port", str(port), "--root", root,
             "--mode", "tiered" if trial.mode == "s3-faults" else trial.mode],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        ))  # fmt: skip
    if trial.kill.startswith("after:"):  # seconds after the job is up (not in its launch)
        ready = [os.path.join(root, f".ready-{r}") for r in range(2)]
        up_by = time.monotonic() + 60
        while not all(map(os.path.exists, ready)) and time.monotonic() < up_by:
            time.sleep(0.05)
        time.sleep(float(trial.kill[6:].split("@")[0]))
        if procs[victim].poll() is None:
            os.kill(procs[victim].pid, signal.SIGKILL)
    deadline = time.monotonic() + TRIAL_LIMIT_S
    for rank, p in enumerate(procs):
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            trial.problems.append(f"rank {rank} hung past {TRIAL_LIMIT_S} s")
    if proxy is not None:
        proxy.__exit__(None, None, None)
    survivor = procs[1 - victim]
    err = survivor.stderr.read().decode(errors="replace") if survivor.stderr else ""
    for p in procs:
        if p.stderr:
            p.stderr.close()
    if survivor.returncode not in (0, 1) or "Timeout (0:01:00)!" in err:  # signal or hang
        trial.problems.append(f"survivor exit {survivor.returncode}: {err[-1500:]}")
    check = (
        (lambda: check_tiered(root, remote, s3 or {}))
        if remote
        else (lambda: check_root(root, trial.mode))
    )
    trial.committed, problems = check()
    trial.problems += problems
    from ckptstore.gc import delete_garbage, find_garbage

    nodes = [os.path.join(root, n) for n in sorted(os.listdir(root)) if n.startswith("node")]
    for where in [*nodes, remote] if remote else [root]:
        if where.startswith("s3://") or os.path.isdir(where):
            opts = s3 if where.startswith("s3://") else {}
            delete_garbage(where, find_garbage(where, older_than=0, **opts), **opts)
    if remote:  # no unfinished multipart upload survives gc
        from ckptstore.backends.s3 import S3Store

        store = S3Store(remote[len("s3://") :], **(s3 or {}))
        pending = store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
        if pending:
            trial.problems.append(f"{len(pending)} multipart upload(s) left after gc")
    after, problems = check()
    if after != trial.committed:
        trial.problems.append(f"gc changed the committed steps {trial.committed} -> {after}")
    trial.problems += [f"after gc: {p}" for p in problems]
    if trial.mode not in ("manager", "tiered") and "#" in trial.kill:  # steps before the kill
        killed_step = int(trial.kill.split("#")[1])
        missing = [s for s in range(1, killed_step) if s not in trial.committed]
        if missing:
            trial.problems.append(f"steps {missing} before the kill are not committed")
    if trial.ok:
        shutil.rmtree(root, ignore_errors=True)
    else:
        trial.problems.append(f"(root kept: {root})")
    return trial


# -- concurrency scenarios ------------------------------------------------------------------
SCENARIOS = ("overwrite-race", "gc-during-saves", "s3-faults")
FAULTS = ("503", "500", "drop", "truncate", "lose", "slow")


def writer(path: str, value: float, saves: int, seed: int, overwrite_path: bool) -> None:
    """A single-process writer: ``saves`` saves of ``{"w": value, "tag": value}`` with jitter,
    all to ``path`` (overwrite) or to ``path/step_N``."""
    import torch

    import ckptstore as cs
    from ckptstore.errors import SaveError

    rng = random.Random(seed)
    for i in range(1, saves + 1):
        time.sleep(rng.uniform(0, 0.2))
        sd = {"w": torch.full((256, 256), value * 1000 + i), "tag": value * 1000 + i}
        if overwrite_path:
            cs.save(sd, path, overwrite=True)
        else:
            with contextlib.suppress(SaveError):  # a concurrent gc may remove its directory
                cs.save(sd, os.path.join(path, f"step_{i:08d}"))


def run_scenario(trial: Trial, python: str = sys.executable) -> Trial:
    """Two writers overwriting one path at once, or a writer while gc deletes everything
    older than 0 s: every committed checkpoint is one writer's whole state, and loads."""
    import torch

    import ckptstore as cs
    from ckptstore.errors import CkptStoreError
    from ckptstore.gc import delete_garbage, find_garbage

    root = tempfile.mkdtemp(prefix=f"chaos-{trial.id}-")
    path = os.path.join(root, "ckpt") if trial.mode == "overwrite-race" else root
    writers = 2 if trial.mode == "overwrite-race" else 1
    procs = [
        subprocess.Popen(
            [python, __file__, "--writer", str(w + 1), "--root", path, "--seed",
             str(trial.seed + w), "--mode", trial.mode],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        for w in range(writers)
    ]  # fmt: skip
    while any(p.poll() is None for p in procs):
        if trial.mode == "gc-during-saves":
            with contextlib.suppress(CkptStoreError, OSError):
                delete_garbage(root, find_garbage(root, older_than=0))
        time.sleep(0.02)
    for p in procs:
        err = p.stderr.read().decode(errors="replace") if p.stderr else ""
        if p.returncode != 0:
            trial.problems.append(f"a writer failed ({p.returncode}): {err[-400:]}")
        if p.stderr:
            p.stderr.close()
    targets = [path] if trial.mode == "overwrite-race" else [
        os.path.join(root, d) for d in sorted(os.listdir(root)) if d.startswith("step_")
    ]  # fmt: skip
    for target in targets:
        if not os.path.exists(os.path.join(target, "manifest.json")):
            continue
        trial.committed.append(len(trial.committed) + 1)
        try:
            out = {"w": torch.zeros(256, 256), "tag": 0.0}
            cs.load(out, target)
            if not torch.equal(out["w"], torch.full((256, 256), out["tag"])):
                trial.problems.append(f"{target}: a mix of two writers' states")
        except CkptStoreError as exc:
            trial.problems.append(f"{target}: committed but does not load: {exc}")
    if trial.mode == "overwrite-race" and not trial.committed:
        trial.problems.append("nothing committed")
    if trial.ok:
        shutil.rmtree(root, ignore_errors=True)
    else:
        trial.problems.append(f"(root kept: {root})")
    return trial


def run_campaign(
    count: int,
    seed: int,
    only: int | None = None,
    parallel: int = 2,
    out=print,
    s3: dict | None = None,
) -> list[Trial]:
    """``s3``: storage options of an S3 server for the tiered trials (None: start SeaweedFS
    for the campaign when it has any)."""
    todo = trials(count, seed)
    if only is not None:
        todo = [t for t in todo if t.id == only]
    server = None
    if s3 is None and any(t.mode in ("tiered", "s3-faults") for t in todo):
        from ckptstore.testing.seaweed import SeaweedServer

        server = SeaweedServer(tempfile.mkdtemp(prefix="chaos-seaweed-"))
        s3 = server.options()
    try:
        return _run_all(todo, seed, parallel, out, s3)
    finally:
        if server is not None:
            server.stop()


def _run_all(todo: list[Trial], seed: int, parallel: int, out, s3: dict | None) -> list[Trial]:
    out(f"{'id':>4} {'mode':8} {'kill':24} {'seed':>10}  {'committed':16} outcome")
    done = []

    def run(trial: Trial) -> Trial:
        try:
            if trial.mode in ("overwrite-race", "gc-during-saves"):
                return run_scenario(trial)
            return run_trial(trial, s3)
        except Exception as exc:  # a bug of the campaign itself is a failed trial, not the end
            trial.problems.append(f"campaign error: {type(exc).__name__}: {exc}")
            return trial

    with ThreadPoolExecutor(parallel) as pool:  # ranks mostly wait: two trials at a time
        for trial in pool.map(run, todo):
            done.append(trial)
            outcome = "ok" if trial.ok else "FAIL: " + "; ".join(trial.problems)[:300]
            out(f"{trial.id:>4} {trial.mode:8} {trial.kill:24} {trial.seed:>10}  "
                f"{trial.committed!s:16} {outcome}")  # fmt: skip
    failed = [t for t in done if not t.ok]
    out(
        f"{len(done)} trial(s), {len(done) - len(failed)} passed, {len(failed)} failed"
        + (f"; replay with --seed {seed} --only ID: {[t.id for t in failed]}" if failed else "")
    )
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", type=int, default=None, help="replay one trial by its id")
    parser.add_argument("--parallel", type=int, default=2, help="trials at a time (2)")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--writer", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--root", default="", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="sync", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.writer is not None:
        writer(args.root, float(args.writer), 5, args.seed, args.mode == "overwrite-race")
        return 0
    if args.worker is not None:
        worker(args.worker, 2, args.port, args.root, args.mode)
        return 0
    done = run_campaign(args.trials, args.seed, args.only, args.parallel)
    return 0 if all(t.ok for t in done) else 1


if __name__ == "__main__":
    sys.exit(main())
