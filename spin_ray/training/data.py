"""Training examples (SPIN pairs, SPPO winner/loser pairs, T-SPIN triplets): validation, a canonical order, and the deterministic (seed, epoch) schedule of global batches.

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
class Example:
    """One training example: a prompt and the answers its objective compares, in the objective's order.

    spin: (human, generated); sppo: (winner, loser); tspin: (human, generated y_t, proto-synthetic y_0);
    sft: (human,). ref_logps holds one reference log-prob per answer, or nothing when the objective
    needs none; win_rates holds SPPO's estimated win rates of the winner and the loser.
    """

    prompt_id: str
    prompt: list[int]
    answers: tuple[list[int], ...]
    ref_logps: tuple[float, ...] = ()
    win_rates: tuple[float, ...] = ()

    @property
    def tokens(self) -> int:
        """Tokens in this example's forward pass (the prompt once per answer)."""
        return len(self.prompt) * len(self.answers) + sum(len(a) for a in self.answers)


# The columns each objective reads from a generation row, besides prompt_id, prompt and human answer.
NEEDED_COLUMNS = {
    "sft": [],
    "spin": ["generated_token_ids", "ref_logp_real", "ref_logp_generated"],
    "sppo": ["generated_token_ids", "ref_logp_generated", "win_rates"],
    "tspin": ["generated_token_ids", "proto_token_ids"],
}
TSPIN_REFERENCE_COLUMNS = ["ref_logp_real", "ref_logp_generated", "ref_logp_proto"]


def needed_columns(objective: str, needs_reference: bool = True) -> list[str]:
    columns = ["prompt_id", "prompt_token_ids", "real_token_ids", *NEEDED_COLUMNS[objective]]
    if objective == "tspin" and needs_reference:
        columns += TSPIN_REFERENCE_COLUMNS
    return columns


class _Row:
    """Field access on one row that names the source, the prompt_id and the field in every error."""

    def __init__(self, row: dict, source: str, number: int):
        self.row, self.source = row, source
        self.pid = row.get("prompt_id") or f"row {number}"

    def error(self, field: str, reason: str) -> TrainingDataError:
        return TrainingDataError(f"{self.source}, prompt_id {self.pid}, field {field!r}: {reason}")

    def get(self, field: str):
        value = self.row.get(field)
        if value is None:
            raise self.error(field, "missing")
        return value

    def tokens(self, field: str, index: int | None = None) -> list[int]:
        value = self.get(field)
        if index is not None:
            if len(value) <= index or value[index] is None:
                raise self.error(field, f"no answer {index}")
            value = value[index]
        if not len(value):
            raise self.error(field, "empty")
        return list(value)

    def number(self, field: str, index: int | None = None) -> float:
        value = self.get(field)
        if index is not None:
            if len(value) <= index or value[index] is None:
                raise self.error(field, "missing")
            value = value[index]
        value = float(value)
        if not math.isfinite(value):
            raise self.error(field, f"not finite ({value})")
        return value


def _example(row: _Row, objective: str, needs_reference: bool) -> Example:
    pid, prompt, real = row.pid, row.tokens("prompt_token_ids"), row.tokens("real_token_ids")
    if objective == "sft":
        return Example(pid, prompt, (real,))
    if objective == "spin":
        return Example(pid, prompt, (real, row.tokens("generated_token_ids", 0)),
                       (row.number("ref_logp_real"), row.number("ref_logp_generated", 0)))
    if objective == "sppo":
        from spin_ray.oracle import winner_and_loser

        generated = row.get("generated_token_ids")
        if len(generated) < 2:
            raise row.error("generated_token_ids", f"SPPO needs at least 2 answers, got {len(generated)}")
        rates = [row.number("win_rates", k) for k in range(len(generated))]
        if any(not 0.0 <= r <= 1.0 for r in rates):
            raise row.error("win_rates", f"win rates must lie in [0, 1], got {rates}")
        w, l = winner_and_loser(rates)
        return Example(pid, prompt, (row.tokens("generated_token_ids", w), row.tokens("generated_token_ids", l)),
                       (row.number("ref_logp_generated", w), row.number("ref_logp_generated", l)),
                       (rates[w], rates[l]))
    if objective == "tspin":
        answers = (real, row.tokens("generated_token_ids", 0), row.tokens("proto_token_ids"))
        refs = ()
        if needs_reference:
            refs = (row.number("ref_logp_real"), row.number("ref_logp_generated", 0), row.number("ref_logp_proto"))
        return Example(pid, prompt, answers, refs)
    raise ValueError(f"unknown objective {objective!r}")


def examples_from_rows(rows: list[dict], source: str, objective: str = "spin",
                       needs_reference: bool = True) -> list[Example]:
    """Validate generation-stage rows into examples sorted by prompt_id (the canonical order).

    SPIN and T-SPIN train on the first generated answer of each prompt, SPPO on the winner and loser
    of its K answers by win rate. SFT needs neither a generated answer nor reference log-probs.
    """
    if not rows:
        raise TrainingDataError(f"{source}: the pairs dataset is empty")
    examples = [_example(_Row(row, source, number), objective, needs_reference)
                for number, row in enumerate(rows, start=1)]
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
