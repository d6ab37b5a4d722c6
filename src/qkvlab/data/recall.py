"""``assoc-recall``: associative recall, the task of paper 000's Fig. 2.

Keys and values come from disjoint vocabularies: keys are tokens 0..K−1 and values K..K+V−1.
A sequence holds P key–value pairs with P distinct keys and independently drawn values, then Q
of those keys again as queries, each followed by its answer (the last answer is only predicted):

    k₁ v₁ … k_P v_P q₁ a₁ q₂ a₂ … q_Q        (length 2P + 2Q − 1; q_i = k_j, a_i = v_j)

With Q = 1 (the default) this is the classic single-query task ``k₁ v₁ … k_P v_P q``; Q > 1 is the
multi-query form of Zoology's MQAR (Arora et al., 2023), which gives Q supervised answers per
sequence instead of one. The queries are distinct keys, drawn uniformly. ``labels`` are −100
(ignored by the loss) everywhere except at the queries, whose label is the answer, so loss and
accuracy are on the answer tokens only. Chance is 1/V for a guess among all values, and 1/P for
copying one of the values in the context without finding the right one. Fresh pairs are drawn for every sequence, from (seed, step), so the data are
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
    """Batches are ``input_ids`` and ``labels`` (B, 2P + 2Q − 1) int64, labels −100 but at the Q queries."""

    kind = "lm"
    train_purpose = RECALL_TRAIN
    eval_sequences = EVAL_SEQUENCES

    def __init__(self, *, keys: int, values: int, pairs: int, seed: int, queries: int = 1) -> None:
        if keys < 2 or values < 2:
            raise UserError(f"recall_keys={keys}, recall_values={values}; accepted: integers >= 2")
        if not 1 <= pairs <= keys:
            raise UserError(
                f"recall_pairs={pairs}; accepted: 1 <= recall_pairs <= recall_keys ({keys}), "
                "since the keys of a sequence are distinct"
            )
        if not 1 <= queries <= pairs:
            raise UserError(
                f"recall_queries={queries}; accepted: 1 <= recall_queries <= recall_pairs ({pairs}), "
                "since the queries of a sequence are distinct keys"
            )
        self.keys, self.values, self.pairs, self.queries, self.seed = keys, values, pairs, queries, seed
        self.info = {
            "vocab_size": keys + values,
            "seq_len": 2 * pairs + 2 * queries - 1,
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
        if self.queries == 1:  # the single-query draw, kept so Q = 1 streams stay what they were
            which = torch.randint(self.pairs, (count, 1), generator=generator)
        else:
            which = torch.rand(count, self.pairs, generator=generator).argsort(-1)[:, : self.queries]
        asked, answers = keys.gather(1, which), values.gather(1, which)
        context = torch.stack([keys, values], dim=-1).flatten(1)  # k₁ v₁ k₂ v₂ …
        tail = torch.stack([asked, answers], dim=-1).flatten(1)[:, :-1]  # q₁ a₁ … q_Q
        input_ids = torch.cat([context, tail], dim=1)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, 2 * self.pairs :: 2] = answers
        return {"input_ids": input_ids, "labels": labels}

    def eval_generator(self) -> torch.Generator:
        return torch_generator(self.seed, RECALL_EVAL, 0)
