from __future__ import annotations

import os

import pytest

# Ranks spawned by tests use one thread each: the CI machine has two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """One real S3 server (SeaweedFS) for the whole test session."""
    from ckptstore.testing.seaweed import SeaweedServer

    server = SeaweedServer(str(tmp_path_factory.mktemp("seaweed")))
    try:
        yield server
    finally:
        server.stop()
