"""Optional per-chunk compression through numcodecs (``zstd``, ``zstd:LEVEL``, ``lz4``)."""

from __future__ import annotations

from functools import cache

import numpy as np
from numcodecs.abc import Codec

from ckptstore.errors import CkptStoreError


@cache
def get_codec(spec: str) -> Codec:
    """The numcodecs codec for a spec string as stored in the manifest."""
    name, _, arg = spec.partition(":")
    if name == "zstd":
        from numcodecs import Zstd

        return Zstd(level=int(arg) if arg else 1)
    if name == "lz4":
        from numcodecs import LZ4

        return LZ4(acceleration=int(arg) if arg else 1)
    raise CkptStoreError(f"unknown codec {spec!r} (known: 'zstd', 'zstd:LEVEL', 'lz4')")


def encode(spec: str, data: memoryview) -> bytes:
    return bytes(get_codec(spec).encode(np.frombuffer(data, dtype=np.uint8)))


def decode(spec: str, data: memoryview | bytes | np.ndarray, raw_nbytes: int) -> bytearray:
    out = bytearray(memoryview(get_codec(spec).decode(data)).cast("B"))
    if len(out) != raw_nbytes:
        raise CkptStoreError(f"codec {spec}: decoded {len(out)} bytes, expected {raw_nbytes}")
    return out
