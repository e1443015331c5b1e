"""Burst control: requests in flight and bytes per second, per store."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ckptstore.backends.throttle import Throttle


def test_concurrency_cap_holds_under_many_threads() -> None:
    throttle = Throttle(max_concurrent=3)
    lock = threading.Lock()
    now = peak = 0

    def request(_: int) -> None:
        nonlocal now, peak
        with throttle.request():
            with lock:
                now += 1
                peak = max(peak, now)
            time.sleep(0.01)
            with lock:
                now -= 1

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(request, range(60)))
    assert peak == 3


def test_byte_rate_cap_spaces_requests_out() -> None:
    mib = 1 << 20
    throttle = Throttle(max_bytes_per_second=4 * mib)

    def send(_: int) -> None:
        with throttle.request(mib):
            pass

    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(send, range(12)))
    # the bucket holds one second's worth (4 MiB); the other 8 MiB need at least 2 s more
    assert time.monotonic() - start >= 1.9


def test_bad_caps_are_refused() -> None:
    with pytest.raises(ValueError, match="max_concurrent"):
        Throttle(max_concurrent=0)
    with pytest.raises(ValueError, match="max_bytes_per_second"):
        Throttle(max_bytes_per_second=-1)
