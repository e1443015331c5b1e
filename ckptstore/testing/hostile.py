"""Crafting hostile checkpoints for tests: what an attacker who edits a manifest and signs
it again can produce (the manifest's checksum detects damage, not intent)."""

from __future__ import annotations

import json
import os
from typing import Any

from ckptstore.manifest import MANIFEST_KEY, encode_manifest


def read_doc(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a local checkpoint as a JSON document (its checksum member removed)."""
    with open(os.path.join(checkpoint, MANIFEST_KEY), "rb") as f:
        doc = json.loads(f.read())
    doc.pop("checksum", None)
    return doc


def write_doc(checkpoint: str | os.PathLike[str], doc: dict[str, Any]) -> None:
    """Replace a local checkpoint's manifest with ``doc``, signed with a valid checksum."""
    doc = {k: v for k, v in doc.items() if k != "checksum"}
    path = os.path.join(checkpoint, MANIFEST_KEY)
    with open(path, "wb") as f:
        f.write(encode_manifest(doc))
