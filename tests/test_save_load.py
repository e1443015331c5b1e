"""Single-process behaviour of save / load / open: dtypes, values, errors, corruption."""

from __future__ import annotations

import json
import os

import pytest
import torch

import ckptstore as cs
from ckptstore.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ChecksumError,
    IncompleteCheckpointError,
    LoadMismatchError,
    PickleNotAllowedError,
    ShardingError,
    StateDictError,
)
from ckptstore.format.dtypes import NAME_TO_DTYPE


def random_of(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Arbitrary bit patterns (NaN payloads, subnormals) for every dtype."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    nbytes = dtype.itemsize
    raw = torch.randint(
        0, 256, (*shape, nbytes) if shape else (nbytes,), generator=g, dtype=torch.uint8
    )
    return raw.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


@pytest.mark.parametrize("codec", [None, "zstd", "lz4"])
def test_every_dtype_roundtrips_bit_exactly(tmp_path, codec) -> None:
    names = sorted(NAME_TO_DTYPE)
    sd = {n: random_of(NAME_TO_DTYPE[n], (5, 3), seed=i) for i, n in enumerate(names)}
    sd["scalar_bf16"] = random_of(torch.bfloat16, (), seed=99)
    cs.save(sd, tmp_path / "c", codec=codec)
    out = {
        k: torch.empty_like(v).fill_(0)
        if v.dtype.itemsize > 1
        else torch.zeros(v.shape, dtype=torch.uint8).view(v.dtype)
        for k, v in sd.items()
    }
    cs.load(out, tmp_path / "c")
    for k in sd:
        assert same_bits(out[k], sd[k]), k
    ck = cs.open(tmp_path / "c")
    assert ck.meta("float8_e4m3fn").dtype == torch.float8_e4m3fn
    assert same_bits(ck.read("complex64"), sd["complex64"])
    # strided regions (not whole chunks) go through the general copy path
    for k in names:
        assert same_bits(ck.read(k, (slice(1, 4), slice(1, 3))), sd[k][1:4, 1:3].contiguous()), k
        dest = (
            torch.zeros(5, 2, dtype=torch.uint8).view(sd[k].dtype)
            if sd[k].dtype.itemsize == 1
            else None
        )
        if dest is not None:  # a non-contiguous destination: a column block of a wider tensor
            wide = torch.zeros(5, 4, dtype=torch.uint8).view(sd[k].dtype)
            cs.load({k: cs.Sharded(wide[:, 1:3], (5, 3), (0, 1))}, tmp_path / "c", strict=False)
            assert same_bits(wide[:, 1:3].contiguous(), sd[k][:, 1:3].contiguous()), k


def test_plain_values_and_nesting(tmp_path) -> None:
    sd = {
        "a": {"b": [1, 2.5, "x", None, True, (1, (2, "z"))], "c": {}},
        "empty": [],
        "nan": float("inf"),
    }
    cs.save(sd, tmp_path / "c")
    out = {"a": {"b": [0, 0, 0, 0, 0, 0], "c": {}}, "empty": [], "nan": 0}
    cs.load(out, tmp_path / "c")
    assert out == sd
    ck = cs.open(tmp_path / "c")
    assert sorted(ck.keys()) == ["a.b.0", "a.b.1", "a.b.2", "a.b.3", "a.b.4", "a.b.5", "nan"]
    assert ck.read("a.b.5") == (1, (2, "z"))


def test_read_regions(tmp_path) -> None:
    w = torch.arange(40 * 30, dtype=torch.float32).reshape(40, 30)
    cs.save({"w": w}, tmp_path / "c")
    ck = cs.open(tmp_path / "c")
    assert torch.equal(ck.read("w"), w)
    assert torch.equal(ck.read("w", (slice(3, 9), slice(5, 7))), w[3:9, 5:7])
    assert torch.equal(ck.read("w", (4,)), w[4])
    assert torch.equal(ck.read("w", (-1, slice(None))), w[-1])
    with pytest.raises(IndexError):
        ck.read("w", (slice(0, 10, 2),))
    with pytest.raises(KeyError, match="nope"):
        ck.read("nope")


def test_partial_region_reads_only_the_blocks_it_needs(tmp_path) -> None:
    w = torch.randn(4096, 256)  # one 4 MiB chunk
    cs.save({"w": w}, tmp_path / "c", checksum_block_bytes=256 * 1024)
    dest = torch.zeros(64, 256)
    info = cs.load({"w": cs.Sharded(dest, (4096, 256), (1024, 0))}, tmp_path / "c")
    assert torch.equal(dest, w[1024:1088])
    assert info.bytes_read <= 2 * 256 * 1024, info.bytes_read  # not the whole 4 MiB


def test_load_checks_everything_before_writing_anything(tmp_path) -> None:
    cs.save(
        {"w": torch.ones(4, 4), "v": torch.ones(3), "i": torch.ones(2, dtype=torch.int64), "x": 1},
        tmp_path / "c",
    )
    w, v = torch.zeros(4, 4), torch.zeros(3)
    bad = {"w": w, "v": torch.zeros(5), "i": torch.zeros(2, dtype=torch.int32), "y": torch.zeros(1)}
    with pytest.raises(LoadMismatchError) as err:
        cs.load(bad, tmp_path / "c")
    text = str(err.value)
    for fragment in (
        "v: the state_dict has float32[5], the checkpoint has float32[3]",
        "i: the state_dict has int32[2], the checkpoint has int64[2]",
        "1 missing from the checkpoint: y",
        "1 in the checkpoint but not in the state_dict: x",
    ):
        assert fragment in text
    assert sorted(err.value.problems) == [
        "i: the state_dict has int32[2], the checkpoint has int64[2]",
        "v: the state_dict has float32[5], the checkpoint has float32[3]",
        "x: in the checkpoint but not in the state_dict",
        "y: missing from the checkpoint",
    ]
    assert torch.equal(w, torch.zeros(4, 4)), (
        "nothing may be written when the load fails its checks"
    )
    # strict=False tolerates missing and unexpected keys, never a wrong shape
    part = {"w": w, "y": torch.zeros(1)}
    cs.load(part, tmp_path / "c", strict=False)
    assert torch.equal(w, torch.ones(4, 4))
    with pytest.raises(LoadMismatchError):
        cs.load({"v": v[:2]}, tmp_path / "c", strict=False)


def test_pickle_needs_opt_in_on_save_and_load(tmp_path) -> None:
    class Thing:
        def __init__(self, x):
            self.x = x

        def __eq__(self, other):
            return isinstance(other, Thing) and other.x == self.x

    sd = {"obj": Thing(3), "w": torch.ones(2)}
    with pytest.raises(PickleNotAllowedError, match="obj"):
        cs.save(sd, tmp_path / "c")
    assert not os.path.exists(tmp_path / "c" / "manifest.json")
    cs.save({"obj": {1, 2}, "w": torch.ones(2)}, tmp_path / "c", allow_pickle=True)
    out = {"obj": None, "w": torch.zeros(2)}
    with pytest.raises(PickleNotAllowedError, match="allow_pickle"):
        cs.load(out, tmp_path / "c")
    assert out["obj"] is None and torch.equal(out["w"], torch.zeros(2))
    cs.load(out, tmp_path / "c", allow_pickle=True)
    assert out["obj"] == {1, 2}
    with pytest.raises(PickleNotAllowedError):
        cs.open(tmp_path / "c").read("obj")
    assert cs.open(tmp_path / "c").read("obj", allow_pickle=True) == {1, 2}


def test_existing_checkpoint_needs_overwrite_and_failed_overwrite_keeps_it(tmp_path) -> None:
    cs.save({"w": torch.ones(3)}, tmp_path / "c")
    with pytest.raises(CheckpointExistsError):
        cs.save({"w": torch.zeros(3)}, tmp_path / "c")
    with pytest.raises(PickleNotAllowedError):
        cs.save({"w": torch.zeros(3), "o": object()}, tmp_path / "c", overwrite=True)
    assert torch.equal(cs.open(tmp_path / "c").read("w"), torch.ones(3))
    cs.save({"w": torch.full((3,), 7.0)}, tmp_path / "c", overwrite=True)
    assert torch.equal(cs.open(tmp_path / "c").read("w"), torch.full((3,), 7.0))
    assert len(os.listdir(tmp_path / "c" / "data")) == 1, "data of the replaced save is removed"


def _data_file(path) -> str:
    d = os.path.join(path, "data")
    return os.path.join(d, sorted(os.listdir(d))[0])


def test_flipped_byte_is_detected_and_never_reaches_a_tensor(tmp_path) -> None:
    a, b = torch.randn(100), torch.randn(50)
    cs.save({"a": a, "b": b}, tmp_path / "c")
    path = _data_file(tmp_path / "c")
    with open(path, "r+b") as f:  # "a" is written first: flip a byte inside it
        f.seek(17)
        byte = f.read(1)
        f.seek(17)
        f.write(bytes([byte[0] ^ 0x40]))
    out = {"a": torch.zeros(100), "b": torch.zeros(50)}
    with pytest.raises(ChecksumError, match="'a'") as err:
        cs.load(out, tmp_path / "c")
    assert err.value.bad == ["a"]
    assert torch.equal(out["a"], torch.zeros(100))
    with pytest.raises(ChecksumError):
        cs.open(tmp_path / "c").read("a")
    assert torch.equal(cs.open(tmp_path / "c").read("b"), b)


def test_missing_and_incomplete_checkpoints_are_refused(tmp_path) -> None:
    with pytest.raises(CheckpointNotFoundError):
        cs.open(tmp_path / "nothing")
    cs.save({"w": torch.ones(2)}, tmp_path / "c")
    os.remove(tmp_path / "c" / "manifest.json")
    with pytest.raises(IncompleteCheckpointError):
        cs.open(tmp_path / "c")
    with pytest.raises(IncompleteCheckpointError):
        cs.load({"w": torch.zeros(2)}, tmp_path / "c")
    # saving again over an incomplete checkpoint is allowed; the killed save's files stay
    # (they could belong to a save still in flight) until `ckpt gc` finds them orphaned
    cs.save({"w": torch.ones(2)}, tmp_path / "c")
    assert len(os.listdir(tmp_path / "c" / "data")) == 2
    from ckptstore.ops.gc import find_garbage

    assert [g.kind for g in find_garbage(tmp_path / "c", older_than=0)] == ["orphan"]


@pytest.mark.parametrize(
    "damage",
    [
        "truncate",
        "garbage",
        "version",
        "missing_key",
        "bad_base64",
        "crc_count",
        "file_index",
        "not_object",
    ],
)
def test_damaged_manifest_is_a_typed_error(tmp_path, damage) -> None:
    from ckptstore.errors import ManifestError
    from ckptstore.format.manifest import encode_manifest

    cs.save({"w": torch.ones(8), "x": 1}, tmp_path / "c")
    mpath = tmp_path / "c" / "manifest.json"
    raw = mpath.read_bytes()
    doc = json.loads(raw)
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "garbage":
        raw = b"\x00\xff" * 10
    elif damage == "not_object":
        raw = b"[1, 2]"
    else:
        if damage == "version":
            doc["format_version"] = 99
        elif damage == "missing_key":
            del doc["chunks"]
        elif damage == "bad_base64":
            doc["chunks"]["offset"] = "!!notbase64!!"
        elif damage == "crc_count":
            doc["chunks"]["crc32c"] = ""
        elif damage == "file_index":
            doc["files"] = []
        doc.pop("checksum")
        raw = encode_manifest(doc)  # signed again: the rules, not the checksum, must refuse it
    mpath.write_bytes(raw)
    with pytest.raises(ManifestError):
        cs.open(tmp_path / "c")
    with pytest.raises(ManifestError):
        cs.load({"w": torch.zeros(8), "x": 0}, tmp_path / "c")


def test_other_stores_by_url(tmp_path) -> None:
    sd = {"w": torch.randn(10, 10), "n": 3}
    for url in ["memory://test-urls/c", f"file://{tmp_path}/f", f"local://{tmp_path}/l"]:
        cs.save(sd, url)
        out = {"w": torch.zeros(10, 10), "n": 0}
        cs.load(out, url)
        assert torch.equal(out["w"], sd["w"]) and out["n"] == 3, url


def test_state_dict_errors(tmp_path) -> None:
    with pytest.raises(StateDictError, match="outside"):
        cs.Sharded(torch.zeros(3), (4,), (2,))
    with pytest.raises(StateDictError):
        cs.save({(1, 2): torch.zeros(1)}, tmp_path / "c")
    with pytest.raises(StateDictError, match="same name"):
        cs.save({"a.b": torch.zeros(1), "a": {"b": torch.zeros(1)}}, tmp_path / "c")
    # a single process that declares only part of a tensor leaves a gap
    with pytest.raises(ShardingError, match="gaps"):
        cs.save({"w": cs.Sharded(torch.zeros(2, 4), (3, 4), (0, 0))}, tmp_path / "c")


def test_per_rank_entries_single_process(tmp_path) -> None:
    state = torch.get_rng_state()
    cs.save({"rng": cs.PerRank(state), "pos": cs.PerRank(17)}, tmp_path / "c")
    torch.rand(10)
    out = {"rng": cs.PerRank(torch.zeros_like(state)), "pos": cs.PerRank(0)}
    cs.load(out, tmp_path / "c")
    assert torch.equal(out["rng"].value, state) and out["pos"].value == 17
    ck = cs.open(tmp_path / "c")
    assert ck.read("pos", rank=0) == 17
    assert ck.meta("rng").per_rank


def test_nn_module_and_optimizer_state_dicts(tmp_path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    cs.save({"model": model.state_dict(), "optim": opt.state_dict()}, tmp_path / "c")
    model2 = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=5.0)
    model2(torch.randn(2, 8)).sum().backward()
    opt2.step()
    sd = {"model": model2.state_dict(), "optim": opt2.state_dict()}
    cs.load(sd, tmp_path / "c")
    opt2.load_state_dict(sd["optim"])
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    assert opt2.param_groups[0]["lr"] == 1e-3
    assert torch.equal(
        opt2.state[opt2.param_groups[0]["params"][0]]["exp_avg"],
        opt.state[opt.param_groups[0]["params"][0]]["exp_avg"],
    )


def test_tensors_without_elements_roundtrip(tmp_path) -> None:
    sd = {
        "rows0": torch.zeros(0, 3),
        "cols0": torch.zeros(4, 0, dtype=torch.int64),
        "e": torch.zeros(0),
    }
    cs.save(sd, tmp_path / "c")
    out = {
        "rows0": torch.ones(0, 3),
        "cols0": torch.ones(4, 0, dtype=torch.int64),
        "e": torch.ones(0),
    }
    cs.load(out, tmp_path / "c")
    ck = cs.open(tmp_path / "c")
    assert [tuple(ck.read(k).shape) for k in ("rows0", "cols0", "e")] == [(0, 3), (4, 0), (0,)]


def test_lazy_conjugate_and_negative_views_save_their_values(tmp_path) -> None:
    x = torch.randn(4, 3, dtype=torch.complex64)
    state = {
        "conj": x.conj(),  # contiguous, conj bit set: its memory holds x, not x.conj()
        "neg": x.conj().imag,  # a negative view
        "conj_t": x.t().conj(),  # strided and lazy
    }
    expected = {k: v.resolve_conj().resolve_neg().clone() for k, v in state.items()}
    cs.save(state, tmp_path / "sync")
    cs.async_save(state, tmp_path / "async").wait()
    for where in ("sync", "async"):
        ck = cs.open(tmp_path / where)
        for k, v in expected.items():
            assert torch.equal(ck.read(k), v), (where, k)


def test_overwrite_deletes_only_the_replaced_checkpoints_files(tmp_path) -> None:
    """A file the replaced manifest did not name (here: a concurrent save still writing)
    survives an overwrite; the replaced checkpoint's own files go."""
    path = tmp_path / "c"
    cs.save({"w": torch.ones(4)}, path)
    old = set(cs.open(path).manifest.files)
    in_flight = path / "data" / "00000-inflight00-0.bin"
    in_flight.write_bytes(b"a concurrent writer's bytes")
    cs.save({"w": torch.full((4,), 2.0)}, path, overwrite=True)
    files = set(os.listdir(path / "data"))
    assert in_flight.name in files
    assert not {f.split("/")[-1] for f in old} & files
    assert torch.equal(cs.open(path).read("w"), torch.full((4,), 2.0))


def test_concurrent_overwrites_leave_exactly_one_complete_checkpoint(tmp_path) -> None:
    """Two writers overwrite one path at the same time, again and again: every time the
    result is one writer's whole checkpoint, never a manifest naming deleted files."""
    import threading

    path = tmp_path / "c"
    states = [{"w": torch.full((256, 64), float(i)), "tag": i} for i in (1, 2)]
    for _ in range(8):
        errors: list[BaseException] = []

        def save(sd: dict, errors: list[BaseException]) -> None:
            try:
                cs.save(sd, path, overwrite=True)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=save, args=(sd, errors)) for sd in states]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        out = {"w": torch.zeros(256, 64), "tag": 0}
        cs.load(out, path)
        assert torch.equal(out["w"], states[out["tag"] - 1]["w"])


