"""The API reference (docs/api.md) is generated from the docstrings: every public name and
method has one, and the committed reference is what the generator writes today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ckptstore

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import api_doc  # noqa: E402


def test_every_public_name_has_a_docstring() -> None:
    assert api_doc.missing_docstrings(ckptstore) == []


def test_every_public_name_is_in_the_reference() -> None:
    text = (ROOT / "docs" / "api.md").read_text()
    for name in ckptstore.__all__:
        if name not in api_doc.MODULES:
            assert f"### `{name}" in text, name
    for name in ckptstore.dcp.__all__:
        assert f"### `dcp.{name}" in text, name
    for name in dir(ckptstore.errors):
        obj = getattr(ckptstore.errors, name)
        if (
            isinstance(obj, type)
            and issubclass(obj, Exception)
            and obj.__module__ == "ckptstore.errors"
        ):
            assert f"**`{name}`**" in text, name


def test_the_reference_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "api_doc.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
