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


def test_verify_reads_every_chunk_through_one_window_per_thread(tmp_path, monkeypatch) -> None:
    """A fresh buffer per chunk would fault in new memory for every chunk of a checkpoint."""
    import ckptstore as cs
    from ckptstore.format import verify

    sd = {f"w{i}": torch.randn(64, 1024) for i in range(40)}  # 40 chunks of 256 KiB
    cs.save(sd, tmp_path / "c")
    ck = cs.open(tmp_path / "c")
    sizes: list[int] = []

    def counted(n: int) -> np.ndarray:
        sizes.append(n)
        return byte_buffer(n)

    monkeypatch.setattr(verify, "byte_buffer", counted)
    report = verify.verify_checkpoint(ck.store, ck.manifest, jobs=2)
    assert report.ok and report.chunks >= 40
    assert 1 <= len(sizes) <= 2 * 2, sizes  # per thread: at most a first and a bigger one
