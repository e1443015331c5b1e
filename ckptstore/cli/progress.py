"""A progress line for long operations: bytes done, total and rate, on a terminal only."""

from __future__ import annotations

import sys
import threading
import time

from ckptstore.cli.format import human_bytes


class Progress:
    """``progress(n)`` adds ``n`` bytes; prints at most 10 times a second to stderr, and only
    when stderr is a terminal and the output is not ``--json``. A context manager: the line
    is finished on the way out."""

    def __init__(self, label: str, total: int | None, enabled: bool) -> None:
        self.label, self.total = label, total
        self.enabled = enabled and sys.stderr.isatty()
        self.done = 0
        self._start = self._last = time.monotonic()
        self._lock = threading.Lock()

    def __call__(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            now = time.monotonic()
            if self.enabled and now - self._last >= 0.1:
                self._last = now
                self._print(now)

    def _print(self, now: float) -> None:
        rate = self.done / max(now - self._start, 1e-9)
        of = f" / {human_bytes(self.total)}" if self.total else ""
        pct = f" {100 * self.done / self.total:5.1f}%" if self.total else ""
        line = f"{self.label}: {human_bytes(self.done)}{of}{pct}  {human_bytes(rate)}/s"
        sys.stderr.write("\r" + line[:79].ljust(79))
        sys.stderr.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.enabled:
            self._print(time.monotonic())
            sys.stderr.write("\n")
            sys.stderr.flush()
