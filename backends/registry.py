"""URL scheme -> Store implementation, imported lazily (adding a backend is one line here)."""

from __future__ import annotations

import importlib
import os

from ckptstore.backends.base import Store
from ckptstore.errors import UnsupportedURLError

# scheme -> "module:Class"; an entry may name a package to install if its import fails.
KNOWN_BACKENDS: dict[str, tuple[str, str | None]] = {
    "file": ("ckptstore.backends.local:LocalStore", None),
    "memory": ("ckptstore.backends.memory:MemoryStore", None),
    "s3": ("ckptstore.backends.s3:S3Store", "boto3"),
}


def _split_scheme(url: str) -> tuple[str, str]:
    if "://" not in url:
        return "file", url
    scheme, rest = url.split("://", 1)
    return scheme.lower(), rest


def open_store(url: str | os.PathLike[str] | Store, **options: object) -> Store:
    """The Store for ``url``: a local path, ``file://``, ``memory://`` or any fsspec URL."""
    if isinstance(url, Store):
        return url
    url = os.fspath(url)
    scheme, rest = _split_scheme(url)
    target = KNOWN_BACKENDS.get(scheme)
    if target is None:
        # Anything fsspec knows about works through the generic adapter.
        from fsspec.registry import known_implementations, registry

        if scheme not in known_implementations and scheme not in registry:
            raise UnsupportedURLError(f"no storage backend for URL scheme {scheme!r} in {url!r}")
        from ckptstore.backends.fsspec_store import FsspecStore

        try:
            return FsspecStore(url, **options)
        except ImportError as exc:
            raise UnsupportedURLError(f"backend for {scheme!r} needs a package: {exc}") from exc
    module_name, class_name = target[0].split(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except ImportError as exc:
        hint = f" (pip install {target[1]})" if target[1] else ""
        raise UnsupportedURLError(f"backend for {scheme!r} is not available{hint}: {exc}") from exc
    return cls(rest, **options)
