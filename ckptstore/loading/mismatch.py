"""A load mismatch, summarized: what a user needs to fix their state_dict in one screen.

A state_dict that does not fit its checkpoint usually misses by a whole sub-tree (the
optimizer saved as ``optim`` and loaded as ``optimizer``): hundreds of problems with one
cause. The message counts them by kind, shows the first few, the checkpoint's top-level
keys and a did-you-mean for near names; every problem stays in the error's ``problems``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

SHOWN = 5  # problems listed per kind in the message
_SIMILAR = 0.6  # difflib ratio for a did-you-mean
_CANDIDATES = 2000  # names compared for a did-you-mean of a full name


@dataclass
class Mismatch:
    """The problems of one load, by kind (names, as the checkpoint spells them)."""

    missing: list[str] = field(default_factory=list)  # in the state_dict, not saved
    unexpected: list[str] = field(default_factory=list)  # saved, not in the state_dict
    other: list[str] = field(default_factory=list)  # shape, dtype or kind mismatches

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.other)

    def problems(self) -> list[str]:
        """Every problem as one line (the error's ``problems``)."""
        return (
            [f"{n}: missing from the checkpoint" for n in self.missing]
            + [f"{n}: in the checkpoint but not in the state_dict" for n in self.unexpected]
            + self.other
        )

    def summary(self, saved_names: list[str]) -> str:
        """The message: counts, the first problems of each kind, the checkpoint's top-level
        keys and did-you-means (``saved_names``: every name the checkpoint holds)."""
        total = len(self.missing) + len(self.unexpected) + len(self.other)
        lines = [f"{total} problem(s) matching the state_dict to the checkpoint:"]
        for what, names in (
            ("missing from the checkpoint", self.missing),
            ("in the checkpoint but not in the state_dict", self.unexpected),
        ):
            if names:
                lines.append(f"  {len(names)} {what}: {_first(names)}")
        if self.other:
            lines.append(f"  {len(self.other)} that differ:")
            lines += [f"    {p}" for p in self.other[:SHOWN]]
            if len(self.other) > SHOWN:
                lines.append(f"    ... and {len(self.other) - SHOWN} more")
        tops = sorted({_top(n) for n in saved_names})
        shown = ", ".join(tops[:20]) + (f", ... ({len(tops)} in all)" if len(tops) > 20 else "")
        lines.append(f"  the checkpoint's top-level keys: {shown or '(none)'}")
        lines += [f"  did you mean {h}?" for h in self.did_you_mean(tops)]
        if total > SHOWN:
            lines.append("  (every problem: the error's .problems)")
        return "\n".join(lines)

    def did_you_mean(self, saved_tops: list[str]) -> list[str]:
        """Near names for what is missing: a top-level key saved under another spelling
        (``optim`` for ``optimizer``), else a near full name among the unexpected ones."""
        hints: list[str] = []
        saved = set(saved_tops)
        for top in dict.fromkeys(map(_top, self.missing)):
            if top in saved:
                continue
            near = difflib.get_close_matches(top, saved_tops, n=1, cutoff=_SIMILAR)
            if near:
                hints.append(f"{near[0]!r} for {top!r} (a top-level key of the checkpoint)")
        if not hints and self.unexpected:
            pool = self.unexpected[:_CANDIDATES]
            for name in self.missing[:3]:
                near = difflib.get_close_matches(name, pool, n=1, cutoff=_SIMILAR)
                if near:
                    hints.append(f"{near[0]!r} for {name!r}")
        return hints[:3]


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def _first(names: list[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f", ... ({len(names) - SHOWN} more)" if len(names) > SHOWN else "")
