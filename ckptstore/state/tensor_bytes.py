"""Views of tensors as raw bytes and back, for every dtype (no numpy dtype needed)."""

from __future__ import annotations

import ctypes

import torch


def host_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the CPU, contiguous, with its values in memory (a copy only when it is
    not already: a lazy conjugate or negative view holds other bytes than its values)."""
    lazy = tensor.is_conj() or tensor.is_neg()
    if not lazy and tensor.is_cpu and tensor.is_contiguous():
        return tensor  # the common case; only its bytes are read
    t = tensor.detach()
    if lazy:
        t = t.resolve_conj().resolve_neg()
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t.contiguous()


_PyBUF_READ = 0x100
_memory_view = ctypes.pythonapi.PyMemoryView_FromMemory
_memory_view.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
_memory_view.restype = ctypes.py_object


def as_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU contiguous tensor, without a copy.

    The view points at the tensor's memory: the caller keeps the tensor alive while the
    view is used. (A ctypes view costs a fraction of the torch/numpy view calls, which
    matters when a state_dict holds tens of thousands of small tensors.)
    """
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(b"")
    return _memory_view(tensor.data_ptr(), nbytes, _PyBUF_READ)
