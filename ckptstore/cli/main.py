"""``ckpt``: list, inspect, verify, compare, copy, reshard, export, import and collect
checkpoints from the shell.

Exit codes: 0 success; 1 the checkpoint is damaged (bad chunks, a manifest that fails its
checksum or validation, data that does not decode); 2 usage error, the path holds no
committed checkpoint, or storage refused (a link out of the root, not a regular file).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
from typing import Any

from ckptstore.cli.format import human_age, human_bytes, table
from ckptstore.cli.paths import check_root, open_for_cli
from ckptstore.errors import DAMAGED_CONTENT, CkptStoreError, IncompleteCheckpointError
from ckptstore.format.manifest import TensorRecord
from ckptstore.format.verify import verify_checkpoint
from ckptstore.loading.checkpoint import Checkpoint

EXIT_OK, EXIT_DAMAGED, EXIT_USAGE = 0, 1, 2


def _emit_error(args: argparse.Namespace, exc: CkptStoreError) -> int:
    state = "incomplete" if isinstance(exc, IncompleteCheckpointError) else "error"
    where = getattr(args, "path", None) or getattr(args, "root", None) or getattr(args, "src", "")
    if getattr(args, "json", False):
        print(json.dumps({"path": where, "state": state, "error": str(exc)}))
    elif where and where not in str(exc):
        print(f"ckpt: {where}: {state}: {exc}", file=sys.stderr)
    else:  # the message names the path already
        print(f"ckpt: {state}: {exc}", file=sys.stderr)
    return EXIT_DAMAGED if isinstance(exc, DAMAGED_CONTENT) else EXIT_USAGE


def cmd_inspect(args: argparse.Namespace) -> int:
    ck = open_for_cli(args.path)
    summary = _inspect_summary(ck, args.tensors)
    if args.tensors and not (summary["tensors"] or summary["objects"] or summary["per_rank"]):
        raise UsageError(_no_match(args.tensors, ck.keys()))
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        _print_inspect(summary, args.tree)
    return EXIT_OK


def _inspect_summary(ck: Checkpoint, pattern: str | None) -> dict[str, Any]:
    """What ``ckpt inspect`` shows (and prints with ``--json``): entries matching
    ``pattern`` (all without one), totals, metadata."""
    m = ck.manifest
    tensors = []
    for name, rec in m.tensors.items():
        if pattern and not fnmatch.fnmatchcase(name, pattern):
            continue
        meta = ck.meta(name)
        tensors.append(
            {
                "name": name,
                "dtype": rec.dtype,
                "shape": list(rec.shape),
                "chunks": meta.chunks,
                "bytes": meta.nbytes,
                "stored_bytes": meta.stored_nbytes,
                "codec": rec.codec,
                "layout": meta.layout,
            }
        )
    objects = [
        {"name": n, "pickled": o.blob is not None, **({} if o.blob else {"value": o.value})}
        for n, o in m.objects.items()
        if not pattern or fnmatch.fnmatchcase(n, pattern)
    ]
    per_rank = [
        {
            "name": n,
            "ranks": len(es),
            "kind": "tensor" if isinstance(es[0], TensorRecord) else "value",
        }
        for n, es in m.per_rank.items()
        if not pattern or fnmatch.fnmatchcase(n, pattern)
    ]
    return {
        "path": ck.url,
        "state": "committed",
        "format_version": m.format_version,
        "world_size": m.world_size,
        "created_unix": m.created_unix,
        "tensors": tensors,
        "objects": objects,
        "per_rank": per_rank,
        "totals": {
            "tensors": len(m.tensors),
            "chunks": len(m.chunks),
            "bytes": m.total_tensor_bytes(),
            "stored_bytes": m.stored_bytes(),
            "files": len(m.files),
        },
        "metadata": m.metadata,
    }


def _print_inspect(summary: dict[str, Any], tree: bool) -> None:
    tensors, objects, per_rank = summary["tensors"], summary["objects"], summary["per_rank"]
    print(f"checkpoint  {summary['path']}")
    print(
        f"state       committed (format v{summary['format_version']}), saved from "
        f"{summary['world_size']} ranks"
    )
    t = summary["totals"]
    print(
        f"totals      {t['tensors']} tensors, {t['chunks']} chunks, {human_bytes(t['bytes'])} "
        f"({human_bytes(t['stored_bytes'])} stored) in {t['files']} files"
    )
    whole = sum(1 for x in tensors if x["chunks"] <= 1)
    grid = sum(1 for x in tensors if x["chunks"] > 1 and x["layout"] == "grid")
    boxes = len(tensors) - whole - grid
    print(f"layout      {whole} whole, {grid} on a chunk grid, {boxes} as free boxes")
    if tensors and tree:
        print()
        print(_tree(tensors))
    elif tensors:
        rows = [
            [
                x["name"],
                x["dtype"],
                "x".join(map(str, x["shape"])) or "scalar",
                str(x["chunks"]),
                human_bytes(x["bytes"]),
                x["codec"] or "-",
            ]
            for x in tensors
        ]
        print()
        print(table(rows, ["tensor", "dtype", "shape", "chunks", "bytes", "codec"]))
    if objects:
        print()
        rows = [[o["name"], "pickled" if o["pickled"] else repr(o["value"])] for o in objects]
        print(table(rows, ["object", "value"], elide=1))
    if per_rank:
        print()
        print(
            table(
                [[p["name"], p["kind"], str(p["ranks"])] for p in per_rank],
                ["per-rank entry", "kind", "ranks"],
            )
        )


def _tree(tensors: list[dict[str, Any]]) -> str:
    """Tensors as a tree of their dotted names, with sizes summed per subtree."""
    root: dict[str, Any] = {}
    for x in tensors:
        node = root
        for part in x["name"].split("."):
            node = node.setdefault(part, {})
        node[""] = x
    lines: list[str] = []

    def size(node: dict[str, Any]) -> int:
        return sum(v["bytes"] if k == "" else size(v) for k, v in node.items())

    def walk(node: dict[str, Any], prefix: str) -> None:
        children = sorted(
            (k for k in node if k), key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k)
        )
        for i, key in enumerate(children):
            last = i == len(children) - 1
            child = node[key]
            branch = "└─ " if last else "├─ "
            leaf = child.get("")
            if leaf is not None and len(child) == 1:
                shape = "x".join(map(str, leaf["shape"])) or "scalar"
                label = f"{key}  {leaf['dtype']} {shape}  {human_bytes(leaf['bytes'])}"
            else:
                label = f"{key}/  {human_bytes(size(child))}"
            lines.append(prefix + branch + label)
            walk({k: v for k, v in child.items() if k}, prefix + ("   " if last else "│  "))

    walk(root, "")
    return "\n".join(lines)


def cmd_verify(args: argparse.Namespace) -> int:
    from ckptstore.cli.progress import Progress

    ck = open_for_cli(args.path)
    with Progress("verify", ck.manifest.stored_bytes(), enabled=not args.json) as progress:
        report = verify_checkpoint(ck.store, ck.manifest, jobs=args.jobs, progress=progress)
    if args.json:
        print(
            json.dumps(
                {
                    "path": ck.url,
                    "ok": report.ok,
                    "chunks": report.chunks,
                    "bytes": report.bytes_checked,
                    "bad": [b.as_dict() for b in report.bad],
                }
            )
        )
    elif report.ok:
        print(
            f"ok: {report.chunks} chunks, {human_bytes(report.bytes_checked)} verified in {ck.url}"
        )
    else:
        print(f"DAMAGED: {len(report.bad)} bad chunk(s) in {ck.url}")
        for b in report.bad:
            print(f"  {b.entry}: chunk {b.chunk} in {b.file} at byte {b.offset}: {b.problem}")
    return EXIT_OK if report.ok else EXIT_DAMAGED


def _when(created: float | None) -> str:
    import datetime

    if not created:
        return "-"
    return datetime.datetime.fromtimestamp(created, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S"
    )


def cmd_ls(args: argparse.Namespace) -> int:
    from ckptstore.training.catalog import scan, scan_tiers

    if args.local:
        tiers = scan_tiers(args.root, args.local)
        if args.json:
            print(json.dumps([e.__dict__ for e in tiers]))
            return EXIT_OK
        if not tiers:
            print(f"no checkpoints under {args.root} or {args.local}")
            return EXIT_OK
        rows = [
            [
                str(e.step),
                _when(e.created_unix),
                human_bytes(e.bytes) if e.bytes is not None else "-",
                str(e.world_size or "-"),
                e.local,
                e.remote,
            ]
            for e in tiers
        ]
        print(table(rows, ["step", "time (UTC)", "size", "ranks", "local", "remote"]))
        failed = [e for e in tiers if e.error]
        for e in failed:
            print(f"step {e.step}: replication failed: {e.error}")
        return EXIT_OK
    if check_root(args.root):  # one checkpoint, not a run root: show it
        return _ls_one(args)
    entries = scan(args.root, details=True)
    replication = _recorded_replication(args.root, [e.step for e in entries])
    if args.json:
        print(json.dumps([{**e.__dict__, "replication": replication.get(e.step)} for e in entries]))
        return EXIT_OK
    if not entries:
        print(f"no checkpoints under {args.root}")
        return EXIT_OK
    rows = []
    for e in entries:
        size = human_bytes(e.bytes) if e.bytes is not None else "-"
        ranks = str(e.world_size) if e.world_size else "-"
        row = [str(e.step), _when(e.created_unix), size, ranks, e.state]
        if replication:
            row.append(replication.get(e.step, "-"))
        rows.append(row)
    header = ["step", "time (UTC)", "size", "ranks", "state"]
    print(table(rows, header + (["replication"] if replication else [])))
    return EXIT_OK


def _ls_one(args: argparse.Namespace) -> int:
    """``ckpt ls`` of a checkpoint rather than a run root: its one line."""
    m = open_for_cli(args.root).manifest
    entry = {
        "path": args.root,
        "state": "committed",
        "created_unix": m.created_unix,
        "bytes": m.stored_bytes(),
        "world_size": m.world_size,
    }
    if args.json:
        print(json.dumps([entry]))
        return EXIT_OK
    row = [args.root, _when(m.created_unix), human_bytes(m.stored_bytes()), str(m.world_size)]
    print(table([[*row, "committed"]], ["checkpoint", "time (UTC)", "size", "ranks", "state"]))
    return EXIT_OK


def _no_match(pattern: str, names: list[str]) -> str:
    """The error for a --tensors glob that matches nothing: a few names to aim at."""
    import difflib

    near = difflib.get_close_matches(pattern.strip("*"), names[:50_000], n=3, cutoff=0.5)
    example = near or names[:3]
    hint = f"; e.g. {', '.join(example)}" if example else ""
    return f"no entry matches --tensors {pattern!r} ({len(names)} entries{hint})"


def _recorded_replication(root: str, steps: list[int]) -> dict[int, str]:
    """For a local tier: each step's replication state as recorded next to its manifest."""
    from ckptstore.tiers.state import read_tier_state
    from ckptstore.training.catalog import step_store

    out = {}
    for step in steps:
        record = read_tier_state(step_store(root, step))
        if record is not None:
            out[step] = record.state
    return out


