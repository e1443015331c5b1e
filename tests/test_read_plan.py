"""The read plan: every needed byte is read once, requests respect the window, the fast
path for small whole tensors and the general path mix correctly, and a bad checksum names
the right tensor among many."""

from __future__ import annotations

import pytest
import torch

import ckptstore as cs
from ckptstore.errors import ChecksumError, ManifestError
from ckptstore.loading.read import ChunkReader
from ckptstore.loading.read_plan import Target, TargetColumns, coalesce, plan_reads
from ckptstore.testing import hostile

BLOCK = 4096


def _mixed_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    sd: dict[str, torch.Tensor] = {"pad": torch.randn(10 * 1024, generator=g)}  # 40 KiB
    for i in range(120):  # small whole tensors of several dtypes and ranks
        shape = [(), (7,), (3, 5), (2, 3, 4)][i % 4]
        dtype = [torch.float32, torch.bfloat16, torch.int8, torch.float64][i % 3]
        sd[f"s{i}"] = torch.randn(shape, generator=g).to(dtype)
    sd["big"] = torch.randn(3 * BLOCK + 100, generator=g)  # one chunk of several blocks
    sd["empty"] = torch.zeros(0, 3)
    sd["matrix"] = torch.randn(64, 48, generator=g)  # read into a transposed destination
    return sd


def _destinations(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: torch.zeros_like(v) for k, v in sd.items()}
    out["matrix"] = torch.zeros(48, 64).t()  # not contiguous: takes the general path
    return out


@pytest.mark.parametrize(
    "window,gap",  # one request; a request cut before the multi-block chunk; cut into blocks
    [(64 << 20, 256 << 10), (56 << 10, 0), (8 << 10, 0), (BLOCK, 0)],
)
@pytest.mark.parametrize("where", ["local", "memory"])  # mapped files; reads into a buffer
def test_plan_reads_each_byte_once_within_the_window(tmp_path, where, window, gap) -> None:
    sd = _mixed_state()
    url = str(tmp_path / "c") if where == "local" else f"memory://plan-{window}-{gap}/c"
    cs.save(sd, url, checksum_block_bytes=BLOCK)
    ck = cs.open(url)
    assert (ck.store.map(ck.manifest.files[0]) is None) == (where == "memory")
    m = ck.manifest
    out = _destinations(sd)
    targets = [Target(k, m.tensors[k], ((0,) * v.dim(), tuple(v.shape)), v) for k, v in out.items()]
    plan = plan_reads(m, targets, window, gap)
    spans = []
    for g in plan.groups:
        items = list(zip(g.simple.start, g.simple.end, strict=True))
        items += [(p.start, p.end) for p in g.spans]
        assert items, "a request without anything to read"
        for lo, hi in items:
            assert g.start <= lo < hi <= g.end
        if len(items) > 1:
            assert g.end - g.start <= window
        spans += [(g.file, lo, hi) for lo, hi in items]
    if window == 56 << 10:  # the whole multi-block chunk starts a request of its own
        assert any(p.name == "big" and p.dest_ptr and p.start == g.start and g.start > 0
                   for g in plan.groups for p in g.spans)  # fmt: skip
    # every small tensor's chunk is read exactly once, by the fast path
    assert sorted(plan.simple_names) == sorted(k for k in sd if k.startswith("s"))
    assert len(spans) == len(set(spans))
    ChunkReader(ck.store, m, ck.url).fill(targets, window=window, gap=gap)
    for k, v in sd.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v), k


