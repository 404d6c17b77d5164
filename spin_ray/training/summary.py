"""What a training phase reports: its steps, where its time went, and what it exported (summary.json)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from spin_ray.storage import join, read_json

SUMMARY = "summary.json"  # in the training folder, written by rank 0 once the export is complete


@dataclass(frozen=True)
class TrainingSummary:
    """One training phase as `train` (every rank) returns it and rank 0 keeps it in `{train_dir}/summary.json`.
    `seconds` is the whole call; `training_seconds` the steps (and the saves they waited for, `checkpoint_seconds`);
    `setup_seconds` the load before step 1; `export_seconds` the export after the last."""

    export_dir: str
    steps: int  # the last step run: below the schedule's total where early stopping ended training
    resumed_from_step: int
    pairs: int
    pairs_left_out_per_epoch: int  # the remainder below one global batch, left out each epoch
    last_step: dict  # the last step's record in metrics.jsonl: loss, the objective's named metrics, lr, grad norm
    seconds: float
    setup_seconds: float
    training_seconds: float
    checkpoint_seconds: float
    export_seconds: float
    training_tokens_per_second: float | None  # None where no step ran in this call (all resumed)
    compute_dtype: str
    lora_rank: int  # 0: full fine-tuning
    trainable_parameters: int
    activation_checkpointing: bool
    sharded_accumulation: bool
    reference_source: str | None  # where reference log-probs came from; None for an objective without them
    reference_pass: str | None = None  # the trainer's reference pass: "scored" now or "stored" by an earlier attempt
    reference_pass_seconds: float | None = None
    plan_check: dict = field(default_factory=dict)  # measured vs planned peak memory and step time (rank 0)
    ingest_seconds: float | None = None  # the workers' read of the pairs (set by Ray Train's entry, rank 0)
    epochs_run: int | None = None  # with early stopping: epochs run, the best, its validation NLL, and each epoch's
    best_epoch: int | None = None
    validation_nll: float | None = None
    validation_nll_by_epoch: list[float] | None = None

    @property
    def loss(self) -> float | None:
        return self.last_step.get("loss")

    def metrics(self) -> dict:
        """The phase's metrics as a run's manifest keeps them: the last step's, then this summary's (the export's
        folder is the phase's artifact, not a metric)."""
        own = {key: value for key, value in dataclasses.asdict(self).items() if key not in ("export_dir", "last_step")}
        return {**self.last_step, **own}

    def to_record(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> TrainingSummary:
        """Read back summary.json. One written before the summary had a `last_step` held the last step's metrics beside
        its own keys: they are read back as `last_step`, so a run trained then still resumes."""
        known = {f.name for f in dataclasses.fields(cls)}
        own = {key: value for key, value in record.items() if key in known}
        own.setdefault("last_step", {key: value for key, value in record.items() if key not in known})
        return cls(**own)


def read_summary(train_dir: str) -> TrainingSummary | None:
    """The summary a finished training left in `train_dir`, else None."""
    record = read_json(join(train_dir, SUMMARY))
    return None if record is None else TrainingSummary.from_record(record)
