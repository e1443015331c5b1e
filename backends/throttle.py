"""Burst control for uploads: a cap on requests in flight and a cap on bytes per second.

Checkpoint writes from thousands of ranks arrive at the storage fabric at the same moment;
uncapped, they saturate it for a short time and starve everything else. A :class:`Throttle`
belongs to one store instance (one rank's uploader), so that the caps are per rank and the
fleet's peak is at most ``ranks x cap``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator


class Throttle:
    """At most ``max_concurrent`` requests at a time and ``max_bytes_per_second`` on average.

    The byte budget is a token bucket holding at most one second's worth (or one request's
    bytes, if larger), so a burst after an idle period is bounded as well.
    """

    def __init__(
        self, max_concurrent: int | None = None, max_bytes_per_second: float | None = None
    ) -> None:
        if max_concurrent is not None and max_concurrent < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        if max_bytes_per_second is not None and max_bytes_per_second <= 0:
            raise ValueError(f"max_bytes_per_second must be > 0, got {max_bytes_per_second}")
        self.max_concurrent = max_concurrent
        self.max_bytes_per_second = max_bytes_per_second
        self._slots = threading.BoundedSemaphore(max_concurrent) if max_concurrent else None
        self._lock = threading.Lock()
        self._tokens = float(max_bytes_per_second or 0.0)
        self._stamp = time.monotonic()

    @property
    def active(self) -> bool:
        return self._slots is not None or self.max_bytes_per_second is not None

    def _take(self, nbytes: int) -> None:
        rate = self.max_bytes_per_second
        if rate is None or nbytes <= 0:
            return
        with self._lock:  # one waiter at a time keeps the bucket fair and simple
            now = time.monotonic()
            capacity = max(rate, float(nbytes))
            self._tokens = min(capacity, self._tokens + (now - self._stamp) * rate)
            self._stamp = now
            if self._tokens < nbytes:
                wait = (nbytes - self._tokens) / rate
                time.sleep(wait)
                self._stamp = time.monotonic()
                self._tokens = 0.0
            else:
                self._tokens -= nbytes

    @contextlib.contextmanager
    def request(self, nbytes: int = 0) -> Iterator[None]:
        """Hold one request slot (and ``nbytes`` of budget) around one request."""
        if self._slots is not None:
            self._slots.acquire()
        try:
            self._take(nbytes)
            yield
        finally:
            if self._slots is not None:
                self._slots.release()
