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
copying one of the values in the context without finding the right one.

With ``min_pairs`` < P (config ``recall_min_pairs``), each *training* sequence holds p pairs, p
drawn uniformly from min_pairs…P, and min(Q, p) queries, left-padded to the full length with a
padding token (id K + V; its label is −100). Short sequences make the key–value binding easy to
discover, an implicit curriculum like the mixed pair counts Zoology trains MQAR on. Validation
always has P pairs and Q queries, so the reported accuracy is the accuracy on the full task. Fresh pairs are drawn for every sequence, from (seed, step), so the data are
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

    def __init__(
        self, *, keys: int, values: int, pairs: int, seed: int, queries: int = 1, min_pairs: int | None = None
    ) -> None:
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
        min_pairs = pairs if min_pairs is None else min_pairs
        if not 1 <= min_pairs <= pairs:
            raise UserError(
                f"recall_min_pairs={min_pairs}; accepted: 1 <= recall_min_pairs <= recall_pairs ({pairs})"
            )
        self.keys, self.values, self.pairs, self.queries, self.seed = keys, values, pairs, queries, seed
        self.min_pairs = min_pairs
        self.pad = keys + values if min_pairs < pairs else None
        self.info = {
            "vocab_size": keys + values + (self.pad is not None),
            "seq_len": 2 * pairs + 2 * queries - 1,
            "n_train_tokens": None,
            "n_val_tokens": EVAL_SEQUENCES,
            "answer_only": True,
            "chance_accuracy": 1.0 / values,
            "copy_chance_accuracy": 1.0 / pairs,
        }

    def sequences(self, count: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``count`` fresh training sequences drawn from ``generator``."""
        return self._draw(count, generator, self.min_pairs)

    def validation_sequences(self, count: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The full task: always P pairs and Q queries."""
        return self._draw(count, generator, self.pairs)

    def _draw(self, count: int, generator: torch.Generator, low: int) -> dict[str, torch.Tensor]:
        p_max, q_max = self.pairs, self.queries
        keys = torch.rand(count, self.keys, generator=generator).argsort(-1)[:, :p_max]
        values = torch.randint(self.values, (count, p_max), generator=generator) + self.keys
        if low == p_max:
            pairs = None
            if q_max == 1:  # the single-query draw, kept so Q = 1 streams stay what they were
                which = torch.randint(p_max, (count, 1), generator=generator)
            else:
                which = torch.rand(count, p_max, generator=generator).argsort(-1)[:, :q_max]
        else:  # p pairs per sequence; queries among the first p keys
            pairs = torch.randint(low, p_max + 1, (count, 1), generator=generator)
            unused = torch.arange(p_max) >= pairs  # (count, P): pair slots past p
            order = torch.rand(count, p_max, generator=generator) + unused  # used slots sort first
            which = order.argsort(-1)[:, :q_max]
        asked, answers = keys.gather(1, which), values.gather(1, which)
        context = torch.stack([keys, values], dim=-1).flatten(1)  # k₁ v₁ k₂ v₂ …
        tail = torch.stack([asked, answers], dim=-1).flatten(1)[:, :-1]  # q₁ a₁ … q_Q
        input_ids = torch.cat([context, tail], dim=1)
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        labels[:, 2 * p_max :: 2] = answers
        if pairs is None:
            return {"input_ids": input_ids, "labels": labels}
        # keep the first 2p context slots and the first 2·min(Q, p) − 1 tail slots, moved to the right
        queries = pairs.clamp(max=q_max)
        keep = torch.cat(
            [torch.arange(2 * p_max) < 2 * pairs, torch.arange(2 * q_max - 1) < 2 * queries - 1], dim=1
        )
        order = keep.to(torch.int8).argsort(dim=-1, stable=True)  # dropped slots first, order kept
        input_ids = input_ids.gather(1, order).masked_fill(~keep.gather(1, order), self.pad)
        labels = labels.gather(1, order).masked_fill(~keep.gather(1, order), IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels}

    def eval_generator(self) -> torch.Generator:
        return torch_generator(self.seed, RECALL_EVAL, 0)
