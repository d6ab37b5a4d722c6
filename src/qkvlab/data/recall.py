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

from collections.abc import Iterator

import torch

from qkvlab.data.base import RECALL_EVAL, RECALL_TRAIN, Dataset, check_batch_position, torch_generator
from qkvlab.errors import UserError

__all__ = ["IGNORE_INDEX", "RecallDataset"]

IGNORE_INDEX = -100  # torch's cross_entropy default
EVAL_SEQUENCES = 2048


class RecallDataset(Dataset):
    """Batches are ``input_ids`` (B, 2P + 1) and ``labels`` (B, 2P + 1) int64, labels −100 but the last."""

    kind = "lm"

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

    def train_batch(
        self, step: int, batch_size: int, *, online: bool = False, rank: int = 0, world_size: int = 1
    ) -> dict[str, torch.Tensor]:
        """Rank ``rank``'s slice of step ``step``'s global batch; every rank draws the whole (small) batch."""
        check_batch_position(step, batch_size, rank, world_size)
        full = self.sequences(batch_size * world_size, torch_generator(self.seed, RECALL_TRAIN, step))
        part = slice(rank * batch_size, (rank + 1) * batch_size)
        return {key: value[part].contiguous() for key, value in full.items()}

    def eval_batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        if batch_size < 1:
            raise UserError(f"batch_size={batch_size}; accepted: an integer >= 1")
        data = self.sequences(EVAL_SEQUENCES, torch_generator(self.seed, RECALL_EVAL, 0))
        for start in range(0, EVAL_SEQUENCES, batch_size):
            yield {key: value[start : start + batch_size] for key, value in data.items()}

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> None:
        return None

    def max_online_steps(self, batch_size: int, world_size: int = 1) -> None:
        return None
