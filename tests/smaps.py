"""Reading this process's memory map (Linux ``/proc/self/smaps``) in tests."""

from __future__ import annotations


def mapping_field(address: int, field: str) -> list[str]:
    """The values of ``field`` (e.g. ``"Rss:"``, ``"VmFlags:"``) of the mapping that holds
    ``address``."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == field:
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}, or it has no {field}")
