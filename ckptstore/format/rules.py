"""The manifest's validation rules: every number checked against every other before a byte
moves. A manifest comes from storage and is untrusted (checkpoints are downloaded and
shared); whatever it claims, a reader must never copy outside a buffer, return bytes that
were not read, follow a name out of the checkpoint, or grow without bound.

The rules are listed in ``docs/format.md`` ("Validation"); each failure is a
:class:`~ckptstore.errors.ManifestError` naming the entry and the rule. The checks run as
array passes over the manifest's columns, so they cost little next to a load of tens of
thousands of tensors.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable
from typing import Any

import numpy as np

from ckptstore import knobs
from ckptstore.errors import ManifestError

MAX_BLOCK_BYTES = 1 << 30
"""Largest checksum block (the save default is 4 MiB)."""
MAX_CHUNKS = 1 << 48
MAX_NDIM = 64
MAX_DIM = 1 << 48
MAX_WORLD_SIZE = 1 << 24
MAX_NAME_CHARS = 1 << 16
MAX_VALUE_DEPTH = 64
"""Nesting of tuples in a stored value and of the caller's metadata."""

_BAD_NAME_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_FILE_KEY = re.compile(
    r"data/(?:[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}/)*[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}"
)


def fail(where: str, message: str) -> None:
    raise ManifestError(f"{where}: {message}")


def check_int(where: str, what: str, value: Any, lo: int, hi: int) -> int:
    """``value`` is an int (not a bool or float) in ``lo..hi``."""
    if type(value) is not int or not lo <= value <= hi:
        fail(where, f"{what} must be an integer in {lo}..{hi}, found {value!r}"[:300])
    return value


def check_keys(where: str, what: str, doc: Any, required: set[str], optional: set[str]) -> None:
    """``doc`` is an object with every ``required`` key and nothing outside ``optional``: a
    key this reader does not know could change what the bytes mean."""
    if not isinstance(doc, dict):
        fail(where, f"{what} must be an object, found {type(doc).__name__}")
    missing, unknown = required - doc.keys(), doc.keys() - required - optional
    if missing or unknown:
        fail(where, f"{what}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")


def bad_name(names: list[str]) -> str | None:
    """Why the first unacceptable name is refused, or None. Entry names are strings of
    printable characters (no NUL, control or escape characters -- a name is printed to
    terminals -- and no lone surrogates), at most ``MAX_NAME_CHARS`` long. One regex pass
    over all names joined, not one per name."""
    if not names:
        return None
    joined = "".join(names)
    if len(joined) > MAX_NAME_CHARS and max(map(len, names)) > MAX_NAME_CHARS:
        name = next(n for n in names if len(n) > MAX_NAME_CHARS)
        return f"name {name[:80]!r}... is longer than {MAX_NAME_CHARS} characters"
    if joined.isprintable():  # a C-level pass; stricter than the rule, so only a fast path
        return None
    bad = _BAD_NAME_CHARS.search(joined)
    if bad is None:
        return None
    name = next(n for n in names if _BAD_NAME_CHARS.search(n))
    return (
        f"name {name[:80]!r} holds the character {bad.group()!r} (control characters and "
        "lone surrogates are refused)"
    )


def check_names(where: str, kind: str, names: Iterable[Any]) -> None:
    names = list(names)
    if not set(map(type, names)) <= {str}:
        fail(where, f"{kind} names must be strings")
    problem = bad_name(names)
    if problem:
        fail(where, f"{kind} {problem}")


_KEY_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-/\n"
_LONG_PART = re.compile(r"[^/\n]{256}")


