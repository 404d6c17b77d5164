"""The algorithm table: one frozen record per objective (SPIN, SPPO, T-SPIN, SFT) that every layer consults.

A record says which generation columns the objective reads, how a row becomes a training example,
which loss it minimises, whether it needs reference log-probs, an oracle or T-SPIN's y_0, what the
trainer reports and how the report explains its margin. Adding an algorithm means one record here
and one loss function in `spin_ray.objectives.losses`. Nothing here imports torch or Ray at module load, so the
config can consult the table cheaply; the loss adapters import `spin_ray.objectives.losses` when called.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class TrainingDataError(ValueError):
    """Rows that cannot be trained on; the message names the source, the row (prompt_id) and the field."""


@dataclass(frozen=True)
class Example:
    """One training example: a prompt and the answers its objective compares, in the objective's order.

    spin: (human, generated); sppo: (winner, loser); tspin: (human, generated y_t, proto-synthetic y_0);
    sft: (human,). ref_logps holds one reference log-prob per answer, or nothing when the objective
    needs none; win_rates holds SPPO's estimated win rates of the winner and the loser. A row checked
    without its token ids (`with_tokens=False`) has no answers: only its numbers were validated.
    """

    prompt_id: str
    prompt: list[int]
    answers: tuple[list[int], ...]
    ref_logps: tuple[float, ...] = ()
    win_rates: tuple[float, ...] = ()

    @property
    def tokens(self) -> int:
        """Tokens of this example as separate sequences (the prompt once per answer): what tokens/s counts, whichever
        layout computes them (prefix sharing computes the prompt once)."""
        return len(self.prompt) * len(self.answers) + sum(len(a) for a in self.answers)


class RowReader:
    """Field access on one generation row that names the source, the prompt_id and the field in every error."""

    def __init__(self, row: dict, source: str, number: int):
        self.row, self.source = row, source
        self.pid = row.get("prompt_id") or f"row {number}"

    def error(self, name: str, reason: str) -> TrainingDataError:
        return TrainingDataError(f"{self.source}, prompt_id {self.pid}, field {name!r}: {reason}")

    def get(self, name: str):
        value = self.row.get(name)
        if value is None:
            raise self.error(name, "missing")
        return value

    def tokens(self, name: str, index: int | None = None) -> list[int]:
        value = self.get(name)
        if index is not None:
            if len(value) <= index or value[index] is None:
                raise self.error(name, f"no answer {index}")
            value = value[index]
        if not len(value):
            raise self.error(name, "empty")
        return list(value)

    def number(self, name: str, index: int | None = None) -> float:
        value = self.get(name)
        if index is not None:
            if len(value) <= index or value[index] is None:
                raise self.error(name, "missing")
            value = value[index]
        value = float(value)
        if not math.isfinite(value):
            raise self.error(name, f"not finite ({value})")
        return value


def winner_and_loser(rates: Sequence[float]) -> tuple[int, int]:
    """SPPO's training pair: the first answer with the highest win rate and the last with the lowest, so that
    when every rate is equal (all answers tie) the two are still different answers, both with target 0."""
    rates = np.asarray(rates, dtype=np.float64)
    winner = int(np.argmax(rates))
    loser = len(rates) - 1 - int(np.argmin(rates[::-1]))
    return winner, loser


# ---- example builders: (row, with_reference, with_tokens) -> Example ----------------------------------


def _prompt_and_real(row: RowReader, with_tokens: bool) -> tuple[list[int], list[int] | None]:
    if not with_tokens:
        return [], None
    return row.tokens("prompt_token_ids"), row.tokens("real_token_ids")


def _sft_example(row: RowReader, with_reference: bool, with_tokens: bool) -> Example:
    prompt, real = _prompt_and_real(row, with_tokens)
    return Example(row.pid, prompt, (real,) if with_tokens else ())


def _spin_example(row: RowReader, with_reference: bool, with_tokens: bool) -> Example:
    prompt, real = _prompt_and_real(row, with_tokens)
    answers = (real, row.tokens("generated_token_ids", 0)) if with_tokens else ()
    refs = (row.number("ref_logp_real"), row.number("ref_logp_generated", 0)) if with_reference else ()
    return Example(row.pid, prompt, answers, refs)


def _sppo_example(row: RowReader, with_reference: bool, with_tokens: bool) -> Example:
    answers_field = "generated_token_ids" if with_tokens else "win_rates"
    count = len(row.get(answers_field))
    if count < 2:
        raise row.error(answers_field, f"SPPO needs at least 2 answers, got {count}")
    rates = [row.number("win_rates", k) for k in range(count)]
    if any(not 0.0 <= r <= 1.0 for r in rates):
        raise row.error("win_rates", f"win rates must lie in [0, 1], got {rates}")
    winner, loser = winner_and_loser(rates)
    prompt, _ = _prompt_and_real(row, with_tokens)
    answers = ((row.tokens("generated_token_ids", winner), row.tokens("generated_token_ids", loser)) if with_tokens
               else ())
    refs = ((row.number("ref_logp_generated", winner), row.number("ref_logp_generated", loser)) if with_reference
            else ())
    return Example(row.pid, prompt, answers, refs, (rates[winner], rates[loser]))


def _tspin_example(row: RowReader, with_reference: bool, with_tokens: bool) -> Example:
    prompt, real = _prompt_and_real(row, with_tokens)
    answers = (real, row.tokens("generated_token_ids", 0), row.tokens("proto_token_ids")) if with_tokens else ()
    refs = ()
    if with_reference:
        refs = (row.number("ref_logp_real"), row.number("ref_logp_generated", 0), row.number("ref_logp_proto"))
    return Example(row.pid, prompt, answers, refs)


# ---- loss adapters: (policy [B, n], refs [B, n] | None, win rates [B, 2] | None, lengths [B, n], config) ----


def _spin_loss(policy, refs, rates, lengths, config):
    from spin_ray.objectives.losses import spin_loss

    training = config.training
    return spin_loss(
        policy[:, 0],
        policy[:, 1],
        refs[:, 0],
        refs[:, 1],
        training.beta,
        training.loss_type,
        lengths[:, 0],
        lengths[:, 1],
        nll_weight=training.nll_weight,
        dpop_lambda=training.dpop_lambda,
        length_normalize=training.length_normalize,
    )


def _sppo_loss(policy, refs, rates, lengths, config):
    from spin_ray.objectives.losses import sppo_loss

    return sppo_loss(policy[:, 0], policy[:, 1], refs[:, 0], refs[:, 1], rates[:, 0], rates[:, 1], config.sppo.beta)


def _tspin_loss(policy, refs, rates, lengths, config):
    import torch

    from spin_ray.objectives.losses import tspin_loss

    real_tokens = lengths[:, 0]
    if config.tspin.length_normalize:  # the variant's reward is on per-token means of policy and reference alike
        policy = policy / lengths
        refs = None if refs is None else refs / lengths
        real_tokens = torch.ones_like(real_tokens)  # policy[:, 0] is already the per-token mean
    ref = (None, None, None) if refs is None else (refs[:, 0], refs[:, 1], refs[:, 2])
    return tspin_loss(policy[:, 0], policy[:, 1], policy[:, 2], *ref, reward_scale=config.tspin.reward_scale,
                      historical_weight=config.tspin.historical_weight, nll_weight=config.training.nll_weight,
                      real_tokens=real_tokens)


def _sft_loss(policy, refs, rates, lengths, config):
    from spin_ray.objectives.losses import sft_loss

    return sft_loss(policy[:, 0], lengths[:, 0])


# ---- config checks: the generation settings an algorithm cannot run without -----------------------------


def _sppo_check(config) -> str | None:
    gen = config.generation
    if gen.num_samples < 2:
        return "algorithm sppo needs generation.num_samples >= 2 (the paper uses 5)"
    if gen.temperature == 0.0:
        return "algorithm sppo needs generation.temperature > 0: greedy decoding gives K identical answers"
    if config.sppo.oracle == "reward_model" and not config.sppo.reward_model:
        return "sppo.oracle reward_model needs sppo.reward_model (a sequence-classification model folder)"
    return None


@dataclass(frozen=True)
class Algorithm:
    """What one objective needs and does; see the module docstring."""

    name: str
    answers: str  # the answers an example compares, in order
    columns: tuple[str, ...]  # generation columns read besides prompt_id, prompt_token_ids, real_token_ids
    build: Callable[[RowReader, bool, bool], Example]
    loss: Callable[..., tuple[Any, dict]]
    metrics: tuple[str, ...]  # what a training step reports, besides loss (some only with a stabiliser on)
    margin_caption: str = ""  # what rewards/margins compares, for the report
    # read only when the objective uses reference log-probs and the engines scored them (else the trainer scores them)
    reference_columns: tuple[str, ...] = ()
    uses_reference: Callable[[Any], bool] = lambda config: True
    needs_oracle: bool = False  # generation scores the K answers with a preference oracle
    needs_proto: bool = False  # examples carry the initial model's answer y_0
    token_average: bool = False  # a step minimises the per-token mean over the global batch, not per example
    check: Callable[[Any], str | None] = field(default=lambda config: None)
    # training.* stabilisers the loss honours (docs/algorithms.md); the config refuses the others when set
    options: tuple[str, ...] = ()
    # what a RECOMMENDABLE key left null takes: chosen on the validation split by bench/quality_grid.py
    recommended: dict[str, Any] = field(default_factory=dict)

    def setting(self, key: str) -> Any:
        """The value of a RECOMMENDABLE key a config leaves null: this objective's recommended, else the paper's."""
        return self.recommended.get(key, RECOMMENDABLE[key])

    def unsupported_options(self, training) -> list[str]:
        """The stabilisers set away from their off value that this objective would silently ignore."""
        return [name for name in STABILISERS if name not in self.options and getattr(training, name)]

    def reference_in_rows(self, config) -> bool:
        """Whether its rows carry reference log-probs: it uses them and the engines scored them
        (`Config.reference_source`); with the trainer's reference pass the examples get them in the workers."""
        return self.uses_reference(config) and config.reference_source == "engine"

    def needed_columns(self, config) -> list[str]:
        columns = ["prompt_id", "prompt_token_ids", "real_token_ids", *self.columns]
        return columns + list(self.reference_columns) if self.reference_in_rows(config) else columns

    def example(self, row: dict, source: str, number: int, config, with_tokens: bool = True) -> Example:
        return self.build(RowReader(row, source, number), self.reference_in_rows(config), with_tokens)


