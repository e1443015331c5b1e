"""Many tensors' host addresses and sizes: the compiled loop and the Python passes agree on
every kind of tensor, refuse what is not a tensor, and loads planned with either fill their
destinations bit-exactly. (DTensor columns are compared on real ranks in
test_distributed.py.)"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

import ckptstore as cs
from ckptstore.state import tensor_fields

NO_HELPER = (
    "the compiled helper is not built here (no C compiler at install); flattening and load "
    "planning use the Python passes, tested below"
)


@pytest.fixture(params=["compiled", "python"])
def impl(request, monkeypatch) -> str:
    if request.param == "compiled":
        if tensor_fields.compiled_module is None:
            pytest.skip(NO_HELPER)
        monkeypatch.setattr(tensor_fields, "compiled", tensor_fields.compiled_module)
    else:
        monkeypatch.setattr(tensor_fields, "compiled", None)
    return request.param


def _kinds() -> list[torch.Tensor]:
    base = torch.arange(48, dtype=torch.float32).reshape(6, 8)
    return [
        base,
        base.t(),  # not contiguous
        base[2:4],  # contiguous, inside another tensor's memory
        base[:, 1],  # strided
        torch.zeros(0, dtype=torch.int8),
        torch.tensor(3.5, dtype=torch.float64),  # 0-dim
        torch.ones(5, dtype=torch.bool),
        torch.ones(3, dtype=torch.complex64),
        torch.empty(4, 4, device="meta"),  # not host memory
        torch.ones(3, dtype=torch.complex64).conj(),  # memory holds the conjugates
        torch.tensor([1 + 2j]).conj().imag,  # memory holds the negatives
    ]


def test_addresses_and_sizes_are_torchs_for_every_kind_of_tensor(impl) -> None:
    tensors = _kinds()
    addresses, nbytes = tensor_fields.host_addresses(tensors)
    plain = [t.is_cpu and t.is_contiguous() and not (t.is_conj() or t.is_neg()) for t in tensors]
    want = [t.data_ptr() if ok else 0 for t, ok in zip(tensors, plain, strict=True)]
    assert addresses.tolist() == want and want[-1] == want[-2] == 0
    assert addresses[2] == tensors[0].data_ptr() + 2 * 8 * 4 and addresses[1] == 0
    assert nbytes.tolist() == [t.nbytes for t in tensors]
    assert addresses.dtype == nbytes.dtype == np.int64


def test_nothing_is_kept_alive(impl) -> None:
    tensors = _kinds()
    alive = [weakref.ref(t) for t in tensors]
    tensor_fields.host_addresses(tensors)
    del tensors
    gc.collect()
    assert all(ref() is None for ref in alive)


def test_what_is_not_a_tensor_is_refused(impl) -> None:
    with pytest.raises(AttributeError):
        tensor_fields.host_addresses([torch.ones(2), "not a tensor"])


def test_the_compiled_loop_refuses_columns_of_the_wrong_size() -> None:
    module = tensor_fields.compiled_module
    if module is None:
        pytest.skip(NO_HELPER)
    tensors = [torch.ones(2), torch.ones(3)]
    right = np.zeros(2, np.int64)
    with pytest.raises(ValueError, match="2 8-byte integers"):
        module.host_addresses(tensors, np.zeros(1, np.int64), right)
    with pytest.raises(ValueError, match="2 8-byte integers"):
        module.host_addresses(tensors, right, np.zeros(2, np.int32))
    with pytest.raises(TypeError):
        module.host_addresses(tuple(tensors), right, right.copy())


def test_loads_planned_either_way_fill_every_destination(impl, tmp_path) -> None:
    g = torch.Generator().manual_seed(5)
    state = {f"norm.{i}": torch.rand(64 + i, generator=g) for i in range(200)}
    state["matrix"] = torch.rand(96, 40, generator=g)
    state["empty"] = torch.zeros(0)
    cs.save(state, tmp_path / "ck")
    dest = {k: torch.zeros_like(v) for k, v in state.items()}
    dest["matrix"] = torch.zeros(40, 96).t()  # not contiguous: the general path
    cs.load(dest, tmp_path / "ck")
    for name, value in state.items():
        assert torch.equal(dest[name], value), name


def test_lazy_conjugate_and_negative_destinations_get_their_values(impl, tmp_path) -> None:
    """A conjugate view's memory holds the conjugates (a negative view's, the negatives):
    bytes written there raw would read back conjugated or negated, so they get values."""
    state = {
        "c": torch.tensor([1 + 2j, 3 - 4j, -5 + 0.5j], dtype=torch.complex64),
        "n": torch.tensor([2.5]),
        "rows": torch.complex(torch.arange(12.0), -torch.arange(12.0)).reshape(4, 3),
    }
    cs.save(state, tmp_path / "ck")
    dest = {
        "c": torch.zeros(3, dtype=torch.complex64).conj(),
        "n": torch.zeros(1, dtype=torch.complex64).conj().imag,
        "rows": torch.zeros(3, 4, dtype=torch.complex64).t().conj(),  # the general path
    }
    assert dest["c"].is_conj() and dest["n"].is_neg() and dest["rows"].is_conj()
    cs.load(dest, tmp_path / "ck")
    for name, value in state.items():
        assert torch.equal(dest[name], value), name
