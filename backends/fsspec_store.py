"""Any fsspec filesystem as a Store (gcs://, az://, hdfs://, sftp://, ...).

``write_if_absent`` is as atomic as the filesystem allows: it uses exclusive create
(``mode="xb"``) where the implementation supports it, else check-then-write. Object
stores with conditional puts have dedicated backends (``s3://``).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import fsspec

from ckptstore.backends.base import ByteRange, Store, StoreWriter
from ckptstore.errors import KeyExistsError, KeyNotFoundError

TMP_MARK = ".tmp-"
"""Written files are staged as ``<key>.tmp-<random>`` and moved into place on commit."""


class _FsspecWriter(StoreWriter):
    def __init__(self, store: FsspecStore, key: str) -> None:
        self._store = store
        self._final = store._path(key)
        self._tmp = f"{self._final}{TMP_MARK}{uuid.uuid4().hex[:8]}"
        store.fs.makedirs(self._final.rsplit("/", 1)[0], exist_ok=True)
        self._file = store.fs.open(self._tmp, "wb")

    def write(self, data: memoryview | bytes) -> None:
        self._file.write(memoryview(data).cast("B"))

    def commit(self) -> None:
        self._file.close()
        self._store.fs.mv(self._tmp, self._final)

    def abort(self) -> None:
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self._store.fs.rm(self._tmp)


class FsspecStore(Store):
    def __init__(self, url: str, **storage_options: object) -> None:
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")
        self.url = url.rstrip("/")

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def is_temporary(self, key: str) -> bool:
        return TMP_MARK in key.rsplit("/", 1)[-1]

    def read(self, key: str, byte_range: ByteRange | None = None) -> bytes:
        path = self._path(key)
        try:
            if byte_range is None:
                return self.fs.cat_file(path)
            return self.fs.cat_file(path, start=byte_range.start, end=byte_range.end)
        except (FileNotFoundError, IsADirectoryError):
            raise KeyNotFoundError(f"{self.url}: no such key {key!r}") from None

    def open_writer(self, key: str) -> StoreWriter:
        return _FsspecWriter(self, key)

    def write_if_absent(self, key: str, data: bytes) -> None:
        path = self._path(key)
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        try:
            with self.fs.open(path, "xb") as f:
                f.write(data)
            return
        except FileExistsError:
            raise KeyExistsError(f"{self.url}: {key!r} already exists") from None
        except (NotImplementedError, ValueError):
            pass  # no exclusive create here: best effort below
        if self.fs.exists(path):
            raise KeyExistsError(f"{self.url}: {key!r} already exists")
        self.fs.pipe_file(path, data)

    def size(self, key: str) -> int:
        try:
            info = self.fs.info(self._path(key))
        except FileNotFoundError:
            raise KeyNotFoundError(f"{self.url}: no such key {key!r}") from None
        if info.get("type") == "directory":
            raise KeyNotFoundError(f"{self.url}: {key!r} is a directory")
        return int(info["size"])

    def list(self, prefix: str = "") -> Iterator[str]:
        if not self.fs.exists(self.root):
            return
        for path in self.fs.find(self.root):
            key = path[len(self.root) :].lstrip("/")
            if key.startswith(prefix):
                yield key

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._path(key))
