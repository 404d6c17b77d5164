"""Model selection: a run's best model on its validation split, kept as the models are evaluated one by one."""

from __future__ import annotations

# select_by -> whether a higher value is better
HIGHER_IS_BETTER = {"nll_per_token": False, "accuracy": True}


def better_model(current: dict | None, candidate: dict, metrics: dict, select_by: str) -> dict:
    """The selected model after `candidate` ({model, iteration, path}) was evaluated with `metrics`: the candidate,
    with its validation value, when it beats `current` on validation_<select_by> (ties keep the earlier model), or
    `current` itself. Without validation metrics the newest model is selected ("last")."""
    value = metrics.get(f"validation_{select_by}")
    if value is None:
        return {**candidate, "by": "last (no validation split)", "value": None}
    chosen = {**candidate, "by": f"validation {select_by}", "value": float(value)}
    if current is None or current.get("value") is None:
        return chosen
    if HIGHER_IS_BETTER[select_by]:
        return chosen if chosen["value"] > current["value"] else current
    return chosen if chosen["value"] < current["value"] else current
