"""Collapse watch: the held-out signals that come before self-play collapse, a new model against its opponent."""

from __future__ import annotations

# Measured before collapse on GSM8K with SmolLM2-135M (bench/results/quality.json, SPIN p1 -> p2): answers hitting
# max_new_tokens 28% -> 85%, format rate 52% -> 11%, NLL of the human answers 1.081 -> 1.108 nats/token.


def collapse_signals(opponent: dict, new: dict, nll_tolerance: float = 0.01,
                     share_tolerance: float = 0.05) -> dict[str, str]:
    """What got worse from the opponent's held-out evaluation to the new model's, beyond the tolerances:
      - the human answers' NLL per token rose by more than `nll_tolerance` nats (their log-prob fell);
      - the share of answers hitting max_new_tokens rose by more than `share_tolerance`;
      - the share of answers in the expected format fell by more than `share_tolerance`.
    A share's change must also exceed two standard errors over the evaluation's prompts (`prompts` in both dicts).
    Each is read on the validation split (validation_<key>) when both sides have it, else on the held-out set.
    Metrics missing on either side are skipped. Returns {nll, length, format: what changed} for the signals that
    fired; empty when none did."""
    signals = {}

    def change(key: str) -> tuple[float, float] | None:
        # the validation split when the run has one: decisions are made there, the test split stays untouched
        if opponent.get(f"validation_{key}") is not None and new.get(f"validation_{key}") is not None:
            key = f"validation_{key}"
        before, after = opponent.get(key), new.get(key)
        return None if before is None or after is None else (float(before), float(after))

    nll = change("nll_per_token")
    if nll and nll[1] - nll[0] > nll_tolerance:
        signals["nll"] = f"human answers' NLL rose {nll[0]:.4f} -> {nll[1]:.4f} nats/token"
    scope = "validation_" if opponent.get("validation_prompts") and new.get("validation_prompts") else ""
    prompts = min(int(opponent.get(f"{scope}prompts") or 0), int(new.get(f"{scope}prompts") or 0))
    capped = change("share_hit_max_new_tokens")
    if capped and capped[1] - capped[0] > max(share_tolerance, _noise(*capped, prompts)):
        signals["length"] = f"answers hitting max_new_tokens rose {capped[0]:.0%} -> {capped[1]:.0%}"
    formatted = change("answer_format_rate")
    if formatted and formatted[0] - formatted[1] > max(share_tolerance, _noise(*formatted, prompts)):
        signals["format"] = f"answer format rate fell {formatted[0]:.0%} -> {formatted[1]:.0%}"
    return signals


def _noise(before: float, after: float, prompts: int) -> float:
    """Two standard errors of the difference of two shares over `prompts` prompts: on 16 held-out prompts one answer
    is 6 points, so a share must move further than sampling noise before it counts (0 when the size is unknown)."""
    if prompts <= 0:
        return 0.0
    return 2.0 * ((before * (1 - before) + after * (1 - after)) / prompts) ** 0.5
