"""Typed errors raised by ckptstore.

Every error says what was expected, what was found, and names the checkpoint,
tensor (key) or file involved, so that a failed save or load can be acted on
without reading the source.
"""

from __future__ import annotations


class CkptStoreError(Exception):
    """Base class of every error ckptstore raises on purpose."""


class StoreError(CkptStoreError):
    """A storage backend could not complete an operation."""


class StoreAccessError(StoreError):
    """The store refused for a reason no retry can fix: credentials missing or wrong, access
    denied, the bucket does not exist. Raised at once, naming the URL and the cause."""


class KeyNotFoundError(StoreError, KeyError):
    """A key (file) that was expected in a store is not there."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "key not found"


class TruncatedFileError(StoreError):
    """A stored file ends before the bytes a checkpoint's manifest places in it."""


class NotARegularFileError(StoreError):
    """A key is a symbolic link out of the checkpoint, a FIFO, a device or a directory:
    checkpoints are read only from regular files inside their root."""


class KeyExistsError(StoreError):
    """A write-if-absent found the key already present (another writer won)."""


class UnsupportedURLError(StoreError):
    """No backend is registered for a URL scheme (or its package is missing)."""


class CheckpointNotFoundError(CkptStoreError):
    """The path holds no checkpoint at all."""


class EntryNotFoundError(CkptStoreError, KeyError):
    """A name asked of a checkpoint is not one of its entries; ``suggestions`` holds the
    nearest names it does hold."""

    def __init__(self, message: str, name: str, suggestions: list[str]) -> None:
        super().__init__(message)
        self.name, self.suggestions = name, suggestions

    def __str__(self) -> str:  # the message, not KeyError's repr of it
        return str(self.args[0])


class IncompleteCheckpointError(CkptStoreError):
    """The path holds data files but no committed manifest: the save never finished."""


class CheckpointExistsError(CkptStoreError):
    """A committed checkpoint already exists at the path and overwrite was not requested."""


class ManifestError(CkptStoreError):
    """The manifest is truncated, malformed, or of an unsupported format version."""


class ChecksumError(CkptStoreError):
    """Bytes read back do not match the crc32c recorded at save time."""

    def __init__(self, message: str, bad: list[str] | None = None) -> None:
        super().__init__(message)
        self.bad = bad or []


class CorruptDataError(CkptStoreError):
    """Stored bytes passed their checksum but are not what the manifest says they are
    (a compressed chunk that does not decode to its tensor's size): a damaged or crafted
    checkpoint. Nothing of it reaches a tensor."""


class UnsafeCopyError(CkptStoreError):
    """A raw copy would have read or written outside its buffer. Validation should have
    refused the manifest first; this last check keeps a bug from becoming memory corruption."""


class AllocationError(CkptStoreError, MemoryError):
    """Memory for a tensor the checkpoint declares could not be allocated."""


class StateDictError(CkptStoreError):
    """The state_dict given to save or load is not acceptable (unsupported leaf, name clash)."""


class LoadMismatchError(CkptStoreError):
    """Keys, shapes or dtypes of the caller's state_dict do not match the checkpoint.

    Raised before any tensor is written; ``problems`` lists every offending key.
    """

    def __init__(self, message: str, problems: list[str]) -> None:
        super().__init__(message)
        self.problems = problems


class PickleNotAllowedError(CkptStoreError):
    """An object needs pickle (on save or load) and the caller did not opt in."""


class ShardingError(CkptStoreError):
    """The shards declared by the ranks do not tile their tensor (overlap or gap)."""


class WorldSizeMismatchError(CkptStoreError):
    """Per-rank values were saved from a different world size than the loading job's."""


class SaveError(CkptStoreError):
    """A save failed on some rank; the checkpoint was not committed."""


class ReplicationError(CkptStoreError):
    """Copying a checkpoint from the local tier to the shared tier failed.

    The local (tier-0) checkpoint is intact and loadable; the replication can be retried
    (``CheckpointManager.replicate()``, ``ckptstore.tiers.upload`` or ``ckpt cp``).
    """


class ConversionError(CkptStoreError):
    """An export or import cannot represent something (a dtype, a layout, a file's content)."""


def typed(exc: Exception, where: str) -> CkptStoreError:
    """``exc`` as a ckptstore error (an I/O error is a :class:`StoreError`); anything that
    reaches a caller through a collective is typed, with the original as its cause."""
    if isinstance(exc, CkptStoreError):
        return exc
    kind = StoreError if isinstance(exc, OSError) else CkptStoreError
    out = kind(f"{where}: {type(exc).__name__}: {exc}")
    out.__cause__ = exc
    return out


DAMAGED_CONTENT = (ManifestError, ChecksumError, CorruptDataError, UnsafeCopyError)
"""Errors that mean a checkpoint's content is damaged or crafted (``ckpt`` exits with 1)."""
