"""Every backend passes the same Store conformance suite."""

from __future__ import annotations

import os
import uuid

import pytest

from ckptstore.backends import FsspecStore, LocalStore, MemoryStore, open_store
from ckptstore.backends.base import Store
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
