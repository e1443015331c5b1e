"""The chunk index of format 4: a large checkpoint's chunk table in its own file, in parts
that a loading rank reads only as far as its tensors need.

A checkpoint of a large job holds millions of chunks (Llama-3-405B with Adam on 16,384
ranks: 1.8 M; on 100,352 ranks: 11 M), and their table is most of what a manifest weighs.
From ``knobs.index_min_chunks()`` chunks on, a save writes the table into one index file
(listed among the data files, so that every tool that copies, replicates or collects files
handles it); ``manifest.json`` keeps a directory of it: the parts of ``part_chunks``
consecutive chunks, each part's byte range and its crc32c.

A part is the zlib-deflated columns of its chunks -- file index (``<i4``), offset and
stored size (``<i8``), each as the difference from the chunk before it (the first from 0):
consecutive cells of a sharded tensor lie in different ranks' files at about the same
offset and are the same size, so the differences are mostly zeros and compress to almost
nothing -- followed by the chunks' block checksums (``<u4``, stored as they are: checksums do
not compress). Every byte of a part is untrusted until its crc32c matches; it is then
inflated into a buffer of exactly the size its chunk count implies, and every value is
checked before any of it is used (``docs/format.md``, "The chunk index").
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import numpy as np

from ckptstore.backends.base import ByteRange, Store
from ckptstore.errors import KeyNotFoundError, ManifestError
from ckptstore.format import rules
from ckptstore.format.checksum import crc32c

MAX_PART_CHUNKS = 1 << 20
MAX_KEY_CHARS = 4096  # the longest data file key a name part may hold
_COLUMN_BYTES = 4 + 8 + 8  # file, offset, nbytes per chunk (inflated)
_READ_BYTES = 8 << 20  # the largest single read of consecutive parts


@dataclass(frozen=True)
class IndexDirectory:
    """Where the parts of a chunk index are: part ``p`` holds chunks
    ``[p * part_chunks, min(count, (p + 1) * part_chunks))`` and bytes ``at[p]..at[p + 1]``
    of file ``file``, the first ``deflated[p]`` of them zlib-compressed columns."""

    file: int
    count: int
    part_chunks: int
    at: np.ndarray  # int64, parts + 1
    deflated: np.ndarray  # int64, parts
    crc32c: np.ndarray  # uint32, parts
    key: str
    """The index file's key (also ``files[file]``): readable before any data file key."""
    stored_bytes: int
    """Stored bytes of all chunks (what ``ckpt ls`` shows without reading the index)."""
    names: NameDirectory | None = None
    """Where the data file keys are, when they are in the index file too."""

    @property
    def parts(self) -> int:
        return len(self.deflated)

    def chunks_of(self, part: int) -> int:
        return min(self.count, (part + 1) * self.part_chunks) - part * self.part_chunks

    def nbytes(self) -> int:
        """Bytes of the chunk parts (the file name parts, if any, follow them)."""
        return int(self.at[-1]) if len(self.at) else 0

    def file_bytes(self) -> int:
        """Bytes of the whole index file."""
        return int(self.names.at[-1]) if self.names is not None else self.nbytes()

    def to_json(self, pack: Any) -> dict[str, Any]:
        return {
            "file": self.file,
            "key": self.key,
            "stored_bytes": self.stored_bytes,
            "part_chunks": self.part_chunks,
            "at": pack(self.at, "<u8"),
            "deflated": pack(self.deflated, "<u4"),
            "crc32c": pack(self.crc32c, "<u4"),
        }

    @classmethod
    def from_json(
        cls, doc: Any, count: int, n_files: int, unpack: Any, where: str
    ) -> IndexDirectory:
        """Parse and check a directory: parts in order, back to back, each large enough for
        its columns and a whole number of checksums (one at least per chunk)."""
        rules.check_keys(
            where,
            "chunks.index",
            doc,
            {"file", "key", "stored_bytes", "part_chunks", "at", "deflated", "crc32c"},
            set(),
        )
        key = rules.check_file_keys(where, [doc["key"]])[0]
        stored = rules.check_int(
            where, "chunks.index.stored_bytes", doc["stored_bytes"], 0, 1 << 62
        )
        file = rules.check_int(where, "chunks.index.file", doc["file"], 0, n_files - 1)
        k = rules.check_int(
            where, "chunks.index.part_chunks", doc["part_chunks"], 1, MAX_PART_CHUNKS
        )
        at = unpack(doc["at"], "<u8").astype(np.int64)
        deflated = unpack(doc["deflated"], "<u4").astype(np.int64)
        crcs = unpack(doc["crc32c"], "<u4")
        parts = -(-count // k)
        if len(at) != parts + 1 or len(deflated) != parts or len(crcs) != parts:
            raise ManifestError(
                f"{where}: the chunk index directory does not describe {parts} parts of "
                f"{k} chunks for {count} chunks"
            )
        size = np.diff(at)
        chunks = np.minimum(count, (np.arange(parts) + 1) * k) - np.arange(parts) * k
        tail = size - deflated
        if (
            at[0] != 0
            or (at < 0).any()
            or int(at[-1]) > 1 << 62
            or (size < 0).any()
            or (deflated < 8).any()
            or (tail < 4 * chunks).any()
            or (tail % 4).any()
        ):
            raise ManifestError(f"{where}: the chunk index directory has impossible part sizes")
        return cls(file, count, k, at, deflated, crcs, key, stored)


def encode_index(
    file: np.ndarray,
    offset: np.ndarray,
    nbytes: np.ndarray,
    crcs: np.ndarray,
    crc_first: np.ndarray,
    part_chunks: int,
    index_file: int,
    key: str,
) -> tuple[bytes, IndexDirectory]:
    """The chunk parts of an index file and their directory, for a chunk table's columns."""
    count = len(file)
    pieces: list[bytes] = []
    at, deflated, sums = [0], [], []
    for lo in range(0, count, part_chunks):
        hi = min(count, lo + part_chunks)
        columns = b"".join(
            np.diff(col[lo:hi].astype(np.int64), prepend=0).astype(dtype).tobytes()
            for col, dtype in ((file, "<i4"), (offset, "<i8"), (nbytes, "<i8"))
        )
        packed = zlib.compress(columns, 1)
        part = packed + crcs[int(crc_first[lo]) : int(crc_first[hi])].astype("<u4").tobytes()
        pieces.append(part)
        deflated.append(len(packed))
        sums.append(crc32c(part))
        at.append(at[-1] + len(part))
    directory = IndexDirectory(
        index_file,
        count,
        part_chunks,
        np.array(at, dtype=np.int64),
        np.array(deflated, dtype=np.int64),
        np.array(sums, dtype=np.uint32),
        key,
        int(nbytes.sum()),
    )
    return b"".join(pieces), directory


@dataclass(frozen=True)
class PartColumns:
    """One part's chunks, decoded and checked."""

    file: np.ndarray
    offset: np.ndarray
    nbytes: np.ndarray
    crc32c: np.ndarray


def decode_part(
    data: bytes | memoryview,
    part: int,
    d: IndexDirectory,
    block: int,
    n_files: int,
    where: str,
) -> PartColumns:
    """Verify, inflate and check part ``part`` (``data`` is exactly its bytes)."""
    lo, hi = int(d.at[part]), int(d.at[part + 1])
    _check_bytes(data, hi - lo, int(d.crc32c[part]), f"chunk index part {part}", where)
    n = d.chunks_of(part)
    z = int(d.deflated[part])
    want = n * _COLUMN_BYTES
    inflater = zlib.decompressobj()
    try:  # inflated into at most the size its chunk count implies, never more
        columns = inflater.decompress(bytes(data[:z]), want)
    except zlib.error as exc:
        raise ManifestError(f"{where}: chunk index part {part} does not inflate: {exc}") from None
    if len(columns) != want or not inflater.eof or inflater.unconsumed_tail:
        raise ManifestError(
            f"{where}: chunk index part {part} does not inflate to exactly {want} bytes"
        )
    files = np.cumsum(np.frombuffer(columns, "<i4", n, 0).astype(np.int64))
    offsets = _bounded_sum(np.frombuffer(columns, "<i8", n, 4 * n), part, "offset", where)
    sizes = _bounded_sum(np.frombuffer(columns, "<i8", n, 12 * n), part, "size", where)
    if n and (files.min() < 0 or files.max() >= n_files or (files == d.file).any()):
        raise ManifestError(f"{where}: chunk index part {part} names a file outside files[]")
    if n and int((offsets + sizes).max()) > 1 << 62:
        raise ManifestError(f"{where}: chunk index part {part}: a chunk ends beyond 2^62 bytes")
    crcs = np.frombuffer(data, "<u4", offset=z).astype(np.uint32)
    blocks = np.maximum(1, -(-sizes // block))
    if int(blocks.sum()) != len(crcs):
        raise ManifestError(
            f"{where}: chunk index part {part} has {len(crcs)} checksums, its chunks need "
            f"{int(blocks.sum())}"
        )
    return PartColumns(files, offsets, sizes, crcs)


def _check_bytes(data: bytes | memoryview, size: int, crc: int, what: str, where: str) -> None:
    """A part of the index is exactly as long as its directory says and matches its crc32c."""
    if len(data) != size:
        raise ManifestError(f"{where}: {what} of the chunk index is truncated")
    if crc32c(data) != crc:
        raise ManifestError(f"{where}: {what} of the chunk index fails its crc32c: damaged")


def _bounded_sum(deltas: np.ndarray, part: int, what: str, where: str) -> np.ndarray:
    """Running sums of differences, every one in 0..2^62: with each difference below 2^62
    in magnitude, the first sum out of range is computed without overflow, so checking them
    all after the fact is exact."""
    if len(deltas) and int(np.abs(deltas).max()) >= 1 << 62:
        raise ManifestError(f"{where}: chunk index part {part}: a {what} is out of range")
    values = np.cumsum(deltas.astype(np.int64))
    if len(values) and (values.min() < 0 or values.max() > 1 << 62):
        raise ManifestError(f"{where}: chunk index part {part}: a {what} is out of range")
    return values


def read_parts(
    store: Store, key: str, at: np.ndarray, parts: Iterable[int], where: str
) -> dict[int, memoryview]:
    """The bytes of ``parts`` of the index file ``key`` (part ``p`` is bytes
    ``at[p]..at[p + 1]``): runs of consecutive parts in one read of at most 8 MiB, each part
    exactly as long as its directory says.

    Raises:
        ManifestError: the index file is missing or shorter than its directory.
    """
    wanted = sorted(set(parts))
    out: dict[int, memoryview] = {}
    i = 0
    while i < len(wanted):
        j = i + 1
        while (
            j < len(wanted)
            and wanted[j] == wanted[j - 1] + 1
            and int(at[wanted[j] + 1] - at[wanted[i]]) <= _READ_BYTES
        ):
            j += 1
        first, last = wanted[i], wanted[j - 1]
        lo, hi = int(at[first]), int(at[last + 1])
        try:
            data = store.read(key, ByteRange(lo, hi))
        except KeyNotFoundError:
            raise ManifestError(f"{where}: the chunk index {key} is missing") from None
        if len(data) != hi - lo:
            raise ManifestError(
                f"{where}: the chunk index {key} holds {lo + len(data)} bytes where its "
                f"directory needs {hi}: truncated?"
            )
        view = memoryview(data)
        for p in range(first, last + 1):
            out[p] = view[int(at[p]) - lo : int(at[p + 1]) - lo]
        i = j
    return out


def joined(parts: list[PartColumns], column: str, dtype: Any) -> np.ndarray:
    """One column of decoded parts, end to end."""
    arrays = [getattr(p, column) for p in parts]
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=dtype)


class _Mapped:
    """A column of the loaded parts, indexed by global chunk number (ints or arrays)."""

    def __init__(self, values: np.ndarray, base: np.ndarray, part_chunks: int, where: str):
        self.values = values
        self._base = base
        self._k = part_chunks
        self._where = where

    def rows(self, index: Any) -> Any:
        chunk = np.asarray(index, dtype=np.int64)
        part = chunk // self._k
        if chunk.size and (chunk.min() < 0 or part.max() >= len(self._base)):
            raise ManifestError(f"{self._where}: a chunk number outside the chunk table")
        base = self._base[part]
        if chunk.size and (base < 0).any():
            raise ManifestError(
                f"{self._where}: chunk {int(chunk.flat[np.argmin(base)])} was not read from the "
                "chunk index (a planning bug)"
            )
        return base + chunk - part * self._k

    def __getitem__(self, index: Any) -> Any:
        return self.values[self.rows(index)]


class IndexedChunks:
    """The parts of a chunk table a rank read: the columns a :class:`ChunkTable` has,
    indexed by global chunk number, holding only the chunks of the loaded parts."""

    def __init__(self, d: IndexDirectory, block: int, parts: dict[int, PartColumns], where: str):
        self.block_bytes = block
        self.directory = d
        self.loaded = sorted(parts)
        base = np.full(d.parts, -1, dtype=np.int64)
        row = 0
        for p in self.loaded:
            base[p] = row
            row += d.chunks_of(p)
        cols = [parts[p] for p in self.loaded]
        nbytes = joined(cols, "nbytes", np.int64)
        blocks = np.maximum(1, -(-nbytes // block))
        first = np.zeros(len(nbytes) + 1, dtype=np.int64)
        np.cumsum(blocks, out=first[1:])
        k = d.part_chunks
        self.file = _Mapped(joined(cols, "file", np.int64), base, k, where)
        self.offset = _Mapped(joined(cols, "offset", np.int64), base, k, where)
        self.nbytes = _Mapped(nbytes, base, k, where)
        self.crc_first = _Mapped(first[:-1], base, k, where)
        self.crc32c = joined(cols, "crc32c", np.uint32)
        self._count = d.count

    def __len__(self) -> int:
        return self._count

    def crc_range(self, chunk: int) -> tuple[int, int]:
        first = int(self.crc_first[chunk])
        return first, first + max(1, -(-int(self.nbytes[chunk]) // self.block_bytes))


def parts_of_chunks(chunks: np.ndarray, d: IndexDirectory) -> list[int]:
    """The parts that hold ``chunks`` (global chunk numbers)."""
    if not len(chunks):
        return []
    return np.unique(np.asarray(chunks, dtype=np.int64) // d.part_chunks).tolist()


# -- the data file names (format 4) ----------------------------------------------------------
@dataclass(frozen=True)
class NameDirectory:
    """Where the data file keys are in the index file: part ``q`` holds keys
    ``[q * per_part, min(count, (q + 1) * per_part))``, deflated, newline-terminated, at
    bytes ``at[q]..at[q + 1]``. The index file's own key is also in the manifest, so that
    it can be read before any name part."""

    count: int
    per_part: int
    at: np.ndarray  # int64, parts + 1
    crc32c: np.ndarray  # uint32, parts

    @property
    def parts(self) -> int:
        return len(self.crc32c)

    def names_of(self, part: int) -> int:
        return min(self.count, (part + 1) * self.per_part) - part * self.per_part

    def to_json(self, pack: Any) -> dict[str, Any]:
        return {
            "count": self.count,
            "per_part": self.per_part,
            "at": pack(self.at, "<u8"),
            "crc32c": pack(self.crc32c, "<u4"),
        }

    @classmethod
    def from_json(cls, doc: Any, unpack: Any, where: str) -> NameDirectory:
        rules.check_keys(where, "files", doc, {"count", "per_part", "at", "crc32c"}, set())
        count = rules.check_int(where, "files.count", doc["count"], 1, rules.MAX_CHUNKS)
        k = rules.check_int(where, "files.per_part", doc["per_part"], 1, MAX_PART_CHUNKS)
        at = unpack(doc["at"], "<u8").astype(np.int64)
        crcs = unpack(doc["crc32c"], "<u4")
        parts = -(-count // k)
        size = np.diff(at)
        if len(at) != parts + 1 or len(crcs) != parts:
            raise ManifestError(f"{where}: the file name directory does not describe {count} keys")
        if (at < 0).any() or int(at[-1]) > 1 << 62 or (size < 8).any():
            raise ManifestError(f"{where}: the file name directory has impossible part sizes")
        return cls(count, k, at, crcs)


def encode_names(files: list[str], per_part: int, start: int) -> tuple[bytes, NameDirectory]:
    """The name parts of ``files`` (placed from byte ``start`` of the index file)."""
    pieces, at, sums = [], [start], []
    for lo in range(0, len(files), per_part):
        part = zlib.compress("".join(f + "\n" for f in files[lo : lo + per_part]).encode(), 6)
        pieces.append(part)
        sums.append(crc32c(part))
        at.append(at[-1] + len(part))
    d = NameDirectory(len(files), per_part, np.array(at, np.int64), np.array(sums, np.uint32))
    return b"".join(pieces), d


def decode_names(data: bytes | memoryview, part: int, d: NameDirectory, where: str) -> list[str]:
    """Verify, inflate (at most what its key count allows) and check name part ``part``."""
    size = int(d.at[part + 1] - d.at[part])
    _check_bytes(data, size, int(d.crc32c[part]), f"file name part {part}", where)
    n = d.names_of(part)
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(bytes(data), n * (MAX_KEY_CHARS + 1))
    except zlib.error as exc:
        raise ManifestError(f"{where}: file name part {part} does not inflate: {exc}") from None
    if not inflater.eof or inflater.unconsumed_tail or not text.endswith(b"\n"):
        raise ManifestError(f"{where}: file name part {part} is not {n} whole keys")
    try:
        names = text.decode("ascii").split("\n")[:-1]
    except UnicodeDecodeError:
        raise ManifestError(f"{where}: file name part {part}: a key is not ASCII") from None
    if len(names) != n:
        raise ManifestError(f"{where}: file name part {part} holds {len(names)} keys, not {n}")
    rules.check_file_keys(where, names)
    return names


class FileNames(Sequence[str]):
    """The data file keys of a format-4 manifest, read from its index file part by part as
    they are used (a rank that restores needs a few of a 100,000-rank job's keys); every key
    is checked (``rules.check_file_keys``) before it is returned, and the whole list for
    duplicates when it is read whole."""

    def __init__(
        self, store: Store | None, index_key: str, index_pos: int, d: NameDirectory, where: str
    ) -> None:
        self._store, self._d, self._where = store, d, where
        self._key, self._pos = index_key, index_pos  # the index file's own key, known
        self._parts: dict[int, list[str]] = {}
        self._whole: list[str] | None = None
        self.fetched_bytes = 0  # of name parts read so far

    def __len__(self) -> int:
        return self._d.count

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return self.whole()[i]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"data file {i} of {len(self)}")
        if i == self._pos:  # checked against its name part when that part is read
            return self._key
        part = i // self._d.per_part
        if part not in self._parts:
            self._read([part])
        return self._parts[part][i - part * self._d.per_part]

    def __iter__(self) -> Iterator[str]:
        return iter(self.whole())

    def __repr__(self) -> str:
        return f"FileNames({len(self)} keys in {self._key})"

    def whole(self) -> list[str]:
        """Every key (all parts read), checked for duplicates."""
        if self._whole is None:
            self._read([q for q in range(self._d.parts) if q not in self._parts])
            keys = [k for q in range(self._d.parts) for k in self._parts[q]]
            if len(set(keys)) != len(keys):
                raise ManifestError(f"{self._where}: a data file is listed twice")
            self._whole = keys
        return self._whole

    def _read(self, parts: list[int]) -> None:
        if not parts:
            return
        if self._store is None:
            raise ManifestError(
                f"{self._where}: the data file list is in the chunk index; read the manifest "
                "with its store"
            )
        d = self._d
        for q, data in read_parts(self._store, self._key, d.at, parts, self._where).items():
            self.fetched_bytes += len(data)
            names = decode_names(data, q, d, self._where)
            first = q * d.per_part
            if first <= self._pos < first + len(names) and names[self._pos - first] != self._key:
                raise ManifestError(f"{self._where}: the chunk index is not at files[{self._pos}]")
            self._parts[q] = names
