"""The Store conformance suite: every backend's test file subclasses :class:`StoreTests`.

A subclass provides the ``store`` fixture (an empty store) and ``raw_get``, which reads a
key *around* the store under test (its own client or the filesystem), so that what the
store claims to have written is really checked.
"""

from __future__ import annotations

import threading

import pytest

from ckptstore.backends.base import ByteRange, Store
from ckptstore.errors import KeyExistsError, KeyNotFoundError


class StoreTests:
    """Subclass and define the ``store`` fixture and :meth:`raw_get`."""

    def raw_get(self, store: Store, key: str) -> bytes:
        raise NotImplementedError

    def test_write_read_roundtrip(self, store: Store) -> None:
        store.write("a/b/c.bin", b"hello world")
        assert store.read("a/b/c.bin") == b"hello world"
        assert self.raw_get(store, "a/b/c.bin") == b"hello world"

    def test_read_range(self, store: Store) -> None:
        data = bytes(range(256)) * 10
        store.write("x", data)
        assert store.read("x", ByteRange(10, 20)) == data[10:20]
        assert store.read("x", ByteRange(0, len(data))) == data
        assert store.read("x", ByteRange(2550, 2560)) == data[2550:2560]

    def test_read_into(self, store: Store) -> None:
        data = bytes(range(200))
        store.write("x", data)
        out = bytearray(50)
        store.read_into("x", 100, memoryview(out))
        assert bytes(out) == data[100:150]

    def test_missing_key(self, store: Store) -> None:
        with pytest.raises(KeyNotFoundError):
            store.read("nope")
        with pytest.raises(KeyNotFoundError):
            store.size("nope")
        assert not store.exists("nope")

    def test_size_exists(self, store: Store) -> None:
        store.write("k", b"12345")
        assert store.size("k") == 5
        assert store.exists("k")

    def test_overwrite_replaces(self, store: Store) -> None:
        store.write("k", b"old old old")
        store.write("k", b"new")
        assert store.read("k") == b"new"

    def test_streaming_writer_commit(self, store: Store) -> None:
        writer = store.open_writer("big")
        for i in range(10):
            writer.write(bytes([i]) * 1000)
        assert not store.exists("big"), "a writer's key must not be visible before commit"
        writer.commit()
        assert self.raw_get(store, "big") == b"".join(bytes([i]) * 1000 for i in range(10))

    def test_streaming_writer_parts_in_order(self, store: Store) -> None:
        """``write_parts`` appends its buffers in order, between plain writes: more buffers
        than one gathering write takes, empty ones, bytes and memoryviews of tensors' size."""
        parts = [bytes([i % 251]) * (i % 7) for i in range(3000)]
        parts[5:9] = [memoryview(b"\x01\x02" * 2048), b"", memoryview(b""), b"tail"]
        writer = store.open_writer("parts")
        writer.write(b"head")
        writer.write_parts(parts)
        writer.write(b"end")
        writer.commit()
        want = b"head" + b"".join(bytes(p) for p in parts) + b"end"
        assert self.raw_get(store, "parts") == want

    def test_streaming_writer_abort_leaves_nothing(self, store: Store) -> None:
        store.write("keep", b"before")
        writer = store.open_writer("keep")
        writer.write(b"partial")
        writer.abort()
        assert store.read("keep") == b"before"
        assert sorted(store.list()) == ["keep"]

    def test_write_if_absent(self, store: Store) -> None:
        store.write_if_absent("m.json", b"first")
        with pytest.raises(KeyExistsError):
            store.write_if_absent("m.json", b"second")
        assert store.read("m.json") == b"first"

    def test_write_if_absent_race_has_one_winner(self, store: Store) -> None:
        winners: list[int] = []
        errors: list[BaseException] = []

        def attempt(i: int) -> None:
            try:
                store.write_if_absent("race.json", str(i).encode())
                winners.append(i)
            except KeyExistsError:
                pass
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert len(winners) == 1
        assert store.read("race.json") == str(winners[0]).encode()

    def test_list_and_prefix(self, store: Store) -> None:
        for key in ["data/0.bin", "data/1.bin", "manifest.json", "other/x"]:
            store.write(key, b"x")
        assert sorted(store.list()) == ["data/0.bin", "data/1.bin", "manifest.json", "other/x"]
        assert sorted(store.list("data/")) == ["data/0.bin", "data/1.bin"]
        assert list(store.list("zzz")) == []

    def test_list_children(self, store: Store) -> None:
        for key in ["step_1/manifest.json", "step_1/data/0.bin", "step_2/data/0.bin", "top"]:
            store.write(key, b"x")
        assert sorted(store.list_children("")) == ["step_1/", "step_2/", "top"]
        assert sorted(store.list_children("step_1/")) == ["data/", "manifest.json"]
        assert list(store.list_children("missing/")) == []

    def test_list_details(self, store: Store) -> None:
        store.write("a/b", b"12345")
        (info,) = list(store.list_details("a/"))
        assert (info.key, info.size) == ("a/b", 5)

    def test_delete(self, store: Store) -> None:
        store.write("a", b"1")
        store.write("b", b"2")
        store.delete("a")
        store.delete("a")  # deleting a missing key is fine
        assert sorted(store.list()) == ["b"]
        assert store.delete_prefix("") == 1
        assert list(store.list()) == []

    def test_empty_object(self, store: Store) -> None:
        store.write("empty", b"")
        assert store.read("empty") == b""
        assert store.size("empty") == 0

    # -- capabilities the core asks for ---------------------------------------------------
    def test_uncommitted_writes_list_as_temporary(self, store: Store) -> None:
        store.write("a/done.bin", b"x")
        writer = store.open_writer("a/pending.bin")
        writer.write(b"y" * 100)
        try:
            keys = set(store.list("a/"))
            assert "a/done.bin" in keys and not store.is_temporary("a/done.bin")
            assert "a/pending.bin" not in keys  # invisible until committed
            assert all(store.is_temporary(k) for k in keys - {"a/done.bin"}), keys
        finally:
            writer.abort()
        assert set(store.list("a/")) == {"a/done.bin"}

    def test_pruning_empty_directories_keeps_every_object(self, store: Store) -> None:
        store.write("s/data/x.bin", b"1")
        store.write("s/manifest.json", b"2")
        store.delete("s/data/x.bin")
        store.prune_empty_dirs("s")
        assert sorted(store.list()) == ["s/manifest.json"]
        assert store.read("s/manifest.json") == b"2"

    def test_tiers_and_fallback_agree(self, store: Store) -> None:
        tiers, fallback = store.tiers(), store.fallback_reader()
        assert (tiers is None) == (fallback is None)
        store.write("k", b"abcdef")
        if fallback is not None:  # a key only on this node's tier is not on the shared one
            with pytest.raises(KeyNotFoundError):
                fallback("k", 0, memoryview(bytearray(3)))
