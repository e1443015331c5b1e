"""The crash trials of the campaign (``tools/chaos.py``), and the fault scenarios that need a
whole job: S3 faults through a proxy, an S3 server restart during replication, a full disk.

Each runs a 2-rank job (real processes, gloo; for tiered saves two simulated nodes with a
local directory each and a SeaweedFS bucket behind them) that saves steps 1..STEPS with a
state that is a function of the step (sharded rows, a replicated tensor, values, per-rank
values). In a crash trial one rank is killed with SIGKILL at the n-th time it reaches a
named phase (``CKPTSTORE_FAILPOINT``, ``ckptstore/failpoints.py``) or after a seeded delay;
the other must end within the collective timeout, with a typed error if any. Then, in a
fresh process, every step with a committed manifest must load and equal its step's state
(bit-exact) and pass ``verify``; every step before the kill must be committed; and ``ckpt gc
--older-than 0s --apply`` must leave every committed step loadable and no multipart upload.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from chaos_trial import STEPS, Trial, finish, leftover_temporaries, untyped_error

PHASES = {
    "sync": ("planned", "written", "before_commit", "committed"),
    "async": ("planned", "staged", "written", "before_commit", "committed"),
    "manager": ("planned", "staged", "written", "before_commit", "committed", "retention"),
    "tiered": ("planned", "staged", "written", "before_commit", "committed", "replicated"),
}
TIMEOUT_S = 4  # the job's collective timeout: a survivor must give up within it
TRIAL_LIMIT_S = 120
HANG_DUMP_S = 60
FAULTS = ("503", "500", "drop", "truncate", "lose", "slow")
# A tmpfs that holds one to four of the job's steps (about 16 KiB each in 4 KiB pages): the
# seed decides where the disk fills (a data file, the manifest, the in-flight marker).
FULL_DISK_PAGES = (6, 18)
RESTART_PAUSE_S = 1.0  # between a restart trial's saves, so that the outage meets some


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
    ready = os.environ.get("CHAOS_READY_DIR", root)
    open(os.path.join(ready, f".ready-{rank}"), "w").close()  # the job is up: kills may start
    if mode == "tiered":
        tiered_job(rank, world, root)
    elif mode == "manager":
        mgr = cs.CheckpointManager(root, every_n_steps=1, keep=3, async_save=True)
        for step in range(1, STEPS + 1):
            mgr.save(step, state_for(step, rank, world))
        mgr.close()
    elif mode == "full-disk":  # every save is tried; a failed one must fail typed, on all
        from ckptstore.errors import CkptStoreError

        failed = []
        for step in range(1, STEPS + 1):
            try:
                cs.save(state_for(step, rank, world), os.path.join(root, f"step_{step:08d}"))
            except CkptStoreError as exc:
                failed.append(f"{step} {type(exc).__name__}")
        with open(f"{os.environ['CHAOS_REPORT']}.{rank}", "w") as f:
            f.write("\n".join(failed))
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


def tiered_job(rank: int, world: int, root: str) -> None:
    """Two simulated nodes (a local directory each) and one S3 bucket. With
    ``CHAOS_CATCH_UP``, replications that failed (the server was down) are replicated again
    once it is back, as an operator's ``ckpt replicate`` would."""
    import ckptstore as cs
    from ckptstore.errors import CkptStoreError

    opts, remote = json.loads(os.environ["CHAOS_S3_OPTIONS"]), os.environ["CHAOS_S3_ROOT"]
    pause = float(os.environ.get("CHAOS_STEP_PAUSE_S", "0"))
    catch_up = bool(os.environ.get("CHAOS_CATCH_UP"))
    handles = []
    for step in range(1, STEPS + 1):
        name = f"step_{step:08d}"
        path = cs.Tiered(local=os.path.join(root, f"node{rank}", name),
                         remote=f"{remote}/{name}", remote_options=opts)  # fmt: skip
        handles.append((path, cs.async_save(state_for(step, rank, world), path)))
        time.sleep(pause)
    late = []
    for path, handle in handles:
        info = handle.wait()  # the local tier commits whatever S3 does
        try:
            info.replication.wait(timeout=60)
        except CkptStoreError:
            if not catch_up:
                raise
            late.append(path)
    if os.environ.get("CHAOS_REPORT"):
        with open(f"{os.environ['CHAOS_REPORT']}.{rank}", "w") as f:
            f.write(f"{len(late)}\n")
    for path in late:
        deadline = time.monotonic() + 60
        while True:
            try:
                cs.replicate(path)  # every rank sees the same outcome: they retry together
                break
            except CkptStoreError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)


