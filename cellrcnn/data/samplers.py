"""Training samplers whose epoch ``e`` is a function of (seed, rank, e) alone.

Lightning calls ``set_epoch(e)`` on a training loader's sampler at the start of every epoch.
These samplers then reseed the loader's generator (the shuffle or weighted draws, and the base
seed of the DataLoader workers) and the augmentation generators of the training datasets. A run
resumed from ``last.ckpt`` therefore draws epoch ``e`` exactly as an uninterrupted run does,
however many draws Lightning's restart made while replaying the interrupted epoch (it creates an
iterator for the epoch the checkpoint was written in, which used to advance the shared generator
and shift every later epoch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import RandomSampler, WeightedRandomSampler


def epoch_seed(seed: int, epoch: int) -> int:
    """A distinct 63-bit seed per (seed, epoch)."""
    return (int(seed) * 1_000_003 + int(epoch) * 7_919 + 1) % 2**63


class _EpochSeeded:
    generator: torch.Generator | None
    _seed: int = 0
    _augmenters: Sequence = ()
    _epoch_fn: Callable[[], int | None] | None = None

    def seed_epochs(self, seed: int, augmenters: Sequence = (), epoch_fn: Callable[[], int | None] | None = None
                    ) -> _EpochSeeded:
        """Use ``seed`` (already mixed with the DDP rank) and reseed the ``_main_rng`` of each of
        ``augmenters`` (the AugmentedDataset parts) in :meth:`set_epoch`. ``epoch_fn``: the
        trainer's epoch, which wins over the number Lightning passes (after a restart that
        number runs one ahead of ``trainer.current_epoch``)."""
        self._seed, self._augmenters, self._epoch_fn = int(seed), list(augmenters), epoch_fn
        return self

    def set_epoch(self, epoch: int) -> None:
        current = self._epoch_fn() if self._epoch_fn is not None else None
        base = epoch_seed(self._seed, epoch if current is None else current)
        if self.generator is not None:
            self.generator.manual_seed(base)
        for i, dataset in enumerate(self._augmenters):
            dataset._main_rng.manual_seed(base + 1 + i)


class EpochRandomSampler(_EpochSeeded, RandomSampler):
    """A RandomSampler (every item once per epoch) reseeded per epoch; needs a ``generator``."""


class EpochWeightedRandomSampler(_EpochSeeded, WeightedRandomSampler):
    """A WeightedRandomSampler reseeded per epoch; needs a ``generator``."""