def test_a_bad_checksum_names_the_right_tensor_among_many(tmp_path) -> None:
    sd = {f"t{i}": torch.full((16,), float(i)) for i in range(300)}
    cs.save(sd, tmp_path / "c")
    m = cs.open(tmp_path / "c").manifest
    victim = "t173"
    chunk = m.tensors[victim].chunk_start
    path = tmp_path / "c" / m.files[int(m.chunks.file[chunk])]
    at = int(m.chunks.offset[chunk]) + 5
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x10
    path.write_bytes(bytes(raw))
    out = {k: torch.zeros(16) for k in sd}
    with pytest.raises(ChecksumError, match=f"'{victim}'") as err:
        cs.load(out, tmp_path / "c")
    assert err.value.bad == [victim]
    assert torch.equal(out[victim], torch.zeros(16))  # the bad bytes never reached it


@pytest.mark.parametrize(
    "column,value,message",
    [
        ("shapes", [8.5], "'w'.*malformed shape"),
        ("shapes", [-1], "'w'.*malformed shape"),
        ("shapes", 8, "'w'.*malformed shape"),
        ("shapes", ["8"], "'w'.*malformed shape"),
        ("chunk_starts", 99, "'w'.*outside the table"),
        ("chunk_starts", -1, "'w'.*chunk_start -1"),
        ("chunk_starts", "0", "'w'.*malformed"),
        ("names", "v", "duplicate tensor names"),
        ("dtypes", "float13", "unknown dtype"),
    ],
)
def test_a_malformed_tensor_table_names_the_tensor(tmp_path, column, value, message) -> None:
    cs.save({"v": torch.ones(4), "w": torch.ones(8)}, tmp_path / "c")
    doc = hostile.read_doc(tmp_path / "c")
    row = doc["tensors"]["names"].index("w")
    doc["tensors"][column][row] = value
    hostile.write_doc(tmp_path / "c", doc)
    with pytest.raises(ManifestError, match=message):
        cs.open(tmp_path / "c")


def test_a_layout_for_a_row_that_does_not_exist_is_refused(tmp_path) -> None:
    cs.save({"w": torch.ones(8)}, tmp_path / "c")
    doc = hostile.read_doc(tmp_path / "c")
    doc["tensors"]["layouts"] = {"5": {"codec": "zstd"}}
    hostile.write_doc(tmp_path / "c", doc)
    with pytest.raises(ManifestError, match="row"):
        cs.open(tmp_path / "c")


def test_coalesce_joins_close_spans_cuts_at_the_window_and_never_crosses_files() -> None:
    import numpy as np

    from ckptstore.loading.read_plan import coalesce

    def run(spans, gap, window):
        f, s, e = (np.array(c, dtype=np.int64) for c in zip(*spans, strict=True))
        return coalesce(f, s, e, gap, window)

    spans = [(0, 0, 10), (0, 10, 20), (0, 25, 30), (0, 100, 110), (1, 0, 5), (1, 5, 8)]
    assert run(spans, gap=5, window=1000) == [(0, 3, 0, 30), (3, 4, 100, 110), (4, 6, 0, 8)]
    assert run(spans, gap=0, window=1000) == [
        (0, 2, 0, 20), (2, 3, 25, 30), (3, 4, 100, 110), (4, 6, 0, 8)
    ]  # fmt: skip
    # the window cuts a run of touching spans; a span longer than the window stands alone
    touching = [(0, 0, 10), (0, 10, 20), (0, 20, 30), (0, 30, 100), (0, 100, 105)]
    assert run(touching, gap=0, window=20) == [
        (0, 2, 0, 20), (2, 3, 20, 30), (3, 4, 30, 100), (4, 5, 100, 105)
    ]  # fmt: skip
    # overlapping spans (one chunk block needed by two regions) are covered by one request
    assert run([(2, 0, 50), (2, 10, 20), (2, 40, 60)], gap=0, window=100) == [(0, 3, 0, 60)]
    empty = np.zeros(0, dtype=np.int64)
    assert coalesce(empty, empty, empty, 0, 10) == []


