"""What a finished generation folder reports: counts, lengths and timings, as its completion record keeps them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class GenerationSummary:
    """A completed generation folder's answers and their cost. `seconds` is the whole engine pass's wall time;
    `engine_seconds`, `reference_seconds` and `startup_seconds` sum the replicas' own time over this folder's
    shards. Per-second rates are None where nothing (or only part) was generated now."""

    prompts: int
    prompts_generated_this_run: int
    responses: int
    generated_tokens: int
    seconds: float
    tokens_per_second: float | None
    mean_response_tokens: float
    max_response_tokens: int
    share_hit_max_new_tokens: float
    max_new_tokens: int
    engine_seconds: float
    reference_seconds: float
    startup_seconds: float
    engine_tokens_per_second: float | None
    engine: str
    model: str
    answers_per_prompt: int
    overlong_dropped: int
    overlong_truncated: int
    oracle_mean_score: float | None = None  # SPPO: the oracle's mean score of the answers
    oracle_all_tied_share: float | None = None  # SPPO: share of prompts whose answers all score alike
    engine_starts: int = 0  # engine replicas the pass started (every prompt set of one pass reports the pass's)
    pass_startup_seconds: float = 0.0
    pass_prompt_sets: int = 1
    engines_started: int | None = None  # from the pass's tally, where it answered
    engines_shut_down: int | None = None

    def to_record(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> GenerationSummary:
        """Read back a completion record's summary; keys this version does not know are left out."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in record.items() if key in known})

    def line(self) -> str:
        """One line for a terminal: counts, rates, where the time went, how often answers hit the length cap."""
        tps, engine_tps = self.tokens_per_second, self.engine_tokens_per_second
        return (
            f"generation ({self.engine}): {self.prompts} prompts ({self.prompts_generated_this_run} generated this "
            f"run), {self.generated_tokens:,} tokens in {self.seconds}s"
            + (f" = {tps} tok/s end to end" if tps else "")
            + f"; engines {self.engine_seconds}s" + (f" ({engine_tps} tok/s)" if engine_tps else "")
            + f", start-up {self.startup_seconds}s, reference {self.reference_seconds}s of actor time"
            + f"; response tokens mean {self.mean_response_tokens}, max {self.max_response_tokens}; "
            f"{self.share_hit_max_new_tokens:.1%} hit max_new_tokens ({self.max_new_tokens})"
        )


@dataclass(frozen=True)
class Completion:
    """A finished generation folder's record (_COMPLETE.json): its shards, every prompt in exactly one, and summary."""

    shards: list[str]
    summary: GenerationSummary

    def to_record(self) -> dict:
        return {"shards": self.shards, "summary": self.summary.to_record()}

    @classmethod
    def from_record(cls, record: dict) -> Completion:
        return cls(record["shards"], GenerationSummary.from_record(record["summary"]))
