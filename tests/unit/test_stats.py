"""The paired bootstrap, on cases whose answer is known."""

import math

import numpy as np
import pytest

from bench.stats import paired_bootstrap


def test_a_constant_difference_has_a_zero_width_interval():
    result = paired_bootstrap([1.0, 2.0, 3.0, 4.0], [0.5, 1.5, 2.5, 3.5])
    assert result.mean == pytest.approx(0.5) and result.low == pytest.approx(0.5) and result.high == pytest.approx(0.5)
    assert result.real and result.prompts == 4


def test_the_interval_matches_the_normal_approximation_on_a_large_sample():
    # 400 prompts, model a right on 60%, b on 50%, disagreeing on exactly 10% more prompts: the mean difference
    # is 0.1 and its standard error sqrt(var(diff) / n)
    a = np.array([1] * 240 + [0] * 160, dtype=float)
    b = np.array([1] * 200 + [0] * 200, dtype=float)
    result = paired_bootstrap(a, b, resamples=20_000)
    diff = a - b
    half = 1.96 * diff.std() / math.sqrt(len(diff))
    assert result.mean == pytest.approx(0.1)
    assert result.low == pytest.approx(0.1 - half, abs=0.005) and result.high == pytest.approx(0.1 + half, abs=0.005)
    assert result.real


def test_identical_models_do_not_differ_and_noise_is_not_called_real():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, 200).astype(float)
    same = paired_bootstrap(a, a)
    assert same.mean == same.low == same.high == 0.0 and not same.real
    noise = paired_bootstrap(a, rng.permutation(a))  # same accuracy, shuffled: any difference is chance
    assert noise.low < 0 < noise.high and not noise.real
    assert paired_bootstrap(a, rng.permutation(a), seed=3).to_dict()["excludes_zero"] is False


def test_mismatched_inputs_are_refused():
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap([1.0, 0.0], [1.0])
    with pytest.raises(ValueError, match="non-empty"):
        paired_bootstrap([], [])
