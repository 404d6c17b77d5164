"""The self-play loop in process (tiny model, real Ray): SFT warm start, mixing, the convergence stop."""

import json
import shutil
from pathlib import Path

import pytest

from spin_ray.config import load_config
from spin_ray.run.driver import run_iterations
from spin_ray.training.loop import read_metrics_log

pytestmark = pytest.mark.ray


def test_warm_start_mix_previous_then_converged_stop_on_forced_rerun(ray_session, tmp_path, tiny_model_dir):
    overrides = [
        f"model.name={tiny_model_dir}", f"run.storage_path={tmp_path}", "run.name=loop",
        "data.limit=8", "generation.max_new_tokens=6", "generation.batch_size=8", "generation.replicas=[1,1]",
        "generation.shard_rows=4", "training.global_batch_size=4", "training.epochs=1",
        "training.learning_rate=1e-3", "iterations.count=2", "iterations.mix_previous=true",
        "iterations.sft_warm_start=true", "evaluation.prompts=4",
        "data.validation_fraction=0.05", "evaluation.validation_prompts=4",
        "iterations.sft_epochs=auto", "iterations.sft_max_epochs=2",
        # the loop is the point; vLLM starts in ~20-60 s each of 5 times (test_generation has it)
        "generation.engine=hf",
    ]
    manifest = run_iterations(load_config(None, overrides), echo=lambda line: None)
    run = Path(tmp_path) / "loop"
    assert manifest["status"] == "done" and manifest["final_model"] == str(run / "iter_1" / "model")

    # the SFT warm start trained on the human answers, and its export is p_0
    sft = manifest["phases"]["sft"]
    assert sft["status"] == "done" and sft["metrics"]["nll"] > 0
    # sft_epochs auto: an epoch at a time until the validation NLL stops improving (at most 2 here), the best kept
    history = sft["metrics"]["validation_nll_by_epoch"]
    assert 1 <= sft["metrics"]["epochs_run"] == len(history) <= 2
    assert sft["metrics"]["validation_nll"] == min(history) == history[sft["metrics"]["best_epoch"] - 1]
    assert manifest["iterations"][0]["opponent"] == str(run / "sft" / "model")
    assert manifest["phases"]["baseline_eval"]["metrics"]["model"] == str(run / "sft" / "model")
    assert manifest["iterations"][1]["opponent"] == str(run / "iter_0" / "model")

    # iteration 1 trained on its own 8 pairs plus iteration 0's 8, rescored and tagged apart
    ids = [pid for step in read_metrics_log(str(run / "iter_1" / "train")) for pid in step["prompt_ids"]]
    assert len(ids) == 16 and len(set(ids)) == 16
    assert sum(pid.startswith("iter0/") for pid in ids) == 8
    trained = manifest["iterations"][1]["phases"]["train"]["metrics"]
    assert trained["pairs"] == 16
    # iteration 0's pairs took their log-probs under p_1 from p_1's engine pass, no scoring pool: at iteration 1's
    # first step the policy IS p_1, so every reward is 0, the mixed-in pairs' included
    assert trained["rescored_in_engine_pass"] is True
    first = read_metrics_log(str(run / "iter_1" / "train"))[0]
    assert any(pid.startswith("iter0/") for pid in first["prompt_ids"])
    assert first["rewards/real"] == pytest.approx(0.0, abs=1e-3) and first["rewards/generated"] == pytest.approx(
        0.0, abs=1e-3
    )
    # a training phase's fixed cost, reported apart from its steps: the pairs' ingest and the model load
    assert trained["ingest_seconds"] > 0 and trained["setup_seconds"] > 0 and trained["training_seconds"] > 0
    # one engine start per model: p0's pass evaluates it and answers iteration 0's prompts, p1's the same for
    # iteration 1, p2's only evaluates; no generation phase starts engines of its own
    assert manifest["phases"]["baseline_eval"]["metrics"]["engine_starts"] == 1
    for t in (0, 1):
        phases = manifest["iterations"][t]["phases"]
        assert phases["generate"]["metrics"]["engine_starts"] == 0 and "answered_in" in phases["generate"]["metrics"]
        assert phases["evaluate"]["metrics"]["engine_starts"] == 1
    for t in (0, 1):
        ev = manifest["iterations"][t]["phases"]["evaluate"]["metrics"]
        assert ev["reward_pairs"] == 4 and 0.0 <= ev["reward_accuracy"] <= 1.0
        assert ev["validation_prompts"] == 4 and ev["validation_nll_per_token"] > 0

    # the validation split: carved out of data.train, never trained on, and the best model on it is selected
    from spin_ray.data.records import load_records

    validation, _ = load_records(str(run / "validation.jsonl"), load_config(None, overrides).data)
    assert validation.num_rows == 4 and not set(validation.column("prompt_id").to_pylist()) & set(ids)
    scored = [manifest["phases"]["baseline_eval"]["metrics"]["validation_nll_per_token"],
              *(manifest["iterations"][t]["phases"]["evaluate"]["metrics"]["validation_nll_per_token"] for t in (0, 1))]
    best = min(range(3), key=lambda i: (scored[i], i))
    assert manifest["selected_model"]["model"] == f"p{best}" and manifest["selected_model"]["value"] == scored[best]

    # The stop rule: held-out reward accuracy is at most 1.0, so a threshold of 1.0 stops the run after
    # iteration 0. It is a results-shaping key, so only --force continues the run under it; every
    # phase is already done and is skipped.
    lines = []
    changed = load_config(None, [*overrides, "iterations.converged_accuracy=1.0"])
    manifest = run_iterations(changed, force=True, echo=lines.append)
    assert manifest["status"] == "converged" and manifest["stopped_after_iteration"] == 0
    assert manifest["final_model"] == str(run / "iter_0" / "model")
    assert manifest["config_changes"][-1]["keys"] == ["iterations.converged_accuracy"]
    assert any("converged" in line for line in lines)
    assert sum("done in an earlier job, skipped" in line for line in lines) == 5  # sft, baseline, 3 of iter 0
    on_disk = json.loads((run / "manifest.json").read_text())
    assert on_disk["status"] == "converged" and (run / "report.png").stat().st_size > 0