# -- the checks ------------------------------------------------------------------------------
def expected_rows(step: int):
    import torch

    return torch.arange(48 * 32, dtype=torch.float32).reshape(48, 32) * step


def check_tiered(root: str, remote: str, opts: dict) -> tuple[list[int], list[str]]:
    """Every step committed on S3 loads from S3 alone; every step committed on every node's
    local tier (what restore uses) is whole across the nodes' local files and S3; returns
    the steps committed in either sense."""
    import torch

    import ckptstore as cs
    from ckptstore.backends.s3 import S3Store
    from ckptstore.errors import CkptStoreError
    from ckptstore.format.verify import verify_checkpoint

    committed, problems = set(), []
    nodes = sorted(d for d in os.listdir(root) if d.startswith("node"))
    for step in range(1, STEPS + 1):
        name = f"step_{step:08d}"
        s3 = S3Store(f"{remote[len('s3://') :]}/{name}", **opts)
        if s3.exists("manifest.json"):
            committed.add(step)
            try:
                ck = cs.open(f"{remote}/{name}", storage_options=opts)
                if not torch.equal(ck.read("model.w"), expected_rows(step)):
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
            for key in ck.manifest.files:
                os.makedirs(os.path.dirname(os.path.join(merged, key)), exist_ok=True)
                sources = [os.path.join(p, key) for p in local]
                found = [x for x in sources if os.path.exists(x)]
                if found:
                    shutil.copy(found[0], os.path.join(merged, key))
                else:  # replicated already and dropped from tier 0? then S3 has it
                    with open(os.path.join(merged, key), "wb") as f:
                        f.write(s3.read(key))
            ck = cs.open(merged)
            if not torch.equal(ck.read("model.w"), expected_rows(step)):
                problems.append(f"{name} on the local tiers: model.w differs")
        except CkptStoreError as exc:
            problems.append(f"{name}: committed locally but its files are not whole: {exc}")
        finally:
            shutil.rmtree(merged, ignore_errors=True)
    return sorted(committed), problems


def check_root(root: str) -> tuple[list[int], list[str]]:
    """Every committed step loads and equals its state; returns (committed steps, problems)."""
    import torch

    import ckptstore as cs
    from ckptstore.errors import CkptStoreError
    from ckptstore.format.verify import verify_checkpoint

    committed, problems = [], []
    steps = sorted(int(d[5:]) for d in os.listdir(root) if d.startswith("step_"))  # not .ready
    for step in steps:
        path = os.path.join(root, f"step_{step:08d}")
        if not os.path.exists(os.path.join(path, "manifest.json")):
            continue
        committed.append(step)
        try:
            ck = cs.open(path)
            if not torch.equal(ck.read("model.w"), expected_rows(step)):
                problems.append(f"step {step}: model.w differs")
            if not torch.equal(ck.read("model.b"), torch.full((1000,), float(step))):
                problems.append(f"step {step}: model.b differs")
            if not verify_checkpoint(ck.store, ck.manifest, jobs=2).ok:
                problems.append(f"step {step}: verify found bad chunks")
        except CkptStoreError as exc:
            problems.append(f"step {step}: committed but does not load: {exc}")
    return committed, problems


def fully_replicated(root: str, remote: str, opts: dict) -> list[str]:
    """Problems if any step is not committed on every node's local tier and on S3."""
    from ckptstore.backends.s3 import S3Store

    problems = []
    nodes = sorted(d for d in os.listdir(root) if d.startswith("node"))
    for step in range(1, STEPS + 1):
        name = f"step_{step:08d}"
        if not all(os.path.exists(os.path.join(root, n, name, "manifest.json")) for n in nodes):
            problems.append(f"{name} is not committed on every node's local tier")
        if not S3Store(f"{remote[len('s3://') :]}/{name}", **opts).exists("manifest.json"):
            problems.append(f"{name} never reached S3 after the server came back")
    return problems


# -- a trial ---------------------------------------------------------------------------------
class FullDisk:
    """A small tmpfs mounted on ``path`` (needs root); ``reason`` says why not otherwise."""

    def __init__(self, path: str, size: int) -> None:
        self.path, self.size, self.mounted, self.reason = path, size, False, ""
        if os.geteuid() != 0:
            self.reason = "skipped: mounting a small tmpfs to fill needs root"
            return
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
            capture_output=True,
        )
        if done.returncode != 0:
            self.reason = f"skipped: cannot mount a tmpfs here: {done.stderr.decode().strip()}"
        self.mounted = done.returncode == 0

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", self.path], check=False)


