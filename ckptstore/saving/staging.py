"""Host staging buffers for asynchronous saves, reused from save to save.

A fresh allocation costs a page fault per 4 KiB on first touch (copying into new memory runs
an order of magnitude slower than into touched memory), so the pool keeps its buffers and
hands the same ones out again. For CUDA tensors the buffers are pinned and the device ->
host copies run on a side stream.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing import shared_memory

import torch

from ckptstore.errors import UnsafeCopyError

_ALIGN = 64  # every staged tensor starts on a 64-byte boundary (typed views need alignment)


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass
class StagedTensors:
    """Copies of tensors in one host buffer; ``views[i]`` holds tensor i's bytes."""

    buffer: torch.Tensor
    views: list[torch.Tensor]
    event: object | None = None  # a CUDA event recorded after the last device -> host copy

    def wait_copies(self) -> None:
        if self.event is not None:
            self.event.synchronize()  # type: ignore[attr-defined]
            self.event = None


class StagingPool:
    """Reusable host buffers; at most ``slots`` are handed out at a time.

    ``acquire`` blocks while every slot is in use (backpressure: one save in flight by
    default). Buffers only grow: a save of the same size reuses already-touched memory.
    """

    def __init__(self, slots: int = 1) -> None:
        self._shm: dict[int, shared_memory.SharedMemory] = {}  # data_ptr -> its segment
        self._free: list[torch.Tensor] = []
        self._in_use = 0
        self._slots = slots
        self._cond = threading.Condition()
        self._prefaulting: threading.Thread | None = None

    def prefault(self, tensors: list[torch.Tensor], *, shared: bool = False) -> Future:
        """Allocate the buffer :meth:`stage` will need for ``tensors`` and touch every page
        of it in a background thread, then keep it for the next :meth:`acquire` (which waits
        for it rather than faulting in fresh memory of its own): the first save's copy runs
        at the speed of later ones. Returns a Future done when the buffer is ready."""
        nbytes, pinned = _layout(tensors)[2], _pinned(tensors, shared)
        ready: Future = Future()

        def fault_in() -> None:
            try:
                buf = self._allocate(nbytes, pinned, shared)
                buf.fill_(0)  # one write per page: the kernel maps them all now
                with self._cond:
                    self._free.append(buf)
                    while len(self._free) > self._slots:
                        self._drop(self._free.pop(0))
                    self._cond.notify_all()
            except BaseException as exc:  # out of memory: the save will allocate (and say)
                ready.set_exception(exc)
                return
            ready.set_result(nbytes)

        with self._cond:
            if self._prefaulting is not None or any(
                b.numel() >= nbytes and self._kind_ok(b, pinned, shared) for b in self._free
            ):
                ready.set_result(nbytes)
                return ready
            self._prefaulting = threading.Thread(
                target=fault_in, name="ckptstore-prefault", daemon=True
            )
            self._prefaulting.start()
        return ready

    def _kind_ok(self, buf: torch.Tensor, pinned: bool, shared: bool) -> bool:
        return buf.is_pinned() == pinned and (buf.data_ptr() in self._shm) == shared

    def _allocate(self, nbytes: int, pinned: bool, shared: bool) -> torch.Tensor:
        if shared:
            segment = shared_memory.SharedMemory(create=True, size=max(nbytes, 1))
            buf = torch.frombuffer(segment.buf, dtype=torch.uint8)
            with self._cond:
                self._shm[buf.data_ptr()] = segment
            return buf
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pinned)

    def wait_prefaulted(self) -> None:
        """Return once the buffer :meth:`prefault` started is ready (at once if none)."""
        prefaulting = self._prefaulting
        if prefaulting is not None:
            prefaulting.join()
            self._prefaulting = None

    def acquire(self, nbytes: int, pinned: bool, shared: bool = False) -> torch.Tensor:
        """A buffer of at least ``nbytes``; ``shared`` puts it in shared memory (for a helper
        process), ``pinned`` in page-locked memory (for device -> host copies)."""
        self.wait_prefaulted()  # faulting in what this save needs: let it finish
        with self._cond:
            while self._in_use >= self._slots:
                self._cond.wait()
            self._in_use += 1
            for i, buf in enumerate(self._free):
                if buf.numel() >= nbytes and self._kind_ok(buf, pinned, shared):
                    return self._free.pop(i)
            if self._free:  # too small or of the wrong kind: replace it
                self._drop(self._free.pop(0))
        return self._allocate(nbytes, pinned, shared)

    def segment_name(self, buf: torch.Tensor) -> str:
        """The shared-memory name of a buffer acquired with ``shared=True``."""
        return self._shm[buf.data_ptr()].name

    def _drop(self, buf: torch.Tensor) -> None:
        segment = self._shm.pop(buf.data_ptr(), None)
        if segment is not None:
            del buf
            segment.unlink()
            with contextlib.suppress(BufferError):  # a tensor still views it: freed with it
                segment.close()

    def close(self) -> None:
        """Release every free buffer (shared-memory segments are unlinked)."""
        with self._cond:
            while self._free:
                self._drop(self._free.pop())

    def release(self, buf: torch.Tensor) -> None:
        with self._cond:
            self._in_use -= 1
            self._free.append(buf)
            while len(self._free) > self._slots:
                self._drop(self._free.pop(0))
            self._cond.notify()

    def stage(
        self, tensors: list[torch.Tensor], *, wait_device: bool = True, shared: bool = False
    ) -> StagedTensors:
        """Copy ``tensors`` into one pooled buffer (device -> host on a side stream for CUDA)."""
        sizes, offsets, total = _layout(tensors)
        buf = self.acquire(total, pinned=_pinned(tensors, shared), shared=shared)
        try:
            views = [buf[o : o + n] for o, n in zip(offsets, sizes, strict=True)]
            staged = StagedTensors(buf, views)
            host = [(t, v) for t, v in zip(tensors, views, strict=True) if not t.is_cuda]
            device = [(t, v) for t, v in zip(tensors, views, strict=True) if t.is_cuda]
            for t, v in host:
                _copy_host(t, v)
            if device:
                staged.event = _copy_from_device(device)
                if wait_device:
                    staged.wait_copies()
            return staged
        except BaseException:
            self.release(buf)
            raise


