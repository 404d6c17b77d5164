"""SPPO and T-SPIN through the same driver, manifest and report (tiny model, real Ray, 2 iterations each)."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from spin_ray.config import load_config
from spin_ray.run.driver import run_iterations
from spin_ray.run.trainset import proto_digest
from spin_ray.training.loop import read_metrics_log

pytestmark = pytest.mark.ray

COMMON = ["data.limit=8", "generation.max_new_tokens=6", "generation.batch_size=8", "generation.replicas=[1,1]",
          "generation.shard_rows=4", "training.global_batch_size=4", "training.epochs=1",
          "training.learning_rate=1e-3", "iterations.count=2",
          "generation.engine=hf"]  # the algorithms, not the engine, are the point: vLLM runs in test_generation


def _rows(folder: Path) -> list[dict]:
    return [row for shard in sorted(folder.glob("shard-*.parquet")) for row in pq.read_table(shard).to_pylist()]


def test_sppo_with_a_reward_model_oracle(ray_session, tmp_path, tiny_model_dir, tiny_reward_model):
    config = load_config(None, [
        *COMMON, f"model.name={tiny_model_dir}", f"run.storage_path={tmp_path}", "run.name=sppo",
        "algorithm=sppo", "generation.num_samples=3", "generation.temperature=1.0",
        "sppo.oracle=reward_model", f"sppo.reward_model={tiny_reward_model}", "sppo.beta=0.1",
        "evaluation.enabled=false"])
    manifest = run_iterations(config, echo=lambda line: None)
    run = Path(tmp_path) / "sppo"
    assert manifest["status"] == "done" and manifest["final_model"] == str(run / "iter_1" / "model")

    for t in (0, 1):
        rows = _rows(run / f"iter_{t}" / "generation")
        assert len(rows) == 8
        for row in rows:
            # K sampled answers, each with its reference log-prob, oracle score and win rate
            assert len(row["generated"]) == len(row["ref_logp_generated"]) == len(row["oracle_scores"]) == 3
            # win rates with the self-pair at 1/2 always average 1/2 (P(i>j) + P(j>i) = 1)
            assert sum(row["win_rates"]) / 3 == pytest.approx(0.5)
        # a reward model separates answers: not every prompt's answers tie
        assert any(max(row["win_rates"]) - min(row["win_rates"]) > 1e-6 for row in rows)
        phases = manifest["iterations"][t]["phases"]
        assert phases["generate"]["metrics"]["answers_per_prompt"] == 3
        assert phases["generate"]["metrics"]["oracle_all_tied_share"] < 1.0
        train = phases["train"]["metrics"]
        assert train["steps"] == 2 and train["pairs"] == 8
        # each step trained on the winner (highest win rate) and the loser (lowest) of its prompts
        by_id = {row["prompt_id"]: row for row in rows}
        for step in read_metrics_log(str(run / f"iter_{t}" / "train")):
            picked = [by_id[pid]["win_rates"] for pid in step["prompt_ids"]]
            assert step["win_rate/winner"] == pytest.approx(sum(max(r) for r in picked) / 4)
            assert step["win_rate/loser"] == pytest.approx(sum(min(r) for r in picked) / 4)
    ids = [pid for step in read_metrics_log(str(run / "iter_1" / "train")) for pid in step["prompt_ids"]]
    assert sorted(ids) == sorted(row["prompt_id"] for row in _rows(run / "iter_1" / "generation"))
    report = (run / "report.md").read_text()
    assert "algorithm **sppo**" in report and "| p2 |" in report


def test_tspin_reuses_the_initial_models_answers(ray_session, tmp_path, tiny_model_dir):
    config = load_config(None, [
        *COMMON, f"model.name={tiny_model_dir}", f"run.storage_path={tmp_path}", "run.name=tspin",
        "algorithm=tspin", "tspin.historical_weight=0.5", "tspin.reference_free=true", "evaluation.prompts=4"])
    assert config.tspin.reference_free
    manifest = run_iterations(config, echo=lambda line: None)
    run = Path(tmp_path) / "tspin"
    assert manifest["status"] == "done"

    # reference-free: generation computed no reference log-probs at all
    proto_rows = _rows(run / "iter_0" / "generation")
    assert all(row["ref_logp_real"] is None and row["ref_logp_generated"] is None for row in proto_rows)
    assert manifest["iterations"][0]["phases"]["generate"]["metrics"]["reference_seconds"] == 0
    # y_0 = the initial model's answers of iteration 0, used unchanged in both iterations
    stored = proto_digest([r["prompt_id"] for r in proto_rows], [r["generated_token_ids"][0] for r in proto_rows])
    trains = [manifest["iterations"][t]["phases"]["train"] for t in (0, 1)]
    assert [train["metrics"]["proto_hash"] for train in trains] == [stored, stored]
    assert all(train["artifacts"]["proto"] == str(run / "iter_0" / "generation") for train in trains)
    # in iteration 0, y_t IS y_0: every historical term is exactly -log sigmoid(0) = log 2
    for step in read_metrics_log(str(run / "iter_0" / "train")):
        assert step["loss/historical"] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert trains[1]["metrics"]["steps"] == 2 and "rewards/historical_margins" in trains[1]["metrics"]
    # evaluation still measures the human answers' NLL (it scores them whatever the algorithm)
    evaluated = manifest["iterations"][1]["phases"]["evaluate"]["metrics"]
    assert evaluated["nll_per_token"] > 0 and evaluated["reward_pairs"] == 4
    report = json.loads((run / "report.json").read_text())
    assert report["algorithm"] == "tspin" and [row["model"] for row in report["rows"]] == ["p0", "p1", "p2"]


def test_tspin_with_reference_rescores_y0_under_each_opponent(ray_session, tmp_path, tiny_model_dir):
    """With tspin.reference_free false, r(y) = lambda (lp - lp_t): at the first step of iteration 1 the policy
    IS the reference p_1, so every reward is 0, which holds for y_0 only if it was rescored under p_1."""
    config = load_config(None, [
        *COMMON, f"model.name={tiny_model_dir}", f"run.storage_path={tmp_path}", "run.name=tspin-ref",
        "algorithm=tspin", "tspin.reference_free=false", "tspin.reward_scale=1.0", "data.limit=4",
        "evaluation.enabled=false"])
    manifest = run_iterations(config, echo=lambda line: None)
    assert manifest["status"] == "done"
    assert all(row["ref_logp_real"] is not None for row in _rows(tmp_path / "tspin-ref" / "iter_1" / "generation"))
    # y_0 was scored under p_1 by p_1's own generation pass, not by a scoring pool after it
    assert manifest["iterations"][1]["phases"]["train"]["metrics"]["rescored_in_engine_pass"] is True
    (first,) = read_metrics_log(str(tmp_path / "tspin-ref" / "iter_1" / "train"))
    for key in ("rewards/real", "rewards/generated", "rewards/proto"):
        assert first[key] == pytest.approx(0.0, abs=1e-3), key
    assert first["loss/historical"] == pytest.approx(0.6931471805599453, abs=1e-3)
