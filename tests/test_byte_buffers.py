"""Host byte buffers for data read from storage: exact, writable, and in memory the kernel
was not advised to back with huge pages (whose first touch can stall on compaction)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from ckptstore.byte_buffers import byte_buffer
from tests.smaps import mapping_field

MiB = 1 << 20


@pytest.mark.parametrize("n", [0, 1, 4 * MiB - 1, 4 * MiB, 64 * MiB + 3])
def test_a_buffer_has_its_size_and_takes_writes(n) -> None:
    buf = byte_buffer(n)
    assert buf.dtype == np.uint8 and buf.shape == (n,) and buf.flags.writeable
    if n:
        buf[:] = 7
        buf[-1] = 9
        assert int(buf[0]) == (7 if n > 1 else 9) and int(buf[-1]) == 9
        t = torch.from_numpy(buf)  # as the read path uses it
        assert t.numel() == n and int(t[-1]) == 9


def _vm_flags(address: int) -> set[str]:
    """The VmFlags of the mapping holding ``address``."""
    return set(mapping_field(address, "VmFlags:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc/self/smaps")
def test_large_buffers_are_not_advised_for_huge_pages_as_numpys_own_are() -> None:
    theirs = np.empty(64 * MiB, dtype=np.uint8)
    ours = byte_buffer(64 * MiB)
    middle = 32 * MiB  # the advice covers the aligned pages: look inside the buffer
    if "hg" not in _vm_flags(theirs.ctypes.data + middle):
        pytest.skip("this numpy does not advise huge pages, so there is nothing to avoid")
    assert "hg" not in _vm_flags(ours.ctypes.data + middle)
    ours[:] = 1  # still ordinary writable memory
    assert int(ours.sum(dtype=np.int64)) == 64 * MiB
