"""One registry of training data sources, all offline-capable.

``load_dataset(spec, ...)`` returns a ``Dataset``:

- ``kind``: "lm" | "image" | "icl"; ``info``: sizes the model needs (vocab_size, image_size, …).
- ``train_batch(step, batch_size, *, online=False, rank=0, world_size=1)``: a *pure function*
  of (seed, step, batch size, online, rank, world size). This is what makes ``--resume``
  bit-identical (the data position is just the step) and DDP exact (rank r takes its slice of
  the same global batch of ``batch_size × world_size`` samples).
  - epochs (default): global sample k = step·global_batch + j sits at position k mod n of the
    permutation drawn for epoch k // n; every training sample is seen once per epoch.
  - ``online=True``: the training samples are streamed in one fixed permutation, exactly once;
    a step past that single pass is an error. ``icl-regression`` is always online (infinite).
- ``eval_batches(batch_size)``: the validation split, in order, deterministic.

Samples: for text, the non-overlapping windows of seq_len + 1 tokens of the split; for images,
the images. Splits are deterministic: text by position (first 1 − val_fraction of the characters
train), images stratified by class with a permutation seeded from ``seed``.
"""

from __future__ import annotations

from qkvlab.data.sources import DATA_SOURCES, Dataset, ICLDataset, ImageDataset, LMDataset, load_dataset

__all__ = ["DATA_SOURCES", "Dataset", "ICLDataset", "ImageDataset", "LMDataset", "load_dataset"]
