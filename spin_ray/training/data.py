"""Training pairs: validation, a canonical order, and the deterministic (seed, epoch) schedule of global batches.

Every worker holds the whole (small, token-id) pairs table and computes the same schedule, so a
data position is just (epoch, step): a checkpoint taken with 2 workers resumes with 1 at the
exact next sample, and each global batch is split evenly over however many ranks there are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class TrainingDataError(ValueError):
    """Pairs that cannot be trained on; the message names the row (prompt_id) and field."""


@dataclass(frozen=True)
class Pair:
    prompt_id: str
    prompt: list[int]
    real: list[int]
    generated: list[int]
    ref_real: float
    ref_generated: float


def pairs_from_rows(rows: list[dict], source: str, objective: str = "spin") -> list[Pair]:
    """Validate generation-stage rows into pairs sorted by prompt_id (the canonical order).

    SPIN trains on the first generated sample of each prompt. SFT needs no generated answer and no
    reference log-probs.
    """
    if not rows:
        raise TrainingDataError(f"{source}: the pairs dataset is empty")
    needed = ["prompt_id", "prompt_token_ids", "real_token_ids"]
    if objective == "spin":
        needed += ["generated_token_ids", "ref_logp_real", "ref_logp_generated"]
    pairs = []
    for number, row in enumerate(rows, start=1):
        pid = row.get("prompt_id", f"row {number}")
        for field in needed:
            if row.get(field) is None:
                raise TrainingDataError(f"{source}, prompt_id {pid}, field {field!r}: missing")
        if objective == "spin":
            generated = row["generated_token_ids"]
            refs = row["ref_logp_generated"]
            if not len(generated) or not len(refs) or refs[0] is None:
                raise TrainingDataError(f"{source}, prompt_id {pid}, field 'ref_logp_generated': missing")
            ref_real, ref_generated = float(row["ref_logp_real"]), float(refs[0])
            for field, value in (("ref_logp_real", ref_real), ("ref_logp_generated", ref_generated)):
                if not math.isfinite(value):
                    raise TrainingDataError(f"{source}, prompt_id {pid}, field {field!r}: not finite ({value})")
            generated = list(generated[0])
        else:
            generated, ref_real, ref_generated = [], 0.0, 0.0
        if not len(row["real_token_ids"]):
            raise TrainingDataError(f"{source}, prompt_id {pid}, field 'real_token_ids': empty")
        pairs.append(Pair(pid, list(row["prompt_token_ids"]), list(row["real_token_ids"]), generated,
                          ref_real, ref_generated))
    ids = [p.prompt_id for p in pairs]
    if len(set(ids)) != len(ids):
        raise TrainingDataError(f"{source}: {len(ids) - len(set(ids))} duplicate prompt_ids")
    return sorted(pairs, key=lambda p: p.prompt_id)


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
