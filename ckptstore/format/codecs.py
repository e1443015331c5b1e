"""Optional per-chunk compression through numcodecs (``zstd``, ``zstd:LEVEL``, ``lz4``).

Decoding is bounded: compressed bytes come from storage and are untrusted, so a chunk is
decoded only into a buffer of exactly the raw size its tensor needs, after its frame header
has been checked to declare that size (no decompression bomb can allocate more).
"""

from __future__ import annotations

import re
from functools import cache

import numpy as np
from numcodecs.abc import Codec

from ckptstore.errors import CkptStoreError, CorruptDataError

CODEC_SPEC = re.compile(r"(zstd(:-?\d{1,6})?|lz4(:\d{1,5})?)")
"""Every codec spec a manifest may name (``docs/format.md``)."""


@cache
def get_codec(spec: str) -> Codec:
    """The numcodecs codec for a spec string as stored in the manifest."""
    if not CODEC_SPEC.fullmatch(spec):
        raise CkptStoreError(f"unknown codec {spec!r} (known: 'zstd', 'zstd:LEVEL', 'lz4')")
    name, _, arg = spec.partition(":")
    if name == "zstd":
        from numcodecs import Zstd

        return Zstd(level=int(arg) if arg else 1)
    from numcodecs import LZ4

    return LZ4(acceleration=int(arg) if arg else 1)


def encode(spec: str, data: memoryview) -> bytes:
    return bytes(get_codec(spec).encode(np.frombuffer(data, dtype=np.uint8)))


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def declared_size(spec: str, data: bytes | memoryview | np.ndarray) -> int | None:
    """The decoded size a compressed chunk's header declares (None: it declares none)."""
    head = bytes(memoryview(data)[:18])
    if spec.startswith("lz4"):  # numcodecs' LZ4: a 4-byte little-endian size, then a block
        return int.from_bytes(head[:4], "little") if len(head) >= 4 else None
    if len(head) < 6 or head[:4] != _ZSTD_MAGIC:
        return None
    descriptor = head[4]
    fcs_flag, single_segment, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    pos = 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[dict_flag]
    width = (1 if single_segment else 0, 2, 4, 8)[fcs_flag]
    if width == 0 or len(head) < pos + width:
        return None
    value = int.from_bytes(head[pos : pos + width], "little")
    return value + 256 if width == 2 else value


def decode(spec: str, data: memoryview | bytes | np.ndarray, raw_nbytes: int) -> np.ndarray:
    """``data`` decoded into a new buffer of exactly ``raw_nbytes`` bytes.

    Raises:
        CorruptDataError: the bytes do not declare, or do not decode to, ``raw_nbytes``.
    """
    declared = declared_size(spec, data)
    if declared != raw_nbytes:
        raise CorruptDataError(
            f"codec {spec}: the compressed chunk declares {declared} decoded bytes, its tensor "
            f"needs {raw_nbytes}"
        )
    out = np.empty(raw_nbytes, dtype=np.uint8)
    try:
        get_codec(spec).decode(data, out=out)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise CorruptDataError(f"codec {spec}: cannot decode a chunk: {exc}") from None
    return out