def cmd_cp(args: argparse.Namespace) -> int:
    from ckptstore.cli.progress import Progress
    from ckptstore.ops.copy import copy_checkpoint

    total = open_for_cli(args.src).manifest.stored_bytes()
    with Progress("copy", total, enabled=not args.json) as progress:
        info = copy_checkpoint(
            args.src, args.dst, jobs=args.jobs, overwrite=args.overwrite, progress=progress
        )
    if args.json:
        print(json.dumps(info.__dict__))
    else:
        print(
            f"copied {info.files} files, {human_bytes(info.bytes)}: {info.src} -> {info.dst} (verified)"
        )
    return EXIT_OK


def cmd_diff(args: argparse.Namespace) -> int:
    from ckptstore.cli.progress import Progress
    from ckptstore.ops.diff import diff_checkpoints

    a, b = open_for_cli(args.a), open_for_cli(args.b)
    total = a.manifest.total_tensor_bytes()
    with Progress("diff", total, enabled=not args.json) as progress:
        report = diff_checkpoints(a, b, tensors=args.tensors, atol=args.atol, progress=progress)
    if args.tensors and not report.entries:
        raise UsageError(_no_match(args.tensors, sorted({*a.keys(), *b.keys()})))
    if args.json:
        print(
            json.dumps(
                {
                    "a": report.a,
                    "b": report.b,
                    "same": report.same,
                    "entries": [e.__dict__ for e in report.entries],
                }
            )
        )
        return EXIT_OK if report.same else EXIT_DAMAGED
    differing = [e for e in report.entries if e.status not in ("equal", "close")]
    close = [e for e in report.entries if e.status == "close"]
    equal = len(report.entries) - len(differing) - len(close)
    print(f"a: {report.a}\nb: {report.b}")
    if differing or close:
        rows = []
        for e in differing + close:
            detail = (
                e.how
                if e.max_abs is None
                else (f"abs {e.max_abs:.3g} rel {e.max_rel:.3g} n={e.mismatched}")
            )
            rows.append([e.name, e.status, detail])
        print()
        print(table(rows, ["entry", "status", "detail"]))
    print(f"\n{equal} equal, {len(close)} within atol, {len(differing)} different")
    return EXIT_OK if report.same else EXIT_DAMAGED