def test_the_start_models_evaluation_is_cached_by_content_data_and_settings(ray_session, tmp_path, tiny_model_dir):
    common = [
        f"model.name={tiny_model_dir}",
        f"run.storage_path={tmp_path}",
        "iterations.count=0",
        "generation.max_new_tokens=6",
        "generation.replicas=[1,1]",
        "generation.engine=hf",
        "evaluation.prompts=4",
    ]

    def baseline(name: str, *extra: str) -> tuple[dict, list[str]]:
        lines: list[str] = []
        manifest = run_iterations(load_config(None, [*common, f"run.name={name}", *extra]), echo=lines.append)
        return manifest["phases"]["baseline_eval"], lines

    first, _ = baseline("a")
    again, lines = baseline("b")  # another run, the same start model: nothing is generated again
    assert not first["metrics"].get("cached") and again["metrics"]["cached"] is True
    assert any("reusing" in line for line in lines)
    shown = ("accuracy", "nll_per_token", "answer_format_rate", "share_hit_max_new_tokens", "prompts")
    assert {k: again["metrics"][k] for k in shown} == {k: first["metrics"][k] for k in shown}
    assert again["artifacts"]["answers"] == first["artifacts"]["answers"]
    changed, _ = baseline("c", "evaluation.prompts=3")  # another setting: evaluated anew
    assert not changed["metrics"].get("cached") and changed["metrics"]["prompts"] == 3
    # the same content at another path (a benchmark arm starting from another run's export): the same evaluation
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy-of-start")
    elsewhere, _ = baseline("d", f"model.name={copy}")
    assert elsewhere["metrics"]["cached"] is True and elsewhere["artifacts"]["answers"] == first["artifacts"]["answers"]


def test_with_the_trainers_reference_no_engine_scores_and_every_example_mixed_in_is_scored_in_training(
        ray_session, tmp_path, tiny_model_dir):
    """training.reference trainer (what every GPU job takes): the generation passes score nothing for training, the
    train phase rescores nothing, and iteration 1's training workers score all 16 examples (its own 8 pairs and
    iteration 0's 8) under p_1 before the first step, which therefore starts at reward 0 and loss log 2 for
    every one of them; the phase runs in an actor named for the run and the driver attempt."""
    from spin_ray.generation.shards import committed_shards, read_shards
    from spin_ray.run.attempts import run_prefix

    overrides = [
        f"model.name={tiny_model_dir}", f"run.storage_path={tmp_path}", "run.name=trainer-ref",
        "data.limit=8", "generation.max_new_tokens=6", "generation.batch_size=8", "generation.replicas=[1,1]",
        "generation.shard_rows=4", "training.global_batch_size=4", "training.epochs=1", "training.learning_rate=1e-3",
        "iterations.count=2", "iterations.mix_previous=true", "evaluation.prompts=4", "training.reference=trainer",
        "training.nll_weight=0", "training.length_normalize=false", "generation.engine=hf",
    ]
    import threading

    import ray

    named, done = set(), threading.Event()

    def watch() -> None:  # while the run goes, the actors its driver attempt started are listed by their names
        while not done.wait(0.5):
            named.update(entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        manifest = run_iterations(load_config(None, overrides), echo=lambda line: None)
    finally:
        done.set()
        watcher.join()
    run = Path(tmp_path) / "trainer-ref"
    assert manifest["status"] == "done"
    for t in (0, 1):
        rows = read_shards(committed_shards(str(run / f"iter_{t}" / "generation")),
                           ["ref_logp_real", "ref_logp_generated"]).to_pylist()
        assert rows and all(
            row["ref_logp_real"] is None and not any(row["ref_logp_generated"] or []) for row in rows
        ), rows[:2]
    trained = manifest["iterations"][1]["phases"]["train"]["metrics"]
    assert trained["pairs"] == 16 and "rescored_in_engine_pass" not in trained
    first = read_metrics_log(str(run / "iter_1" / "train"))[0]
    assert any(pid.startswith("iter0/") for pid in first["prompt_ids"])
    assert first["reference_gap"] == pytest.approx(0.0, abs=1e-6)
    assert first["loss"] == pytest.approx(0.6931, abs=1e-3) and first["rewards/margins"] == pytest.approx(0, abs=1e-6)
    summary = json.loads((run / "iter_1" / "train" / "summary.json").read_text())
    assert summary["reference_source"] == "trainer" and summary["reference_pass"] == "scored"
    assert (run / "iter_1" / "train" / "reference_logps.parquet").is_file()
    prefix = run_prefix(str(tmp_path), "trainer-ref")
    assert any(name.startswith(prefix) and name.endswith(":train:iter_0") for name in named), named
    assert any(name.startswith(prefix) and name.endswith(":pass:iter_0/eval") for name in named), named
