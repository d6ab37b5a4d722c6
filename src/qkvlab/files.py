"""Every file qkvlab writes goes through here: atomic, and never through a symbolic link.

A run, grid or report folder may come from someone else (copied, unpacked, shared). A link planted
in it (``RUN/metrics.jsonl -> ~/.bashrc``) must not make qkvlab write outside the folder the user
named. So:

- whole files are written to a temporary file in the same folder, fsynced and renamed over the
  target (:func:`write_atomic`): a reader sees the old file or the whole new one, and a link at the
  target is replaced, never followed;
- files that grow (logs, ``metrics.jsonl``) and lock files are opened with ``O_NOFOLLOW``
  (:func:`open_append`, :func:`open_lock`); a link there is refused in one line;
- a folder qkvlab reads back and writes into (a run to resume, a grid to continue) is checked for
  links first (:func:`refuse_links`).

The folder the user names may itself be a link (``runs -> /scratch/runs``): that is the user's
choice. Only what is below it is qkvlab's to guard. Failures of the file system (disk full,
read-only) name the path they hit.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import IO

from qkvlab.errors import UserError

__all__ = [
    "LinkRefused",
    "fsync_dir",
    "latest_checkpoint",
    "open_append",
    "open_lock",
    "refuse_links",
    "sha256_file",
    "write_atomic",
]


class LinkRefused(UserError):
    """A symbolic link where qkvlab would write."""


def _link_message(path: Path) -> str:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    return (
        f"{path} is a symbolic link (to {target}); qkvlab never writes through a link in a folder it "
        "writes into: remove the link or use another folder"
    )


def refuse_links(folder: Path) -> None:
    """Refuse ``folder`` if anything below it is a symbolic link (``folder`` itself may be one)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in sorted(dirs + files):
            path = Path(root) / name
            if path.is_symlink():
                raise LinkRefused(_link_message(path))


def _named(exc: OSError, path: Path) -> OSError:
    """``exc`` with ``path`` as its file name, so a disk-full message says where."""
    if exc.filename is None or str(exc.filename).startswith(str(path.parent / f".{path.name}.")):
        exc.filename = str(path)
    return exc


def write_atomic(path: str | os.PathLike[str], data: str | bytes, *, sync_folder: bool = True) -> None:
    """Write ``data`` (text as UTF-8) to ``path``: a temporary file beside it, fsync, rename over it.

    Readers see the old file or the whole new one, never a part, also when several processes race
    (the last rename wins). A link at ``path`` is replaced by the file, not followed. The folder is
    created if missing and fsynced after the rename (``sync_folder``), so the rename survives a crash.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:200]}.", suffix=".tmp")
    except OSError as exc:
        raise _named(exc, path) from None
    try:
        # mkstemp makes the file 0600; give it the mode an ordinary open() would (0666 less umask)
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _named(exc, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_folder:
        fsync_dir(path.parent)


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file, read in 4 MiB blocks (a checkpoint or a 400 MB model never sits in memory)."""
    import hashlib

    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open_no_follow(path: Path, flags: int, mode: int = 0o644) -> int:
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP or path.is_symlink():
            raise LinkRefused(_link_message(path)) from None
        raise _named(exc, path) from None


def open_append(path: str | os.PathLike[str], *, line_buffered: bool = False) -> IO[str]:
    """Open a text file for appending (created if missing), refusing a link at ``path``."""
    path = Path(path)
    fd = _open_no_follow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return os.fdopen(fd, "a", buffering=1 if line_buffered else -1, encoding="utf-8")


def open_lock(path: str | os.PathLike[str]) -> int:
    """A file descriptor for ``flock`` on ``path`` (created if missing), refusing a link there."""
    return _open_no_follow(Path(path), os.O_RDWR | os.O_CREAT)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """A run folder's newest complete checkpoint: the one ``latest`` names (a file, never a link), else the
    last ``checkpoint-*`` holding ``state.json``; None if it has none."""
    pointer = run_dir / "latest"
    if pointer.is_file() and not pointer.is_symlink():
        named = pointer.read_text(errors="replace").split()
        candidate = run_dir / named[0] if named and named[0].startswith("checkpoint-") else None
        if candidate is not None and (candidate / "state.json").is_file():
            return candidate
    complete = [p for p in sorted(run_dir.glob("checkpoint-*")) if (p / "state.json").is_file()]
    return complete[-1] if complete else None
