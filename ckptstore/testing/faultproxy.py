"""An HTTP fault-injecting proxy between an S3 client and a real server (tests only).

Requests pass through byte for byte (signatures stay valid); a :class:`FaultPlan` decides,
request by request, to answer 503 SlowDown or 500 itself, to drop the connection, to lose
the response of a request the server carried out, to delay the response, or to cut the
response body short.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

FAULTS = ("pass", "503", "500", "drop", "slow", "truncate", "lose")
"""``drop``: close before forwarding; ``lose``: forward, let the server act, then close
without answering (the response was lost: the client cannot know the request took effect)."""


@dataclass(frozen=True)
class RequestRecord:
    start: float
    end: float
    method: str
    path: str
    body_bytes: int
    response_bytes: int = 0


def peak_in_flight(requests: list[RequestRecord], method: str = "PUT") -> int:
    """The most requests of ``method`` that were in flight at one moment."""
    events = sorted(
        [(r.start, 1) for r in requests if r.method == method]
        + [(r.end, -1) for r in requests if r.method == method]
    )
    peak = now = 0
    for _, delta in events:
        now += delta
        peak = max(peak, now)
    return peak


def peak_rate(requests: list[RequestRecord], window: float = 0.1, method: str = "PUT") -> float:
    """The most requests of ``method`` started within any ``window`` seconds, per second."""
    starts = sorted(r.start for r in requests if r.method == method)
    best, lo = 0, 0
    for hi, t in enumerate(starts):
        while t - starts[lo] > window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best / window


@dataclass
class FaultPlan:
    """``rule(method, path, n)`` -> a fault name; ``n`` counts requests from 0."""

    rule: Callable[[str, str, int], str] = lambda method, path, n: "pass"
    slow_seconds: float = 0.5
    counts: dict[str, int] = field(default_factory=dict)
    _n: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def next(self, method: str, path: str) -> str:
        with self._lock:
            n = self._n
            self._n += 1
        fault = self.rule(method, path, n)
        with self._lock:
            self.counts[fault] = self.counts.get(fault, 0) + 1
        return fault


def _read_head(sock_file) -> bytes | None:
    lines = []
    while True:
        line = sock_file.readline(65537)
        if not line:
            return None
        lines.append(line)
        if line in (b"\r\n", b"\n"):
            return b"".join(lines)


def _headers(head: bytes) -> dict[str, str]:
    out = {}
    for line in head.split(b"\r\n")[1:]:
        if b":" in line:
            k, v = line.split(b":", 1)
            out[k.decode("latin-1").strip().lower()] = v.decode("latin-1").strip()
    return out


def _read_body(sock_file, headers: dict[str, str], no_body: bool = False) -> bytes:
    if no_body:
        return b""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        parts = []
        while True:
            size_line = sock_file.readline()
            parts.append(size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers until the empty line
                    line = sock_file.readline()
                    parts.append(line)
                    if line in (b"\r\n", b"\n", b""):
                        return b"".join(parts)
            parts.append(sock_file.read(size + 2))
    length = int(headers.get("content-length", "0") or 0)
    return sock_file.read(length) if length else b""


_ERROR_BODY = {
    "503": b"<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>",
    "500": b"<Error><Code>InternalError</Code><Message>Injected.</Message></Error>",
}


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.server.count_connection()  # type: ignore[attr-defined]
        try:
            self._serve()
        except (TimeoutError, ConnectionError):
            return  # an idle keep-alive connection timed out, or the client went away

    def _serve(self) -> None:
        server: FaultProxy = self.server  # type: ignore[assignment]
        self.connection.settimeout(60)
        while True:
            head = _read_head(self.rfile)
            if head is None:
                return
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            method, path = request_line.split(" ")[:2]
            headers = _headers(head)
            if headers.get("expect", "").lower() == "100-continue":
                self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # the client waits for it
                self.wfile.flush()
            body = _read_body(self.rfile, headers)
            started = time.monotonic()
            fault = server.plan.next(method, path)
            if fault == "drop":
                return
            if fault in ("503", "500"):
                status = "503 Slow Down" if fault == "503" else "500 Internal Server Error"
                payload = _ERROR_BODY[fault]
                self.wfile.write(
                    f"HTTP/1.1 {status}\r\nContent-Type: application/xml\r\n"
                    f"Content-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                self.wfile.flush()
                continue
            with socket.create_connection(server.upstream, timeout=60) as up:
                up.sendall(head + body)
                up_file = up.makefile("rb")
                resp_head = _read_head(up_file)
                while resp_head is not None and resp_head.startswith(b"HTTP/1.1 1"):
                    resp_head = _read_head(up_file)  # interim 1xx answers are not the response
                if resp_head is None:
                    return
                resp_headers = _headers(resp_head)
                status = int(resp_head.split(b" ", 2)[1])
                resp_body = _read_body(
                    up_file, resp_headers, no_body=method == "HEAD" or status in (204, 304)
                )
            if fault == "lose":
                server.record(RequestRecord(started, time.monotonic(), method, path, len(body)))
                return
            if fault == "slow":
                time.sleep(server.plan.slow_seconds)
            if fault == "truncate" and len(resp_body) > 1:
                self.wfile.write(resp_head + resp_body[: len(resp_body) // 2])
                self.wfile.flush()
                return  # close mid-body
            self.wfile.write(resp_head + resp_body)
            self.wfile.flush()
            server.record(
                RequestRecord(started, time.monotonic(), method, path, len(body), len(resp_body))
            )


class FaultProxy(socketserver.ThreadingTCPServer):
    """``with FaultProxy(("127.0.0.1", 8333), plan) as proxy: ... proxy.endpoint``."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, upstream: tuple[str, int], plan: FaultPlan | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream = upstream
        self.plan = plan or FaultPlan()
        self.endpoint = f"http://127.0.0.1:{self.server_address[1]}"
        self.requests: list[RequestRecord] = []
        """Every request passed upstream: start/end (monotonic), method, path, body bytes
        (request and response)."""
        self.connections = 0
        """Client connections accepted (a client that reuses its connections opens few)."""
        self._log_lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def record(self, request: RequestRecord) -> None:
        with self._log_lock:
            self.requests.append(request)

    def count_connection(self) -> None:
        with self._log_lock:
            self.connections += 1

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
