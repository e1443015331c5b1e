"""Every tunable in one place: explicit argument > environment variable > default."""

from __future__ import annotations

import os

_MiB = 1 << 20


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw else default


def checksum_block_bytes() -> int:
    """Bytes covered by one crc32c; partial reads verify only the blocks they touch."""
    return _env_int("CKPTSTORE_CHECKSUM_BLOCK_BYTES", 4 * _MiB)


def files_per_rank() -> int:
    """Data files (and writer threads) per rank for one save."""
    return _env_int("CKPTSTORE_FILES_PER_RANK", 1)


def pack_bytes() -> int:
    """Chunks smaller than this are packed into one buffer before being written."""
    return _env_int("CKPTSTORE_PACK_BYTES", 1 * _MiB)


def read_threads() -> int:
    """Parallel reader threads per rank on load.

    Default: the node's cores shared among its ranks (``LOCAL_WORLD_SIZE``, set by torchrun),
    at least 1 and at most 8. Local reads are CPU-bound (checksum + copy), so more threads
    than cores only add contention; remote stores (latency-bound) set their own.
    """
    local_ranks = max(1, _env_int("LOCAL_WORLD_SIZE", 1))
    return _env_int("CKPTSTORE_READ_THREADS", max(1, min(8, (os.cpu_count() or 1) // local_ranks)))


def manifest_broadcast_min_ranks() -> int:
    """From this many ranks on, one rank reads the manifest and broadcasts it (local stores).

    Below it every rank reads the manifest itself, which saves a collective. Remote stores
    always broadcast, so that a large job does not fetch the same object once per rank.
    """
    return _env_int("CKPTSTORE_MANIFEST_BROADCAST_MIN_RANKS", 32)


def read_window_bytes() -> int:
    """Largest single read; bigger regions are split (bounded memory on load)."""
    return _env_int("CKPTSTORE_READ_WINDOW_BYTES", 16 * _MiB)


def spread_prefixes() -> int:
    """Key prefixes a save spreads its data files over on object stores (and tiered paths),
    where request rates are limited per prefix (S3: ~5,500 GET/s): ``data/<hh>/``. 1 turns
    spreading off; this node's disk never spreads. At most 256."""
    return max(1, min(256, _env_int("CKPTSTORE_SPREAD_PREFIXES", 64)))


def share_reads() -> str:
    """``auto`` (default): on a load, ranks that need the same bytes (data-parallel replicas)
    read each byte once from the store and pass it on, for stores that are not this node's
    disk; ``on``: for every store; ``off``: every rank reads all it needs itself."""
    raw = os.environ.get("CKPTSTORE_SHARE_READS", "auto").strip().lower()
    if raw not in ("auto", "on", "off"):
        raise ValueError(f"CKPTSTORE_SHARE_READS must be auto, on or off, not {raw!r}")
    return raw


def shared_read_round_bytes() -> int:
    """Bytes each rank reads per round of a shared read before passing them on (it holds
    this much twice: its own share and one received share)."""
    return _env_int("CKPTSTORE_SHARED_READ_ROUND_BYTES", 128 * _MiB)


def coalesce_gap_bytes() -> int:
    """Two byte ranges of one file closer than this are read as one."""
    return _env_int("CKPTSTORE_COALESCE_GAP_BYTES", 256 * 1024)


def plan_cache_size() -> int:
    return _env_int("CKPTSTORE_PLAN_CACHE_SIZE", 8)


def max_checkpoint_bytes() -> int:
    """Largest total a manifest may declare (tensor bytes, or stored bytes): a bound on what
    one crafted manifest can make a reader allocate or read. Default 1 PiB."""
    return _env_int("CKPTSTORE_MAX_CHECKPOINT_BYTES", 1 << 50)


def max_manifest_bytes() -> int:
    """Largest manifest file a reader accepts (a 16,384-rank manifest is ~50 MB). 1 GiB."""
    return _env_int("CKPTSTORE_MAX_MANIFEST_BYTES", 1 << 30)


def collective_timeout_s() -> float:
    """Longest wait of any ckptstore collective (its own gloo groups), so that a dead rank
    becomes an error in minutes, not at the job's process-group timeout. Default 300 s."""
    raw = os.environ.get("CKPTSTORE_COLLECTIVE_TIMEOUT_S")
    return float(raw) if raw else 300.0


def save_lease_s() -> float:
    """How long a save in flight is protected from ``ckpt gc``, whatever ``--older-than``
    says: its marker is younger than this. A killed save's leftovers are collected after it.
    Default 6 h (a save takes minutes)."""
    raw = os.environ.get("CKPTSTORE_SAVE_LEASE_S")
    return float(raw) if raw else 6 * 3600.0


def index_min_chunks() -> int:
    """From this many chunks on, a save writes its chunk table as a separate chunk index
    (format 4) that each rank reads only in part; smaller checkpoints keep it inline."""
    return _env_int("CKPTSTORE_INDEX_MIN_CHUNKS", 262_144)


def index_part_chunks() -> int:
    """Chunks per part of a chunk index: the unit a loading rank fetches and verifies."""
    return max(1, min(1 << 20, _env_int("CKPTSTORE_INDEX_PART_CHUNKS", 1024)))


def compiled_fields() -> bool:
    """Read many tensors' fields (flattening a state_dict, planning a load) with the compiled
    helper where it is built (``0``: Python passes, e.g. to compare the two)."""
    return os.environ.get("CKPTSTORE_COMPILED_FIELDS", "1").strip() not in ("0", "false", "no")


def compiled_copy() -> bool:
    """Verify and copy loaded chunks with the compiled helper where it is built (``0``: the
    Python loop, e.g. to compare the two)."""
    return os.environ.get("CKPTSTORE_COMPILED_COPY", "1").strip() not in ("0", "false", "no")
