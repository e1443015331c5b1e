"""Writing staged bytes from a helper process (``async_save(persist="process")``).

The helper is started once per training process with ``python -m ckptstore.saving.persist_process``
(no re-import of the training script), reads the staged bytes from a shared-memory segment,
writes and checksums the data files, and sends back where each chunk went. Checksumming and
writing then never hold the training process's GIL. The commit stays in the training process.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import json
import struct
import subprocess
import sys
import threading
from multiprocessing import resource_tracker, shared_memory
from typing import Any, BinaryIO

import torch

from ckptstore.errors import SaveError
from ckptstore.format.data_files import WriteResult
from ckptstore.saving.save import PlannedSave
from ckptstore.saving.staging import StagedTensors

_HEADER = struct.Struct("<Q")


def _send(stream: BinaryIO, obj: Any) -> None:
    """One length-prefixed JSON message (plain data only: no pickle on this pipe)."""
    data = json.dumps(obj).encode()
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _recv(stream: BinaryIO) -> Any:
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError("helper pipe closed")
    (n,) = _HEADER.unpack(head)
    return json.loads(stream.read(n))


_RESULT_COLUMNS = ("files", "file", "offset", "nbytes", "crc_count", "crc", "bytes_written")


def _result_to_json(result: WriteResult) -> dict[str, Any]:
    return {name: getattr(result, name) for name in _RESULT_COLUMNS}


def _result_from_json(doc: dict[str, Any]) -> WriteResult:
    return WriteResult(**{name: doc[name] for name in _RESULT_COLUMNS})


class _Helper:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ckptstore.saving.persist_process"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.lock = threading.Lock()
        atexit.register(self.close)

    def close(self) -> None:
        """End the helper: closing its stdin makes it exit; wait for it briefly."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def call(self, request: dict[str, Any]) -> Any:
        with self.lock:
            assert self.proc.stdin is not None and self.proc.stdout is not None
            _send(self.proc.stdin, request)
            return _recv(self.proc.stdout)


_HELPER: _Helper | None = None


def write_in_helper(
    planned: PlannedSave, staged: StagedTensors, segment: str
) -> tuple[WriteResult | None, BaseException | None]:
    """Have the helper write this rank's staged items; errors come back as values."""
    global _HELPER
    assert planned.target is not None
    store = planned.target.data_store  # a tiered save's data goes to its node's tier
    url = store.url
    if url.startswith("memory://"):
        return None, SaveError(f"{url}: persist='process' needs a store another process can reach")
    if _HELPER is None or _HELPER.proc.poll() is not None:
        _HELPER = _Helper()
    base = staged.buffer.data_ptr()
    request = {
        "segment": segment,
        "spans": [(v.data_ptr() - base, v.numel()) for v in staged.views],
        "blobs": [base64.b64encode(b).decode("ascii") for b in planned.blobs()],
        "url": url,
        "storage_options": {}
        if store is not planned.store
        else planned.options.storage_options or {},
        "rank": planned.rank,
        "files": planned.options.files_per_rank,
        "block": planned.options.block,
        "codec": planned.options.codec,
        "spread": planned.spread,
    }
    try:
        status, value = _HELPER.call(request)
    except (OSError, EOFError) as exc:
        return None, SaveError(f"{url}: the writer helper process failed: {exc}")
    if status == "ok":
        return _result_from_json(value), None
    return None, SaveError(f"{url}: writing in the helper process failed: {value}")


def _serve(inp: BinaryIO, out: BinaryIO) -> None:
    from ckptstore import knobs
    from ckptstore.backends.registry import open_store
    from ckptstore.format.data_files import WriteItem, write_items
    from ckptstore.state.tensor_bytes import as_bytes

    while True:
        try:
            req = _recv(inp)
        except EOFError:
            return
        try:
            segment = shared_memory.SharedMemory(name=req["segment"])
            # The segment belongs to the training process: this process must not unlink it.
            resource_tracker.unregister(segment._name, "shared_memory")  # type: ignore[attr-defined]
            try:
                buf = torch.frombuffer(segment.buf, dtype=torch.uint8)
                items = [WriteItem(as_bytes(buf[o : o + n]), req["codec"]) for o, n in req["spans"]]
                items += [WriteItem(memoryview(base64.b64decode(b))) for b in req["blobs"]]
                result = write_items(
                    open_store(req["url"], **req["storage_options"]),
                    items,
                    rank=req["rank"],
                    files=req["files"] or knobs.files_per_rank(),
                    block_bytes=req["block"],
                    pack_bytes=knobs.pack_bytes(),
                    spread=req["spread"],
                )
                del items, buf
            finally:
                segment.close()
            _send(out, ("ok", _result_to_json(result)))
        except Exception as exc:
            _send(out, ("error", f"{type(exc).__name__}: {exc}"))


if __name__ == "__main__":
    _serve(sys.stdin.buffer, sys.stdout.buffer)
