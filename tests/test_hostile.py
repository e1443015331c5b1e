"""Safe to open, whoever wrote it: every reader and CLI command against hostile checkpoints.

Each case (``ckptstore.testing.hostile.CASES``) damages a valid 3-rank reference checkpoint;
all twelve operations then run on it in a fresh process. Every operation ends in success
with the reference's data or in a typed error -- never a crash, a hang, an untyped
exception, wrong or uninitialised bytes, a write outside its destination, or memory beyond
what the reference run needs plus 64 MiB.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from ckptstore.testing import hostile
from ckptstore.testing.ranks import run_ranks

# What must fail, by kind of damage: a damaged manifest stops everything that opens the
# checkpoint; damaged data stops everything that reads those bytes. ls and gc only list.
OPENS = {"read", "load", "inspect", "verify", "diff", "cp", "reshard", "export-safetensors",
         "export-torch", "export-zarr"}  # fmt: skip
READS = OPENS - {"inspect", "diff"}  # diff compares recorded checksums first
MUST_FAIL = {"manifest": OPENS, "data": READS, "pickle": {"read", "load"}, "harmless": set()}
PWNED = "/tmp/ckptstore-pwned"
SLACK_BYTES = 64 << 20


def _digest_tree(root: str) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _holds_secret(root: str) -> list[str]:
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            if os.path.isfile(path) and not os.path.islink(path):
                with open(path, "rb") as f:
                    if hostile.SECRET[:64] in f.read():
                        found.append(path)
    return found


def _run(case: str, base: str, refs: dict[str, str]) -> dict:
    _kind, mutate = hostile.CASES[case]
    good = refs["zstd" if case in hostile.COMPRESSED else "plain"]
    top = os.path.join(base, case)
    outside, root, work = (os.path.join(top, d) for d in ("outside", "root", "work"))
    os.makedirs(outside)
    os.makedirs(work)
    with open(os.path.join(outside, "secret.bin"), "wb") as f:
        f.write(hostile.SECRET)
    path = os.path.join(root, "step_00000001")
    shutil.copytree(good, path)
    mutate(path, outside)
    before = _digest_tree(outside)
    proc = subprocess.run(
        [sys.executable, "-m", "ckptstore.testing.hostile", path, good, work],
        capture_output=True, text=True, timeout=len(hostile.operations("", "", "")) * 20,
    )  # fmt: skip
    assert proc.returncode == 0, (
        f"{case}: the reader process died ({proc.returncode}):\n{proc.stderr[-3000:]}"
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["outside_changed"] = _digest_tree(outside) != before
    result["leaked"] = _holds_secret(work) + _holds_secret(root)
    return result


@pytest.fixture(scope="module")
def campaign(tmp_path_factory) -> dict[str, dict]:
    """Every case, run two at a time (each in its own process), plus the reference run."""
    base = str(tmp_path_factory.mktemp("hostile"))
    refs = {}
    for codec in ("plain", "zstd"):
        refs[codec] = os.path.join(base, f"reference-{codec}")
        run_ranks(3, hostile.save_reference, refs[codec], None if codec == "plain" else "zstd")
    hostile.CASES["reference"] = ("harmless", lambda ckpt, outside: None)
    try:
        with ThreadPoolExecutor(2) as pool:
            names = list(hostile.CASES)
            results = dict(zip(names, pool.map(lambda c: _run(c, base, refs), names), strict=True))
    finally:
        del hostile.CASES["reference"]
    return results


def test_the_reference_passes_every_operation(campaign) -> None:
    ops = campaign["reference"]["ops"]
    assert {op: r["outcome"] for op, r in ops.items()} == dict.fromkeys(ops, "ok"), ops


@pytest.mark.parametrize("case", sorted(hostile.CASES))
def test_hostile_checkpoint(campaign, case) -> None:
    kind, _ = hostile.CASES[case]
    result = campaign[case]
    outcomes = {op: r["outcome"] for op, r in result["ops"].items()}
    bad = {op: result["ops"][op] for op, o in outcomes.items() if o not in ("ok", "typed")}
    assert not bad, f"{case}: crash-free but not safe: {bad}"
    not_refused = {op for op in MUST_FAIL[kind] if outcomes[op] != "typed"}
    assert not not_refused, f"{case}: {sorted(not_refused)} did not refuse it: {outcomes}"
    assert not result["outside_changed"], f"{case}: a file outside the checkpoint changed"
    assert not result["leaked"], (
        f"{case}: bytes from outside the root were copied: {result['leaked']}"
    )
    assert not os.path.exists(PWNED), f"{case}: a pickle from the checkpoint was executed"
    limit = campaign["reference"]["max_rss_bytes"] + SLACK_BYTES
    assert result["max_rss_bytes"] <= limit, (
        f"{case}: peak memory {result['max_rss_bytes'] >> 20} MiB, the reference run "
        f"{campaign['reference']['max_rss_bytes'] >> 20} MiB"
    )
    slowest = max(r["seconds"] for r in result["ops"].values())
    assert slowest < hostile.OP_SECONDS, f"{case}: an operation took {slowest:.1f} s"
