"""Per-rank random number generator state: torch (CPU and CUDA), numpy, Python ``random``.

Saved as :class:`~ckptstore.PerRank` entries so that a run resumed on the same world size
continues bit-exactly. Plain values only (no pickle): numpy's and Python's states are tuples
of ints.
"""

from __future__ import annotations

import random
import sys
from typing import Any

import torch

from ckptstore.state.leaves import PerRank


def capture() -> dict[str, Any]:
    """This rank's generator states, as a state_dict fragment of PerRank entries."""
    out: dict[str, Any] = {
        "torch": PerRank(torch.get_rng_state()),
        "python": PerRank(_plain(random.getstate())),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = PerRank(torch.stack(torch.cuda.get_rng_state_all()))
    np = sys.modules.get("numpy")
    if np is not None:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        out["numpy"] = PerRank(
            (str(name), tuple(int(k) for k in keys), int(pos), int(has_gauss), float(gauss))
        )
    return out


def template(captured: dict[str, Any]) -> dict[str, Any]:
    """A fresh state_dict fragment of the same structure, to load into."""
    return {
        k: PerRank(v.value.clone() if isinstance(v.value, torch.Tensor) else v.value)
        for k, v in captured.items()
    }


def restore(loaded: dict[str, Any]) -> None:
    """Set every generator from a loaded fragment (entries missing from it are left alone)."""
    if "torch" in loaded:
        torch.set_rng_state(loaded["torch"].value)
    if "python" in loaded:
        version, internal, gauss = loaded["python"].value
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in loaded and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(loaded["cuda"].value))
    np = sys.modules.get("numpy")
    if "numpy" in loaded and np is not None:
        name, keys, pos, has_gauss, gauss = loaded["numpy"].value
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value
