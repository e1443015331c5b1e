"""Names on the way out of a checkpoint: select a sub-tree, strip, rename or add prefixes.

A training checkpoint holds ``{"model": ..., "optim": ...}``; Hugging Face expects the
model's own names (``model.layers.0...`` for a Llama, ``transformer.h.0...`` for GPT-2),
and a compiled model's names carry ``_orig_mod.``. A :class:`KeyMap` says which entries go
out and under which names; two entries that would get one name are refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ckptstore.errors import ConversionError


@dataclass(frozen=True)
class KeyMap:
    """``subtree``: export only entries under ``subtree.`` and drop that prefix; then each
    of ``strip`` is removed where a name starts with it, each ``(old, new)`` of ``rename``
    replaces a leading ``old``, and ``add`` is put in front of every name."""

    subtree: str = ""
    strip: Sequence[str] = ()
    rename: Sequence[tuple[str, str]] = ()
    add: str = ""

    def __bool__(self) -> bool:
        return bool(self.subtree or self.strip or self.rename or self.add)

    def selects(self, name: str) -> bool:
        return not self.subtree or name.startswith(self.subtree.rstrip(".") + ".")

    def __call__(self, name: str) -> str:
        if self.subtree:
            name = name[len(self.subtree.rstrip(".")) + 1 :]
        for prefix in self.strip:
            if prefix and name.startswith(prefix):
                name = name[len(prefix) :]
        for old, new in self.rename:
            if name.startswith(old):
                name = new + name[len(old) :]
        return self.add + name

    def apply(self, names: Iterable[str], where: str) -> dict[str, str]:
        """Output name -> checkpoint name for every selected name (refused: nothing
        selected, an empty name, or two entries mapped to one name)."""
        out: dict[str, str] = {}
        for name in names:
            if not self.selects(name):
                continue
            new = self(name)
            if not new:
                raise ConversionError(f"{where}: {name!r} would be exported under an empty name")
            if new in out:
                raise ConversionError(
                    f"{where}: {out[new]!r} and {name!r} would both be exported as {new!r}"
                )
            out[new] = name
        if self.subtree and not out:
            raise ConversionError(f"{where}: no tensor under {self.subtree!r}")
        return out


def parse_rename(specs: Sequence[str]) -> list[tuple[str, str]]:
    """``OLD=NEW`` command-line specs as pairs."""
    pairs = []
    for spec in specs:
        old, sep, new = spec.partition("=")
        if not sep or not old:
            raise ConversionError(
                f"--rename wants OLD=NEW (a prefix and its replacement), not {spec!r}"
            )
        pairs.append((old, new))
    return pairs