def cmd_export(args: argparse.Namespace) -> int:
    from ckptstore.cli.progress import Progress
    from ckptstore.interop.export import export_checkpoint
    from ckptstore.interop.key_map import KeyMap, parse_rename

    key_map = KeyMap(
        args.subtree or "", args.strip_prefix, parse_rename(args.rename), args.add_prefix
    )
    if args.config and args.format != "hf":
        raise UsageError("--config goes with --format hf")

    ck = open_for_cli(args.path)  # once: the export reads this same manifest
    with Progress("export", ck.manifest.total_tensor_bytes(), enabled=not args.json) as progress:
        info = export_checkpoint(
            ck,
            args.out,
            format=args.format,
            tensors=args.tensors,
            dtype=args.dtype,
            max_shard_bytes=parse_size(args.max_shard_size),
            max_memory=parse_size(args.max_memory),
            progress=progress,
            key_map=key_map,
        )
    if args.json:
        print(json.dumps(info.__dict__))
    else:
        print(
            f"exported {info.tensors} tensors, {human_bytes(info.bytes)} as {info.format} to "
            f"{info.out} in {len(info.files)} file(s):"
        )
        for name in info.files:
            print(f"  {name}")
        if args.format == "hf":
            _hf_config(args.config, args.out)
        if info.skipped:
            print(
                f"not exported ({len(info.skipped)}: values, per-rank entries"
                + (f", entries outside {args.subtree!r}" if args.subtree else "")
                + f"): {', '.join(info.skipped[:8])}"
                + (" ..." if len(info.skipped) > 8 else "")
            )
    return EXIT_OK


