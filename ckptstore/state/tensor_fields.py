"""The fields of many tensors at once: a compiled loop, or C-level passes per attribute.

Flattening a state_dict and planning a load read a few attributes of each of tens of
thousands of tensors. As ``map`` passes, one per attribute, every pass meets each object
again, fresh from memory; the compiled helper ``ckptstore.state._tensor_fields`` (built at
install where a C compiler is present) reads all of one tensor's attributes in one loop,
through the same getters: about 40 % less time for a model's 20,000 DTensors. Elsewhere,
or with ``CKPTSTORE_COMPILED_FIELDS=0``, the passes do the same (tests compare the two).
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any

import numpy as np
import torch

from ckptstore import knobs

try:
    from ckptstore.state import _tensor_fields as compiled_module
except ImportError:  # no C compiler at install: the passes
    compiled_module = None

compiled: Any = compiled_module if compiled_module is not None and knobs.compiled_fields() else None
"""The compiled helper, or None where it is not built or ``CKPTSTORE_COMPILED_FIELDS=0``."""


def host_addresses(tensors: list[torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Each tensor's address where it is contiguous host memory that holds its values (no
    lazy conjugate or negative bit: raw bytes written there would read back conjugated or
    negated), else 0; and its size in bytes. Two int64 arrays."""
    n = len(tensors)
    if compiled is not None:
        addresses, nbytes = np.empty(n, np.int64), np.empty(n, np.int64)
        compiled.host_addresses(tensors, addresses, nbytes)
        return addresses, nbytes
    usable = np.fromiter(map(_IS_CPU, tensors), bool, n)
    usable &= np.fromiter(map(torch.Tensor.is_contiguous, tensors), bool, n)
    usable &= ~np.fromiter(map(torch.Tensor.is_conj, tensors), bool, n)
    usable &= ~np.fromiter(map(torch.Tensor.is_neg, tensors), bool, n)
    addresses = np.fromiter(map(torch.Tensor.data_ptr, tensors), np.int64, n)
    addresses[~usable] = 0
    return addresses, np.fromiter(map(_NBYTES, tensors), np.int64, n)


_IS_CPU, _NBYTES = attrgetter("is_cpu"), attrgetter("nbytes")
