"""Housekeeping off the training thread: one worker thread that runs the latest request.

Retiring a checkpoint from shared storage is a listing and batches of deletes -- seconds at
16k ranks -- which the coordinator used to do between two saves while every other rank
waited for it in the next collective. Requests made while a run is going are folded into
one more run after it (retention is idempotent: the newest listing decides).
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class BackgroundWorker:
    """Runs ``job`` in a thread of its own on :meth:`request`; never two runs at once.

    ``job`` reports what it wants said (warnings) by returning messages; they are kept for
    the caller's thread (:meth:`take_messages`), where a warning reaches the user.
    """

    def __init__(self, job: Callable[[], list[str]], name: str) -> None:
        self._job = job
        self._name = name
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._again = False
        self._messages: list[str] = []

    def request(self) -> None:
        """Run the job soon (now if idle, else once more after the current run)."""
        with self._lock:
            if self._thread is not None:
                self._again = True
                return
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            try:
                messages = self._job()
            except Exception as exc:  # a bug must not kill the thread silently
                messages = [f"{self._name} failed: {type(exc).__name__}: {exc}"]
            with self._lock:
                self._messages.extend(messages)
                if not self._again:
                    self._thread = None
                    return
                self._again = False

    def wait(self, timeout: float | None = None) -> None:
        """Until no run is going (or ``timeout`` seconds passed)."""
        with self._lock:
            thread = self._thread
        while thread is not None:
            thread.join(timeout)
            if timeout is not None:
                return
            with self._lock:
                thread = self._thread

    def take_messages(self) -> list[str]:
        with self._lock:
            messages, self._messages = self._messages, []
        return messages
