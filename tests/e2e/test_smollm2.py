"""SmolLM2 end to end: the real model from the wheel, the real GSM8K set."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spin_ray.config import load_config
from spin_ray.demo import run_demo

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def test_validate_the_local_job_config(smollm2_path):
    result = subprocess.run(
        [sys.executable, "-m", "spin_ray.cli", "validate", str(ROOT / "jobs" / "gsm8k_smollm2_cpu.yaml"), "--json"],
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


def test_demo_starts_at_log2_and_learns_to_prefer_human_answers(smollm2_path):
    config = load_config(overrides=["generation.max_new_tokens=32"])
    lines = []
    history = run_demo(config, prompts=2, steps=1, learning_rate=1e-5, echo=lines.append)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert history[1]["rewards/margins"] > history[0]["rewards/margins"]
    assert history[1]["loss"] < history[0]["loss"]
    answers = [line for line in lines if line.startswith("  opponent")]
    assert len(answers) == 2
    for line in answers:
        assert "<|im_end|>" not in line and "<|im_start|>" not in line


@pytest.mark.ray
def test_generation_on_16_gsm8k_prompts(ray_session, smollm2_path, tmp_path):
    from spin_ray.generation.pipeline import run_generation

    config = load_config(
        ROOT / "jobs" / "gsm8k_smollm2_cpu.yaml",
        ["data.limit=16", "generation.max_new_tokens=64", f"run.storage_path={tmp_path}", "generation.shard_rows=8"],
    )
    result = run_generation(config)
    rows = result.dataset.take_all()
    kept = 16 - result.summary["overlong_dropped"]  # the drop policy may remove a long human answer
    assert kept >= 14 and len(rows) == kept and len({r["prompt_id"] for r in rows}) == kept
    for row in rows:
        text = row["generated"][0]
        assert text.strip(), f"empty answer for {row['prompt_id']}"
        for marker in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "assistant\n"):
            assert marker not in text
        assert row["ref_logp_real"] < 0 and row["ref_logp_generated"][0] < 0
    summary = result.summary
    assert summary["generated_tokens"] == sum(r["generated_tokens"][0] for r in rows)
    assert 0 < summary["mean_response_tokens"] <= 64 and summary["tokens_per_second"] > 0


@pytest.mark.ray
def test_training_two_steps_on_real_gsm8k_pairs(ray_session, smollm2_path, tmp_path):
    import torch

    from spin_ray.generation.hf_engine import HFEngine
    from spin_ray.generation.pipeline import run_generation
    from spin_ray.models import load_model, load_tokenizer
    from spin_ray.tokenization import ChatFormat
    from spin_ray.training.step import reference_logps
    from spin_ray.training.trainer import run_training

    config = load_config(
        ROOT / "jobs" / "gsm8k_smollm2_cpu.yaml",
        ["data.limit=9", "generation.max_new_tokens=48", f"run.storage_path={tmp_path}", "training.global_batch_size=4",
         "training.micro_batch_size=1", "training.epochs=1", "training.optimizer=adamw", "training.learning_rate=1e-5"],
    )
    rows = run_generation(config).dataset
    summary = run_training(config, rows, smollm2_path)
    assert summary["steps"] == 2 and summary["pairs"] >= 8

    exported = summary["export_dir"]
    model, tokenizer = load_model(exported), load_tokenizer(exported)
    chat = ChatFormat(tokenizer)
    pairs = rows.take_all()
    prompts = [r["prompt_token_ids"] for r in pairs]
    real = reference_logps(model, prompts, [r["real_token_ids"] for r in pairs], tokenizer.pad_token_id)
    generated = reference_logps(model, prompts, [r["generated_token_ids"][0] for r in pairs], tokenizer.pad_token_id)
    ref_real = torch.tensor([r["ref_logp_real"] for r in pairs], dtype=torch.float32)
    ref_generated = torch.tensor([r["ref_logp_generated"][0] for r in pairs], dtype=torch.float32)
    margins = (real - ref_real) - (generated - ref_generated)
    assert margins.mean() > 0  # the human answers gained log-prob relative to the model's own
    answer = HFEngine(model, chat, max_new_tokens=24).generate(prompts[:1])[0]
    assert answer.text.strip() and "<|im_end|>" not in answer.text