def _hf_config(config: str | None, out: str) -> None:
    """Copy ``config`` into ``out`` as ``config.json``, or say that from_pretrained needs one."""
    import os
    import shutil

    if config:
        if not os.path.isfile(config):
            raise UsageError(f"--config {config}: no such file")
        shutil.copyfile(config, os.path.join(out, "config.json"))
        print(f"  config.json (from {config})")
    elif not os.path.exists(os.path.join(out, "config.json")):
        print(f"from_pretrained({out!r}) also needs the model's config.json there (--config FILE)")


def cmd_import(args: argparse.Namespace) -> int:
    from ckptstore.cli.progress import Progress
    from ckptstore.interop.importer import import_checkpoint

    with Progress("import", None, enabled=not args.json) as progress:
        info = import_checkpoint(
            args.src,
            args.dst,
            kind=args.kind,
            trust=args.trust,
            overwrite=args.overwrite,
            max_memory=parse_size(args.max_memory),
            progress=progress,
        )
    if args.json:
        print(json.dumps(info.__dict__))
    else:
        print(
            f"imported {info.tensors} tensors, {human_bytes(info.bytes)} from a {info.kind} "
            f"checkpoint: {info.src} -> {info.dst}"
        )
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    from ckptstore.ops.gc import delete_garbage, parse_duration, survey_garbage

    try:
        older = parse_duration(args.older_than)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    check_root(args.root)
    survey = survey_garbage(args.root, older_than=older)
    items = survey.items
    freed = delete_garbage(args.root, items) if args.apply else 0
    if args.json:
        print(
            json.dumps(
                {
                    "root": args.root,
                    "applied": args.apply,
                    "freed_bytes": freed,
                    "items": [
                        {"kind": i.kind, "where": i.where, "bytes": i.bytes, "age_s": i.age_s}
                        for i in items
                    ],
                    "skipped": [s.__dict__ for s in survey.skipped],
                }
            )
        )
        return EXIT_OK
    if survey.skipped:
        print(f"left alone ({len(survey.skipped)}):")
        for skipped in survey.skipped:
            print(f"  {skipped.where} ({skipped.kind}): {skipped.why}")
        print()
    if not items:
        print(f"nothing to collect under {args.root} (older than {args.older_than})")
        return EXIT_OK
    rows = [[i.where, i.kind, human_bytes(i.bytes), human_age(i.age_s)] for i in items]
    print(table(rows, ["path", "kind", "size", "age"]))
    total = sum(i.bytes for i in items)
    if args.apply:
        print(f"deleted {len(items)} item(s), {human_bytes(freed)} freed")
    else:
        print(f"{len(items)} item(s), {human_bytes(total)}: dry run, nothing deleted (--apply)")
    return EXIT_OK


