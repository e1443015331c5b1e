"""Reads from a mapped file: the pages a request needs are mapped in one system call
(``MADV_POPULATE_READ``) before its checksums touch them, and where that cannot be done
nothing changes."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

import pytest

from ckptstore.loading.read import _populate
from tests.smaps import mapping_field

MiB = 1 << 20


def _resident_bytes(m: mmap.mmap) -> int:
    """Bytes of ``m`` mapped into this process's page table (``Rss`` in /proc/self/smaps)."""
    return int(mapping_field(ctypes.addressof(ctypes.c_char.from_buffer(m)), "Rss:")[0]) * 1024


def _kernel() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or _kernel() < (5, 14),
    reason="MADV_POPULATE_READ is Linux's, from 5.14",
)
def test_populate_maps_the_requested_pages_and_no_others(tmp_path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(8 * MiB))
    fd = os.open(path, os.O_RDONLY)
    try:  # as the local store maps a data file
        m = mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    try:
        assert _resident_bytes(m) == 0
        _populate(memoryview(m), 3 * MiB + 100, 5 * MiB)  # an unaligned start
        resident = _resident_bytes(m)
        # The range (page-aligned; the kernel maps a large page-cache folio whole), not the
        # whole file.
        assert 2 * MiB <= resident < 8 * MiB
        _populate(memoryview(m), 5, 5)  # an empty range: nothing
        assert _resident_bytes(m) == resident
        _populate(memoryview(m), 7 * MiB, 9 * MiB)  # past the end of the file: no error
    finally:
        m.close()


def test_populate_does_nothing_for_views_it_cannot_map() -> None:
    _populate(None, 0, 10)
    _populate(memoryview(b"not a mapping"), 0, 5)  # bytes have no madvise: no error
