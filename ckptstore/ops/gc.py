"""Finding and removing what no checkpoint needs: incomplete checkpoints (a save that never
committed), data files a committed manifest does not name (leftovers of killed or replaced
saves), and temporary files of interrupted writes.

Two steps on purpose: :func:`find_garbage` lists, :func:`delete_garbage` deletes exactly the
listed keys and nothing else. Anything younger than ``older_than`` seconds is left alone: it
may belong to a save still in progress; so is any checkpoint whose save-in-flight marker is
younger than ``knobs.save_lease_s()``, whatever ``older_than`` says. Objects whose age the
backend cannot tell count as young unless ``older_than`` is 0.
"""

from __future__ import annotations

import os
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field

from ckptstore import knobs
from ckptstore.backends.base import ObjectInfo, PendingUpload, Store
from ckptstore.backends.registry import open_store
from ckptstore.errors import CkptStoreError
from ckptstore.format.commit_point import read_manifest_bytes
from ckptstore.format.manifest import DATA_PREFIX, MANIFEST_KEY, SAVING_KEY, Manifest

_STEP = re.compile(r"^(step_\d+)/")


@dataclass(frozen=True)
class GarbageItem:
    kind: str
    """``incomplete`` (a step without a manifest), ``orphan`` (a data file the manifest does
    not name), ``temp`` (a temporary file of an interrupted write) or ``upload`` (an
    unfinished multipart upload of a killed writer, which listings do not show)."""
    where: str
    """The step directory or file, relative to the root."""
    keys: tuple[str, ...] = field(repr=False)
    bytes: int
    age_s: float | None
    uploads: tuple[PendingUpload, ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class SkippedItem:
    """Something that looks like garbage but was left alone, and why."""

    kind: str
    where: str
    why: str


@dataclass
class GarbageSurvey:
    items: list[GarbageItem] = field(default_factory=list)
    skipped: list[SkippedItem] = field(default_factory=list)


def _age(objs: list[ObjectInfo], now: float) -> float | None:
    times = [o.modified_unix for o in objs]
    if not times or any(t is None for t in times):
        return None
    return now - max(t for t in times if t is not None)


class _Collector:
    """Candidates in, items or skipped (with the reason) out."""

    def __init__(self, older_than: float) -> None:
        self.now = time.time()
        self.older_than = older_than
        self.survey = GarbageSurvey()

    def age(self, objs: list[ObjectInfo]) -> float | None:
        return _age(objs, self.now)

    def consider(self, item: GarbageItem) -> None:
        if self.older_than <= 0 or (item.age_s is not None and item.age_s >= self.older_than):
            self.survey.items.append(item)
        elif item.age_s is None:
            why = "its age is unknown (the store reports no modification time): --older-than 0"
            self.skip(item.kind, item.where, why)
        else:
            why = f"younger ({_human_age(item.age_s)}) than --older-than {_human_age(self.older_than)}"
            self.skip(item.kind, item.where, why)

    def skip(self, kind: str, where: str, why: str) -> None:
        self.survey.skipped.append(SkippedItem(kind, where, why))

    def temps(self, store: Store, objs: list[ObjectInfo]) -> None:
        for o in objs:
            if store.is_temporary(o.key):
                self.consider(GarbageItem("temp", o.key, (o.key,), o.size, self.age([o])))


def _human_age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def find_garbage(
    root: str | os.PathLike[str] | Store, *, older_than: float = 3600.0, **storage_options
) -> list[GarbageItem]:
    """What under ``root`` (a CheckpointManager root, or one checkpoint) no checkpoint needs."""
    return survey_garbage(root, older_than=older_than, **storage_options).items


def survey_garbage(
    root: str | os.PathLike[str] | Store, *, older_than: float = 3600.0, **storage_options
) -> GarbageSurvey:
    """:func:`find_garbage`, plus what looked like garbage but was left alone, and why (a
    save in flight, too young, a corrupt manifest)."""
    store = open_store(root, **storage_options)
    found = _Collector(older_than)
    groups: dict[str, list[ObjectInfo]] = defaultdict(list)
    for obj in store.list_details(""):
        m = _STEP.match(obj.key)
        groups[m.group(1) + "/" if m else ""].append(obj)
    lease = knobs.save_lease_s()
    for prefix, objs in sorted(groups.items()):
        keys = {o.key for o in objs}
        where = prefix.rstrip("/") or "."
        marker = next((o for o in objs if SAVING_KEY in o.key.rsplit("/", 1)[-1]), None)
        if marker is not None:
            age = found.age([marker])
            if age is None or age < lease:  # a save is in flight here: whatever its age says
                found.skip("checkpoint", where, "a save is in flight (its marker is fresh)")
                continue
        if prefix and prefix + MANIFEST_KEY not in keys:
            if any(
                o.key.startswith(prefix + DATA_PREFIX) or store.is_temporary(o.key) for o in objs
            ):
                found.consider(
                    GarbageItem(
                        "incomplete",
                        prefix.rstrip("/"),
                        tuple(sorted(keys)),
                        sum(o.size for o in objs),
                        found.age(objs),
                    )
                )
            continue
        if not prefix and MANIFEST_KEY not in keys:  # a root that is not itself a checkpoint
            found.temps(store, objs)
            continue
        try:
            data = read_manifest_bytes(store, prefix)
            checkpoint = (
                open_store(f"{store.url.rstrip('/')}/{prefix.rstrip('/')}", **storage_options)
                if prefix
                else store
            )
            manifest = Manifest.from_json(data, where=store.url, store=checkpoint)
        except CkptStoreError as exc:  # a corrupt manifest is for a human to look at
            found.skip("checkpoint", where, f"its manifest does not parse ({exc}); see ckpt verify")
            continue
        live = {prefix + f for f in manifest.files}
        for o in objs:
            if (
                o.key.startswith(prefix + DATA_PREFIX)
                and o.key not in live
                and not store.is_temporary(o.key)
            ):
                found.consider(GarbageItem("orphan", o.key, (o.key,), o.size, found.age([o])))
        found.temps(store, objs)
    for up in store.list_uploads(""):
        age = None if up.started_unix is None else found.now - up.started_unix
        found.consider(GarbageItem("upload", up.key, (), 0, age, (up,)))
    return found.survey


def delete_garbage(
    root: str | os.PathLike[str] | Store, items: list[GarbageItem], **storage_options
) -> int:
    """Delete exactly the keys of ``items``; returns the bytes freed."""
    store = open_store(root, **storage_options)
    freed = 0
    for item in items:
        for key in item.keys:
            store.delete(key)
        for upload in item.uploads:
            store.abort_upload(upload)
        freed += item.bytes
    for item in items:
        if item.kind == "incomplete":
            store.prune_empty_dirs(item.where)
    return freed


def parse_duration(text: str) -> float:
    """``90s``, ``15m``, ``2h``, ``7d`` or plain seconds -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 2h, 7d)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
