"""The package installs as ``ckptstore`` with ``ckptstore.backends``; no top-level ``backends``."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = (
    "import importlib.util, ckptstore, ckptstore.backends.local as l;"
    "print(ckptstore.__file__); print(l.__file__);"
    "print(importlib.util.find_spec('backends'))"
)


def _venv(tmp_path, name: str) -> str:
    venv = tmp_path / name
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    return str(venv / "bin" / "python")


def _run_probe(python: str) -> list[str]:
    # Dependencies (torch, numpy, ...) come from the test venv; ckptstore must come from the new one.
    env = dict(os.environ, PYTHONPATH=sysconfig.get_paths()["purelib"])
    out = subprocess.run(
        [python, "-c", PROBE], capture_output=True, text=True, env=env, cwd="/", check=True
    )
    return out.stdout.split("\n")


@pytest.mark.timeout(600)
def test_non_editable_install_has_backends_subpackage(tmp_path) -> None:
    python = _venv(tmp_path, "plain")
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-deps", ROOT],
        check=True,
        cwd=str(tmp_path),
    )
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert os.path.isdir(os.path.join(site, "ckptstore", "backends"))
    assert not os.path.exists(os.path.join(site, "backends")), (
        "a bare top-level 'backends' was installed"
    )
    pkg, backend, spec = _run_probe(python)[:3]
    assert pkg.startswith(site) and backend.startswith(os.path.join(site, "ckptstore", "backends"))
    assert spec == "None"
    if shutil.which(os.environ.get("CC", "cc")):  # where a C compiler is, the install has the
        for helper in ("loading/_verified_copy", "state/_tensor_fields"):  # compiled helpers
            assert glob.glob(os.path.join(site, "ckptstore", f"{helper}*.so")), helper


@pytest.mark.timeout(600)
def test_editable_install_maps_backends(tmp_path) -> None:
    python = _venv(tmp_path, "editable")
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-deps", "-e", ROOT],
        check=True,
        cwd=str(tmp_path),
    )
    pkg, backend, spec = _run_probe(python)[:3]
    assert pkg == os.path.join(ROOT, "ckptstore", "__init__.py")
    assert backend == os.path.join(ROOT, "backends", "local.py")
    assert spec == "None"