def _layout(tensors: list[torch.Tensor]) -> tuple[list[int], list[int], int]:
    """Each tensor's byte size and offset in a staging buffer, and the buffer's size."""
    sizes = [t.numel() * t.element_size() for t in tensors]
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += _aligned(n)
    return sizes, offsets, total


def _pinned(tensors: list[torch.Tensor], shared: bool) -> bool:
    """Whether ``tensors`` are staged in pinned memory: for device -> host copies, unless
    the buffer is shared memory (for a helper process)."""
    return not shared and torch.cuda.is_available() and any(t.is_cuda for t in tensors)


def _typed(view: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``view`` (bytes) seen as a tensor of ``like``'s dtype and shape."""
    return view.view(like.dtype).view(like.shape) if like.numel() else view[:0].view(like.dtype)


def _copy_host(src: torch.Tensor, dst: torch.Tensor) -> None:
    n = dst.numel()
    if n == 0:
        return
    if src.is_contiguous() and not (src.is_conj() or src.is_neg()):
        # dst was sized from src (``stage``): both hold exactly n bytes. A tensor without
        # storage (meta device) has no address: refused before memmove could read from 0.
        src_ptr = src.data_ptr()
        if not src_ptr:
            raise UnsafeCopyError(f"staging: a {src.device} tensor has no data to copy")
        ctypes.memmove(dst.data_ptr(), src_ptr, n)  # any dtype, no kernel, GIL released
    else:  # strided, or a lazy conjugate / negative view: copy_ writes its values
        _typed(dst, src).copy_(src)


def _copy_from_device(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> object:
    """Device -> pinned host copies on a side stream; returns the event that marks the end."""
    stream = _side_stream(pairs[0][0].device)
    # The side stream must not start before the tensors' pending work on the compute stream.
    stream.wait_stream(torch.cuda.current_stream(pairs[0][0].device))
    with torch.cuda.stream(stream):
        for src, dst in pairs:
            if dst.numel():
                _typed(dst, src).copy_(src, non_blocking=True)
                src.record_stream(stream)
        event = torch.cuda.Event()
        event.record(stream)
    return event


_STREAMS: dict[torch.device, object] = {}


def _side_stream(device: torch.device):  # pragma: no cover - needs a GPU
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device=device)
    return _STREAMS[device]