def test_coalesce_is_exact_for_offsets_near_the_largest_allowed() -> None:
    """Offsets up to 2^62 are valid; per-file arithmetic must not wrap (found by fuzzing)."""
    import numpy as np

    top = (1 << 62) - 100
    files = np.array([0, 1, 2], dtype=np.int64)
    starts = np.array([top, 10, 20], dtype=np.int64)
    ends = np.array([top + 50, 30, 40], dtype=np.int64)
    with np.errstate(over="raise"):
        got = coalesce(files, starts, ends, 256 << 10, 16 << 20)
    assert got == [(0, 1, top, top + 50), (1, 2, 10, 30), (2, 3, 20, 40)]


def test_a_shard_loaded_as_it_was_saved_takes_the_whole_chunk_path(tmp_path) -> None:
    """Shards saved on a grid (FSDP's rows of a norm, a TP block) and asked for cell by
    cell are whole-chunk copies; a box that is not one cell (resharded) takes the general
    path; both land the right bytes."""
    import itertools

    from ckptstore.testing.ranks import run_ranks
    from tests import dist_cases

    full = torch.arange(40 * 6, dtype=torch.float32).reshape(40, 6)
    cuts = [0, 14, 28, 40]  # uneven rows, as 40 rows over 3 ranks
    root = str(tmp_path / "c")
    run_ranks(3, dist_cases.save_rows_uneven, root, timeout=120)
    ck = cs.open(root)
    m = ck.manifest
    assert ck.meta("w").layout == "grid" and ck.meta("w").chunks == 3
    cells = [torch.zeros(b - a, 6) for a, b in itertools.pairwise(cuts)]
    targets = [Target("w", m.tensors["w"], ((a, 0), (b - a, 6)), t)
               for (a, b), t in zip(itertools.pairwise(cuts), cells, strict=True)]  # fmt: skip
    across = torch.zeros(20, 6)  # rows 10..30: parts of all three cells
    targets.append(Target("w", m.tensors["w"], ((10, 0), (20, 6)), across))
    plan = plan_reads(m, targets, 64 << 20, 256 << 10)
    assert plan.simple_names == ["w", "w", "w"]  # the three exact cells
    assert sum(len(g.spans) for g in plan.groups) == 3  # the resharded box: one per cell
    ChunkReader(ck.store, m, root).fill(targets)
    for (a, b), t in zip(itertools.pairwise(cuts), cells, strict=True):
        assert torch.equal(t, full[a:b])
    assert torch.equal(across, full[10:30])


def test_targets_as_columns_plan_and_fill_as_targets_do(tmp_path) -> None:
    """A load plans a model's tensor blocks from columns (no Target per tensor): the same
    requests as from the targets one by one, fast path and general path alike, and a
    fill from the columns is bit-exact."""
    sd = _mixed_state()
    cs.save(sd, str(tmp_path / "c"), checksum_block_bytes=BLOCK)
    ck = cs.open(str(tmp_path / "c"))
    m = ck.manifest
    out = _destinations(sd)
    targets = [Target(k, m.tensors[k], ((0,) * v.dim(), tuple(v.shape)), v) for k, v in out.items()]
    columns = TargetColumns.of(targets)
    assert columns.count() == len(targets) and columns.targets() == targets
    assert columns.targets([2, 0]) == [targets[2], targets[0]]
    by_target, by_columns = plan_reads(m, targets, 1 << 20, 0), plan_reads(m, columns, 1 << 20, 0)
    assert by_columns.simple_names == by_target.simple_names
    assert by_columns.simple_chunks == by_target.simple_chunks
    assert [(g.file, g.start, g.end, g.simple.start.tolist()) for g in by_columns.groups] == [
        (g.file, g.start, g.end, g.simple.start.tolist()) for g in by_target.groups
    ]
    assert [[p.name for p in g.spans] for g in by_columns.groups] == [
        [p.name for p in g.spans] for g in by_target.groups
    ]
    half = TargetColumns.joined([TargetColumns.of(targets[:5]), TargetColumns.of(targets[5:])])
    assert half == columns
    ChunkReader(ck.store, m, ck.url).fill(columns)
    for k, v in sd.items():
        assert torch.equal(out[k], v), k


