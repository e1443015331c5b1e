"""The ``ckpt`` CLI as a newcomer meets it: wrong paths get a one-line error that points
at the right command or path, output piped elsewhere keeps every name whole, and each
command says what it did (and, for gc, what it left alone and why)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

import ckptstore as cs
from ckptstore.cli import format as cli_format
from ckptstore.cli.main import EXIT_DAMAGED, EXIT_OK, EXIT_USAGE
from ckptstore.cli.main import main as ckpt

LONG = "model." + ".".join(f"block{i}" for i in range(30)) + ".attention.output.weight"


@pytest.fixture
def run(tmp_path) -> str:
    root = tmp_path / "run"
    for step in (100, 200):
        state = {
            "model": {"w": torch.full((4,), float(step)), LONG: torch.ones(2)},
            "optim": {"m": torch.zeros(3)},
        }
        cs.save({**state, "note": "a value with spaces"}, root / f"step_{step:08d}")
    return str(root)


def _err(capsys) -> str:
    return capsys.readouterr().err


def test_ls_of_a_missing_path_fails_and_of_one_checkpoint_shows_it(run, capsys) -> None:
    assert ckpt(["ls", run + "-typo"]) == EXIT_USAGE
    assert "no such file or directory" in _err(capsys)
    assert ckpt(["ls", f"{run}/step_00000100"]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"{run}/step_00000100" in out and "committed" in out


def test_inspect_of_a_run_root_or_a_missing_step_points_at_ckpt_ls(run, capsys) -> None:
    assert ckpt(["inspect", run]) == EXIT_USAGE
    err = _err(capsys)
    assert f"ckpt ls {run}" in err and f"{run}/step_00000200" in err and err.count("\n") == 1
    assert ckpt(["inspect", f"{run}/step_00000150"]) == EXIT_USAGE
    err = _err(capsys)
    assert "no checkpoint for step 150" in err
    assert f"{run}/step_00000100 and {run}/step_00000200" in err


def test_a_glob_matching_nothing_says_so(run, capsys) -> None:
    assert ckpt(["inspect", f"{run}/step_00000100", "--tensors", "model.ww*"]) == EXIT_USAGE
    assert "no entry matches --tensors 'model.ww*'" in _err(capsys)
    assert (
        ckpt(["diff", f"{run}/step_00000100", f"{run}/step_00000200", "--tensors", "x*"])
        == EXIT_USAGE
    )


def test_diff_names_the_missing_path(run, capsys) -> None:
    assert ckpt(["diff", f"{run}/step_00000100", "/nope/step_1"]) == EXIT_USAGE
    assert "/nope/step_1" in _err(capsys)


def test_piped_output_keeps_every_name_whole_and_values_quoted(run, capsys) -> None:
    assert ckpt(["inspect", f"{run}/step_00000100"]) == EXIT_OK
    out = capsys.readouterr().out
    assert LONG in out
    assert "'a value with spaces'" in out


def test_a_terminal_table_elides_the_middle_of_a_name(monkeypatch) -> None:
    monkeypatch.setattr(cli_format, "terminal_columns", lambda: 60)
    text = cli_format.table([[LONG, "float32", "2"]], ["tensor", "dtype", "shape"])
    line = text.splitlines()[2]
    assert len(line) <= 60 and "…" in line
    assert line.split()[0].endswith("attention.output.weight")  # the distinguishing tail
    assert cli_format.elided("abcdef", 6) == "abcdef"


def test_piping_into_head_ends_quietly_and_version_exists(tmp_path) -> None:
    many = {f"layers.{i}.some_rather_long_parameter_name": torch.zeros(1) for i in range(3000)}
    cs.save(many, tmp_path / "many")  # more output than a pipe holds once head has gone
    command = [sys.executable, "-m", "ckptstore.cli.main"]
    proc = subprocess.run(
        f"{' '.join(command)} inspect {tmp_path / 'many'} | head -1",
        shell=True,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    version = subprocess.run([*command, "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and cs.__version__ in version.stdout


def test_diff_compares_per_rank_entries(tmp_path, capsys) -> None:
    cs.save({"w": torch.ones(2), "seed": cs.PerRank(1)}, tmp_path / "a")
    cs.save({"w": torch.ones(2), "seed": cs.PerRank(2)}, tmp_path / "b")
    cs.save({"w": torch.ones(2)}, tmp_path / "c")
    assert ckpt(["diff", str(tmp_path / "a"), str(tmp_path / "b"), "--json"]) == EXIT_DAMAGED
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)["entries"]}
    assert entries["seed"]["status"] == "differs"
    assert ckpt(["diff", str(tmp_path / "a"), str(tmp_path / "c"), "--json"]) == EXIT_DAMAGED
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)["entries"]}
    assert entries["seed"]["status"] == "only_a"


def test_export_a_sub_tree_under_the_names_a_model_expects(run, tmp_path, capsys) -> None:
    out = tmp_path / "hf"
    argv = [
        "export",
        f"{run}/step_00000100",
        str(out),
        "--format",
        "safetensors",
        "--subtree",
        "model",
    ]
    assert ckpt([*argv, "--rename", "w=transformer.w"]) == EXIT_OK
    text = capsys.readouterr().out
    assert "exported 2 tensors" in text and "model.safetensors" in text and "optim.m" in text
    tensors = load_file(out / "model.safetensors")
    assert set(tensors) == {"transformer.w", LONG}  # saved as "model." + LONG
    assert torch.equal(tensors["transformer.w"], torch.full((4,), 100.0))
    clash = [
        *["export", f"{run}/step_00000100", str(tmp_path / "x"), "--format", "safetensors"],
        *["--strip-prefix", "model.", "--strip-prefix", "optim.", "--rename", "w=m"],
    ]
    assert ckpt(clash) == EXIT_USAGE  # "model.w" -> "w" -> "m" and "optim.m" -> "m"
    assert "would both be exported as 'm'" in _err(capsys)


def test_gc_says_what_it_left_alone_and_why(run, capsys) -> None:
    partial = os.path.join(run, "step_00000300", "data")
    os.makedirs(partial)
    with open(os.path.join(partial, "00000-x-0.bin"), "wb") as f:
        f.write(b"\0" * 64)
    assert ckpt(["gc", run]) == EXIT_OK
    out = capsys.readouterr().out
    assert "step_00000300 (incomplete): younger" in out and "--older-than 1.0 h" in out


def test_a_second_reshard_to_the_same_path_names_overwrite(run, tmp_path, capsys) -> None:
    argv = ["reshard", f"{run}/step_00000100", str(tmp_path / "r"), "--world-size", "2"]
    assert ckpt(argv) == EXIT_OK
    capsys.readouterr()
    assert ckpt(argv) == EXIT_USAGE
    assert "--overwrite" in _err(capsys)


def test_import_of_a_dcp_checkpoint_prints_no_torch_warning(tmp_path, capfd) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # torch's own, from writing the DCP input here
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(3)}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    capfd.readouterr()
    assert ckpt(["import", str(tmp_path / "dcp"), str(tmp_path / "ck"), "--trust"]) == EXIT_OK
    captured = capfd.readouterr()
    assert "imported 1 tensors" in captured.out
    assert "distributed" not in captured.err, captured.err
