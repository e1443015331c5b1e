"""The safetensors file format, read and written natively (no extra dependency).

A file is an 8-byte little-endian header length, a JSON header mapping each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data section,
plus an optional ``"__metadata__"`` of strings), then the tensors' raw C-order bytes.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import torch

from ckptstore.errors import ConversionError

TORCH_TO_ST: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
}
ST_TO_TORCH = {v: k for k, v in TORCH_TO_ST.items()}
MAX_HEADER_BYTES = 100 << 20


def st_dtype(dtype: torch.dtype, name: str) -> str:
    try:
        return TORCH_TO_ST[dtype]
    except KeyError:
        raise ConversionError(
            f"tensor {name!r}: safetensors has no type for {dtype}; export it with "
            "--format torch or --format zarr, or cast it with --dtype"
        ) from None


@dataclass(frozen=True)
class StEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int


def encode_header(
    entries: list[tuple[str, torch.dtype, tuple[int, ...], int]], metadata: dict[str, str] | None
) -> bytes:
    """The header (length prefix included) for tensors laid out back to back in this order;
    ``entries`` are (name, dtype, shape, nbytes). Padded to 8 bytes, as safetensors does."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {
            "dtype": st_dtype(dtype, name),
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def read_entries(data: Any, where: str) -> tuple[list[StEntry], dict[str, str]]:
    """Every tensor of the safetensors file whose bytes are ``data`` (bytes, a memoryview or
    a memory map of the whole file), sorted by offset, and the header's metadata. Validated
    before any offset is used: a plausible header length, a JSON object, known dtypes,
    non-negative shapes, data inside the file and exactly as long as dtype and shape say.

    Raises:
        ConversionError: naming the file (``where``) and the tensor.
    """
    size = len(data)
    if size < 8:
        raise ConversionError(f"{where}: not a safetensors file (shorter than 8 bytes)")
    n = int.from_bytes(data[:8], "little")
    if n > min(MAX_HEADER_BYTES, size - 8):
        raise ConversionError(f"{where}: a header of {n} bytes is not plausible")
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
    except ValueError as exc:
        raise ConversionError(f"{where}: the header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{where}: the header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    base, entries = 8 + n, []
    for name, info in header.items():
        try:
            dtype = ST_TO_TORCH[info["dtype"]]
            begin, end = (base + int(x) for x in info["data_offsets"])
            shape = tuple(int(x) for x in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{where}: tensor {name!r}: unsupported entry") from None
        if any(d < 0 for d in shape):
            raise ConversionError(f"{where}: tensor {name!r}: a negative dimension")
        if not base <= begin <= end <= size:
            raise ConversionError(f"{where}: tensor {name!r} lies outside the file")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ConversionError(
                f"{where}: tensor {name!r}: {end - begin} bytes do not hold {dtype}{list(shape)}"
            )
        entries.append(StEntry(name, dtype, shape, begin, end))
    entries.sort(key=lambda e: e.begin)
    return entries, metadata
