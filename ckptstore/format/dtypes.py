"""Names of torch dtypes as they appear in the manifest, and their sizes.

The manifest stores dtypes by these names (never by pickled objects). Every dtype is
saved as its raw little-endian bytes, so float8 and bfloat16 round-trip bit-exactly.
"""

from __future__ import annotations

import torch

_CANDIDATES = [
    "float64",
    "float32",
    "float16",
    "bfloat16",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "complex128",
    "complex64",
    "complex32",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint64",
    "uint32",
    "uint16",
    "uint8",
    "bool",
]

NAME_TO_DTYPE: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in _CANDIDATES
    if isinstance(getattr(torch, name, None), torch.dtype)
}
DTYPE_TO_NAME: dict[torch.dtype, str] = {dtype: name for name, dtype in NAME_TO_DTYPE.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_TO_NAME[dtype]
    except KeyError:
        raise ValueError(f"unsupported tensor dtype {dtype}") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return NAME_TO_DTYPE[name]
    except KeyError:
        raise ValueError(
            f"unknown dtype name {name!r} (this torch knows {sorted(NAME_TO_DTYPE)})"
        ) from None


def itemsize(name: str) -> int:
    return NAME_TO_DTYPE[name].itemsize
