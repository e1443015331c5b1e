"""The planning-at-scale simulation (`tools/scale_sim.py`, part of `make bench`) runs on the
current code: its real flatten declares exactly the simulated boxes, and its smallest job
plans, commits and parses a manifest that holds every declared chunk once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_scale_sim_smallest_job_runs_on_the_current_code() -> None:
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "scale_sim.py"), "--ranks", "8"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record["case"] == "scale_sim" and record["ranks"] == 8
    assert 0 < record["unique_chunks"] <= record["declared_chunks"]
    assert record["rank_flatten_ms"] > 0 and record["manifest_bytes"] > 0
