"""Paired comparisons of two models on the same prompts: mean difference with a bootstrap 95% interval."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairedDifference:
    """mean(a - b) over prompts, and the percentile bootstrap interval of that mean (resampling prompts)."""

    mean: float
    low: float
    high: float
    prompts: int

    @property
    def real(self) -> bool:
        """Whether the interval excludes 0: a difference this sample size does not explain by chance."""
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        return {"mean": self.mean, "ci95": [self.low, self.high], "prompts": self.prompts, "excludes_zero": self.real}


def paired_bootstrap(a: Sequence[float], b: Sequence[float], resamples: int = 10_000, seed: int = 0,
                     level: float = 0.95) -> PairedDifference:
    """Mean of a_i - b_i and its percentile bootstrap interval: prompts are drawn with replacement `resamples` times
    and the mean difference recomputed on each draw. a and b are per-prompt scores of two models on the same prompts
    (1/0 exact match, NLL per token, ...), in the same prompt order."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired_bootstrap needs two equal-length, non-empty score lists, got {a.shape} and {b.shape}")
    diff = a - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return PairedDifference(float(diff.mean()), float(low), float(high), len(diff))
