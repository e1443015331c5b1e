"""Tensors' bytes without a copy: one view per tensor, or slices of one view of the address
range many tensors lie in -- the same bytes either way, for every dtype, view and size."""

from __future__ import annotations

import pytest
import torch

from ckptstore.state.tensor_bytes import (
    address_range,
    all_as_bytes,
    all_host_contiguous,
    as_bytes,
)


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def test_slices_of_one_range_are_each_tensors_bytes() -> None:
    g = torch.Generator().manual_seed(5)
    base = torch.rand(64, 33, generator=g)
    tensors = [
        torch.rand(7, generator=g).to(torch.bfloat16),
        base[5],  # a view with a storage offset
        torch.randint(0, 2**31, (3, 4), generator=g, dtype=torch.int64),
        base[60:],  # ends at the storage's end
        torch.rand(1, generator=g).to(torch.float64),
        torch.rand(1000, generator=g),  # another allocation, further away
    ]
    views = all_as_bytes(tensors)
    assert [bytes(v) for v in views] == [_raw(t) for t in tensors]
    assert [bytes(v) for v in views] == [bytes(as_bytes(t)) for t in tensors]
    assert all(v.readonly for v in views)
    assert all_as_bytes([]) == []
    with_empty = [tensors[0], torch.empty(0), tensors[2]]  # no address for an empty one
    assert [bytes(v) for v in all_as_bytes(with_empty)] == [_raw(t) for t in with_empty]


def test_a_writable_range_writes_only_its_slice() -> None:
    a, b = torch.zeros(4, dtype=torch.int32), torch.zeros(4, dtype=torch.int32)
    lo = min(a.data_ptr(), b.data_ptr())
    hi = max(a.data_ptr(), b.data_ptr()) + 16
    window = address_range(lo, hi - lo, writable=True)
    at = b.data_ptr() - lo
    window[at : at + 16] = torch.arange(4, dtype=torch.int32).numpy().tobytes()
    assert b.tolist() == [0, 1, 2, 3] and a.tolist() == [0, 0, 0, 0]
    assert address_range(lo, 16).readonly
    for bad in [(0, 16), (-8, 16), (lo, -1)]:
        with pytest.raises(ValueError, match="no memory range"):
            address_range(*bad)


def test_host_contiguous_columns_copy_only_what_needs_it() -> None:
    plain = [torch.rand(3), torch.rand(2, 2)]
    assert all_host_contiguous(plain) is plain  # nothing to do: the same list
    strided = torch.rand(4, 4).t()
    conj = torch.tensor([1 + 2j, 3 - 1j]).conj()  # a lazy conjugate holds other bytes
    out = all_host_contiguous([plain[0], strided, conj])
    assert out[0] is plain[0] and out[1].is_contiguous() and torch.equal(out[1], strided)
    assert not out[2].is_conj() and out[2].tolist() == [1 - 2j, 3 + 1j]
