"""Local filesystem store: the default backend (node-local NVMe, NFS, Lustre mounts).

Writes go to a temporary file in the target directory and are renamed into place on
commit, after ``fsync``; the directory itself is fsynced so the rename survives a crash.
A durable file is flushed while it is written (every ``EARLY_FLUSH_BYTES``, in a thread),
so the disk's work overlaps the writer's and the commit's ``fsync`` has only the tail left.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
import threading
import uuid
from bisect import bisect_right
from collections.abc import Iterator, Sequence
from itertools import accumulate

from ckptstore.backends.base import ByteRange, ObjectInfo, Store, StoreWriter
from ckptstore.errors import (
    KeyExistsError,
    KeyNotFoundError,
    NotARegularFileError,
    StoreError,
    TruncatedFileError,
)

_TMP_MARK = ".tmp-"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(path: str, durable: bool) -> None:
    """``os.makedirs``, and with ``durable`` each new directory's entry is fsynced in its
    parent: a step directory created by a save survives a power loss along with the
    manifest inside it."""
    if os.path.isdir(path):
        return
    missing = []
    head = path
    while head and not os.path.isdir(head):
        missing.append(head)
        head = os.path.dirname(head)
    os.makedirs(path, exist_ok=True)
    if durable:
        for created in reversed(missing):
            _fsync_dir(os.path.dirname(created))


_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 16
"""Buffers one ``writev`` takes (1024 on Linux)."""

WRITE_SLICE = 64 << 10
"""Bytes one ``write`` / ``writev`` system call takes at most. The kernel sizes page-cache
folios by the write (Linux 6.18, ext4), and their cost per byte is not flat: on a virtual
machine that reports free 2 MiB blocks to its host (virtio-balloon free page reporting),
large folios often come from memory the host took back and are faulted in again on their
first write. Measured there (four processes each writing 5,000 small tensors and a 16 MiB
shard, interleaved A/B): 64 KiB slices 12 ms of CPU and 74 ms of wall time every round;
1 MiB slices 10 ms while small free blocks last, then ~50 ms and ~145 ms; unsliced ~83 ms.
One process, 64 MiB: 16 ms in 64 KiB writes, 15 ms in 1 MiB ones while they are fast,
150-175 ms in 4 MiB or larger writes. 64 KiB costs one system call per 64 KiB and keeps
the folios small enough to come from the blocks the host left alone."""


class _EarlyFlush:
    """Flushes a file's bytes to the disk while more of them are still being written: after
    every ``EARLY_FLUSH_BYTES`` written, an ``fdatasync`` in a thread of its own (one at a
    time). The disk works while the writer still copies bytes into the page cache, and the
    pages already flushed are clean -- reclaimable by the next write without waiting -- so
    the commit's ``fsync`` has only the tail left. An error of an early flush is kept and
    raised by :meth:`finish`: the kernel reports a failed write-back once per open file,
    so the commit's own ``fsync`` on the same descriptor would not see it again."""

    __slots__ = ("_error", "_fd", "_pending", "_thread")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._pending = 0
        self._thread: threading.Thread | None = None
        self._error: OSError | None = None

    def wrote(self, nbytes: int) -> None:
        self._pending += nbytes
        if self._pending < EARLY_FLUSH_BYTES or (
            self._thread is not None and self._thread.is_alive()
        ):
            return
        self._pending = 0
        self._thread = threading.Thread(target=self._flush, daemon=True)
        self._thread.start()

    def _flush(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            self._error = self._error or exc

    def finish(self) -> None:
        """Wait for the flush in flight (before the file is fsynced or closed); raise the
        error of any early flush."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error


EARLY_FLUSH_BYTES = 8 << 20
"""Bytes written to a durable file between two early flushes (:class:`_EarlyFlush`)."""


class _LocalWriter(StoreWriter):
    def __init__(self, final_path: str, durable: bool) -> None:
        self._final = final_path
        directory = os.path.dirname(final_path)
        _make_dirs(directory, durable)
        self._tmp = os.path.join(
            directory, f"{_TMP_MARK}{os.path.basename(final_path)}.{uuid.uuid4().hex[:8]}"
        )
        self._fd: int | None = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._durable = durable
        self._early = _EarlyFlush(self._fd) if durable else None

    def write(self, data: memoryview | bytes) -> None:
        """Write ``data`` at the end of the file, ``WRITE_SLICE`` bytes per system call."""
        assert self._fd is not None, "write after commit/abort"
        view = memoryview(data).cast("B")
        while view:
            written = os.write(self._fd, view[:WRITE_SLICE])
            view = view[written:]
            if self._early is not None:
                self._early.wrote(written)

    def write_parts(self, parts: Sequence[memoryview | bytes]) -> None:
        """Write ``parts`` one after another: one ``writev`` per run of parts of at most
        ``WRITE_SLICE`` bytes together (and at most ``_IOV_MAX``), no copy to join them; a
        part larger than that by itself goes through :meth:`write`."""
        assert self._fd is not None, "write after commit/abort"
        ends = list(accumulate(map(len, parts)))  # each part's end in the whole run
        first, start = 0, 0
        while first < len(parts):
            end = bisect_right(ends, start + WRITE_SLICE, first, min(len(parts), first + _IOV_MAX))
            if end == first:  # one part above the slice
                self.write(parts[first])
                end = first + 1
            else:
                self._write_batch(parts[first:end], ends[end - 1] - start)
            first, start = end, ends[end - 1]

    def _write_batch(self, batch: Sequence[memoryview | bytes], total: int) -> None:
        done = os.writev(self._fd, batch)
        if self._early is not None:
            self._early.wrote(done)
        if done < total:  # a short write: the rest one buffer at a time
            for part in batch:
                view = memoryview(part).cast("B")
                if done < len(view):
                    self.write(view[done:])
                done = max(0, done - len(view))

    def commit(self) -> None:
        assert self._fd is not None, "commit twice"
        try:
            try:
                if self._early is not None:
                    self._early.finish()
                if self._durable:
                    os.fsync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None
            os.replace(self._tmp, self._final)
            if self._durable:
                _fsync_dir(os.path.dirname(self._final))
        except OSError as exc:  # e.g. its directory was removed meanwhile, or the disk is full
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
            raise StoreError(f"{self._final}: cannot commit the file: {exc.strerror}") from exc

    def abort(self) -> None:
        if self._early is not None:
            with contextlib.suppress(OSError):  # the file is dropped: its flush no longer matters
                self._early.finish()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a device"),
        (stat.S_ISBLK, "a device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


def _read_all(fd: int, size: int) -> bytes:
    """Exactly the ``size`` bytes the file had when it was opened (a file that grows while
    it is read does not make the read unbounded)."""
    parts, done = [], 0
    while done < size:
        part = os.pread(fd, size - done, done)
        if not part:
            break
        parts.append(part)
        done += len(part)
    return b"".join(parts)


class LocalStore(Store):
    """Files under a root directory. ``durable=False`` skips fsync (tests, scratch space)."""

    def __init__(self, root: str, *, durable: bool = True) -> None:
        self.root = os.path.abspath(root)
        self.url = f"file://{self.root}"
        self.durable = durable

    def _path(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/") or "\0" in key:
            raise StoreError(f"{self.url}: invalid key {key!r}")
        return os.path.join(self.root, key) if key else self.root

    def _open_regular(self, key: str) -> int:
        """A read-only descriptor of ``key``, refusing anything but a regular file inside the
        root: no component below the root may be a symbolic link (each is opened with
        ``O_NOFOLLOW`` relative to its parent), and FIFOs, devices, sockets and directories
        are refused without blocking (``O_NONBLOCK``; the type is checked with ``fstat``).
        The root itself may be a link: it is the caller's choice, not the checkpoint's."""
        self._path(key)  # validates the key
        parts = key.split("/")
        nofollow = os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            parent = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise KeyNotFoundError(f"{self.url}: no such file {key!r}") from None
        try:
            for part in parts[:-1]:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | nofollow, dir_fd=parent)
                os.close(parent)
                parent = child
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NONBLOCK | nofollow, dir_fd=parent)
        except FileNotFoundError:
            raise KeyNotFoundError(f"{self.url}: no such file {key!r}") from None
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                raise NotARegularFileError(
                    f"{self.url}: {key!r} is or lies under a symbolic link or a non-directory; "
                    "checkpoints are read only from regular files inside their root"
                ) from None
            raise StoreError(f"{self.url}: cannot open {key!r}: {exc.strerror}") from None
        finally:
            os.close(parent)
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise NotARegularFileError(
                f"{self.url}: {key!r} is not a regular file ({_file_kind(mode)}); "
                "checkpoints are read only from regular files"
            )
        return fd

    def read(self, key: str, byte_range: ByteRange | None = None) -> bytes:
        fd = self._open_regular(key)
        try:
            if byte_range is None:
                return _read_all(fd, os.fstat(fd).st_size)
            return os.pread(fd, byte_range.length, byte_range.start)
        except OSError as exc:
            raise StoreError(f"{self.url}: reading {key!r} failed: {exc.strerror}") from None
        finally:
            os.close(fd)

    def read_into(self, key: str, offset: int, out: memoryview) -> None:
        fd = self._open_regular(key)
        try:
            view = memoryview(out).cast("B")
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], offset + done)
                if n == 0:
                    raise TruncatedFileError(
                        f"{self.url}/{key}: file ends at byte {offset + done}, "
                        f"expected at least {offset + len(view)} bytes"
                    )
                done += n
        except OSError as exc:
            raise StoreError(f"{self.url}: reading {key!r} failed: {exc.strerror}") from None
        finally:
            os.close(fd)

    def map(self, key: str) -> memoryview | None:
        fd = self._open_regular(key)
        try:
            if os.fstat(fd).st_size == 0:
                return memoryview(b"")
            # A private writable mapping: tensors made over it are writable, and since
            # nothing writes to it, no page is ever copied.
            mapped = mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise StoreError(f"{self.url}: cannot map {key!r}: {exc.strerror}") from None
        finally:
            os.close(fd)
        return memoryview(mapped)

    def open_writer(self, key: str) -> StoreWriter:
        return _LocalWriter(self._path(key), self.durable)

    def write_volatile(self, key: str, data: bytes) -> None:
        """Replace ``key`` atomically (temp file + rename) without fsync: for bookkeeping
        that may be lost in a crash, never for checkpoint data or manifests."""
        with _LocalWriter(self._path(key), durable=False) as writer:
            writer.write(data)

    def write_if_absent(self, key: str, data: bytes) -> None:
        path = self._path(key)
        directory = os.path.dirname(path)
        _make_dirs(directory, self.durable)
        tmp = os.path.join(directory, f"{_TMP_MARK}{os.path.basename(path)}.{uuid.uuid4().hex[:8]}")
        try:  # the temporary file goes whatever happens (a full disk included)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                if self.durable:
                    os.fsync(f.fileno())
            # link() fails if the target exists: an atomic create-if-absent with full content.
            os.link(tmp, path)
        except FileExistsError:
            raise KeyExistsError(f"{self.url}: {key!r} already exists") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if self.durable:
            _fsync_dir(directory)

    def size(self, key: str) -> int:
        fd = self._open_regular(key)
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def list(self, prefix: str = "") -> Iterator[str]:
        if not os.path.isdir(self.root):
            return
        for dirpath, _dirs, files in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            for name in files:
                key = name if rel == "." else f"{rel}/{name}".replace(os.sep, "/")
                # In-progress writes (temp files) are listed too: leftovers of a killed
                # save are visible, so they mark a checkpoint incomplete and can be deleted.
                if key.startswith(prefix):
                    yield key

    def list_children(self, prefix: str = "") -> Iterator[str]:
        directory = os.path.join(self.root, prefix) if prefix else self.root
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in entries:
            yield entry.name + "/" if entry.is_dir(follow_symlinks=False) else entry.name

    reads_are_local = True

    def is_temporary(self, key: str) -> bool:
        return key.rsplit("/", 1)[-1].startswith(_TMP_MARK)

    def prune_empty_dirs(self, prefix: str) -> None:
        """Remove the directories under ``prefix`` (itself included) that hold no file:
        directories are local-filesystem bookkeeping that object stores do not have."""
        top = os.path.join(self.root, prefix)
        for dirpath, _dirs, _files in sorted(os.walk(top), key=lambda w: -len(w[0])):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)

    def list_details(self, prefix: str = "") -> Iterator[ObjectInfo]:
        for key in self.list(prefix):
            try:
                st = os.stat(self._path(key))
            except FileNotFoundError:
                continue
            yield ObjectInfo(key, st.st_size, st.st_mtime)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(key))
