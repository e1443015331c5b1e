"""The CUDA paths: pinned staging buffers, device -> host copies on a side stream ordered after
the compute stream, ``stage_async`` + ``handle.staged()``, loads into device tensors.

These need a CUDA device; the CI machine has none, so they are skipped there and run on a
GPU machine (``python -m pytest tests/test_cuda_staging.py``; see DEVELOPERS.md).
"""

from __future__ import annotations

import pytest
import torch

import ckptstore as cs

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (the CI machine has none)"
)


def _state(device: str) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    return {
        "w": torch.randn(2048, 1024, device=device, generator=g),
        "h": torch.randn(512, 256, device=device, generator=g).to(torch.bfloat16),
        "f8": torch.randn(64, 64, device=device, generator=g).to(torch.float8_e4m3fn),
        "n": 3,
    }


def test_sync_and_async_saves_of_device_tensors_are_bit_exact(tmp_path) -> None:
    sd = _state("cuda")
    cs.save(sd, tmp_path / "sync")
    handle = cs.async_save(sd, tmp_path / "async")
    handle.wait(timeout=120)
    for name in ("sync", "async"):
        out = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in sd.items()}
        cs.load(out, tmp_path / name)  # straight into device memory
        for k in ("w", "h", "f8"):
            assert out[k].is_cuda
            assert torch.equal(out[k].view(torch.uint8), sd[k].view(torch.uint8)), (name, k)


def test_staging_buffer_is_pinned_and_reused(tmp_path) -> None:
    from ckptstore.saving import async_save as module

    sd = _state("cuda")
    cs.async_save(sd, tmp_path / "a").wait(timeout=120)
    state = module._state()
    free = list(state.pool._free)
    assert free and all(b.is_pinned() for b in free)
    pointer = free[0].data_ptr()
    cs.async_save(sd, tmp_path / "b").wait(timeout=120)
    assert state.pool._free[0].data_ptr() == pointer  # the same pinned memory, reused


def test_copies_wait_for_pending_compute_on_the_current_stream(tmp_path) -> None:
    a = torch.randn(4096, 4096, device="cuda")
    out = torch.empty_like(a)
    torch.mm(a, a, out=out)  # queued; not finished when async_save starts
    expected = out.clone()  # also queued, after the matmul
    handle = cs.async_save({"out": out}, tmp_path / "c", stage_async=True)
    handle.staged()
    out.zero_()  # allowed once staged() returned
    handle.wait(timeout=120)
    assert torch.equal(cs.open(tmp_path / "c").read("out").cuda(), expected)


def test_stage_async_returns_before_the_copies_finish(tmp_path) -> None:
    big = {"w": torch.randn(64, 1024, 1024, device="cuda")}  # 256 MiB
    handle = cs.async_save(big, tmp_path / "d", stage_async=True)
    stall = handle.stall_seconds
    handle.staged()
    info = handle.wait(timeout=120)
    assert info.rank_bytes_written >= 256 << 20
    assert stall < 5.0  # bounded; its size against DCP is for tools/gpu_check.py to measure
