"""Hostile checkpoints, and every reader run against them (the hostile-input suite).

A *case* starts from a valid reference checkpoint and changes it the way an attacker (or
bad luck) would: numbers in the manifest that disagree with each other, signed again so
that its checksum matches (the checksum detects damage, not intent); symbolic links out of
the root; FIFOs; directories where files belong; truncated files; names that are not
names. :func:`run_operations` then runs every reader on it -- ``open().read``, ``load``,
and the ``ckpt`` commands inspect, verify, diff, cp, reshard, export (three formats), ls and
gc -- each under a time limit, and reports per operation: ``ok``, ``typed`` (a ckptstore
error, or a CLI exit code 1/2 after one), ``untyped`` (any other exception: a bug),
``timeout`` or ``wrong`` (data returned that differs from the reference).

``python -m ckptstore.testing.hostile CASE GOOD WORK`` runs the operations in a fresh
process and prints one JSON object (with the process's peak memory), so that a crash, a
hang or a memory blow-up of one case cannot hide behind another.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import resource
import shutil
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ckptstore.format.checksum import block_crcs, crc32c
from ckptstore.format.manifest import MANIFEST_KEY, encode_manifest

OP_SECONDS = 15
SECRET = b"outside-the-checkpoint-root " * 64
"""Content of the file outside the root that symlink cases point at; no output may hold it."""


# -- manifest documents ------------------------------------------------------------------
def read_doc(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a local checkpoint as a JSON document (its checksum member removed)."""
    with open(os.path.join(checkpoint, MANIFEST_KEY), "rb") as f:
        doc = json.loads(f.read())
    doc.pop("checksum", None)
    return doc


def write_doc(checkpoint: str | os.PathLike[str], doc: dict[str, Any]) -> None:
    """Replace a local checkpoint's manifest with ``doc``, signed with a valid checksum."""
    doc = {k: v for k, v in doc.items() if k != "checksum"}
    with open(os.path.join(checkpoint, MANIFEST_KEY), "wb") as f:
        f.write(encode_manifest(doc))


def write_signed_text(checkpoint: str | os.PathLike[str], body: bytes) -> None:
    """Write a manifest from JSON text ``body`` (one object), signed: for texts that
    ``json.dumps`` cannot produce (deep nesting, invalid UTF-8)."""
    signed = body.rstrip()[:-1]
    with open(os.path.join(checkpoint, MANIFEST_KEY), "wb") as f:
        f.write(signed + b',"checksum":"crc32c:%08x"}' % crc32c(signed))


def unpack(text: str, dtype: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype).copy()


