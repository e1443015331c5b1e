"""Every backend passes the same Store conformance suite."""

from __future__ import annotations

import os
import uuid

import pytest

from ckptstore.backends import FsspecStore, LocalStore, MemoryStore, open_store
from ckptstore.backends.base import Store
from ckptstore.backends.tiered import TieredStore
from ckptstore.errors import UnsupportedURLError
from ckptstore.testing.store_tests import StoreTests


class TestLocalStore(StoreTests):
    @pytest.fixture
    def store(self, tmp_path) -> Store:
        return LocalStore(str(tmp_path / "root"))

    def raw_get(self, store: Store, key: str) -> bytes:
        with open(os.path.join(store.root, key), "rb") as f:  # type: ignore[attr-defined]
            return f.read()


class TestMemoryStore(StoreTests):
    @pytest.fixture
    def store(self) -> Store:
        return MemoryStore(uuid.uuid4().hex)

    def raw_get(self, store: Store, key: str) -> bytes:
        return MemoryStore(store.name)._data[key]  # type: ignore[attr-defined]


class TestFsspecStoreOnLocalFiles(StoreTests):
    """The generic fsspec adapter, driven through fsspec's local filesystem."""

    @pytest.fixture
    def store(self, tmp_path) -> Store:
        return FsspecStore(f"local://{tmp_path}/root")

    def raw_get(self, store: Store, key: str) -> bytes:
        with open(os.path.join(store.root, key), "rb") as f:  # type: ignore[attr-defined]
            return f.read()


def test_open_store_picks_backend_by_scheme(tmp_path) -> None:
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    assert isinstance(open_store("memory://abc"), MemoryStore)
    assert isinstance(open_store(f"local://{tmp_path}"), FsspecStore)
    with pytest.raises(UnsupportedURLError, match="nosuchscheme"):
        open_store("nosuchscheme://x/y")


def test_local_store_rejects_escaping_keys(tmp_path) -> None:
    store = LocalStore(str(tmp_path))
    with pytest.raises(Exception, match="invalid key"):
        store.write("../outside", b"x")


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs (needs root, as CI has; a user's machine without it skips)."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_at_the_manifest_leaves_no_temporary_file(full_disk) -> None:
    from ckptstore.backends.local import LocalStore

    store = LocalStore(str(full_disk / "ckpt"))
    with pytest.raises(OSError):
        store.write_if_absent("manifest.json", b"x" * (1 << 20))
    assert os.listdir(full_disk / "ckpt") == []


def test_a_save_that_fills_the_disk_fails_cleanly_and_keeps_the_previous_one(full_disk) -> None:
    import torch

    import ckptstore as cs
    from ckptstore.errors import SaveError

    cs.save({"w": torch.ones(1000)}, full_disk / "step1")
    with pytest.raises(SaveError):
        cs.save({"w": torch.ones(1 << 20)}, full_disk / "step2")
    assert not os.path.exists(full_disk / "step2" / "manifest.json")
    assert torch.equal(cs.open(full_disk / "step1").read("w"), torch.ones(1000))


class TestTieredStore(StoreTests):
    """A node-local directory in front of a shared store: writes go to the local tier, reads
    take the local copy first (the shared tier's behaviour is covered in tests/test_tiered.py)."""

    @pytest.fixture
    def store(self, tmp_path) -> Store:
        return TieredStore(LocalStore(str(tmp_path / "local")), MemoryStore(uuid.uuid4().hex))

    def raw_get(self, store: Store, key: str) -> bytes:
        with open(os.path.join(store.local.root, key), "rb") as f:  # type: ignore[attr-defined]
            return f.read()


def test_a_local_file_flushed_while_it_is_written_keeps_every_byte(tmp_path, monkeypatch) -> None:
    """Flushed early, before the commit, and written in system calls of at most
    ``WRITE_SLICE`` bytes (larger ones cost the kernel several times the CPU per byte)."""
    from ckptstore.backends import local

    flushed: list[int] = []
    call_bytes: list[int] = []
    real_fdatasync, real_write, real_writev = os.fdatasync, os.write, os.writev

    def counting_fdatasync(fd: int) -> None:
        flushed.append(fd)
        real_fdatasync(fd)

    def counting_write(fd: int, data) -> int:
        call_bytes.append(len(memoryview(data).cast("B")))
        return real_write(fd, data)

    def counting_writev(fd: int, buffers) -> int:
        call_bytes.append(sum(len(memoryview(b).cast("B")) for b in buffers))
        return real_writev(fd, buffers)

    monkeypatch.setattr(local, "EARLY_FLUSH_BYTES", 64 << 10)
    monkeypatch.setattr(os, "fdatasync", counting_fdatasync)
    monkeypatch.setattr(os, "write", counting_write)
    monkeypatch.setattr(os, "writev", counting_writev)
    store = LocalStore(str(tmp_path))
    sizes = (1, 70_000, 4096, 300_000, 13, 65_536, 1 << 20, 3 << 20, 5)
    parts = [os.urandom(n) for n in sizes]
    expected = b"".join(parts) * 2
    with store.open_writer("data/f.bin") as writer:
        for part in parts:
            writer.write(part)
        writer.write_parts([memoryview(p) for p in parts])
    assert flushed  # at least once (one flush at a time: how many depends on the disk)
    assert max(call_bytes) <= local.WRITE_SLICE
    assert sum(call_bytes) == len(expected)
    monkeypatch.undo()
    assert store.read("data/f.bin") == expected
    assert os.listdir(tmp_path / "data") == ["f.bin"]


def test_an_aborted_local_file_waits_for_its_flush_and_leaves_nothing(
    tmp_path, monkeypatch
) -> None:
    from ckptstore.backends import local

    monkeypatch.setattr(local, "EARLY_FLUSH_BYTES", 1)
    store = LocalStore(str(tmp_path))
    writer = store.open_writer("data/f.bin")
    writer.write(os.urandom(1 << 20))  # a flush is started
    writer.abort()
    assert os.listdir(tmp_path / "data") == []
    assert not store.exists("data/f.bin")


def test_a_failed_early_flush_fails_the_commit(tmp_path, monkeypatch) -> None:
    """The kernel reports a failed write-back once per open file: an early flush that saw
    it must fail the commit, which the commit's own fsync no longer would."""
    from ckptstore.backends import local
    from ckptstore.errors import StoreError

    def failing_fdatasync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(local, "EARLY_FLUSH_BYTES", 1)
    monkeypatch.setattr(os, "fdatasync", failing_fdatasync)
    store = LocalStore(str(tmp_path))
    writer = store.open_writer("data/f.bin")
    writer.write(b"x" * 4096)
    with pytest.raises(StoreError, match=r"f\.bin.*Input/output error"):
        writer.commit()
    assert os.listdir(tmp_path / "data") == []
