"""The ``Dataset`` interface, and the deterministic sample order shared by the finite datasets.

Every random choice is drawn from a generator seeded by a tuple such as (seed, purpose, epoch)
through numpy's ``SeedSequence``, never from global RNG state: a batch is a pure function of
its arguments, which is what makes resume bit-identical and DDP ranks agree.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np
import torch

from qkvlab.errors import UserError

__all__ = ["Dataset", "FiniteDataset", "SyntheticDataset", "numpy_rng", "torch_generator"]

# Purposes, mixed into every seed so that no two uses of the same `seed` share a stream.
EPOCH, ONLINE, SPLIT, ICL_TRAIN, RECALL_TRAIN, RECALL_EVAL = 1, 2, 3, 4, 5, 6


def _entropy(seed: int, *parts: int) -> list[int]:
    if seed < 0:
        raise UserError(f"seed={seed}; accepted: an integer >= 0")
    return [int(seed), *(int(p) for p in parts)]


def numpy_rng(seed: int, *parts: int) -> np.random.Generator:
    """A numpy generator for (seed, *parts); distinct tuples give independent streams."""
    return np.random.default_rng(np.random.SeedSequence(_entropy(seed, *parts)))


def torch_generator(seed: int, *parts: int) -> torch.Generator:
    """A CPU torch generator for (seed, *parts), seeded through the same ``SeedSequence`` mixing."""
    state = np.random.SeedSequence(_entropy(seed, *parts)).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def check_batch_position(step: int, batch_size: int, rank: int, world_size: int) -> None:
    if step < 0:
        raise UserError(f"step={step}; accepted: an integer >= 0")
    if batch_size < 1:
        raise UserError(f"batch_size={batch_size}; accepted: an integer >= 1 (samples per rank)")
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(
            f"rank={rank}, world_size={world_size}; accepted: world_size >= 1, 0 <= rank < world_size"
        )


class Dataset(abc.ABC):
    """What every data source returns; see ``qkvlab.data`` for the contract."""

    kind: ClassVar[str]  # "lm" | "image" | "icl"
    info: dict[str, Any]
    seed: int

    @abc.abstractmethod
    def train_batch(
        self, step: int, batch_size: int, *, online: bool = False, rank: int = 0, world_size: int = 1
    ) -> dict[str, torch.Tensor]:
        """Rank ``rank``'s ``batch_size`` samples of the global batch at ``step``; pure in its arguments."""

    @abc.abstractmethod
    def eval_batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """The whole validation split, in order (the last batch may be smaller)."""

    @abc.abstractmethod
    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int | None:
        """Steps until every training sample has been seen once; None for infinite data."""

    @abc.abstractmethod
    def max_online_steps(self, batch_size: int, world_size: int = 1) -> int | None:
        """Steps of one single pass in online mode; None for infinite data."""


