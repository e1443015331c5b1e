"""Host byte buffers for data read from storage, in normal pages.

numpy advises the kernel to back every array of 4 MiB or more with transparent huge pages
(``madvise(MADV_HUGEPAGE)``). Where the kernel honours that advice by compacting memory
to find free 2 MiB pages -- the default ``defrag`` setting does so for advised memory, and a
node whose page cache is full of checkpoint files is fragmented -- the first touch of such
a buffer stalls. Measured on the reference machine: a restore of 512 MiB from object
storage spent ~0.2 s (a third of its time) first-touching its two 64 MiB bounce buffers,
against a few milliseconds of ordinary page faults for the same memory unadvised.

Buffers from :func:`byte_buffer` are anonymous mappings nobody advised: the kernel's
default, as ``malloc`` or torch would give (where the system sets huge pages to
``always``, the kernel still uses them when it has them free, without compacting). Each is
a mapping of its own, unmapped when freed: they are for buffers that are kept and reused
(a reader's bounce buffers, ``verify``'s window) or too big for ``malloc`` to recycle (a
shared read's rounds). A short-lived buffer taken per chunk (a decoded chunk) is cheaper
from numpy, whose ``malloc`` hands back memory it already faulted in.
"""

from __future__ import annotations

import mmap

import numpy as np

__all__ = ["byte_buffer"]

_NUMPY_ADVISES_FROM = 4 << 20  # numpy's own threshold for the advice
_FLAGS = getattr(mmap, "MAP_PRIVATE", None), getattr(mmap, "MAP_ANONYMOUS", None)


def byte_buffer(nbytes: int) -> np.ndarray:
    """A writable uint8 array of ``nbytes`` (contents undefined: zero pages, in fact)."""
    if nbytes < _NUMPY_ADVISES_FROM or None in _FLAGS:
        return np.empty(nbytes, dtype=np.uint8)
    private, anonymous = _FLAGS
    mapping = mmap.mmap(-1, nbytes, flags=private | anonymous)  # unmapped when freed
    return np.frombuffer(mapping, dtype=np.uint8)
