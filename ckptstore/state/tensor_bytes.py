"""Views of tensors as raw bytes and back, for every dtype (no numpy dtype needed)."""

from __future__ import annotations

import ctypes
from operator import add, attrgetter

import torch


def holds_its_values(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s memory is host memory, contiguous, and holds its values: not a
    lazy conjugate or negative view, whose bytes are the conjugates or negatives (raw bytes
    read from or written to it would be too)."""
    return tensor.is_cpu and tensor.is_contiguous() and not (tensor.is_conj() or tensor.is_neg())


def host_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` on the CPU, contiguous, with its values in memory (a copy only when it is
    not already: a lazy conjugate or negative view holds other bytes than its values)."""
    if holds_its_values(tensor):
        return tensor  # the common case; only its bytes are read
    t = tensor.detach()
    if t.is_conj() or t.is_neg():
        t = t.resolve_conj().resolve_neg()
    if t.device.type != "cpu":
        t = t.to("cpu")
    return t.contiguous()


_PyBUF_READ, _PyBUF_WRITE = 0x100, 0x200
_memory_view = ctypes.pythonapi.PyMemoryView_FromMemory
_memory_view.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
_memory_view.restype = ctypes.py_object


def address_range(address: int, nbytes: int, *, writable: bool = False) -> memoryview:
    """A view of ``nbytes`` of this process's memory from ``address``: no copy, no owner.

    Many tensors' bytes are slices of one such view of the range they lie in (slicing costs
    a fraction of a view or ``memmove`` call per tensor). Creating or slicing the view
    touches no memory, so the range may span memory that is not the tensors'; only slices
    that lie in a tensor the caller keeps alive may be read or written.
    """
    if address <= 0 or nbytes < 0:
        raise ValueError(f"no memory range at address {address:#x} of {nbytes} bytes")
    return _memory_view(address, nbytes, _PyBUF_WRITE if writable else _PyBUF_READ)


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


def all_host_contiguous(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`host_contiguous` of each of ``tensors``, in C-level passes when (as almost
    always) every one is already a CPU contiguous tensor holding its values."""
    if (
        all(map(_IS_CPU, tensors))
        and all(map(torch.Tensor.is_contiguous, tensors))
        and not any(map(torch.Tensor.is_conj, tensors))
        and not any(map(torch.Tensor.is_neg, tensors))
    ):
        return tensors
    return list(map(host_contiguous, tensors))


def all_as_bytes(tensors: list[torch.Tensor]) -> list[memoryview]:
    """:func:`as_bytes` of each of ``tensors`` (CPU, contiguous), in C-level passes: slices
    of one view of the address range they lie in (see :func:`address_range`)."""
    sizes = list(map(_NBYTES, tensors))
    if not sizes or 0 in sizes:
        return list(map(as_bytes, tensors))
    ptrs = list(map(torch.Tensor.data_ptr, tensors))
    base = min(ptrs)
    whole = address_range(base, max(map(add, ptrs, sizes)) - base)
    starts = list(map(base.__rsub__, ptrs))
    return list(map(whole.__getitem__, map(slice, starts, map(add, starts, sizes))))


_IS_CPU, _NBYTES = attrgetter("is_cpu"), attrgetter("nbytes")
