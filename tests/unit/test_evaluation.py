"""Held-out evaluation math: GSM8K answer extraction, per-row scores, rewards against the opponent."""

import math

import pyarrow as pa
import pytest

from spin_ray.evaluation import final_answer, keep_opponent_logps, normalise_number, reward_columns, score_answers


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,200", "1200"),
        ("$18.00", "18"),
        ("-3", "-3"),
        ("0.50", "0.5"),
        ("100", "100"),
        ("7.", "7"),
        ("abc", None),
    ],
)
def test_normalise_number(text, expected):
    assert normalise_number(text) == expected


def test_final_answer_takes_the_number_after_the_last_marker():
    human = "She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"
    assert final_answer(human) == "18"
    assert final_answer("#### 5\nwait, no\n#### $1,000.00 dollars") == "1000"


def test_final_answer_without_marker_takes_the_last_number():
    assert final_answer("First 3 apples, then 4 more, so the answer is 7.") == "7"
    assert final_answer("no numbers here") is None
    assert final_answer(None) is None


def test_score_answers_rows():
    batch = pa.table({
        "prompt_id": ["a", "b", "c"],
        "real": ["... #### 18", "... #### 3", "... #### 1,000"],
        "generated": [["So 18."], ["#### 4"], ["#### 1000"]],
        "ref_logp_real": [-20.0, -5.0, -9.0],
        "real_tokens": [10, 5, 3],
    })
    out = score_answers(batch).to_pydict()
    assert out["correct"] == [1.0, 0.0, 1.0]
    assert out["formatted"] == [0.0, 1.0, 1.0]
    assert out["nll_per_token"] == [2.0, 1.0, 3.0]


def test_rewards_against_the_opponent_by_hand():
    # new model M's log-probs in ref_* (its scoring pass), the opponent's own in the copied columns
    batch = pa.table({
        "prompt_id": ["a", "b"],
        "ref_logp_real": [-10.0, -20.0],
        "ref_logp_generated": [[-30.0], [-5.0]],
    })
    batch = keep_opponent_logps(batch)
    batch = batch.set_column(1, "ref_logp_real", pa.array([-8.0, -21.0]))  # M raised a's human answer
    batch = batch.set_column(2, "ref_logp_generated", pa.array([[-33.0], [-4.0]]))
    out = reward_columns(batch, beta=0.1).to_pydict()
    assert out["reward_real"] == pytest.approx([0.2, -0.1])
    assert out["reward_generated"] == pytest.approx([-0.3, 0.1])
    assert out["reward_margin"] == pytest.approx([0.5, -0.2])
    assert out["reward_correct"] == [1.0, 0.0]
    assert all(math.isfinite(v) for v in out["reward_margin"])
