"""Which examples train and which are held out, and the order micro-batches are trained in."""

from __future__ import annotations

import torch

from ..errors import MiniOmniError
from .collate import TrainingExample


def split_validation(examples: list[TrainingExample], fraction: float, seed: int
                     ) -> tuple[list[TrainingExample], list[TrainingExample]]:
    """(training, held out): a seeded ``fraction`` of the examples (at least one when fraction > 0) held out."""
    if fraction <= 0:
        return examples, []
    count = max(1, round(fraction * len(examples)))
    if count >= len(examples):
        raise MiniOmniError(f"data.validation_split={fraction} would hold out all {len(examples)} examples; "
                            "lower it or add data")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:count])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


class DataPlan:
    """Deterministic micro-batch order: epoch e is a permutation seeded by (seed, e)."""

    def __init__(self, batches: list[list[TrainingExample]], seed: int, world: int, accum: int, shuffle: bool) -> None:
        self.batches = batches
        self.seed = seed
        self.world = world
        self.accum = accum
        self.shuffle = shuffle
        self.per_step = world * accum
        self.steps_per_epoch = len(batches) // self.per_step
        if self.steps_per_epoch < 1:
            raise MiniOmniError(
                f"{len(batches)} micro-batches cannot fill one step of {world} rank(s) x {accum} accumulation "
                "step(s); add data, lower data.batch_tokens or data.grad_accum"
            )
        self._order: tuple[int, list[int]] | None = None

    def order(self, epoch: int) -> list[int]:
        """The micro-batch indices of epoch ``epoch``, in the order they are trained."""
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                order = torch.randperm(len(self.batches), generator=generator).tolist()
            else:
                order = list(range(len(self.batches)))
            self._order = (epoch, order)
        return self._order[1]

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step index within the epoch) of optimizer step ``step``."""
        return divmod(step, self.steps_per_epoch)

    def micro_batches(self, step: int, rank: int) -> list[list[TrainingExample]]:
        """The micro-batches rank ``rank`` trains in optimizer step ``step``."""
        epoch, index = self.position(step)
        group = self.order(epoch)[index * self.per_step : (index + 1) * self.per_step]
        return [self.batches[i] for i in group[rank :: self.world]]
