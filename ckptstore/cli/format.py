"""Human-readable sizes and tables for the CLI: whole names when piped, the terminal's
width on a terminal."""

from __future__ import annotations

import re
import shutil
import sys


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def table(rows: list[list[str]], header: list[str], elide: int = 0) -> str:
    """Aligned columns. Cells are never cut when the output is not a terminal (piped to a
    file or a program, every name arrives whole); on a terminal that is too narrow, column
    ``elide`` loses the middle of its longest cells -- the head and the distinguishing tail
    of a name stay (``model.layers.1…23.mlp.w1``)."""
    cells = [header, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    room = terminal_columns()
    if room is not None:
        others = sum(widths) - widths[elide] + 2 * (len(widths) - 1)
        widths[elide] = max(len(header[elide]), 12, min(widths[elide], room - others))

    numeric = [j > 0 and all(_NUMERIC.fullmatch(r[j]) for r in rows) for j in range(len(header))]

    def cell(j: int, text: str, width: int) -> str:
        text = elided(text, width) if j == elide else text
        return text.rjust(width) if numeric[j] else text.ljust(width)

    lines = []
    for i, r in enumerate(cells):
        parts = [cell(j, c, w) for j, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(parts).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


_NUMERIC = re.compile(r"[-\d.:x ]*(?:[KMGT]?i?B|[smhd]|%)?|-|scalar")
"""Cells right-aligned as numbers: counts, sizes, shapes, times, ages."""


def elided(text: str, width: int) -> str:
    """``text`` in ``width`` characters: the middle replaced by "…" when it does not fit
    (a third of the room for the head, the rest for the tail)."""
    if len(text) <= width:
        return text
    head = (width - 1) // 3
    return text[:head] + "…" + text[len(text) - (width - 1 - head) :]


def terminal_columns() -> int | None:
    """The terminal's width when stdout is a terminal, else None (no limit)."""
    if not sys.stdout.isatty():
        return None
    return shutil.get_terminal_size((100, 24)).columns


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"
