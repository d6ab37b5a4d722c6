"""One registry of training data sources, all usable offline except ``hf:``.

``load_dataset(spec, *, seq_len=128, tokenizer="char", vocab_size=512, seed=0, val_fraction=0.1,
cache_dir=None, icl_dim=8, icl_points=32, icl_noise=0.0)`` returns a ``Dataset``. ``spec`` is one
of ``DATA_SOURCES``: ``shakespeare``, ``text:PATH``, ``hf:NAME[:CONFIG]``, ``digits``,
``mnist5k``, ``icl-regression``.

The ``Dataset`` contract
------------------------
- ``kind``: ``"lm"``, ``"image"`` or ``"icl"``.
- ``info``: what a model needs to be built for it.
  - lm: ``vocab_size``, ``seq_len``, ``n_train_tokens``, ``n_val_tokens``;
  - image: ``image_size``, ``channels`` (1), ``n_classes``, ``n_train``, ``n_val``;
  - icl: ``dim``, ``points``, ``noise``.
- ``tokenizer`` (lm only): ``encode(str) -> list[int]``, ``decode(list[int]) -> str``,
  ``vocab_size``; ``char`` (the corpus's sorted characters) or ``bpe`` (byte-level, trained on
  the training split, cached per (sha256 of it, vocab_size)).
- ``train_batch(step, batch_size, *, online=False, rank=0, world_size=1) -> dict[str, Tensor]``
  is a *pure function* of (seed, step, batch_size, online, rank, world_size). It holds no
  position and reads no global RNG. That is why resuming at step s is bit-identical, and why
  DDP is exact: the global batch at a step is batch_size × world_size samples, and rank r takes
  samples [r·batch_size, (r+1)·batch_size) of it.
  - lm: ``input_ids`` and ``labels`` (B, seq_len) int64, where labels are the next tokens;
  - image: ``pixels`` (B, 1, H, W) float32 in [0, 1] and ``labels`` (B,) int64;
  - icl: ``inputs`` (B, N, d + 1) float32 and ``targets`` (B,) float32.
- Sample order for the finite sources. Their samples are the training split's non-overlapping
  windows of seq_len + 1 tokens (lm) or its images (image), numbered 0..n−1.
  - Epochs (the default): global sample k = step·global_batch + j is position k mod n of a
    permutation seeded by (seed, k // n). Every sample is seen exactly once per epoch.
  - ``online=True``: samples are streamed through one fixed permutation, once, and never
    repeated. A step past the single pass (``max_online_steps``) is a ``UserError``; the last
    n mod global_batch samples of the permutation go unused.
  - ``icl-regression`` draws a fresh global batch from (seed, step) at every step, so it is
    infinite and always online.
- ``steps_per_epoch(batch_size, world_size=1)`` is ⌈n / global_batch⌉, and
  ``max_online_steps(batch_size, world_size=1)`` is ⌊n / global_batch⌋. Both are None for icl.
- ``eval_batches(batch_size)`` yields the whole validation split, in order, the same every time.
  For lm that is its windows; for image, its images; for icl, a fixed set of 2,048 sequences
  drawn with seed + 1,000,003.
- Splits are deterministic. lm splits by position: the first (1 − val_fraction) of the
  characters are train, the rest validation. image splits stratified by class, with a
  permutation seeded from ``seed``.

Bad input raises ``qkvlab.errors.UserError``, with one line that names the value and what is
accepted.
"""

from __future__ import annotations

from qkvlab._lazy import lazy_exports

# loaded on first use, so qkvlab.cache (used by the package fetcher) needs no torch
_WHERE = {
    "Dataset": "qkvlab.data.base",
    "FiniteDataset": "qkvlab.data.base",
    "SyntheticDataset": "qkvlab.data.base",
    "resolve_cache_dir": "qkvlab.cache",
    "ICLDataset": "qkvlab.data.icl",
    "ImageDataset": "qkvlab.data.images",
    "DATA_SOURCES": "qkvlab.data.sources",
    "load_dataset": "qkvlab.data.sources",
    "LMDataset": "qkvlab.data.text",
    "TOKENIZERS": "qkvlab.data.tokenizer",
    "BPETokenizer": "qkvlab.data.tokenizer",
    "CharTokenizer": "qkvlab.data.tokenizer",
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