def run_trial(trial: Trial, s3: dict | None = None, server=None) -> Trial:
    """One crash trial, or one of the scenarios s3-faults, s3-restart (``server`` is the
    SeaweedServer to restart) and full-disk."""
    from ckptstore.testing.ranks import free_port

    root = tempfile.mkdtemp(prefix=f"chaos-{trial.id}-")
    side = tempfile.mkdtemp(prefix=f"chaos-{trial.id}-side-")  # ready files, reports
    disk = None
    if trial.mode == "full-disk":
        disk = FullDisk(root, 4096 * random.Random(trial.seed).randint(*FULL_DISK_PAGES))
        if not disk.mounted:
            trial.skipped = disk.reason
            shutil.rmtree(side, ignore_errors=True)
            return finish(trial, root)
    try:
        return _run_job(trial, root, side, s3, server, free_port(), disk)
    finally:
        if disk is not None:
            disk.unmount()
        shutil.rmtree(side, ignore_errors=True)
        if trial.ok:
            shutil.rmtree(root, ignore_errors=True)


def _run_job(
    trial: Trial, root: str, side: str, s3: dict | None, server, port: int, disk: FullDisk | None
) -> Trial:
    remote, job_s3, proxy = "", s3, None
    if trial.mode in ("tiered", "s3-faults", "s3-restart"):
        from ckptstore.backends.s3 import S3Store

        assert s3 is not None
        bucket = f"chaos-{trial.id}-{trial.seed}"
        S3Store(bucket, create_bucket=True, **s3)
        remote = f"s3://{bucket}/run"
    if trial.mode == "s3-faults":  # the job's S3 requests go through a faulty proxy
        proxy = _faulty_proxy(trial.seed, s3)
        job_s3 = {**s3, "endpoint_url": proxy.endpoint, "max_attempts": 4}
    if trial.mode == "s3-restart":  # few retries: the outage fails replications, not delays
        job_s3 = {**s3, "max_attempts": 2}
    victim = int(trial.kill.rsplit("@", 1)[1].split("#")[0])
    killing = not trial.kill.startswith("none")
    job_mode = {"s3-faults": "tiered", "s3-restart": "tiered"}.get(trial.mode, trial.mode)
    procs = []
    for rank in range(2):
        env = dict(os.environ, CKPTSTORE_COLLECTIVE_TIMEOUT_S=str(TIMEOUT_S), OMP_NUM_THREADS="1",
                   CHAOS_S3_OPTIONS=json.dumps(job_s3 or {}), CHAOS_S3_ROOT=remote,
                   CHAOS_READY_DIR=side, CHAOS_REPORT=os.path.join(side, "failed"),
                   CKPTSTORE_REPLICATION_RETRIES="0")  # fmt: skip
        env.pop("CKPTSTORE_FAILPOINT", None)
        if trial.mode == "s3-restart":
            env.update(CHAOS_STEP_PAUSE_S=str(RESTART_PAUSE_S), CHAOS_CATCH_UP="1")
        if killing and rank == victim and not trial.kill.startswith("after:"):
            env["CKPTSTORE_FAILPOINT"] = trial.kill
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", str(rank), "--port", str(port),
             "--root", root, "--mode", job_mode],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        ))  # fmt: skip
    if trial.kill.startswith("after:") or trial.mode == "s3-restart":
        _wait_until_up(side)
        delay = random.Random(trial.seed).uniform(0.2, 2.5)
        time.sleep(float(trial.kill[6:].split("@")[0]) if killing else delay)
        if killing and procs[victim].poll() is None:
            os.kill(procs[victim].pid, signal.SIGKILL)
        elif trial.mode == "s3-restart":
            server.restart()  # SIGTERM, then a fresh start on the same data
    errors = _wait_for(procs, trial)
    if proxy is not None:
        proxy.__exit__(None, None, None)
    for rank, (code, err) in enumerate(errors):
        if killing and rank == victim:
            continue
        if code not in (0, 1) or "Timeout (0:01:00)!" in err:  # a signal, or a hang
            trial.problems.append(f"rank {rank} exit {code}: {err[-1500:]}")
        elif (untyped := untyped_error(err)) is not None:
            trial.problems.append(f"rank {rank} ended with an untyped error: {untyped}")
        elif code != 0 and trial.mode in ("s3-restart", "full-disk"):
            trial.problems.append(f"rank {rank} exit {code}: {err[-600:]}")
    check = (lambda: check_tiered(root, remote, s3 or {})) if remote else (lambda: check_root(root))
    trial.committed, problems = check()
    trial.problems += problems
    _scenario_checks(trial, root, side, remote, s3 or {}, disk)
    _gc_everything(root, remote, s3 or {}, trial)
    after, problems = check()
    if after != trial.committed:
        trial.problems.append(f"gc changed the committed steps {trial.committed} -> {after}")
    trial.problems += [f"after gc: {p}" for p in problems]
    if trial.mode in ("sync", "async") and "#" in trial.kill:  # steps before the kill
        killed_step = int(trial.kill.split("#")[1])
        missing = [s for s in range(1, killed_step) if s not in trial.committed]
        if missing:
            trial.problems.append(f"steps {missing} before the kill are not committed")
    if not trial.ok:
        for rank, (_, err) in enumerate(errors):  # next to the root: it may be a tmpfs
            with open(f"{root}.rank{rank}.stderr", "w") as f:
                f.write(err)
        trial.problems.append(f"(root kept: {root}; each rank's stderr in {root}.rankN.stderr)")
    return trial