def cmd_reshard(args: argparse.Namespace) -> int:
    from ckptstore.cli.progress import Progress
    from ckptstore.ops.reshard import reshard_checkpoint

    ck = open_for_cli(args.src)  # once: the reshard reads this same manifest
    with Progress("reshard", ck.manifest.total_tensor_bytes(), enabled=not args.json) as progress:
        info = reshard_checkpoint(
            ck,
            args.dst,
            world_size=args.world_size,
            placements=args.placement,
            max_memory=parse_size(args.max_memory),
            overwrite=args.overwrite,
            progress=progress,
        )
    if args.json:
        print(json.dumps(info.__dict__))
        return EXIT_OK
    print(
        f"resharded for {info.world_size} ranks: {info.sharded} sharded, {info.replicated} "
        f"replicated tensors, {human_bytes(info.bytes)}: {info.src} -> {info.dst}"
    )
    if info.dropped:
        print(f"per-rank entries not carried over (world size changed): {', '.join(info.dropped)}")
    return EXIT_OK


def parse_size(text: str) -> int:
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*", text.lower())
    if not m:
        raise UsageError(f"not a size: {text!r} (use e.g. 512MB, 5GB, 1GiB)")
    unit = (m.group(2) or "b").rstrip("b").rstrip("i") or "b"
    scale = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[unit]
    return int(float(m.group(1)) * scale)


class UsageError(CkptStoreError):
    """A command-line argument is not acceptable."""


