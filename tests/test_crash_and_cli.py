"""A save killed before commit, and the ckpt CLI (inspect / verify) on real checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import ckptstore as cs
from ckptstore.cli.main import main as ckpt_main
from ckptstore.errors import IncompleteCheckpointError

SAVER = textwrap.dedent(
    """
    import sys, torch, ckptstore as cs
    sd = {f"w{i}": torch.full((32, 1024, 1024), float(i)) for i in range(4)}  # 512 MiB
    print("ready", flush=True)
    cs.save(sd, sys.argv[1])
    print("committed", flush=True)
    """
)


def test_save_killed_before_commit_is_refused_and_previous_still_loads(tmp_path) -> None:
    previous = tmp_path / "step1"
    cs.save({"w0": torch.ones(4)}, previous)
    target = tmp_path / "step2"
    proc = subprocess.Popen(
        [sys.executable, "-c", SAVER, str(target)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 120
        # kill as soon as data has started to land, long before the manifest can exist
        while time.monotonic() < deadline:
            data = target / "data"
            if data.exists() and any(data.iterdir()):
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (target / "manifest.json").exists()
    with pytest.raises(IncompleteCheckpointError):
        cs.open(target)
    with pytest.raises(IncompleteCheckpointError):
        cs.load({"w0": torch.zeros(4)}, target)
    assert ckpt_main(["inspect", str(target)]) == 2
    out = {"w0": torch.zeros(4)}
    cs.load(out, previous)
    assert torch.equal(out["w0"], torch.ones(4))


@pytest.fixture
def sample(tmp_path):
    sd = {
        "model": {"w": torch.randn(64, 32), "b": torch.zeros(32, dtype=torch.bfloat16)},
        "step": 12,
        "rng": cs.PerRank(torch.get_rng_state()),
    }
    cs.save(sd, tmp_path / "c", metadata={"run": "t"})
    return tmp_path / "c"


def test_inspect_human_and_json(sample, capsys) -> None:
    assert ckpt_main(["inspect", str(sample)]) == 0
    text = capsys.readouterr().out
    assert "model.w" in text and "float32" in text and "64x32" in text and "1 ranks" in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert ckpt_main(["inspect", str(sample), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["world_size"] == 1 and doc["state"] == "committed"
    w = next(t for t in doc["tensors"] if t["name"] == "model.w")
    assert (
        w["shape"] == [64, 32]
        and w["dtype"] == "float32"
        and w["chunks"] == 1
        and w["bytes"] == 64 * 32 * 4
    )
    assert doc["objects"] == [{"name": "step", "pickled": False, "value": 12}]
    assert doc["totals"]["tensors"] == 2 and doc["metadata"] == {"run": "t"}


def test_inspect_incomplete_says_so(sample, capsys) -> None:
    os.remove(sample / "manifest.json")
    assert ckpt_main(["inspect", str(sample), "--json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["state"] == "incomplete"


def test_verify_ok_then_flipped_byte(sample, capsys) -> None:
    assert ckpt_main(["verify", str(sample)]) == 0
    assert "ok:" in capsys.readouterr().out
    data = sample / "data"
    path = data / sorted(os.listdir(data))[0]
    raw = bytearray(path.read_bytes())
    raw[100] ^= 1  # inside model.b or model.w, whichever was packed first
    path.write_bytes(bytes(raw))
    assert ckpt_main(["verify", str(sample)]) == 1
    assert "DAMAGED" in capsys.readouterr().out
    assert ckpt_main(["verify", str(sample), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert not doc["ok"] and len(doc["bad"]) == 1
    assert doc["bad"][0]["entry"] in ("model.w", "model.b")


def test_ckpt_console_script(sample) -> None:
    exe = os.path.join(os.path.dirname(sys.executable), "ckpt")
    out = subprocess.run(
        [exe, "verify", str(sample), "--json"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["ok"] is True