@pytest.mark.parametrize("lease", [None, "0"])
def test_gc_during_a_save(tmp_path, monkeypatch, lease) -> None:
    """`ckpt gc --older-than 0s --apply` while a save writes. The save's in-flight marker
    keeps gc off (it commits and loads); with the marker's lease at 0 gc deletes its files,
    and the save then refuses to commit (nothing broken is committed). Either way the
    checkpoint of another step is untouched."""
    from ckptstore import failpoints
    from ckptstore.errors import SaveError
    from ckptstore.ops.gc import delete_garbage, find_garbage

    if lease is not None:
        monkeypatch.setenv("CKPTSTORE_SAVE_LEASE_S", lease)
    cs.save({"w": torch.ones(8)}, tmp_path / "step_00000001")
    path = tmp_path / "step_00000002"
    failpoints.on("written", lambda: delete_garbage(tmp_path, find_garbage(tmp_path, older_than=0)))
    try:
        if lease is None:
            cs.save({"w": torch.full((8,), 2.0)}, path)
            assert torch.equal(cs.open(path).read("w"), torch.full((8,), 2.0))
            assert not (path / ".ckptstore-saving").exists()
        else:
            with pytest.raises(SaveError, match="vanished"):
                cs.save({"w": torch.full((8,), 2.0)}, path)
            assert not (path / "manifest.json").exists()
    finally:
        failpoints.on("written", None)
    assert torch.equal(cs.open(tmp_path / "step_00000001").read("w"), torch.ones(8))