def _strided_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    return {
        "f32": torch.randn(33, 10, generator=g),  # 40-byte rows: rows straddle the blocks
        "f64": torch.randn(9, 5, 7, generator=g, dtype=torch.float64),
        "i8": torch.randint(-100, 100, (50, 13), generator=g, dtype=torch.int8),
        "bf16": torch.randn(21, 30, generator=g).to(torch.bfloat16),
    }


_STRIDED_BOXES = {  # column cuts: every row of the box is a separate run of its chunk
    "f32": ((0, 3), (33, 5)),
    "f64": ((2, 1, 2), (6, 3, 4)),
    "i8": ((1, 0), (48, 7)),
    "bf16": ((0, 29), (21, 1)),
}


def _box_of(t: torch.Tensor, box) -> torch.Tensor:
    return t[tuple(slice(o, o + n) for o, n in zip(*box, strict=True))]


@pytest.mark.parametrize("where", ["local", "memory"])  # mapped files; reads into a buffer
@pytest.mark.parametrize("contiguous", [True, False])
def test_strided_boxes_of_chunks_over_many_blocks_land_bit_exact(
    tmp_path, where, contiguous
) -> None:
    sd = _strided_state()
    url = str(tmp_path / "c") if where == "local" else f"memory://strided-{contiguous}/c"
    cs.save(sd, url, checksum_block_bytes=64)
    ck = cs.open(url)
    targets, outs = [], {}
    for name, box in _STRIDED_BOXES.items():
        shape = box[1]
        dest = torch.zeros(shape, dtype=sd[name].dtype)
        if not contiguous:  # a transposed destination of the same shape
            dest = torch.zeros(tuple(reversed(shape)), dtype=sd[name].dtype).permute(
                *reversed(range(len(shape)))
            )
        outs[name] = dest
        targets.append(Target(name, ck.manifest.tensors[name], box, dest))
    plan = ChunkReader(ck.store, ck.manifest, url).plan(targets)
    spans = [p for g in plan.groups for p in g.spans]
    assert {p.name for p in spans} == set(_STRIDED_BOXES) and not plan.simple_names
    assert all(p.block_hi - p.block_lo > 1 and not p.dest_ptr for p in spans)
    ChunkReader(ck.store, ck.manifest, url).run(plan)
    for name, box in _STRIDED_BOXES.items():
        assert torch.equal(outs[name], _box_of(sd[name], box)), name


def test_a_bad_block_in_a_strided_box_stops_its_rows_at_the_last_verified_one(tmp_path) -> None:
    """No row with a byte in the bad block (or after it) reaches the tensor -- row 26 of the
    box straddles the boundary; rows wholly in blocks verified before it may."""
    w = torch.arange(64 * 12, dtype=torch.float32).reshape(64, 12) + 1  # 48-byte rows
    cs.save({"w": w}, tmp_path / "c", checksum_block_bytes=256)
    m = cs.open(tmp_path / "c").manifest
    chunk = m.tensors["w"].chunk_start
    path = tmp_path / "c" / m.files[int(m.chunks.file[chunk])]
    raw = bytearray(path.read_bytes())
    raw[int(m.chunks.offset[chunk]) + 1283] ^= 0x10  # block 5 (bytes 1280..1536): row 26
    path.write_bytes(bytes(raw))
    dest = torch.zeros(64, 8)  # columns 2..10: row r is bytes 48 r + 8 .. 48 r + 40
    with pytest.raises(ChecksumError, match=r"'w'.*block 5"):
        cs.load({"w": cs.Sharded(dest, (64, 12), (0, 2))}, tmp_path / "c")
    copied = int((dest != 0).any(dim=1).sum())
    assert copied <= 26, "a row with a byte of the bad block reached the tensor"
    assert torch.equal(dest[:copied], w[:copied, 2:10])
    assert not dest[26:].any()
