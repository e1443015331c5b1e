"""Verify-then-copy of many byte ranges: the compiled helper and the Python loop agree, copy
bit-exact, stop at the first bad range before copying it, and refuse any range that lies
outside its source or destination. Every case runs on both implementations."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from crc32c import crc32c

import ckptstore as cs
from ckptstore.errors import ChecksumError
from ckptstore.loading import verified_copy as vc

NO_HELPER = (
    "the compiled helper is not built here (no C compiler at install) or this CPU has no "
    "SSE4.2 crc32c instruction; loads use the Python loop, tested below"
)
IMPLEMENTATIONS = ["compiled", "python"]


@pytest.fixture(params=IMPLEMENTATIONS)
def impl(request, monkeypatch) -> str:
    if request.param == "compiled":
        module = vc._compiled_module
        if module is None or not module.HARDWARE:
            pytest.skip(NO_HELPER)
        monkeypatch.setattr(vc, "compiled", module)
    else:
        monkeypatch.setattr(vc, "compiled", None)
    return request.param


def _ranges(rng: np.random.Generator, sizes: list[int], gap: int = 3):
    """A source holding ranges of ``sizes`` (with gaps), their crcs, and destination offsets
    that are deliberately not aligned."""
    starts, at, pos, dpos = [], [], 11, 5
    for n in sizes:
        starts.append(pos)
        at.append(dpos)
        pos += n + gap
        dpos += n + 1
    src = rng.integers(0, 256, pos + 7, dtype=np.uint8)
    ends = [s + n for s, n in zip(starts, sizes, strict=True)]
    crcs = [crc32c(memoryview(src)[s:e]) for s, e in zip(starts, ends, strict=True)]
    return src, starts, ends, crcs, at, dpos + 9


SIZES = [0, 1, 7, 8, 63, 255, 256, 257, 767, 768, 1000, 4096, 4097, 24_575, 24_576, 70_001]


def test_the_compiled_crc32c_matches_the_crc32c_package() -> None:
    module = vc._compiled_module
    if module is None or not module.HARDWARE:
        pytest.skip(NO_HELPER)
    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    for n in [*range(0, 1100), 3 * 8192 - 1, 3 * 8192, 3 * 8192 + 769, 131_072, 199_990]:
        for offset in (0, 1, 5):
            piece = data[offset : offset + n]
            assert module.crc32c(piece) == crc32c(piece), (n, offset)


@pytest.mark.parametrize("columns", ["lists", "arrays"])
def test_ranges_are_verified_and_copied_bit_exactly(impl, columns) -> None:
    rng = np.random.default_rng(1)
    src, starts, ends, crcs, at, dest_len = _ranges(rng, SIZES * 3)
    if columns == "arrays":  # as a read plan holds them: int64, crcs as stored (uint32)
        starts, ends, at = (np.array(c, dtype=np.int64) for c in (starts, ends, at))
        crcs = np.array(crcs, dtype=np.uint32)
    dest = np.zeros(dest_len, dtype=np.uint8)
    first = 4  # src[0] is file byte 4
    status = vc.check_and_copy(
        memoryview(src[first:]),
        first,
        starts,
        ends,
        crcs,
        memoryview(dest),
        at,
    )
    assert status == (vc.COPIED, -1)
    for s, e, a in zip(starts, ends, at, strict=True):
        assert np.array_equal(dest[a : a + e - s], src[s:e])
    assert len(starts) == 3 * len(SIZES)
    copied = np.zeros(dest_len, dtype=bool)
    for s, e, a in zip(starts, ends, at, strict=True):
        copied[a : a + e - s] = True
    assert not dest[~copied].any()  # nothing written between the destinations


def test_a_bad_range_stops_the_copy_before_its_bytes_move(impl) -> None:
    rng = np.random.default_rng(2)
    src, starts, ends, crcs, at, dest_len = _ranges(rng, [4096] * 50 + [70_001] * 3)
    for victim in (0, 17, 51):
        bad = src.copy()
        bad[starts[victim] + 100] ^= 0x20
        dest = np.zeros(dest_len, dtype=np.uint8)
        status = vc.check_and_copy(memoryview(bad), 0, starts, ends, crcs, memoryview(dest), at)
        assert status == (vc.MISMATCH, victim)
        for i, (s, e, a) in enumerate(zip(starts, ends, at, strict=True)):
            if i < victim:
                assert np.array_equal(dest[a : a + e - s], src[s:e])
            else:
                assert not dest[a : a + e - s].any(), i
    dest = np.zeros(dest_len, dtype=np.uint8)
    wrong = [*crcs[:3], 1 << 33, *crcs[4:]]  # a crc no 32-bit checksum can have
    assert vc.check_and_copy(memoryview(src), 0, starts, ends, wrong, memoryview(dest), at) == (
        vc.MISMATCH,
        3,
    )


@pytest.mark.parametrize(
    "change",
    ["start before src", "end past src", "end before start", "dest_at negative", "past dest"],
)
def test_a_range_outside_its_buffers_is_refused(impl, change) -> None:
    rng = np.random.default_rng(3)
    src, starts, ends, crcs, at, dest_len = _ranges(rng, [300, 5000, 300, 300])
    first, victim = 10, 2
    if change == "start before src":
        starts[0] = 9  # file byte 9 is before src[0]
        victim = 0
    elif change == "end past src":
        ends[victim] = len(src) + 1
    elif change == "end before start":
        ends[victim] = starts[victim] - 1
    elif change == "dest_at negative":
        at[victim] = -1
    else:
        at[victim] = dest_len - 10
    dest = np.zeros(dest_len, dtype=np.uint8)
    status = vc.check_and_copy(
        memoryview(src[first:]), first, starts, ends, crcs, memoryview(dest), at
    )
    assert status == (vc.OUTSIDE, victim)
    for i in range(victim, 4):  # neither the refused range nor any after it moved
        if at[i] >= 0:
            assert not dest[at[i] : at[i] + max(0, ends[i] - starts[i])].any(), i


@pytest.mark.parametrize("victim", ["small", "multi_block"])
def test_a_damaged_chunk_is_named_and_never_reaches_its_tensor(impl, tmp_path, victim) -> None:
    state = {f"small{i}": torch.full((256,), float(i)) for i in range(200)}
    state["multi_block"] = torch.arange(300_000, dtype=torch.float32)
    cs.save(state, tmp_path / "good", checksum_block_bytes=64 << 10)
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    cs.load(out, tmp_path / "good")
    assert all(torch.equal(out[k], v) for k, v in state.items())

    shutil.copytree(tmp_path / "good", tmp_path / "bad")
    m = cs.open(tmp_path / "bad").manifest
    name = "small117" if victim == "small" else "multi_block"
    chunk = m.tensors[name].chunk_start
    path = tmp_path / "bad" / m.files[int(m.chunks.file[chunk])]
    raw = bytearray(path.read_bytes())
    raw[int(m.chunks.offset[chunk]) + int(m.chunks.nbytes[chunk]) - 3] ^= 0x01  # its last block
    path.write_bytes(bytes(raw))
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    with pytest.raises(ChecksumError, match=f"'{name}'") as err:
        cs.load(out, tmp_path / "bad")
    assert err.value.bad == [name]
    if victim == "small":
        assert not out[name].any()
    else:  # blocks before the damaged one may be in; the damaged block is not
        assert not out[name][-100:].any()
