"""Where fetched data and trained tokenisers are cached, and how files get there (atomically)."""

from __future__ import annotations

import os
from pathlib import Path

from qkvlab.files import fsync_dir, write_atomic

__all__ = ["atomic_write_bytes", "resolve_cache_dir"]


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir`` if given, else ``$QKVLAB_CACHE``, else ``~/.cache/qkvlab``."""
    if cache_dir is None:
        cache_dir = os.environ.get("QKVLAB_CACHE") or Path.home() / ".cache" / "qkvlab"
    return Path(cache_dir).expanduser()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, never through a link (:func:`qkvlab.files.write_atomic`).

    Several processes (DDP ranks) may race to write the same cache entry; the last rename wins and
    every reader sees a complete file.
    """
    write_atomic(path, data, sync_folder=False)


__all__ += ["fsync_dir", "write_atomic"]