# The loss stabilisers of training.* and their off values (the paper's loss).
STABILISERS: dict[str, Any] = {"nll_weight": 0.0, "dpop_lambda": 0.0, "length_normalize": False}
# Config keys whose default is null: each takes the trained objective's recommended value, else the paper's (here).
RECOMMENDABLE: dict[str, Any] = {
    **{f"training.{name}": STABILISERS[name] for name in ("nll_weight", "length_normalize")},
    "tspin.reward_scale": 1.0,
    "tspin.length_normalize": False,
    "tspin.reference_free": True,
}

_REWARD_METRICS = ("rewards/real", "rewards/generated", "rewards/margins", "rewards/accuracies", "logps/real",
                   "logps/generated")

SPIN = Algorithm(
    name="spin",
    answers="(human, generated)",
    columns=("generated_token_ids",),
    reference_columns=("ref_logp_real", "ref_logp_generated"),
    build=_spin_example,
    loss=_spin_loss,
    metrics=(*_REWARD_METRICS, "nll/real", "dpop/penalty"),
    options=tuple(STABILISERS),
    # the grid's winner (docs/performance.md): SPIN's only point with no collapse signal in 2 iterations
    recommended={"training.nll_weight": 0.2, "training.length_normalize": True},
    margin_caption="reward of the human answer minus the opponent's answer (beta x log-ratio)",
)
SPPO = Algorithm(
    name="sppo", answers="(winner, loser)",
    columns=("generated_token_ids", "win_rates"), reference_columns=("ref_logp_generated",),
    build=_sppo_example, loss=_sppo_loss, needs_oracle=True, check=_sppo_check,
    metrics=("rewards/winner", "rewards/loser", "rewards/margins", "rewards/accuracies", "logps/winner",
             "logps/loser", "win_rate/winner", "win_rate/loser"),
    margin_caption="reward of the oracle's winner minus its loser among the K answers (beta x log-ratio)",
)
TSPIN = Algorithm(
    name="tspin", answers="(human, generated y_t, proto-synthetic y_0)",
    columns=("generated_token_ids", "proto_token_ids"),
    reference_columns=("ref_logp_real", "ref_logp_generated", "ref_logp_proto"),
    uses_reference=lambda config: not config.tspin.reference_free,
    build=_tspin_example, loss=_tspin_loss, needs_proto=True, options=("nll_weight",),
    # the grid's only calm T-SPIN point: SPIN's calm loss (per-token log-ratios against p_t, RPO 0.2, alpha = SPIN's
    # beta) plus the historical term; every point at the paper's alpha 1.0 collapsed
    recommended={"training.nll_weight": 0.2, "tspin.reward_scale": 0.1, "tspin.length_normalize": True,
                 "tspin.reference_free": False},
    metrics=(*_REWARD_METRICS, "loss/current", "loss/historical", "rewards/proto", "rewards/historical_margins",
             "logps/proto", "nll/real"),
    margin_caption="reward of the human answer minus the current synthetic answer y_t (alpha x log-prob)",
)
SFT = Algorithm(
    name="sft", answers="(human,)", columns=(), build=_sft_example, loss=_sft_loss,
    uses_reference=lambda config: False, token_average=True, metrics=("nll", "logps/real"),
    margin_caption="none (supervised fine-tuning on the human answers)",
)

# The self-play algorithms a run may choose with `algorithm:`; SFT is `training.objective: sft`.
ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (SPIN, SPPO, TSPIN)}


def objective(config) -> Algorithm:
    """The record the trainer optimises: SFT when training.objective is sft, else the run's algorithm."""
    return SFT if config.training.objective == "sft" else ALGORITHMS[config.algorithm]
