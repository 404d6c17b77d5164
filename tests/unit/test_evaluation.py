"""Held-out evaluation math: per-row scores and rewards against the opponent."""

import math

import pyarrow as pa
import pytest

from spin_ray.run.evaluation import reward_columns, score_answers


def test_score_answers_rows():
    batch = pa.table({
        "prompt_id": ["a", "b", "c"],
        "real": ["... #### 18", "... #### 3", "... #### 1,000"],
        "generated": [["So 18."], ["#### 4"], ["#### 1000"]],
        "ref_logp_real": [-20.0, -5.0, -9.0],
        "real_tokens": [10, 5, 3],
        "generated_tokens": [[4], [3], [64]],
        "finish_reasons": [["stop"], ["stop"], ["length"]],
    })
    out = score_answers(batch).to_pydict()
    assert out["correct"] == [1.0, 0.0, 1.0]
    assert out["correct_strict"] == [0.0, 0.0, 1.0]  # lm-eval strict needs '#### <number>'
    assert out["correct_flexible"] == [1.0, 0.0, 1.0]
    assert out["formatted"] == [0.0, 1.0, 1.0]
    assert out["nll_per_token"] == [2.0, 1.0, 3.0]
    assert out["answer_tokens"] == [4, 3, 64] and out["hit_max_new_tokens"] == [0.0, 0.0, 1.0]


def test_rewards_against_the_opponent_by_hand():
    # the opponent's own log-probs in ref_* (it generated the rows), the new model M's in new_logp_*
    batch = pa.table({
        "prompt_id": ["a", "b"],
        "ref_logp_real": [-10.0, -20.0],
        "ref_logp_generated": [[-30.0], [-5.0]],
        "new_logp_real": [-8.0, -21.0],  # M raised a's human answer
        "new_logp_generated": [[-33.0], [-4.0]],
    })
    out = reward_columns(batch, beta=0.1).to_pydict()
    assert out["reward_real"] == pytest.approx([0.2, -0.1])
    assert out["reward_generated"] == pytest.approx([-0.3, 0.1])
    assert out["reward_margin"] == pytest.approx([0.5, -0.2])
    assert out["reward_correct"] == [1.0, 0.0]
    assert all(math.isfinite(v) for v in out["reward_margin"])
