"""The safetensors file format, read and written natively (no extra dependency).

A file is an 8-byte little-endian header length, a JSON header mapping each tensor name to
``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data section,
plus an optional ``"__metadata__"`` of strings), then the tensors' raw C-order bytes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

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


def read_header(f, where: str) -> tuple[list[StEntry], dict[str, str]]:
    """Parse a safetensors header from an open binary file."""
    head = f.read(8)
    if len(head) != 8:
        raise ConversionError(f"{where}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > 100 << 20:
        raise ConversionError(f"{where}: header of {n} bytes is not plausible")
    try:
        header = json.loads(f.read(n))
    except ValueError as exc:
        raise ConversionError(f"{where}: header is not JSON: {exc}") from None
    base = 8 + n
    metadata = header.pop("__metadata__", None) or {}
    entries = []
    for name, info in header.items():
        try:
            dtype = ST_TO_TORCH[info["dtype"]]
            begin, end = info["data_offsets"]
            shape = tuple(int(x) for x in info["shape"])
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{where}: tensor {name!r}: unsupported entry {info!r}") from None
        entries.append(StEntry(name, dtype, shape, base + int(begin), base + int(end)))
    entries.sort(key=lambda e: e.begin)
    return entries, metadata