def _scenario_checks(
    trial: Trial, root: str, side: str, remote: str, s3: dict, disk: FullDisk | None
) -> None:
    if trial.mode == "s3-restart":  # committed locally throughout, and caught up after
        trial.problems += fully_replicated(root, remote, s3)
        late = _lines(os.path.join(side, "failed.0"))
        trial.note = f"({late[0] if late else '?'} replications failed, caught up after)"
        if late == ["0"]:
            trial.problems.append("the restart missed every replication (nothing to prove)")
    if trial.mode == "full-disk":
        reports = [os.path.join(side, f"failed.{r}") for r in range(2)]
        failed = [_lines(p) for p in reports]
        if None in failed:
            trial.problems.append("a rank did not finish its saves")
        elif failed[0] != failed[1]:
            trial.problems.append(f"the ranks disagree on which saves failed: {failed}")
        elif not failed[0]:
            trial.problems.append(f"the disk never filled ({disk and disk.size} bytes)")
        if not trial.committed:
            trial.problems.append("nothing was committed before the disk filled")
        leftovers = leftover_temporaries(root)
        if leftovers:
            trial.problems.append(f"failed writes left temporaries: {leftovers[:3]}")


def _lines(path: str) -> list[str] | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().splitlines()


def _wait_until_up(side: str) -> None:
    ready = [os.path.join(side, f".ready-{r}") for r in range(2)]
    up_by = time.monotonic() + 60
    while not all(map(os.path.exists, ready)) and time.monotonic() < up_by:
        time.sleep(0.05)


def _wait_for(procs: list, trial: Trial) -> list[tuple[int, str]]:
    """Each rank's (exit code, stderr); a rank still running at the trial's limit hung."""
    deadline = time.monotonic() + TRIAL_LIMIT_S
    out = []
    for rank, p in enumerate(procs):
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            trial.problems.append(f"rank {rank} hung past {TRIAL_LIMIT_S} s")
        err = p.stderr.read().decode(errors="replace") if p.stderr else ""
        if p.stderr:
            p.stderr.close()
        out.append((p.returncode, err))
    return out


def _faulty_proxy(seed: int, s3: dict):
    """A proxy in front of the S3 server that fails 8 % of requests at random."""
    from urllib.parse import urlparse

    from ckptstore.testing.faultproxy import FaultPlan, FaultProxy

    rng = random.Random(seed)
    lock = threading.Lock()

    def rule(method: str, path: str, n: int) -> str:
        with lock:
            return rng.choice(FAULTS) if rng.random() < 0.08 else "pass"

    up = urlparse(s3["endpoint_url"])
    proxy = FaultProxy((up.hostname, up.port), FaultPlan(rule=rule, slow_seconds=0.2))
    proxy.__enter__()
    return proxy


def _gc_everything(root: str, remote: str, s3: dict, trial: Trial) -> None:
    """``ckpt gc --older-than 0s --apply`` on every tier; no multipart upload may survive."""
    from ckptstore.ops.gc import delete_garbage, find_garbage

    nodes = [os.path.join(root, n) for n in sorted(os.listdir(root)) if n.startswith("node")]
    for where in [*nodes, remote] if remote else [root]:
        if where.startswith("s3://") or os.path.isdir(where):
            opts = s3 if where.startswith("s3://") else {}
            delete_garbage(where, find_garbage(where, older_than=0, **opts), **opts)
    if remote:
        from ckptstore.backends.s3 import S3Store

        store = S3Store(remote[len("s3://") :], **s3)
        pending = store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
        if pending:
            trial.problems.append(f"{len(pending)} multipart upload(s) left after gc")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="one rank of a campaign job (internal)")
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--root", required=True)
    parser.add_argument("--mode", required=True)
    args = parser.parse_args()
    worker(args.worker, 2, args.port, args.root, args.mode)