def _all_plain_keys(files: list[str]) -> bool:
    """Whether every key matches ``_FILE_KEY`` without ``..``: the same rules as string
    scans over all keys at once (a 100,000-rank checkpoint lists 100,000 files; one regex
    match per key would cost 100 ms). Each line of the joined keys starts with ``data/``;
    only allowed characters; no empty component, none starting with a dot, none longer
    than 255; no ``..``."""
    if not files:
        return True
    joined = "\n".join(files) + "\n"
    if not joined.isascii():
        return False
    raw = joined.encode("ascii")
    return (
        raw.startswith(b"data/")
        and raw.count(b"\ndata/") == len(files) - 1
        and not raw.translate(None, _KEY_CHARS)
        and b"//" not in raw
        and b"/\n" not in raw
        and b"/." not in raw
        and b".." not in raw
        and (max(map(len, files)) <= 260 or _LONG_PART.search(joined) is None)
    )


def check_file_keys(where: str, files: Any) -> list[str]:
    """Data file keys: ``data/...`` of plain path components (no ``..``, no absolute path,
    no backslash), unique."""
    if not isinstance(files, list) or not set(map(type, files)) <= {str}:
        fail(where, "files must be a list of strings")
    if not _all_plain_keys(files):  # the fast test failed: name the first bad key
        for key in files:
            if not _FILE_KEY.fullmatch(key) or ".." in key:
                fail(where, f"data file key {key[:120]!r} is not of the form data/NAME")
    if len(set(files)) != len(files):
        fail(where, "a data file is listed twice")
    return files


