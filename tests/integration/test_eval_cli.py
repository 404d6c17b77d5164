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
    data.write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "solution": f"{i} + {i} = {2 * i}\n#### {2 * i}"})
                            + "\n" for i in range(5)))
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