def test_save_load_and_async_save_keep_no_tensor_alive(tmp_path) -> None:
    """Nothing a save or load builds (a leaf per tensor, plans) outlives it through a
    reference cycle: with the cyclic collector off, the caller's tensors are freed as soon
    as the caller drops them (a cycle would keep them, and a young-generation pass on the
    training thread would then walk every leaf)."""
    import gc
    import weakref

    def state() -> dict:
        return {
            "model": {f"w{i}": torch.full((3,), float(i)) for i in range(10)},  # column pass
            "opt": [{"m": torch.ones(2)}, {"v": torch.zeros(2)}],  # the recursive walk
            "step": 3,
        }

    def refs(sd: dict) -> list[weakref.ref]:
        return [
            weakref.ref(t) for t in [*sd["model"].values(), sd["opt"][0]["m"], sd["opt"][1]["v"]]
        ]

    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        sd = state()
        alive = refs(sd)
        cs.save(sd, tmp_path / "a")
        del sd
        assert [r() for r in alive] == [None] * len(alive), "save kept a tensor alive"

        dest = {k: v for k, v in state().items() if k != "step"} | {"step": 0}
        alive = refs(dest)
        cs.load(dest, tmp_path / "a")
        assert float(dest["model"]["w7"][0]) == 7.0 and dest["step"] == 3
        del dest
        assert [r() for r in alive] == [None] * len(alive), "load kept a tensor alive"

        sd = state()
        alive = refs(sd)
        cs.async_save(sd, tmp_path / "b").wait()
        del sd
        assert [r() for r in alive] == [None] * len(alive), "async_save kept a tensor alive"
    finally:
        if was_enabled:
            gc.enable()


