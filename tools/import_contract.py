"""The import contract of ckptstore: its layers, its walls, no cycles. ``make test`` runs it
(``tests/test_architecture.py``); run it alone with ``python tools/import_contract.py``.

Layers, highest first. A module imports from its own package and from lower layers only;
packages that share a layer do not import each other. Every import counts -- module level
and inside functions alike -- except those under ``if TYPE_CHECKING:`` (annotations only).

Walls:
- only ``ckptstore.coordination`` (and the test helpers) use ``torch.distributed`` itself --
  process groups, collectives, the job's key-value store; ``torch.distributed.tensor``,
  ``.device_mesh``, ``.checkpoint`` and ``.fsdp`` are tensor and state APIs, open to all;
- ``ckptstore.backends`` (Stores) import nothing of ckptstore but its errors: a Store moves
  bytes and knows nothing about tensors or checkpoints;
- ``ckptstore.format`` imports no planner, reader or writer above it;
- outside ``ckptstore.backends`` no module tests for a concrete Store class with
  ``isinstance``: the core asks a Store for capabilities.
"""

from __future__ import annotations

import ast
import os
import sys
from collections.abc import Iterator

LAYERS: list[list[str]] = [
    ["ckptstore.testing"],  # helpers for tests, benchmarks and the campaign
    ["ckptstore.cli"],  # the `ckpt` command
    ["ckptstore"],  # the public API (``import ckptstore as cs``)
    # built on save and load; integrations: plugins for training frameworks
    ["ckptstore.training", "ckptstore.ops", "ckptstore.interop", "ckptstore.integrations"],
    ["ckptstore.saving", "ckptstore.loading"],
    ["ckptstore.tiers"],  # what a save does for a store with tiers
    ["ckptstore.coordination", "ckptstore.state"],
    ["ckptstore.format"],  # the on-disk contract
    ["ckptstore.backends"],  # bytes behind a URL
    [
        "ckptstore.errors",
        "ckptstore.knobs",
        "ckptstore.gcpause",
        "ckptstore.failpoints",
        "ckptstore.byte_buffers",
    ],
]
TORCH_DISTRIBUTED_OK = ("ckptstore.coordination", "ckptstore.testing")
TORCH_DISTRIBUTED_SUBMODULES = ("tensor", "_tensor", "device_mesh", "checkpoint", "fsdp")
STORE_CLASSES = {"LocalStore", "TieredStore", "S3Store", "MemoryStore", "FsspecStore"}
SOURCES = {"ckptstore": "ckptstore", "ckptstore.backends": "backends"}


def modules(root: str) -> dict[str, str]:
    """Every module of the package: dotted name -> file."""
    out: dict[str, str] = {}
    for package, folder in SOURCES.items():
        base = os.path.join(root, folder)
        for dirpath, _dirs, files in os.walk(base):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), base)[:-3].replace(os.sep, ".")
                    name = f"{package}.{rel}".removesuffix(".__init__")
                    if package == "ckptstore" and rel.startswith("backends"):
                        continue  # an installed copy or stray folder; backends/ is the source
                    out[name] = os.path.join(dirpath, f)
    return out


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, skipping ``if TYPE_CHECKING:`` blocks."""
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            continue
        yield child
        yield from _runtime_nodes(child)


def imports(name: str, path: str, known: dict[str, str]) -> set[str]:
    """The modules of the package that ``name`` imports (at run time)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            found.update(s for s in subs if s in known)
            if not all(s in known for s in subs):
                found.add(node.module)
    out = set()
    for target in found:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            out.add(target)
    return out


def layer_of(name: str) -> tuple[int, str] | None:
    """(layer index, package) of a module: the longest package prefix listed."""
    best: tuple[int, str] | None = None
    for i, packages in enumerate(LAYERS):
        for p in packages:
            if (name == p or name.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
                best = (i, p)
    return best


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _walls(name: str, path: str) -> list[str]:
    """torch.distributed outside the coordination layer; isinstance on concrete Stores."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    problems = []
    may_use_dist = name.startswith(TORCH_DISTRIBUTED_OK)
    for node in _runtime_nodes(tree):
        line = getattr(node, "lineno", 0)
        if not may_use_dist:
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == "torch.distributed" or a.name.startswith(
                        "torch.distributed.distributed_c10d"
                    ):
                        problems.append(f"{name}:{line} imports {a.name} (only coordination may)")
            elif isinstance(node, ast.ImportFrom) and node.module:
                mod = node.module
                if mod == "torch" and any(a.name == "distributed" for a in node.names):
                    problems.append(
                        f"{name}:{line} imports torch.distributed (only coordination may)"
                    )
                elif mod == "torch.distributed" and any(
                    a.name not in TORCH_DISTRIBUTED_SUBMODULES for a in node.names
                ):
                    problems.append(
                        f"{name}:{line} imports from torch.distributed (only coordination may)"
                    )
            elif isinstance(node, ast.Call):
                func = ast.unparse(node.func)
                head = func.removeprefix("torch.distributed.").split(".")[0]
                if (
                    func.startswith("torch.distributed.")
                    and head not in TORCH_DISTRIBUTED_SUBMODULES
                ):
                    problems.append(f"{name}:{line} calls {func} (only coordination may)")
        if (
            not name.startswith("ckptstore.backends")
            and isinstance(node, ast.Call)
            and ast.unparse(node.func) == "isinstance"
            and len(node.args) == 2
        ):
            named = {
                n.id if isinstance(n, ast.Name) else getattr(n, "attr", "")
                for n in ast.walk(node.args[1])
            }
            if named & STORE_CLASSES:
                problems.append(
                    f"{name}:{line} tests for {sorted(named & STORE_CLASSES)[0]} "
                    "(ask the Store for a capability instead)"
                )
    return problems


def check(root: str) -> list[str]:
    """Every breach of the contract in the sources under ``root`` (empty: it holds)."""
    known = modules(root)
    graph = {name: imports(name, path, known) for name, path in known.items()}
    problems = []
    for name in sorted(known):
        mine = layer_of(name)
        if mine is None:
            problems.append(f"{name}: in no layer of the contract (add its package to LAYERS)")
            continue
        for target in sorted(graph[name]):
            theirs = layer_of(target)
            if theirs is None or theirs[1] == mine[1]:
                continue
            if theirs[0] < mine[0]:
                problems.append(f"{name} imports {target}: a higher layer ({theirs[1]})")
            elif theirs[0] == mine[0]:
                problems.append(
                    f"{name} imports {target}: {mine[1]} and {theirs[1]} are independent"
                )
        problems += _walls(name, known[name])
    problems += [f"import cycle: {' -> '.join(c)}" for c in _cycles(graph)]
    return problems


def main() -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    problems = check(root)
    for p in problems:
        print(p)
    print(
        f"import contract: {'broken, ' + str(len(problems)) + ' problem(s)' if problems else 'holds'}"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