def build_parser() -> argparse.ArgumentParser:
    from ckptstore import __version__

    parser = argparse.ArgumentParser(
        prog="ckpt",
        description="List, inspect, verify, compare, copy, reshard, export, import and collect ckptstore checkpoints.",
    )
    parser.add_argument("--version", action="version", version=f"ckpt (ckptstore) {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)  # what every command accepts
    common.add_argument("--json", action="store_true", help="machine-readable output")

    def command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kwargs)

    p = command("ls", help="checkpoints under a root: step, time, size, state per tier")
    p.add_argument("root", help="directory or URL holding step_<N> checkpoints")
    p.add_argument(
        "--local",
        metavar="DIR",
        help="this node's local tier of the same checkpoints: show the state on each tier",
    )
    p.set_defaults(func=cmd_ls)
    p = command("cp", help="copy a committed checkpoint to another store, verified, manifest last")
    p.add_argument("src", help="checkpoint directory or URL to copy")
    p.add_argument("dst", help="destination directory or URL")
    p.add_argument("--jobs", type=int, default=8, help="files copied in parallel (default 8)")
    p.add_argument("--overwrite", action="store_true", help="replace a committed checkpoint at DST")
    p.set_defaults(func=cmd_cp)
    p = command("inspect", help="tensors, objects, totals and saved world size")
    p.add_argument("path", help="checkpoint directory or URL")
    p.add_argument("--tensors", metavar="GLOB", help="only entries whose name matches GLOB")
    p.add_argument("--tree", action="store_true", help="tensors as a tree of their dotted names")
    p.set_defaults(func=cmd_inspect)
    p = command("diff", help="which tensors differ between two checkpoints")
    p.add_argument("a", help="first checkpoint")
    p.add_argument("b", help="second checkpoint")
    p.add_argument("--tensors", metavar="GLOB", help="only entries whose name matches GLOB")
    p.add_argument("--atol", type=float, default=0.0, help="differences up to this count as close")
    p.set_defaults(func=cmd_diff)
    p = command("reshard", help="rewrite a checkpoint for N ranks: sequential reads on load")
    p.add_argument("src", help="checkpoint directory or URL")
    p.add_argument("dst", help="new checkpoint directory or URL")
    p.add_argument("--world-size", type=int, required=True, help="ranks of the loading job")
    p.add_argument(
        "--placement",
        action="append",
        default=[],
        metavar="GLOB=shard(d)|replicate",
        help="placement of matching tensors (first match wins; default shard(0) where dim 0 "
        "has at least N rows, else replicate); repeatable",
    )
    p.add_argument("--max-memory", default="256MB", help="largest region held in memory (256MB)")
    p.add_argument("--overwrite", action="store_true", help="replace a committed checkpoint at DST")
    p.set_defaults(func=cmd_reshard)
    p = command(
        "export", help="consolidated tensors as safetensors, one torch.save file, or zarr v3"
    )
    p.add_argument("path", help="checkpoint directory or URL")
    p.add_argument("out", help="output directory (safetensors, zarr) or file (torch)")
    p.add_argument("--format", required=True, choices=["hf", "safetensors", "torch", "zarr"])
    p.add_argument(
        "--config",
        metavar="FILE",
        help="with --format hf: copy this config.json into OUT (from_pretrained needs one)",
    )
    p.add_argument("--tensors", metavar="GLOB", help="only tensors whose name matches GLOB")
    p.add_argument("--dtype", help="cast floating-point tensors: bf16, fp16, fp32")
    p.add_argument(
        "--subtree",
        metavar="NAME",
        help="export only entries under NAME. and drop that prefix (e.g. model)",
    )
    p.add_argument(
        "--strip-prefix",
        action="append",
        default=[],
        metavar="P",
        help="remove P from the start of names that have it (e.g. _orig_mod.); repeatable",
    )
    p.add_argument(
        "--rename",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="replace a leading OLD with NEW (e.g. model.=transformer.); repeatable",
    )
    p.add_argument("--add-prefix", default="", metavar="P", help="put P in front of every name")
    p.add_argument("--max-shard-size", default="5GB", help="safetensors file size limit (5GB)")
    p.add_argument("--max-memory", default="256MB", help="largest region held in memory (256MB)")
    p.set_defaults(func=cmd_export)
    p = command(
        "import", help="a torch DCP directory, torch.save file or safetensors into a checkpoint"
    )
    p.add_argument("src", help="DCP directory, .pt file, .safetensors file/directory/index")
    p.add_argument("dst", help="new checkpoint directory or URL")
    p.add_argument("--kind", choices=["dcp", "torch", "safetensors"], help="default: detected")
    p.add_argument(
        "--trust",
        action="store_true",
        help="read pickled metadata (DCP's .metadata is a pickle: only for trusted sources)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a committed checkpoint at DST")
    p.add_argument("--max-memory", default="1GB", help="DCP tensors read per batch (1GB)")
    p.set_defaults(func=cmd_import)
    p = command("gc", help="incomplete checkpoints and unreferenced files under a root (dry run)")
    p.add_argument("root", help="directory or URL (a CheckpointManager root or one checkpoint)")
    p.add_argument("--older-than", default="1h", help="leave younger things alone (default 1h)")
    p.add_argument("--apply", action="store_true", help="delete what is listed")
    p.set_defaults(func=cmd_gc)
    p = command("verify", help="re-read every chunk and check its crc32c")
    p.add_argument("path", help="checkpoint directory or URL")
    p.add_argument("--jobs", type=int, default=4, help="parallel readers (default 4)")
    p.set_defaults(func=cmd_verify)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CkptStoreError as exc:
        return _emit_error(args, exc)
    except BrokenPipeError:  # `ckpt inspect X | head`: the reader has what it wanted
        _quiet_stdout()
        return EXIT_OK


def _quiet_stdout() -> None:
    """After a broken pipe: send what is left of stdout nowhere, so that the interpreter's
    final flush does not fail again (the recipe of Python's signal documentation)."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
