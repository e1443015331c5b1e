"""Reading a GET's body straight into the caller's memory.

botocore's ``StreamingBody.readinto`` goes through urllib3, whose ``readinto`` reads a new
``bytes`` object and copies it into the buffer: on a restore from object storage that is one
more pass over every byte, and a fresh allocation for every ranged GET. botocore asks urllib3
for the raw body (``decode_content=False``), so the bytes urllib3 would return are exactly
those of the ``http.client`` response underneath it; where the body is that plain response,
untouched so far, this reads it from the socket into the caller's buffer directly (one copy,
by the kernel) and hands the connection back to the pool once the body is fully read.
Anything else -- another HTTP stack, a wrapper, a body partly read -- takes botocore's
public ``readinto``.

A connection whose body was not read to its end (an error, a short body, a buffer smaller
than the body) is closed, never returned to the pool half-read.
"""

from __future__ import annotations

import contextlib
import http.client
from collections.abc import Callable
from typing import Any

from botocore.response import StreamingBody

__all__ = ["read_body_into"]


def read_body_into(body: Any, into: memoryview) -> int:
    """Read ``body`` into ``into`` until it is full or the body ends; the bytes read."""
    raw = _plain_response(body)
    if raw is None:
        return _read_public(body, into)
    response: http.client.HTTPResponse = raw._fp
    try:
        got = _fill(response.readinto, into)
    except BaseException:
        _discard(raw)
        raise
    if response.isclosed() and not response.length:  # the whole body, nothing left unread
        raw.release_conn()
    else:
        _discard(raw)
    return got


def _plain_response(body: Any) -> Any:
    """The urllib3 response under ``body`` where reading its socket directly is what
    botocore's own read would do; ``None`` otherwise."""
    if type(body) is not StreamingBody:  # e.g. a checksum-validating wrapper: it must read
        return None
    raw = getattr(body, "_raw_stream", None)
    response = getattr(raw, "_fp", None)
    if not isinstance(response, http.client.HTTPResponse) or response.isclosed():
        return None
    if getattr(raw, "decode_content", True) or getattr(raw, "_fp_bytes_read", 1) != 0:
        return None  # urllib3 would decode, or has read (and may hold) part of the body
    if not all(callable(getattr(raw, name, None)) for name in ("release_conn", "close")):
        return None
    return raw


def _read_public(body: Any, into: memoryview) -> int:
    got = _fill(body.readinto, into)
    body.close()
    return got


def _fill(readinto: Callable[[memoryview], int], into: memoryview) -> int:
    """Call ``readinto`` until ``into`` is full or it reads nothing; the bytes read."""
    got = 0
    while got < len(into):
        n = readinto(into[got:])
        if not n:
            break
        got += n
    return got


def _discard(raw: Any) -> None:
    with contextlib.suppress(Exception):
        raw.close()