def test_a_model_block_loads_whole_reordered_in_part_and_refuses_a_wrong_entry(tmp_path) -> None:
    """A model's dict of tensors (a tensor block, matched and planned as columns) loads
    bit-exact in any key order and in part; a wrong shape or dtype inside it is refused,
    named, before anything is written."""
    g = torch.Generator().manual_seed(3)
    model = {f"layers.{i}.norm": torch.randn(8 + i % 3, generator=g) for i in range(40)}
    cs.save({"model": model, "step": 7}, tmp_path / "c")

    same = {"model": {k: torch.zeros_like(v) for k, v in model.items()}, "step": 0}
    info = cs.load(same, tmp_path / "c")
    assert info.tensors == 40 and same["step"] == 7
    assert all(torch.equal(same["model"][k], v) for k, v in model.items())

    reordered = {"model": {k: torch.zeros_like(model[k]) for k in reversed(model)}, "step": 0}
    cs.load(reordered, tmp_path / "c")
    assert all(torch.equal(reordered["model"][k], v) for k, v in model.items())

    subset = {"model": {k: torch.zeros_like(v) for k, v in list(model.items())[5:30]}}
    assert cs.load(subset, tmp_path / "c", partial=True).tensors == 25
    assert all(torch.equal(subset["model"][k], model[k]) for k in subset["model"])

    wrong = {"model": {k: torch.zeros_like(v) for k, v in model.items()}, "step": 0}
    wrong["model"]["layers.4.norm"] = torch.zeros(99)
    wrong["model"]["layers.9.norm"] = torch.zeros_like(model["layers.9.norm"], dtype=torch.int32)
    with pytest.raises(LoadMismatchError) as err:
        cs.load(wrong, tmp_path / "c")
    assert "model.layers.4.norm" in str(err.value) and "model.layers.9.norm" in str(err.value)
    assert not wrong["model"]["layers.0.norm"].any()  # nothing written before the checks
