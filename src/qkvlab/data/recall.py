"""``assoc-recall``: associative recall, the task of paper 000's Fig. 2.

Keys and values come from disjoint vocabularies: keys are tokens 0..K−1 and values K..K+V−1.
A sequence holds P key–value pairs with P distinct keys and independently drawn values, then one
of those keys again as the query:

    k₁ v₁ k₂ v₂ … k_P v_P q        (length 2P + 1; q = k_j for a uniform j)

The model must answer v_j at the last position. ``labels`` are −100 (ignored by the loss)
everywhere except that position, so loss and accuracy are on the answer token only. Chance is
1/V for a guess among all values, and 1/P for copying one of the values in the context without
finding the right one. Fresh pairs are drawn for every sequence, from (seed, step), so the data are
infinite and every run is fully online: the training stream never repeats a sequence (it would take
two draws agreeing on all 2P + 1 tokens). Validation is a fixed set of 2,048 sequences from a
stream of its own.
"""

from __future__ import annotations

import torch

from qkvlab.data.base import RECALL_EVAL, RECALL_TRAIN, SyntheticDataset, torch_generator
from qkvlab.errors import UserError

__all__ = ["IGNORE_INDEX", "RecallDataset"]

IGNORE_INDEX = -100  # torch's cross_entropy default
EVAL_SEQUENCES = 2048


class RecallDataset(SyntheticDataset):
    """Batches are ``input_ids`` (B, 2P + 1) and ``labels`` (B, 2P + 1) int64, labels −100 but the last."""

    kind = "lm"
    train_purpose = RECALL_TRAIN
    eval_sequences = EVAL_SEQUENCES

    def __init__(self, *, keys: int, values: int, pairs: int, seed: int) -> None:
        if keys < 2 or values < 2:
            raise UserError(f"recall_keys={keys}, recall_values={values}; accepted: integers >= 2")
        if not 1 <= pairs <= keys:
            raise UserError(
                f"recall_pairs={pairs}; accepted: 1 <= recall_pairs <= recall_keys ({keys}), "
                "since the keys of a sequence are distinct"
            )
        self.keys, self.values, self.pairs, self.seed = keys, values, pairs, seed
        self.info = {
            "vocab_size": keys + values,
            "seq_len": 2 * pairs + 1,
            "n_train_tokens": None,
            "n_val_tokens": EVAL_SEQUENCES,
            "answer_only": True,
            "chance_accuracy": 1.0 / values,
            "copy_chance_accuracy": 1.0 / pairs,
        }

    def sequences(self, count: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``count`` fresh sequences drawn from ``generator``."""
        keys = torch.rand(count, self.keys, generator=generator).argsort(-1)[:, : self.pairs]
        values = torch.randint(self.values, (count, self.pairs), generator=generator) + self.keys
        which = torch.randint(self.pairs, (count,), generator=generator)
        rows = torch.arange(count)
        context = torch.stack([keys, values], dim=-1).flatten(1)  # k₁ v₁ k₂ v₂ …
        input_ids = torch.cat([context, keys[rows, which].unsqueeze(1)], dim=1)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, -1] = values[rows, which]
        return {"input_ids": input_ids, "labels": labels}

    def eval_generator(self) -> torch.Generator:
        return torch_generator(self.seed, RECALL_EVAL, 0)
