"""Property-based fuzzing of the manifest parser, its validation, and the read path behind it.

Whatever a manifest holds, opening it ends in a ``ManifestError`` or a checkpoint whose
every read ends in data or a typed error. A short run is part of ``make test``; ``make
fuzz`` runs long (``CKPTSTORE_FUZZ_EXAMPLES``). Reproduce a failure with the seed Hypothesis
prints (``--hypothesis-seed=N``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import time
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptstore as cs
from ckptstore.errors import CkptStoreError, ManifestError
from ckptstore.format.manifest import MANIFEST_KEY, Manifest, encode_manifest
from ckptstore.format.verify import verify_checkpoint
from ckptstore.testing import hostile
from ckptstore.testing.ranks import run_ranks

EXAMPLES = int(os.environ.get("CKPTSTORE_FUZZ_EXAMPLES", "150"))
SECONDS = float(os.environ.get("CKPTSTORE_FUZZ_SECONDS", "0"))
"""With a time budget, each property runs rounds of EXAMPLES fresh examples until it is spent."""
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[str, dict[str, Any], bytes]:
    base = tmp_path_factory.mktemp("fuzz")
    path = str(base / "ref")
    run_ranks(3, hostile.save_reference, path, "zstd")
    with open(os.path.join(path, MANIFEST_KEY), "rb") as f:
        raw = f.read()
    work = str(base / "work")
    shutil.copytree(path, work)
    return work, hostile.read_doc(path), raw


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON document a value sits at."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _put(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    doc[path[0]] = _put(doc[path[0]], path[1:], value)
    return doc


_INTS = st.one_of(
    st.integers(-3, 70),
    st.sampled_from([-(1 << 63), -1, 1 << 31, 1 << 32, (1 << 62) + 1, (1 << 63) - 1, 1 << 64]),
)
_SCALARS = st.one_of(
    _INTS, st.floats(allow_nan=True), st.booleans(), st.none(),
    st.text(max_size=12), st.sampled_from(["zstd", "lz4", "float32", "data/x.bin", "../x"]),
)  # fmt: skip
_VALUES = st.recursive(
    _SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip


@st.composite
def _packed(draw: st.DrawFn, original: str) -> str:
    """A packed column with some elements changed to extreme values, or any bytes at all."""
    raw = bytearray(base64.b64decode(original))
    if draw(st.booleans()) or not raw:
        return base64.b64encode(draw(st.binary(max_size=64))).decode()
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(raw) - 1))
        raw[at] = draw(st.integers(0, 255))
    return base64.b64encode(bytes(raw)).decode()


def _is_packed(value: Any) -> bool:
    if not isinstance(value, str) or len(value) < 8 or len(value) % 4:
        return False
    try:
        base64.b64decode(value, validate=True)
    except ValueError:
        return False
    return True


@st.composite
def mutated_docs(draw: st.DrawFn, doc: dict[str, Any]) -> dict[str, Any]:
    doc = json.loads(json.dumps(doc))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths[1:]))
        current: Any = doc
        for k in path:
            current = current[k]
        if _is_packed(current):
            value = draw(_packed(current))
        elif isinstance(current, int) and not isinstance(current, bool) and draw(st.booleans()):
            value = current + draw(st.sampled_from([-1, 1, 7, -(1 << 40), 1 << 40]))
        elif draw(st.integers(0, 9)) == 0 and isinstance(doc_at(doc, path[:-1]), dict):
            parent = doc_at(doc, path[:-1])
            del parent[path[-1]]
            continue
        else:
            value = draw(_VALUES)
        doc = _put(doc, path, value)
    return doc


def doc_at(doc: Any, path: tuple) -> Any:
    for k in path:
        doc = doc[k]
    return doc


def _read_everything(work: str) -> None:
    """Open, read every entry, load, verify: data or a typed error, nothing else."""
    try:
        ck = cs.open(work)
    except CkptStoreError:
        return
    for name in [*ck.manifest.tensors, *ck.manifest.objects]:
        with contextlib.suppress(CkptStoreError):
            ck.read(name)
    for name, entries in ck.manifest.per_rank.items():
        for r in range(len(entries)):
            with contextlib.suppress(CkptStoreError):
                ck.read(name, rank=r)
    verify_checkpoint(ck.store, ck.manifest, jobs=1)
    template = {
        n: torch.full(r.shape, 7, dtype=ck.meta(n).dtype)
        for n, r in ck.manifest.tensors.items()
        if sum(r.shape) < 1 << 16
    }
    with contextlib.suppress(CkptStoreError):
        cs.load(template, work, strict=False, per_rank="keep")


def _rounds(check: Any) -> None:
    """One round, or rounds until ``SECONDS`` are spent (each round draws new examples)."""
    deadline = time.monotonic() + SECONDS
    rounds = 0
    while rounds == 0 or time.monotonic() < deadline:
        check()
        rounds += 1
    print(f"{rounds} round(s) of {EXAMPLES} examples")


def test_fuzz_signed_structural_edits(reference) -> None:
    """A manifest edited anywhere, then signed again (an attacker's manifest)."""
    work, doc, _ = reference

    @FUZZ
    @given(mutated_docs(doc))
    def check(mutated: dict[str, Any]) -> None:
        with open(os.path.join(work, MANIFEST_KEY), "wb") as f:
            f.write(encode_manifest(mutated))
        _read_everything(work)

    _rounds(check)


def test_fuzz_arbitrary_bytes_are_a_manifest_error_or_a_manifest() -> None:
    @FUZZ
    @given(st.binary(max_size=512))
    def check(data: bytes) -> None:
        with contextlib.suppress(ManifestError):
            Manifest.from_json(data)

    _rounds(check)


def test_every_one_character_edit_is_detected(reference) -> None:
    """Damage, not intent: any single byte of a committed manifest changed (to each of three
    other values) makes ``open`` refuse it; none reads as a valid, different manifest."""
    _, _, raw = reference
    undetected = []
    for at in range(len(raw)):
        for new in {ord("0"), ord("a"), ord('"'), raw[at] ^ 1} - {raw[at]}:
            data = raw[:at] + bytes([new]) + raw[at + 1 :]
            try:
                Manifest.from_json(data)
            except ManifestError:
                continue
            undetected.append((at, chr(raw[at]), chr(new)))
    assert not undetected, f"{len(undetected)} edits read as valid: {undetected[:5]}"


def test_verify_reports_a_damaged_manifest_as_damaged(reference, tmp_path) -> None:
    """``ckpt verify`` checks what ``open`` checks: a one-character edit is exit code 1."""
    from ckptstore.cli.main import main

    work, _, raw = reference
    path = tmp_path / "c"
    shutil.copytree(work, path)
    at = raw.index(b'"shapes":[[') + len(b'"shapes":[[')  # the first dimension of a shape
    (path / MANIFEST_KEY).write_bytes(raw[:at] + b"9" + raw[at + 1 :])
    assert main(["verify", str(path)]) == 1
    (path / MANIFEST_KEY).write_bytes(raw)
    assert main(["verify", str(path)]) == 0
