from __future__ import annotations

import os

# Ranks spawned by tests use one thread each: the CI machine has two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
