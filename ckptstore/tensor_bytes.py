"""Views of tensors as raw bytes and back, for every dtype (no numpy dtype needed)."""

from __future__ import annotations

import torch


def host_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the CPU and contiguous (a copy only when it is not already)."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t.contiguous()


def as_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU contiguous tensor, without a copy."""
    flat = tensor.reshape(-1)
    if flat.dtype != torch.uint8:
        flat = flat.view(torch.uint8)
    return memoryview(flat.numpy()).cast("B")


def from_bytes(buffer: memoryview | bytearray, dtype: torch.dtype, count: int) -> torch.Tensor:
    """A 1-D tensor of ``count`` elements of ``dtype`` over ``buffer`` (shares memory)."""
    raw = torch.frombuffer(buffer, dtype=torch.uint8, count=count * dtype.itemsize)
    return raw if dtype == torch.uint8 else raw.view(dtype)
