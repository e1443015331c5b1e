"""Verify byte ranges by their crc32c and copy each into its destination, many per call.

A load's last step, for every chunk it reads: check the stored bytes, then copy them into
the destination tensor. The compiled helper ``ckptstore.loading._verified_copy`` (built at install
where a C compiler is present; used where the CPU has the SSE4.2 crc32c instruction) does
a whole column of ranges in one call, without the GIL, copying with streaming stores: about
half the time of the Python loop for the tens of thousands of small tensors of a model.
Elsewhere, or with ``CKPTSTORE_COMPILED_COPY=0``, the Python loop below does the same with
the crc32c package. Both check every range against both buffers before a byte of it
moves, and stop at the first range that fails its crc32c, before copying it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ckptstore import knobs
from ckptstore.format.checksum import crc32c_of

try:
    from ckptstore.loading import _verified_copy as _compiled_module
except ImportError:  # no C compiler at install: the Python loop
    _compiled_module = None

COPIED, MISMATCH, OUTSIDE = 0, 1, 2
"""Outcomes of :func:`check_and_copy`: all copied; a range failed its crc32c; a range lies
outside its source or destination buffer."""

compiled: Any = (
    _compiled_module
    if _compiled_module is not None and _compiled_module.HARDWARE and knobs.compiled_copy()
    else None
)
"""The compiled helper, or None where it is not built, the CPU lacks the instruction, or
``CKPTSTORE_COMPILED_COPY=0``."""


def check_and_copy(
    src: memoryview,
    src_first: int,
    starts: Sequence[int] | np.ndarray,
    ends: Sequence[int] | np.ndarray,
    crcs: Sequence[int] | np.ndarray,
    dest: memoryview,
    dest_at: Sequence[int] | np.ndarray,
) -> tuple[int, int]:
    """Range ``i`` is file bytes ``[starts[i], ends[i])`` (``src[0]`` is file byte
    ``src_first``), with crc32c ``crcs[i]``, copied to ``dest[dest_at[i]:]``; the columns
    are int64 numpy arrays (crcs also uint32) or sequences of ints. Returns
    ``(COPIED, -1)``, or ``(MISMATCH | OUTSIDE, i)`` for the first range that failed: the
    ranges before it were copied, it and those after it were not."""
    if compiled is not None:
        return compiled.check_and_copy(src, src_first, starts, ends, crcs, dest, dest_at)
    # The Python loop: the same checks, then one crc32c and one slice assignment per range.
    first = src_first
    if not len(starts):
        return COPIED, -1
    starts, ends, crcs, dest_at = (
        c.tolist() if isinstance(c, np.ndarray) else c for c in (starts, ends, crcs, dest_at)
    )
    if first < 0 or min(starts) < first or max(ends) - first > len(src) or min(dest_at) < 0:
        return OUTSIDE, _first_outside(len(src), first, starts, ends, len(dest), dest_at)
    check = crc32c_of  # a local: this loop runs once per small tensor
    try:
        for lo, hi, crc, at in zip(starts, ends, crcs, dest_at, strict=True):
            piece = src[lo - first : hi - first]
            if hi < lo or check(piece) != crc:
                return MISMATCH if hi >= lo else OUTSIDE, starts.index(lo)
            dest[at : at + hi - lo] = piece  # a slice past dest is short: ValueError
    except ValueError:
        return OUTSIDE, _first_outside(len(src), first, starts, ends, len(dest), dest_at)
    return COPIED, -1


def _first_outside(
    src_len: int,
    first: int,
    starts: Sequence[int],
    ends: Sequence[int],
    dest_len: int,
    dest_at: Sequence[int],
) -> int:
    for i, (lo, hi, at) in enumerate(zip(starts, ends, dest_at, strict=True)):
        if first < 0 or lo < first or hi < lo or hi - first > src_len or at < 0:
            return i
        if at + hi - lo > dest_len:
            return i
    return 0
