"""Human-readable sizes and tables for the CLI (80 columns)."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def table(rows: list[list[str]], header: list[str], max_first: int = 44) -> str:
    cells = [header, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    widths[0] = min(widths[0], max_first)

    def fit(text: str, width: int) -> str:
        return text if len(text) <= width else "…" + text[-(width - 1) :]

    lines = []
    for i, r in enumerate(cells):
        parts = [fit(r[0], widths[0]).ljust(widths[0])]
        parts += [
            c.rjust(w) if j > 0 else c
            for j, (c, w) in enumerate(zip(r[1:], widths[1:], strict=True), 1)
        ]
        lines.append("  ".join(parts).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def human_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"
