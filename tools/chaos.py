"""The crash campaign: kill ranks at named phases and at seeded random moments of sync, async,
CheckpointManager and tiered saves, race writers, readers and gc against each other, fill
the disk, fail and restart the S3 server; then check that every committed checkpoint loads
bit-exactly, that no rank waited past the collective timeout and that every error was typed.

Three trials in four are crashes (``chaos_job.py``): a 2-rank job with one rank killed by
SIGKILL at the n-th time it reaches a named phase or after a seeded delay. Every fourth is a
scenario: two processes overwriting one path at once, gc during saves, retention during a
load (``chaos_scenarios.py``), S3 faults through a proxy, an S3 server restart during
replication, a full disk (``chaos_job.py``).

``python tools/chaos.py --trials 200 --seed 1`` prints a table of trials (mode, kill, seed,
committed steps, outcome) and the seeds of the failures, to replay one with ``--only ID``.
``make chaos`` runs the full campaign; ``tests/test_chaos.py`` a seeded subset.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from chaos_job import PHASES, run_trial
from chaos_scenarios import KINDS, run_scenario
from chaos_trial import SCENARIOS, Trial

MODES = tuple(PHASES)
SERIAL = ("s3-restart",)  # restarts the shared S3 server: alone, after the others


def trials(count: int, seed: int, every_kind: bool = False) -> list[Trial]:
    """Named-phase kills for every mode, phase, rank and a spread of steps (two trials in
    four), a scenario (the third) and a kill at a seeded random moment (the fourth);
    deterministic for a seed. ``every_kind``: add one trial of each mode and scenario that
    ``count`` trials would not reach."""
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
    if every_kind:
        for mode in SCENARIOS:
            if mode not in {t.mode for t in out}:
                out.append(Trial(len(out), mode, "none@0", rng.randrange(1 << 30)))
    return out


def run_campaign(
    count: int,
    seed: int,
    only: int | None = None,
    parallel: int = 2,
    out=print,
    s3: dict | None = None,
    server=None,
    every_kind: bool = False,
) -> list[Trial]:
    """``server``: the SeaweedServer of the S3 trials (None: the campaign starts one when it
    needs it). Given only ``s3`` options, the restart trials are skipped: the campaign
    restarts only a server it holds."""
    todo = trials(count, seed, every_kind)
    if only is not None:
        todo = [t for t in todo if t.id == only]
    owned = None
    if server is not None:
        s3 = server.options()
    elif s3 is None and any(t.mode in ("tiered", "s3-faults", *SERIAL) for t in todo):
        from ckptstore.testing.seaweed import SeaweedServer

        server = owned = SeaweedServer(tempfile.mkdtemp(prefix="chaos-seaweed-"))
        s3 = server.options()
    try:
        return _run_all(todo, seed, parallel, out, s3, server)
    finally:
        if owned is not None:
            owned.stop()
            shutil.rmtree(owned.data_dir, ignore_errors=True)


def _run_all(todo: list[Trial], seed: int, parallel: int, out, s3, server) -> list[Trial]:
    out(f"{'id':>4} {'mode':21} {'kill':24} {'seed':>10}  {'committed':16} outcome")
    done = []

    def run(trial: Trial) -> Trial:
        try:
            if trial.mode in KINDS:
                return run_scenario(trial)
            if trial.mode in SERIAL and server is None:
                trial.skipped = "skipped: needs an S3 server this campaign may restart"
                return trial
            return run_trial(trial, s3, server)
        except Exception as exc:  # a bug of the campaign itself is a failed trial, not the end
            trial.problems.append(f"campaign error: {type(exc).__name__}: {exc}")
            return trial

    def report(trial: Trial) -> None:
        done.append(trial)
        outcome = trial.skipped or (
            f"ok {trial.note}".strip() if trial.ok else "FAIL: " + "; ".join(trial.problems)[:300]
        )
        out(f"{trial.id:>4} {trial.mode:21} {trial.kill:24} {trial.seed:>10}  "
            f"{trial.committed!s:16} {outcome}")  # fmt: skip

    with ThreadPoolExecutor(parallel) as pool:  # ranks mostly wait: two trials at a time
        for trial in pool.map(run, [t for t in todo if t.mode not in SERIAL]):
            report(trial)
    for trial in [t for t in todo if t.mode in SERIAL]:
        report(run(trial))
    failed = [t for t in done if not t.ok]
    skipped = [t for t in done if t.skipped]
    crashes = [t for t in done if t.mode in MODES]
    out(
        f"{len(done)} trial(s) ({len(crashes)} crash, {len(done) - len(crashes)} scenario): "
        f"{len(done) - len(failed) - len(skipped)} passed, {len(failed)} failed, "
        f"{len(skipped)} skipped"
        + (f"; replay with --seed {seed} --only ID: {[t.id for t in failed]}" if failed else "")
    )
    return done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--only", type=int, default=None, help="replay one trial by its id")
    parser.add_argument("--parallel", type=int, default=2, help="trials at a time (2)")
    args = parser.parse_args()
    done = run_campaign(args.trials, args.seed, args.only, args.parallel)
    return 0 if all(t.ok for t in done) else 1


if __name__ == "__main__":
    sys.exit(main())
