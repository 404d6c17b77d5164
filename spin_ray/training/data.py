"""Training examples in their canonical order, and the deterministic (seed, epoch) schedule of global batches.

Every worker holds the whole (small, token-id) pairs table and computes the same schedule, so a
data position is just (epoch, step): a checkpoint taken with 2 workers resumes with 1 at the
exact next sample, and each global batch is split evenly over however many ranks there are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spin_ray.objectives.algorithms import Example, TrainingDataError, objective


def examples_from_rows(rows: list[dict], source: str, config, with_tokens: bool = True) -> list[Example]:
    """Validate generation-stage rows into the objective's examples, sorted by prompt_id (the canonical order).

    SPIN and T-SPIN train on the first generated answer of each prompt, SPPO on the winner and loser of its
    K answers by win rate, SFT on the human answer alone. `with_tokens=False` checks a row's numbers
    (reference log-probs, win rates) without reading its token ids, as the driver does before training.
    """
    if not rows:
        raise TrainingDataError(f"{source}: the pairs dataset is empty")
    algorithm = objective(config)
    examples = [algorithm.example(row, source, number, config, with_tokens) for number, row in enumerate(rows, start=1)]
    ids = [e.prompt_id for e in examples]
    if len(set(ids)) != len(ids):
        raise TrainingDataError(f"{source}: {len(ids) - len(set(ids))} duplicate prompt_ids")
    return sorted(examples, key=lambda e: e.prompt_id)


@dataclass(frozen=True)
class Schedule:
    """Which pairs make up each optimizer step, for any number of ranks."""

    num_pairs: int
    global_batch_size: int
    micro_batch_size: int
    epochs: int
    seed: int

    def __post_init__(self):
        if self.num_pairs < self.global_batch_size:
            raise TrainingDataError(
                f"training.global_batch_size ({self.global_batch_size}) is larger than the data "
                f"({self.num_pairs} pairs); lower it or add data"
            )

    @property
    def steps_per_epoch(self) -> int:
        # the last num_pairs % global_batch_size pairs of each epoch's shuffled order are left out
        return self.num_pairs // self.global_batch_size

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_pairs)

    def global_batch(self, step: int) -> np.ndarray:
        """Pair indices of optimizer step `step` (0-based over all epochs)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        start = within * self.global_batch_size
        return self.epoch_order(epoch)[start : start + self.global_batch_size]

    def check_world(self, world_size: int) -> None:
        if self.global_batch_size % (world_size * self.micro_batch_size):
            raise TrainingDataError(
                f"training.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"workers x micro_batch_size ({world_size} x {self.micro_batch_size})"
            )

    def micro_batches(self, step: int, rank: int, world_size: int) -> list[np.ndarray]:
        """This rank's equal slice of the global batch, cut into micro-batches."""
        self.check_world(world_size)
        per_rank = self.global_batch_size // world_size
        mine = self.global_batch(step)[rank * per_rank : (rank + 1) * per_rank]
        return [mine[i : i + self.micro_batch_size] for i in range(0, per_rank, self.micro_batch_size)]
