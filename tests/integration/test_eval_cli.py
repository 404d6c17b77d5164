"""`spin-ray eval` alone (tiny model, real Ray): the baseline row, and a model scored against itself."""

import json

import pytest

from spin_ray.cli import main

pytestmark = pytest.mark.ray


def test_eval_baseline_and_self_reward_is_zero(ray_session, tmp_path, tiny_model_dir, capsys):
    common = [f"run.storage_path={tmp_path}", "evaluation.prompts=4", "generation.max_new_tokens=8",
              "generation.replicas=[1,1]", "generation.batch_size=4", "generation.engine=hf"]
    out = tmp_path / "base"
    assert main(["eval", "--data", "gsm8k:test", "--output", str(out), tiny_model_dir, *common]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prompts"] == 4 and metrics["data"] == "gsm8k:test"
    assert metrics["accuracy"] == 0.0  # a random model does not solve GSM8K
    assert metrics["nll_per_token"] > 5  # and finds human text very unlikely (uniform over 49k tokens: 10.8)
    assert "reward_accuracy" not in metrics
    assert f"{out}/metrics.json" in capsys.readouterr().out

    # Against its own answers the model's reward is 0: the same log-probs, once summed while
    # decoding (the engine) and once from a forward pass (the scoring stage), up to batching noise.
    again = tmp_path / "self"
    assert main(["eval", "--output", str(again), "--opponent-answers", str(out / "answers"), tiny_model_dir,
                 *common]) == 0
    self_metrics = json.loads((again / "metrics.json").read_text())
    assert self_metrics["reward_pairs"] == 4
    assert abs(self_metrics["reward_margin"]) < 1e-3
    assert abs(self_metrics["reward_real"]) < 1e-3 and abs(self_metrics["reward_generated"]) < 1e-3


def test_eval_on_a_users_own_math_file(ray_session, tmp_path, tiny_model_dir, capsys):
    # any held-out file whose answers end in '#### <number>' gets the same metrics as GSM8K
    data = tmp_path / "my_math.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": f"What is {i} + {i}?", "solution": f"{i} + {i} = {2 * i}\n#### {2 * i}"}) + "\n"
            for i in range(5)
        )
    )
    out = tmp_path / "mine"
    assert main(["eval", "--data", str(data), "--output", str(out), tiny_model_dir, "data.prompt_column=question",
                 "data.response_column=solution", "evaluation.prompts=5", "generation.max_new_tokens=8",
                 "generation.replicas=[1,1]", "generation.engine=hf", f"run.storage_path={tmp_path}"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prompts"] == 5 and metrics["data"] == str(data)
    for key in ("accuracy", "accuracy_lm_eval_strict", "accuracy_lm_eval_flexible", "answer_format_rate",
                "nll_per_token", "mean_answer_tokens", "share_hit_max_new_tokens"):
        assert metrics[key] is not None, key
    assert (out / "scores.parquet").is_file()
    # the same output folder, another model: the old metrics.json is not taken for this model's
    capsys.readouterr()
    assert main(["eval", "--data", str(data), "--output", str(out), tiny_model_dir, "data.prompt_column=question",
                 "data.response_column=solution", "evaluation.prompts=3", "generation.max_new_tokens=8",
                 "generation.replicas=[1,1]", "generation.engine=hf", f"run.storage_path={tmp_path}"]) == 0
    assert "replacing it" in capsys.readouterr().out
    assert json.loads((out / "metrics.json").read_text())["prompts"] == 3


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_rewards_scored_in_the_engine_pass_equal_a_separate_scorers(ray_session, tmp_path, tiny_model_dir,
                                                                   varied_model_dir, engine):
    import pyarrow.parquet as pq

    common = [f"run.storage_path={tmp_path}", "evaluation.prompts=6", "generation.max_new_tokens=12",
              "generation.replicas=[1,1]", "generation.batch_size=6", "generation.engine=hf"]
    # the opponent p_t: a model whose greedy answers differ per prompt
    assert main(["eval", "--output", str(tmp_path / "opponent"), varied_model_dir, *common]) == 0
    answers = str(tmp_path / "opponent" / "answers")
    runs = {"engine pass": [f"generation.engine={engine}"], "reference pool": ["generation.fuse_reference=false"]}
    scores, metrics = {}, {}
    for scored_in, overrides in runs.items():
        out = tmp_path / scored_in.replace(" ", "_")
        assert (
            main(["eval", "--output", str(out), "--opponent-answers", answers, tiny_model_dir, *common, *overrides])
            == 0
        )
        metrics[scored_in] = json.loads((out / "metrics.json").read_text())
        scores[scored_in] = pq.read_table(out / "scores.parquet").sort_by("prompt_id").to_pydict()
        assert metrics[scored_in]["reward_scoring"] == scored_in and metrics[scored_in]["reward_pairs"] == 6
    fused, pool = scores["engine pass"], scores["reference pool"]
    assert fused["prompt_id"] == pool["prompt_id"]
    assert len(set(pool["reward_generated"])) > 1  # answers that differ: not a comparison of constants
    for column in ("reward_real", "reward_generated", "reward_margin"):
        assert fused[column] == pytest.approx(pool[column], abs=1e-4), column  # beta x log-probs within 1e-3 nats
    assert fused["reward_correct"] == pool["reward_correct"]
    assert metrics["engine pass"]["reward_accuracy"] == metrics["reference pool"]["reward_accuracy"]
