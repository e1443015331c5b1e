"""Write docs/api.md, the API reference, from the public names' signatures and docstrings.

    python tools/api_doc.py          # rewrite docs/api.md
    python tools/api_doc.py --check  # exit 1 if docs/api.md is not what this would write

``tests/test_api_doc.py`` runs the check, and fails for a public name without a docstring:
the reference stays true to the code.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent.parent / "docs" / "api.md"

INTRO = """# API reference

Generated from the docstrings by `python tools/api_doc.py` (a test keeps it in step with
the code). `import ckptstore as cs`; every name below is `cs.<name>`. The user guide
(`docs/guide.md`) shows them in use; `docs/design.md` says how they work.
"""

SECTIONS = [
    ("Saving and loading", ["save", "load", "async_save", "prepare_async_save", "open"]),
    (
        "What they return",
        ["SaveInfo", "LoadInfo", "AsyncSaveHandle", "Checkpoint", "TensorMeta", "ObjectMeta"],
    ),
    ("State leaves", ["Sharded", "PerRank"]),
    ("Training loops", ["CheckpointManager"]),
    (
        "When to save, what to keep",
        ["EveryNSteps", "EveryNSeconds", "AnyOf", "KeepLast", "KeepEvery", "KeepAll", "KeepAny"],
    ),
    ("Tiered storage", ["Tiered", "replicate", "ReplicationHandle", "ReplicationInfo"]),
    ("torch DCP's storage layer (`cs.dcp`)", ["dcp.Writer", "dcp.Reader"]),
]
MODULES = {"errors", "dcp"}  # documented through their members


STORE_CLASSES = {"Tiered"}  # a Store: what users write is its constructor, not its methods


def missing_docstrings(module: Any) -> list[str]:
    """Public names (and public methods of public classes) without a docstring."""
    out = []
    names = [n for n in module.__all__ if n not in MODULES]
    names += [n for _, section in SECTIONS for n in section if "." in n]
    for name in names:
        obj = _resolve(module, name)
        if not inspect.getdoc(obj):
            out.append(name)
        if inspect.isclass(obj) and name not in STORE_CLASSES:
            for attr, member in _methods(obj):
                if not inspect.getdoc(member):
                    out.append(f"{name}.{attr}")
    return out


def _resolve(module: Any, dotted: str) -> Any:
    obj = module
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _methods(cls: type) -> list[tuple[str, Any]]:
    members = []
    for attr, member in vars(cls).items():
        if attr.startswith("_") and attr != "__init__":
            continue
        if attr == "__init__":
            continue  # documented by the class docstring's Args
        if callable(member) or isinstance(member, property):
            members.append((attr, member))
    return members


def _signature(name: str, obj: Any) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return name
    return f"{name}{sig}"


def _fields(cls: type) -> list[str]:
    if not dataclasses.is_dataclass(cls):
        return []
    return [f"`{f.name}`" for f in dataclasses.fields(cls) if not f.name.startswith("_")]


def render(module: Any) -> str:
    parts = [INTRO]
    documented = {n for _, names in SECTIONS for n in names}
    rest = [n for n in module.__all__ if n not in documented and n not in MODULES]
    sections = [*SECTIONS, ("Other", rest)] if rest else SECTIONS
    for title, names in sections:
        parts.append(f"## {title}\n")
        for name in names:
            parts.append(_entry(name, _resolve(module, name)))
    parts.append("## Errors (`cs.errors`)\n")
    parts.append(
        "Every error ckptstore raises on purpose is a `CkptStoreError`; the CLI's exit codes "
        "follow them (`docs/cli.md`).\n"
    )
    errors = module.errors
    for name, cls in inspect.getmembers(errors, inspect.isclass):
        if cls.__module__ == errors.__name__ and issubclass(cls, Exception):
            bases = ", ".join(b.__name__ for b in cls.__bases__)
            parts.append(f"- **`{name}`** ({bases}): {_one_paragraph(inspect.getdoc(cls))}\n")
    return "\n".join(parts).rstrip() + "\n"


def _entry(name: str, obj: Any) -> str:
    lines = [f"### `{_signature(name, obj)}`\n" if not inspect.isclass(obj) else f"### `{name}`\n"]
    if inspect.isclass(obj):
        init = obj.__dict__.get("__init__")
        if init is not None or dataclasses.is_dataclass(obj):
            lines.append(f"```python\n{_signature(name, obj)}\n```\n")
    lines.append((inspect.getdoc(obj) or "").strip() + "\n")
    if inspect.isclass(obj):
        fields = _fields(obj)
        if fields:
            lines.append(f"Fields: {', '.join(fields)}.\n")
        methods = [] if name in STORE_CLASSES else _methods(obj)
        for attr, member in methods:
            target = member.fget if isinstance(member, property) else member
            head = (
                f"{name}.{attr}"
                if isinstance(member, property)
                else _signature(f"{name}.{attr}", target)
            )
            lines.append(f"- `{head}`: {_one_paragraph(inspect.getdoc(member))}")
        if methods:
            lines.append("")
    return "\n".join(lines)


def _one_paragraph(doc: str | None) -> str:
    return " ".join((doc or "").split("\n\n")[0].split())


def main() -> int:
    sys.path.insert(0, str(OUT.parent.parent))
    import ckptstore

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    text = render(ckptstore)
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python tools/api_doc.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
