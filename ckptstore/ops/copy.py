"""Copying a committed checkpoint between stores or tiers (``ckpt cp``).

Data files are streamed in parallel (``jobs`` at a time, in pieces of ``piece_bytes``), every
chunk is then verified against its crc32c at the destination, and the manifest is written
last, atomically: an interrupted or failed copy leaves no checkpoint at the destination.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ckptstore.backends.base import ByteRange, Store
from ckptstore.errors import ChecksumError, StoreError
from ckptstore.format.commit_point import (
    commit_manifest,
    delete_replaced,
    read_manifest_bytes,
    refuse_existing,
    store_for,
)
from ckptstore.format.manifest import Manifest
from ckptstore.format.verify import verify_checkpoint


@dataclass(frozen=True)
class CopyInfo:
    src: str
    dst: str
    files: int
    bytes: int


def copy_checkpoint(
    src: str | os.PathLike[str] | Store,
    dst: str | os.PathLike[str] | Store,
    *,
    jobs: int = 8,
    overwrite: bool = False,
    piece_bytes: int = 16 << 20,
    src_options: dict[str, Any] | None = None,
    dst_options: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> CopyInfo:
    """Copy the committed checkpoint at ``src`` to ``dst``; returns what was copied.

    Raises:
        CheckpointExistsError: ``dst`` already holds a committed checkpoint (and not overwrite).
        ChecksumError: a chunk does not match its checksum at the destination (the copied
            files are removed; no manifest is written).
    """
    source = store_for(src, src_options)
    target = store_for(dst, dst_options)
    raw = read_manifest_bytes(source)
    manifest = Manifest.from_json(raw, where=source.url, store=source).with_index(source)
    refuse_existing(target, overwrite=overwrite)

    def copy_file(key: str, size: int) -> int:
        with target.open_writer(key) as writer:
            for lo in range(0, size, piece_bytes):
                hi = min(lo + piece_bytes, size)
                piece = source.read(key, ByteRange(lo, hi))
                if len(piece) != hi - lo:
                    raise StoreError(
                        f"{source.url}/{key}: the file ends before byte {hi}; the manifest uses "
                        f"{size} bytes of it (truncated?)"
                    )
                writer.write(piece)
                if progress:
                    progress(len(piece))
        return size

    # Only the files the chunks and pickled objects use, up to the last byte they use: a
    # file the manifest lists but nothing reads is not copied (it could be anything).
    used = [(k, n) for k, n in zip(manifest.files, manifest.file_extents(), strict=True) if n]
    try:
        with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="ckptstore-copy") as pool:
            sizes = list(pool.map(copy_file, *zip(*used, strict=True))) if used else []
        report = verify_checkpoint(target, manifest, jobs=jobs)
    except BaseException:
        for key, _ in used:
            target.delete(key)
        raise
    if not report.ok:
        for key, _ in used:
            target.delete(key)
        bad = sorted({b.entry for b in report.bad})
        raise ChecksumError(
            f"copy {source.url} -> {target.url}: {len(report.bad)} chunk(s) fail their checksum "
            f"({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}); nothing was committed",
            bad=bad,
        )
    replaced = commit_manifest(target, raw, overwrite=overwrite)
    delete_replaced(target, replaced, manifest)
    return CopyInfo(source.url, target.url, len(used), sum(sizes))
