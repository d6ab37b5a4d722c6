"""The data section of a run's config: the keys ``qkvlab.data.load_dataset`` reads, each with its help
line and its check (no torch here: ``--help-keys`` and the config's checks read it). A new data setting
is one entry here, its ``TrainConfig`` field and its ``load_dataset`` keyword: the trainer passes the
whole section through (:meth:`qkvlab.config.TrainConfig.section`)."""

from __future__ import annotations

from qkvlab.args import NONNEGATIVE, POSITIVE, Key

__all__ = ["KEYS"]

_AT_LEAST_2 = (lambda v: v >= 2, "≥ 2")

KEYS: dict[str, Key] = {
    "data": (
        "shakespeare | text:PATH | hf:NAME[:CONFIG] | digits | mnist5k | icl-regression | assoc-recall",
        None,
    ),
    "tokenizer": (
        "char | bpe (byte-level BPE trained locally on the data)",
        (lambda v: v in ("char", "bpe"), "char or bpe"),
    ),
    "vocab_size": ("BPE vocabulary size (char: the data's characters)", _AT_LEAST_2),
    "seq_len": ("tokens per training sequence (language data)", POSITIVE),
    "val_fraction": ("share of the data held out for validation", (lambda v: 0 < v <= 0.5, "in (0, 0.5]")),
    "icl_dim": ("icl-regression: dimension of the regression inputs", POSITIVE),
    "icl_points": ("icl-regression: in-context examples per sequence", _AT_LEAST_2),
    "icl_noise": ("icl-regression: label noise std", NONNEGATIVE),
    "recall_keys": ("assoc-recall: size of the key alphabet", _AT_LEAST_2),
    "recall_values": ("assoc-recall: size of the value alphabet", _AT_LEAST_2),
    "recall_pairs": ("assoc-recall: key-value pairs per sequence", POSITIVE),
    "recall_queries": ("assoc-recall: queries per sequence", POSITIVE),
    "recall_min_pairs": (
        "assoc-recall: fewest pairs per sequence (None: every sequence has recall_pairs)",
        POSITIVE,
    ),
}