def check_value_depth(where: str, what: str, value: Any, depth: int = 0) -> None:
    """Stored values and metadata nest at most ``MAX_VALUE_DEPTH`` levels (a reader that
    walks them recursively must not run out of stack)."""
    if depth > MAX_VALUE_DEPTH:
        fail(where, f"{what} nests deeper than {MAX_VALUE_DEPTH} levels")
    if isinstance(value, dict):
        for v in value.values():
            check_value_depth(where, what, v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            check_value_depth(where, what, v, depth + 1)


def check_shape_sizes(
    where: str, dims: np.ndarray, ndims: np.ndarray, itemsizes: np.ndarray
) -> np.ndarray:
    """Bytes of each row (dims laid end to end, ``ndims[i]`` each), refusing any row whose
    size would not fit in 62 bits: element counts are products, so they are computed in
    floating point first (no silent int64 wrap-around), then exactly."""
    if len(ndims) and int(ndims.max()) > MAX_NDIM:
        fail(where, f"a tensor has more than {MAX_NDIM} dimensions")
    if len(dims) and int(dims.max()) > MAX_DIM:
        fail(where, f"a tensor dimension exceeds {MAX_DIM}")
    approx = row_numel(dims.astype(np.float64), ndims) * itemsizes
    if len(approx) and float(approx.max()) > float(1 << 62):
        fail(where, "a tensor's byte size overflows 62 bits")
    return row_numel(dims, ndims) * itemsizes


def check_shape(where: str, name: str, shape: tuple[int, ...], itemsize: int) -> None:
    """One shape (a per-rank tensor, a layout row): the rule of :func:`check_shape_sizes`
    with Python's exact integers, no array set-up per record."""
    if len(shape) > MAX_NDIM or (shape and (min(shape) < 0 or max(shape) > MAX_DIM)):
        fail(where, f"tensor {name!r}: shape {list(shape)[:8]} out of range")
    if math.prod(shape) * itemsize > 1 << 62:
        fail(where, f"tensor {name!r}: its byte size overflows 62 bits")


def row_numel(dims: np.ndarray, ndims: np.ndarray) -> np.ndarray:
    """Elements per row from the rows' dimensions laid end to end (``ndims[i]`` each), in
    ``dims``' dtype."""
    numel = np.ones(len(ndims), dtype=dims.dtype)
    has_dims = ndims > 0
    if len(dims):
        first = np.cumsum(ndims) - ndims
        numel[has_dims] = np.multiply.reduceat(dims, first[has_dims])
    return numel


def check_total(where: str, what: str, total: int) -> None:
    limit = knobs.max_checkpoint_bytes()
    if total > limit:
        fail(
            where,
            f"{what} total {total} bytes, above the limit of {limit} "
            "(CKPTSTORE_MAX_CHECKPOINT_BYTES)",
        )


def check_grid(where: str, name: str, starts: Any, shape: tuple[int, ...]) -> tuple:
    """A grid's chunk starts partition each dimension: ints, strictly increasing from 0,
    each below the dimension's size (a tensor without elements may have empty lists)."""
    if not isinstance(starts, list) or len(starts) != len(shape):
        fail(where, f"tensor {name!r}: grid must list chunk starts for each of {len(shape)} dims")
    empty = 0 in shape
    out = []
    for s, dim in zip(starts, shape, strict=True):
        if type(s) is not list or not all(type(x) is int for x in s):
            fail(where, f"tensor {name!r}: grid starts must be lists of integers")
        if not (empty and not s) and (
            not s
            or s[0] != 0
            or s[-1] >= max(dim, 1)
            or (len(s) > 1 and any(b <= a for a, b in itertools.pairwise(s)))
        ):
            fail(where, f"tensor {name!r}: grid starts {s[:8]} do not partition a dim of {dim}")
        out.append(tuple(s))
    return tuple(out)


def check_box_tiling(
    where: str, name: str, offsets: np.ndarray, shapes: np.ndarray, shape: tuple[int, ...]
) -> None:
    """Boxes lie inside the tensor and tile it exactly: no gap (which would return bytes that
    were never read), no overlap.

    Exactness is checked without comparing boxes pairwise: the sum of the boxes' indicator
    functions equals the tensor's iff their discrete mixed derivatives agree, and the
    derivative of a box is ±1 at each of its 2^k corners. So every box's corners are
    collected with signs, equal points summed, and what remains must be exactly the
    tensor's own corners. Only dimensions that some box cuts take part (k of them), so the
    cost is O(n 2^k log n) for n boxes: cheap for the one or two cut dims of real shardings.
    """
    n, nd = offsets.shape
    dims = np.asarray(shape, dtype=np.int64).reshape(nd)
    if n == 0:
        if 0 not in shape:
            fail(where, f"tensor {name!r}: no boxes for a tensor of shape {list(shape)}")
        return
    ends = offsets + shapes
    if (offsets < 0).any() or (shapes <= 0).any() or (ends > dims).any():
        fail(where, f"tensor {name!r}: a box lies outside shape {list(shape)} or is empty")
    cut = np.flatnonzero(~(np.all(offsets == 0, axis=0) & np.all(shapes == dims, axis=0)))
    k = len(cut)
    if k == 0:
        if n != 1:
            fail(where, f"tensor {name!r}: {n} boxes each cover the whole tensor (overlap)")
        return
    if k > 12:
        fail(where, f"tensor {name!r}: boxes cut {k} dimensions (at most 12 are supported)")
    lo, hi = offsets[:, cut], ends[:, cut]
    masks = np.arange(1 << k)
    bits = (masks[:, None] >> np.arange(k)[None, :]) & 1  # (2^k, k): take hi where bit set
    points = np.where(bits[:, None, :] == 1, hi[None, :, :], lo[None, :, :]).reshape(-1, k)
    signs = np.repeat(1 - 2 * (bits.sum(axis=1) & 1), n)
    order = np.lexsort(points.T[::-1])
    points, signs = points[order], signs[order]
    new = np.ones(len(points), dtype=bool)
    new[1:] = np.any(points[1:] != points[:-1], axis=1)
    starts = np.flatnonzero(new)
    weight = np.add.reduceat(signs, starts)
    left = weight != 0
    got = {
        (tuple(p), int(w))
        for p, w in zip(points[starts][left].tolist(), weight[left].tolist(), strict=True)
    }
    corner = bits * dims[cut][None, :]
    want = {
        (tuple(p), int(1 - 2 * (b.sum() & 1))) for p, b in zip(corner.tolist(), bits, strict=True)
    }
    if got != want:
        covered = int(np.prod(shapes, axis=1, dtype=np.float64).sum())
        problem = "overlap" if covered > math.prod(shape) else "leave gaps or overlap"
        fail(where, f"tensor {name!r}: its {n} boxes {problem} (they do not tile {list(shape)})")
