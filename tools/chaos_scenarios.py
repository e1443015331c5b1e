"""The concurrency scenarios of the campaign (``tools/chaos.py``): single-process writers and
readers racing each other on one root.

* overwrite-race: two processes save to one path with ``overwrite=True`` at once; the result
  must be one writer's whole state, never a mix, and it must load.
* gc-during-saves: a writer saves steps while ``gc --older-than 0s --apply`` runs in a loop;
  a save may fail (typed), nothing broken may be committed.
* retention-during-load: a ``CheckpointManager`` with ``keep=1`` saves steps while another
  process restores the latest in a loop; retention deletes what the reader is about to read.
  Every restore must give one step's whole state or a typed error, and most must succeed.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

from chaos_trial import Trial, finish, untyped_error

KINDS = ("overwrite-race", "gc-during-saves", "retention-during-load")
SIDE = 128  # the scenarios' state: a SIDE x SIDE tensor filled with the step's tag


def writer(path: str, value: float, saves: int, seed: int, mode: str) -> None:
    """``saves`` saves of ``{"w": full(tag), "tag": tag}`` with jitter: all to ``path``
    (overwrite-race), to ``path/step_N`` (gc-during-saves), or through a manager that keeps
    one (retention-during-load)."""
    import torch

    import ckptstore as cs
    from ckptstore.errors import SaveError

    rng = random.Random(seed)
    manager = None
    if mode == "retention-during-load":
        manager = cs.CheckpointManager(path, keep=1, async_save=False)
        _wait_for_file(os.path.join(path, ".reader-ready"), 60)
    for i in range(1, saves + 1):
        time.sleep(rng.uniform(0, 0.2) if manager is None else rng.uniform(0, 0.06))
        tag = value * 1000 + i
        sd = {"w": torch.full((SIDE, SIDE), tag), "tag": tag}
        if manager is not None:
            manager.save(i, sd)
        elif mode == "overwrite-race":
            cs.save(sd, path, overwrite=True)
        else:
            with contextlib.suppress(SaveError):  # a concurrent gc may remove its directory
                cs.save(sd, os.path.join(path, f"step_{i:08d}"))
    if manager is not None:  # the reader stops
        manager.close()  # its last retention done
        open(os.path.join(path, ".writer-done"), "w").close()


def _wait_for_file(path: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)


def reader(root: str) -> int:
    """Restore the latest of ``root`` until the writer is done; print how many restores
    succeeded (and how many of them passed over a step deleted under them) and how many
    failed typed. Exit 4 on a wrong state, 3 on an untyped error."""
    import torch

    import ckptstore as cs
    from ckptstore.errors import CkptStoreError

    ok = typed = recovered = 0
    open(os.path.join(root, ".reader-ready"), "w").close()
    while not os.path.exists(os.path.join(root, ".writer-done")):
        state = {"w": torch.zeros(SIDE, SIDE), "tag": -1.0}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "deleted while it was read"
                manager = cs.CheckpointManager(root)
                step = manager.restore(state)
        except CkptStoreError:
            typed += 1
            continue
        except Exception:
            traceback.print_exc()
            return 3
        if step is None:
            continue
        whole = torch.equal(state["w"], torch.full_like(state["w"], state["tag"]))
        if state["tag"] != 1000 + step or not whole:
            print(f"restore of step {step}: tag {state['tag']}, whole {whole}", file=sys.stderr)
            return 4
        ok += 1
        recovered += bool(manager.skipped_on_restore)
    print(ok, typed, recovered)
    return 0


def run_scenario(trial: Trial) -> Trial:
    """Run one scenario of :data:`KINDS`; every committed checkpoint must be one writer's
    whole state, and load."""
    import torch

    import ckptstore as cs
    from ckptstore.errors import CkptStoreError
    from ckptstore.ops.gc import delete_garbage, find_garbage

    root = tempfile.mkdtemp(prefix=f"chaos-{trial.id}-")
    path = os.path.join(root, "ckpt") if trial.mode == "overwrite-race" else root
    if trial.mode == "overwrite-race":
        os.makedirs(path)
    saves = 30 if trial.mode == "retention-during-load" else 5
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--writer", str(w + 1), "--root", path, "--seed",
             str(trial.seed + w), "--mode", trial.mode, "--saves", str(saves)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        for w in range(2 if trial.mode == "overwrite-race" else 1)
    ]  # fmt: skip
    if trial.mode == "retention-during-load":
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--reader", "--root", root],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        ))  # fmt: skip
    while any(p.poll() is None for p in procs):
        if trial.mode == "gc-during-saves":
            with contextlib.suppress(CkptStoreError, OSError):
                delete_garbage(root, find_garbage(root, older_than=0))
        time.sleep(0.02)
    for p in procs:
        out, err = (s.decode(errors="replace") for s in p.communicate())
        if p.returncode != 0:
            trial.problems.append(f"a process failed ({p.returncode}): {err[-400:]}")
        elif (untyped := untyped_error(err)) is not None:
            trial.problems.append(f"untyped error: {untyped}")
        if p.args[2] == "--reader" and p.returncode == 0:
            ok, typed, recovered = map(int, out.split())
            trial.note = (f"({ok} restores, {recovered} of them past a deleted step; "
                          f"{typed} failed typed)")  # fmt: skip
            if ok == 0:
                trial.problems.append(f"no restore succeeded ({typed} failed, typed)")
    targets = [path] if trial.mode == "overwrite-race" else [
        os.path.join(root, d) for d in sorted(os.listdir(root)) if d.startswith("step_")
    ]  # fmt: skip
    for target in targets:
        if not os.path.exists(os.path.join(target, "manifest.json")):
            continue
        trial.committed.append(len(trial.committed) + 1)
        try:
            ck = cs.open(target)
            w, tag = ck.read("w"), ck.read("tag")
            if not torch.equal(w, torch.full((SIDE, SIDE), float(tag))):
                trial.problems.append(f"{target}: a mix of two writers' states")
        except CkptStoreError as exc:
            trial.problems.append(f"{target}: committed but does not load: {exc}")
    if not trial.committed and trial.mode != "gc-during-saves":  # gc may take them all
        trial.problems.append("nothing committed")
    return finish(trial, root)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="a writer or reader of a scenario (internal)")
    parser.add_argument("--writer", type=int, default=None)
    parser.add_argument("--reader", action="store_true")
    parser.add_argument("--root", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", default="")
    parser.add_argument("--saves", type=int, default=5)
    args = parser.parse_args()
    if args.reader:
        sys.exit(reader(args.root))
    writer(args.root, float(args.writer), args.saves, args.seed, args.mode)
