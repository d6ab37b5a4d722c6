"""Where fetched data and trained tokenisers are cached, and how files get there (atomically)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_bytes", "resolve_cache_dir"]


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir`` if given, else ``$QKVLAB_CACHE``, else ``~/.cache/qkvlab``."""
    if cache_dir is None:
        cache_dir = os.environ.get("QKVLAB_CACHE") or Path.home() / ".cache" / "qkvlab"
    return Path(cache_dir).expanduser()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part.

    Temp file in the same folder, fsync, then ``os.replace`` (atomic on POSIX and Windows). Several
    processes (DDP ranks) may race to write the same cache entry; the last replace wins and every
    reader sees a complete file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; give it the mode an ordinary open() would (0666 less umask)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write a small text file atomically (temp file, fsync, rename), then fsync the folder."""
    atomic_write_bytes(path, text.encode("utf-8"))
    fsync_dir(path.parent)
