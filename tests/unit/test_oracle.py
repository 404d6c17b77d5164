"""SPPO's preference oracles: K x K matrices, win rates with the self-pair at 1/2, the GSM8K rule, a reward model."""

import numpy as np
import pyarrow as pa
import pytest

from spin_ray.generation.oracle import (
    GSM8KRuleOracle,
    RewardModelOracle,
    gsm8k_rule_preferences,
    matrix_from_scores,
    win_rates,
)
from spin_ray.objectives.algorithms import winner_and_loser

QUESTION = [{"role": "user", "content": "Tom has 3 apples and buys 4. How many?"}]
HUMAN = "3 + 4 = 7\n#### 7"


def test_win_rates_count_the_self_pair_as_one_half():
    # answer 0 beats both others for sure, 1 and 2 tie
    matrix = np.array([[0.0, 1.0, 1.0], [0.0, 0.0, 0.5], [0.0, 0.5, 0.0]])  # diagonal is ignored
    assert win_rates(matrix).tolist() == pytest.approx([2.5 / 3, 1.0 / 3, 1.0 / 3])
    assert winner_and_loser(win_rates(matrix)) == (0, 2)
    assert win_rates(np.full((4, 4), 0.5)).tolist() == [0.5] * 4


def test_gsm8k_rule_correct_beats_wrong_and_ties_are_half():
    answers = ["so the answer is 7", "#### 12", "It is 7.00 apples.", "no idea"]
    matrix = matrix_from_scores(GSM8KRuleOracle().scores([QUESTION], [answers], [HUMAN])[0], GSM8KRuleOracle.comparison)
    assert matrix.tolist() == [[0.5, 1.0, 0.5, 1.0], [0.0, 0.5, 0.0, 0.5], [0.5, 1.0, 0.5, 1.0], [0.0, 0.5, 0.0, 0.5]]
    assert win_rates(matrix).tolist() == [0.75, 0.25, 0.75, 0.25]


def test_rule_stage_appends_scores_and_win_rates():
    batch = pa.table({"prompt": [QUESTION, QUESTION], "real": [HUMAN, HUMAN],
                      "generated": [["7", "8"], ["9", "10"]]})
    out = gsm8k_rule_preferences(batch)
    assert out.column("oracle_scores").to_pylist() == [[1.0, 0.0], [0.0, 0.0]]
    assert out.column("win_rates").to_pylist() == [[0.75, 0.25], [0.5, 0.5]]


def test_bradley_terry_matrix_is_a_sigmoid_of_score_differences():
    matrix = matrix_from_scores([2.0, 0.0, -1.0], "bradley_terry")
    assert matrix[0, 1] == pytest.approx(1 / (1 + np.exp(-2.0)))
    assert np.allclose(matrix + matrix.T, 1.0) and np.allclose(np.diag(matrix), 0.5)


def test_reward_model_oracle_scores_each_answer_alone(tiny_reward_model):
    oracle = RewardModelOracle(tiny_reward_model, batch_size=2)
    answers = ["7", "The answer is 12, since 3 + 4 is not 12.", "#### 7"]
    (scores,) = oracle.scores([QUESTION], [answers])
    # padding in a batch of 2 does not change a score: each answer scored alone gives the same value
    alone = [oracle.scores([QUESTION], [[a]])[0][0] for a in answers]
    assert scores == pytest.approx(alone, abs=1e-5)
    assert len(set(np.round(scores, 6))) == 3
    matrix = matrix_from_scores(scores, oracle.comparison)
    assert matrix[0, 1] == pytest.approx(1 / (1 + np.exp(-(scores[0] - scores[1]))), abs=1e-6)
    assert np.allclose(matrix + matrix.T, 1.0)


def test_reward_model_with_several_outputs_is_refused(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, num_labels=3)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_labels 1"):
        RewardModelOracle(str(tmp_path))
