"""crc32c of stored bytes, one checksum per block (hardware-accelerated where available)."""

from __future__ import annotations

import crc32c as _crc32c

crc32c_of = _crc32c.crc32c
"""crc32c of a buffer, the extension's own function: for loops over tens of thousands of
small chunks, where a Python wrapper's call costs as much as the checksum."""


def crc32c(data: memoryview | bytes, value: int = 0) -> int:
    """crc32c of ``data``, continuing from ``value`` (the crc of the bytes before it)."""
    return _crc32c.crc32c(data, value) if value else _crc32c.crc32c(data)


def block_crcs(data: memoryview, block_bytes: int) -> list[int]:
    """Checksums of consecutive ``block_bytes`` blocks of ``data`` (one for empty data)."""
    n = len(data)
    if n <= block_bytes:
        return [_crc32c.crc32c(data)]
    return [_crc32c.crc32c(data[i : i + block_bytes]) for i in range(0, n, block_bytes)]