class FiniteDataset(Dataset):
    """A dataset of ``n_train`` training samples, indexed 0..n_train-1, and ``n_val`` validation ones.

    Global sample number k = step·(batch_size·world_size) + j; rank r holds j in
    [r·batch_size, (r+1)·batch_size).

    - epochs: sample k is position k mod n of the permutation drawn for epoch k // n
      (seeded by (seed, epoch)), so each epoch visits every sample exactly once;
    - online: sample k is position k of one fixed permutation, for k < n only, so no sample is
      ever seen twice. The last n mod global_batch samples of that permutation are not used.
    """

    n_train: int
    n_val: int

    def __init__(self) -> None:
        self._permutations: dict[tuple[int, int], torch.Tensor] = {}  # a cache; results never depend on it

    @abc.abstractmethod
    def _train_samples(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch of training samples with these indices."""

    @abc.abstractmethod
    def _val_samples(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        """The batch of validation samples start..stop-1."""

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> int:
        return math.ceil(self.n_train / (batch_size * world_size))

    def max_online_steps(self, batch_size: int, world_size: int = 1) -> int:
        return self.n_train // (batch_size * world_size)

    def _permutation(self, purpose: int, epoch: int) -> torch.Tensor:
        key = (purpose, epoch)
        if key not in self._permutations:
            if len(self._permutations) >= 4:  # a batch spans at most two epochs
                self._permutations.pop(next(iter(self._permutations)))
            order = numpy_rng(self.seed, purpose, epoch).permutation(self.n_train)
            self._permutations[key] = torch.from_numpy(order)
        return self._permutations[key]

    def train_indices(
        self, step: int, batch_size: int, *, online: bool = False, rank: int = 0, world_size: int = 1
    ) -> torch.Tensor:
        """Which training samples (0..n_train-1) ``train_batch`` returns for these arguments."""
        check_batch_position(step, batch_size, rank, world_size)
        global_batch = batch_size * world_size
        first = step * global_batch + rank * batch_size
        k = torch.arange(first, first + batch_size, dtype=torch.long)
        if online:
            steps = self.max_online_steps(batch_size, world_size)
            if step >= steps:
                raise UserError(
                    f"online step {step} is past the one pass over the data: {self.n_train} training samples "
                    f"at global batch {global_batch} ({batch_size} × {world_size} ranks) allow {steps} online "
                    f"steps; train at most {steps} steps, use a smaller batch, or turn online off"
                )
            return self._permutation(ONLINE, 0).index_select(0, k)
        first_epoch, last_epoch = first // self.n_train, (first + batch_size - 1) // self.n_train
        return torch.cat(  # a batch spans one epoch, or the end of one and the start of the next (or more)
            [
                self._permutation(EPOCH, epoch).index_select(0, k[k // self.n_train == epoch] % self.n_train)
                for epoch in range(first_epoch, last_epoch + 1)
            ]
        )

    def train_batch(
        self, step: int, batch_size: int, *, online: bool = False, rank: int = 0, world_size: int = 1
    ) -> dict[str, torch.Tensor]:
        indices = self.train_indices(step, batch_size, online=online, rank=rank, world_size=world_size)
        return self._train_samples(indices)

    def eval_batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        if batch_size < 1:
            raise UserError(f"batch_size={batch_size}; accepted: an integer >= 1")
        for start in range(0, self.n_val, batch_size):
            yield self._val_samples(start, min(start + batch_size, self.n_val))


class SyntheticDataset(Dataset):
    """Infinite data drawn fresh at every step (``icl-regression``, ``assoc-recall``): no epochs, always online.

    The global batch of step s is ``sequences(batch_size · world_size, generator of (seed, train_purpose, s))``;
    every rank draws it whole (it is small) and keeps its slice, so the ranks together see exactly
    what one process with the global batch would, and ``online`` changes nothing. Validation is the
    same ``eval_sequences`` sequences every time, drawn from ``eval_generator()``.
    """

    train_purpose: ClassVar[int]
    eval_sequences: ClassVar[int] = 2048

    @abc.abstractmethod
    def sequences(self, count: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """``count`` fresh sequences drawn from ``generator``."""

    @abc.abstractmethod
    def eval_generator(self) -> torch.Generator:
        """The generator of the fixed validation set (its own stream, never the training one)."""

    def validation_sequences(self, count: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The validation set's sequences; the training distribution unless a task says otherwise."""
        return self.sequences(count, generator)

    def train_batch(
        self, step: int, batch_size: int, *, online: bool = False, rank: int = 0, world_size: int = 1
    ) -> dict[str, torch.Tensor]:
        """Rank ``rank``'s slice of the global batch of step ``step``, drawn from (seed, step)."""
        check_batch_position(step, batch_size, rank, world_size)
        full = self.sequences(batch_size * world_size, torch_generator(self.seed, self.train_purpose, step))
        part = slice(rank * batch_size, (rank + 1) * batch_size)
        return {key: value[part].contiguous() for key, value in full.items()}

    def eval_batches(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        if batch_size < 1:
            raise UserError(f"batch_size={batch_size}; accepted: an integer >= 1")
        data = self.validation_sequences(self.eval_sequences, self.eval_generator())
        for start in range(0, self.eval_sequences, batch_size):
            yield {key: value[start : start + batch_size] for key, value in data.items()}

    def steps_per_epoch(self, batch_size: int, world_size: int = 1) -> None:
        return None

    def max_online_steps(self, batch_size: int, world_size: int = 1) -> None:
        return None