def pack(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode()


def chunk_of(doc: dict[str, Any], name: str) -> int:
    t = doc["tensors"]
    return t["chunk_starts"][t["names"].index(name)]


def stored_sizes(checkpoint: str, doc: dict[str, Any]) -> np.ndarray:
    """Every chunk's stored size (from the ``nbytes`` column, or derived by a reader)."""
    if "nbytes" in doc["chunks"]:
        return unpack(doc["chunks"]["nbytes"], "<u8").astype(np.int64)
    import ckptstore as cs

    return cs.open(checkpoint).manifest.chunks.nbytes.copy()


def resum(checkpoint: str, doc: dict[str, Any], nbytes: np.ndarray) -> None:
    """Set the ``nbytes`` column and recompute every chunk's checksums from the data files,
    as an attacker who wants the bytes to pass would."""
    c = doc["chunks"]
    files, offsets = unpack(c["file"], "<u4"), unpack(c["offset"], "<u8")
    crcs: list[int] = []
    for f, o, n in zip(files.tolist(), offsets.tolist(), nbytes.tolist(), strict=True):
        with open(os.path.join(checkpoint, doc["files"][f]), "rb") as fh:
            fh.seek(o)
            crcs += block_crcs(memoryview(fh.read(n)), c["block_bytes"])
    c["nbytes"] = pack(nbytes, "<u8")
    c["crc32c"] = pack(np.array(crcs, dtype=np.uint32), "<u4")


def layout_row(doc: dict[str, Any], name: str) -> dict[str, Any]:
    """The layout row of tensor ``name``, to edit; a tensor in the grid column of format 3
    is first moved to an equivalent layout row (a manifest may mix both forms)."""
    t = doc["tensors"]
    i = t["names"].index(name)
    if "grid_of" in t:
        grid_of = unpack(t["grid_of"], "<i4").copy()
        if grid_of[i] >= 0:
            t.setdefault("layouts", {})[str(i)] = {"grid": t["grids"][grid_of[i]]}
            grid_of[i] = -1
            t["grid_of"] = pack(grid_of, "<i4")
    return t["layouts"][str(i)]


def _boxes(doc: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    b = layout_row(doc, "boxes")["boxes"]
    n = b["count"]
    return b, unpack(b["offsets"], "<i8").reshape(n, 2), unpack(b["shapes"], "<i8").reshape(n, 2)


def _set_boxes(b: dict[str, Any], offs: np.ndarray, shps: np.ndarray) -> None:
    b["offsets"], b["shapes"] = pack(offs, "<i8"), pack(shps, "<i8")


def _rename(doc: dict[str, Any], old: str, new: str) -> None:
    names = doc["tensors"]["names"]
    names[names.index(old)] = new


# -- the cases ------------------------------------------------------------------------------
# Each takes (checkpoint directory, outside directory) and damages the checkpoint. The kind
# says which operations must fail: "manifest" (everything that opens it), "data" (everything
# that reads the damaged bytes), "pickle" (everything that would unpickle) or "harmless"
# (nothing may fail, nothing may leak).
# Cases marked ``compressed`` start from a reference saved with ``codec="zstd"``.
Mutation = Callable[[str, str], None]
CASES: dict[str, tuple[str, Mutation]] = {}
COMPRESSED: set[str] = set()


def case(kind: str, compressed: bool = False) -> Callable[[Mutation], Mutation]:
    def register(fn: Mutation) -> Mutation:
        CASES[fn.__name__] = (kind, fn)
        if compressed:
            COMPRESSED.add(fn.__name__)
        return fn

    return register


def _edit(fn: Callable[[dict[str, Any]], None]) -> Mutation:
    def mutate(ckpt: str, outside: str) -> None:
        doc = read_doc(ckpt)
        fn(doc)
        write_doc(ckpt, doc)

    mutate.__name__ = fn.__name__
    return mutate


def _resized(delta: int) -> Mutation:
    def mutate(ckpt: str, outside: str) -> None:
        doc = read_doc(ckpt)
        nbytes = stored_sizes(ckpt, doc)
        i = chunk_of(doc, "w")
        nbytes[i] += delta
        with open(os.path.join(ckpt, doc["files"][0]), "ab") as f:
            f.write(b"\xab" * max(delta, 0))  # the bytes are there: only the numbers lie
        resum(ckpt, doc, nbytes)
        write_doc(ckpt, doc)

    return mutate


CASES["nbytes_larger_than_tensor"] = ("manifest", _resized(4096))
CASES["nbytes_smaller_than_tensor"] = ("manifest", _resized(-64))


@case("manifest")
@_edit
def offset_near_2_64(doc: dict[str, Any]) -> None:
    offsets = unpack(doc["chunks"]["offset"], "<u8")
    offsets[chunk_of(doc, "w")] = (1 << 64) - 16
    doc["chunks"]["offset"] = pack(offsets, "<u8")


def _box_case(change: Callable[[np.ndarray, np.ndarray], None]) -> Callable:
    """A case that edits the offsets and shapes of the "boxes" tensor in place."""

    def mutate(doc: dict[str, Any]) -> None:
        b, offs, shps = _boxes(doc)
        change(offs, shps)
        _set_boxes(b, offs, shps)

    mutate.__name__ = change.__name__
    CASES[change.__name__] = ("manifest", _edit(mutate))
    return change


@_box_case
def box_negative_offset(offs: np.ndarray, shps: np.ndarray) -> None:
    offs[0, 0] -= 1


@_box_case
def box_past_the_end(offs: np.ndarray, shps: np.ndarray) -> None:
    shps[-1, 1] += 1


@_box_case
def box_gap(offs: np.ndarray, shps: np.ndarray) -> None:
    shps[0, 0] -= 1


@_box_case
def box_overlap_same_volume(offs: np.ndarray, shps: np.ndarray) -> None:
    offs[1] = offs[0]  # move one box onto another: the volume still adds up
    shps[1] = np.minimum(shps[1], shps[0])


@case("manifest")
@_edit
def grid_not_increasing(doc: dict[str, Any]) -> None:
    layout_row(doc, "grid")["grid"][0] = [0, 6, 3]


def _grid_index(doc: dict[str, Any], name: str, change: Callable[[int], int]) -> None:
    t = doc["tensors"]
    grid_of = unpack(t["grid_of"], "<i4").copy()
    i = t["names"].index(name)
    grid_of[i] = change(int(grid_of[i]))
    t["grid_of"] = pack(grid_of, "<i4")


@case("manifest")
@_edit
def grid_index_past_the_list(doc: dict[str, Any]) -> None:
    _grid_index(doc, "grid", lambda g: len(doc["tensors"]["grids"]))


@case("manifest")
@_edit
def grid_index_of_another_shape(doc: dict[str, Any]) -> None:
    """The grid tensor points at a grid that partitions a larger dim (chunks past its end)."""
    doc["tensors"]["grids"].append([[0, 1 << 20], [0]])
    _grid_index(doc, "grid", lambda g: len(doc["tensors"]["grids"]) - 1)


@case("manifest")
@_edit
def shape_overflow(doc: dict[str, Any]) -> None:
    doc["tensors"]["shapes"][doc["tensors"]["names"].index("w")] = [1 << 40, 1 << 40]


@case("manifest")
@_edit
def huge_block_bytes(doc: dict[str, Any]) -> None:
    doc["chunks"]["block_bytes"] = 1 << 34
    doc["tensors"]["shapes"][doc["tensors"]["names"].index("w")] = [3 << 28]


@case("data")
def big_declared_tensor_short_file(ckpt: str, outside: str) -> None:
    """A 3 GiB tensor in 1 GiB checksum blocks over a data file of a few KiB: refused when
    read, with memory bounded by what was actually read."""
    doc = read_doc(ckpt)
    doc["chunks"]["block_bytes"] = 1 << 30
    doc["tensors"]["shapes"][doc["tensors"]["names"].index("w")] = [3 << 28]
    crcs = unpack(doc["chunks"]["crc32c"], "<u4").tolist()  # one per chunk: all are small
    i = chunk_of(doc, "w")
    crcs[i : i + 1] = [0, 0, 0]
    doc["chunks"]["crc32c"] = pack(np.array(crcs, dtype=np.uint32), "<u4")
    write_doc(ckpt, doc)


@case("manifest")
@_edit
def huge_chunk_count(doc: dict[str, Any]) -> None:
    doc["chunks"]["count"] = 10**12


@case("manifest")
def json_nested_2000_deep(ckpt: str, outside: str) -> None:
    body = json.dumps(read_doc(ckpt), separators=(",", ":")).encode()
    deep = b'"metadata":' + b'{"a":' * 2000 + b"1" + b"}" * 2000
    write_signed_text(ckpt, body.replace(b'"metadata":{}', deep))


@case("manifest")
@_edit
def value_nested_100_deep(doc: dict[str, Any]) -> None:
    value: Any = 1
    for _ in range(100):
        value = {"tuple": [value]}
    doc["objects"]["x"] = {"value": value}


@case("manifest")
@_edit
def nul_in_name(doc: dict[str, Any]) -> None:
    _rename(doc, "b", "b\x00hidden")


@case("manifest")
@_edit
def terminal_escape_in_name(doc: dict[str, Any]) -> None:
    _rename(doc, "b", "b\x1b[2J\x1b[31mfake")


@case("manifest")
@_edit
def lone_surrogate_in_name(doc: dict[str, Any]) -> None:
    _rename(doc, "b", "b\ud800")


@case("manifest")
def not_utf8(ckpt: str, outside: str) -> None:
    body = json.dumps(read_doc(ckpt), separators=(",", ":")).encode()
    write_signed_text(ckpt, body.replace(b'"b"', b'"b\xff\xfe"', 1))


@case("manifest")
@_edit
def traversal_in_file_key(doc: dict[str, Any]) -> None:
    doc["files"][0] = "data/../../outside/secret.bin"


@case("manifest")
@_edit
def absolute_file_key(doc: dict[str, Any]) -> None:
    doc["files"][0] = "/etc/passwd"


@case("manifest")
@_edit
def file_index_out_of_range(doc: dict[str, Any]) -> None:
    files = unpack(doc["chunks"]["file"], "<u4")
    files[0] = 99
    doc["chunks"]["file"] = pack(files, "<u4")


@case("manifest")
@_edit
def two_tensors_share_a_chunk(doc: dict[str, Any]) -> None:
    """A second tensor of the same size pointing at "w"'s chunk: sizes agree, ownership not."""
    t = doc["tensors"]
    t["names"].append("w_alias")
    t["dtypes"].append("float32")
    t["shapes"].append([64, 32])
    t["chunk_starts"].append(chunk_of(doc, "w"))


@case("manifest")
@_edit
def per_rank_list_empty(doc: dict[str, Any]) -> None:
    doc["per_rank"]["pos"] = []


@case("manifest")
@_edit
def unknown_layout_key(doc: dict[str, Any]) -> None:
    layout_row(doc, "grid")["codex"] = "zstd"


@case("manifest")
@_edit
def unknown_codec(doc: dict[str, Any]) -> None:
    layout_row(doc, "grid")["codec"] = "zstdx"


@case("manifest")
@_edit
def codec_on_raw_bytes(doc: dict[str, Any]) -> None:
    layout_row(doc, "grid")["codec"] = "zstd"  # raw bytes read as compressed: no nbytes


@case("manifest", compressed=True)
def codec_dropped(ckpt: str, outside: str) -> None:
    """A compressed tensor whose codec is removed: its stored bytes would be read raw."""
    doc = read_doc(ckpt)
    nbytes = stored_sizes(ckpt, doc)
    i = doc["tensors"]["names"].index("w")
    doc["tensors"]["layouts"][str(i)] = {}
    resum(ckpt, doc, nbytes)
    write_doc(ckpt, doc)


@case("data", compressed=True)
def decompression_bomb(ckpt: str, outside: str) -> None:
    """A compressed chunk whose zstd frame declares 2^40 decoded bytes, checksums matching."""
    doc = read_doc(ckpt)
    nbytes = stored_sizes(ckpt, doc)
    i = chunk_of(doc, "w")
    offset = int(unpack(doc["chunks"]["offset"], "<u8")[i])
    frame = b"\x28\xb5\x2f\xfd" + bytes([0xC0]) + (1 << 40).to_bytes(8, "little") + b"\0" * 8
    path = os.path.join(ckpt, doc["files"][int(unpack(doc["chunks"]["file"], "<u4")[i])])
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(frame[: int(nbytes[i])])
    resum(ckpt, doc, nbytes)
    write_doc(ckpt, doc)


@case("pickle")
def unpickle_without_opt_in(ckpt: str, outside: str) -> None:
    """A plain value turned into a pickle record (valid checksums) whose bytes would run
    code: nothing may unpickle it without ``allow_pickle``."""
    doc = read_doc(ckpt)
    payload = b"cos\nsystem\n(S'touch /tmp/ckptstore-pwned'\ntR."
    path = os.path.join(ckpt, doc["files"][0])
    offset = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(payload)
    doc["objects"]["x"] = {
        "pickle": {"file": 0, "offset": offset, "nbytes": len(payload), "crc32c": [crc32c(payload)]}
    }
    write_doc(ckpt, doc)


@case("manifest")
def value_edited_without_signing(ckpt: str, outside: str) -> None:
    path = os.path.join(ckpt, MANIFEST_KEY)
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw.replace(b'"value":7', b'"value":8', 1))


def _outside_copy(ckpt: str, outside: str, rel: str) -> str:
    target = os.path.join(outside, "copy-of-" + rel.replace("/", "_"))
    src = os.path.join(ckpt, rel)
    (shutil.copytree if os.path.isdir(src) else shutil.copyfile)(src, target)
    return target


@case("data")
def symlinked_data_file(ckpt: str, outside: str) -> None:
    rel = read_doc(ckpt)["files"][0]
    target = _outside_copy(ckpt, outside, rel)  # identical bytes: checksums would pass
    os.remove(os.path.join(ckpt, rel))
    os.symlink(target, os.path.join(ckpt, rel))


@case("data")
def symlinked_data_dir(ckpt: str, outside: str) -> None:
    target = _outside_copy(ckpt, outside, "data")
    shutil.rmtree(os.path.join(ckpt, "data"))
    os.symlink(target, os.path.join(ckpt, "data"))


@case("manifest")
def symlinked_manifest(ckpt: str, outside: str) -> None:
    target = _outside_copy(ckpt, outside, MANIFEST_KEY)
    os.remove(os.path.join(ckpt, MANIFEST_KEY))
    os.symlink(target, os.path.join(ckpt, MANIFEST_KEY))


@case("harmless")
def unused_file_is_a_symlink(ckpt: str, outside: str) -> None:
    """The manifest lists one more file, used by no chunk, that links out of the root."""
    doc = read_doc(ckpt)
    doc["files"].append("data/extra.bin")
    os.symlink(os.path.join(outside, "secret.bin"), os.path.join(ckpt, "data", "extra.bin"))
    write_doc(ckpt, doc)


@case("manifest")
def fifo_manifest(ckpt: str, outside: str) -> None:
    os.remove(os.path.join(ckpt, MANIFEST_KEY))
    os.mkfifo(os.path.join(ckpt, MANIFEST_KEY))


@case("data")
def fifo_data_file(ckpt: str, outside: str) -> None:
    rel = read_doc(ckpt)["files"][0]
    os.remove(os.path.join(ckpt, rel))
    os.mkfifo(os.path.join(ckpt, rel))


@case("data")
def data_file_is_a_directory(ckpt: str, outside: str) -> None:
    rel = read_doc(ckpt)["files"][0]
    os.remove(os.path.join(ckpt, rel))
    os.mkdir(os.path.join(ckpt, rel))


@case("data")
def truncated_data_file(ckpt: str, outside: str) -> None:
    rel = read_doc(ckpt)["files"][0]
    path = os.path.join(ckpt, rel)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


# -- the reference checkpoint ---------------------------------------------------------------
def reference_state(rank: int, world: int) -> dict[str, Any]:
    """What every case starts from (3 ranks): a box layout (no grid), a grid, whole tensors of
    two dtypes, plain values and per-rank entries."""
    import torch

    import ckptstore as cs

    assert world == 3
    g = torch.arange(36, dtype=torch.float32).reshape(6, 6)
    boxes = [((0, 0), (3, 6)), ((3, 0), (3, 3)), ((3, 3), (3, 3))]  # not a grid
    (o0, o1), (n0, n1) = boxes[rank]
    grid = torch.arange(36, dtype=torch.float32).reshape(9, 4) * 0.5
    return {
        "boxes": cs.Sharded(g[o0 : o0 + n0, o1 : o1 + n1].clone(), (6, 6), (o0, o1)),
        "grid": cs.Sharded(grid[3 * rank : 3 * rank + 3].clone(), (9, 4), (3 * rank, 0)),
        "w": torch.linspace(-1, 1, 64 * 32).reshape(64, 32),
        "b": torch.arange(17, dtype=torch.bfloat16),
        "x": 7,
        "t": (1, "a"),
        "rng": cs.PerRank(torch.full((4,), rank, dtype=torch.int64)),
        "pos": cs.PerRank(rank),
    }


def save_reference(rank: int, world: int, path: str, codec: str | None) -> None:
    import ckptstore as cs

    cs.save(reference_state(rank, world), path, codec=codec)


# -- running every reader ---------------------------------------------------------------------
class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout


def _template(good: str) -> dict[str, Any]:
    """A state_dict shaped like the reference checkpoint, for a single-process load."""
    import torch

    import ckptstore as cs

    ck = cs.open(good)
    m = ck.manifest
    sd: dict[str, Any] = {
        n: torch.zeros(r.shape, dtype=ck.meta(n).dtype) for n, r in m.tensors.items()
    }
    sd.update({n: None for n in m.objects})
    sd.update({n: ck.read(n, rank=0) for n in m.per_rank})  # kept: the world size differs
    return sd


def _read_all(path: str, good: str) -> str:
    import torch

    import ckptstore as cs

    ck, ref = cs.open(path), cs.open(good)
    for name in ref.manifest.tensors:
        if not torch.equal(ck.read(name), ref.read(name)):
            return "wrong"
    for name in ref.manifest.objects:
        if ck.read(name) != ref.read(name):
            return "wrong"
    for name in ref.manifest.per_rank:
        for r in range(ref.world_size):
            a, b = ck.read(name, rank=r), ref.read(name, rank=r)
            if (a != b) if not hasattr(a, "shape") else not torch.equal(a, b):
                return "wrong"
    return "ok"


def _load(path: str, good: str) -> str:
    import torch

    import ckptstore as cs

    sd = _template(good)
    cs.load(sd, path, per_rank="keep")
    ref = _template(good)
    cs.load(ref, good, per_rank="keep")
    for name, value in ref.items():
        same = torch.equal(sd[name], value) if hasattr(value, "shape") else sd[name] == value
        if not same:
            return "wrong"
    return "ok"


def _cli(*argv: str) -> Callable[[], str]:
    def run() -> str:
        from ckptstore.cli.main import main

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            rc = main(list(argv))
        return "ok" if rc == 0 else "typed"

    return run


def operations(path: str, good: str, work: str) -> dict[str, Callable[[], str]]:
    root = os.path.dirname(path)
    out = lambda name: os.path.join(work, name)  # noqa: E731
    return {
        "read": lambda: _read_all(path, good),
        "load": lambda: _load(path, good),
        "inspect": _cli("inspect", path),
        "verify": _cli("verify", path),
        "diff": _cli("diff", path, good),
        "cp": _cli("cp", path, out("cp")),
        "reshard": _cli("reshard", path, out("reshard"), "--world-size", "2"),
        "export-safetensors": _cli("export", path, out("st"), "--format", "safetensors"),
        "export-torch": _cli("export", path, out("model.pt"), "--format", "torch"),
        "export-zarr": _cli("export", path, out("zarr"), "--format", "zarr"),
        "ls": _cli("ls", root),
        "gc": _cli("gc", root, "--older-than", "0s"),
    }


def run_operations(path: str, good: str, work: str) -> dict[str, Any]:
    """Every reader on the checkpoint at ``path`` (``good``: the reference it was made from)."""
    from ckptstore.errors import CkptStoreError

    signal.signal(signal.SIGALRM, _alarm)
    results: dict[str, Any] = {}
    for op, fn in operations(path, good, work).items():
        t0 = time.perf_counter()
        signal.alarm(OP_SECONDS)
        try:
            outcome, error = fn(), None
        except _Timeout:
            outcome, error = "timeout", None
        except CkptStoreError as exc:
            outcome, error = "typed", f"{type(exc).__name__}: {exc}"[:300]
        except BaseException as exc:  # the bug this suite is for
            outcome, error = "untyped", f"{type(exc).__name__}: {exc}"[:300]
        finally:
            signal.alarm(0)
        results[op] = {"outcome": outcome, "error": error, "seconds": time.perf_counter() - t0}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"ops": results, "max_rss_bytes": rss}


if __name__ == "__main__":
    print(json.dumps(run_operations(*sys.argv[1:4])))
