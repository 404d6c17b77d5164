"""The Ray-free training step: one concatenated forward, log 2 at the start, margins that move."""

import math

import pytest
import torch

from spin_ray.training.step import concatenated_logps, reference_logps, sft_step_loss, spin_step_loss


@pytest.fixture
def pairs(chat):
    prompts = chat.batch_prompt_ids([[{"role": "user", "content": q}] for q in ("What is 3+4?", "Name a fruit.")])
    reals = chat.batch_response_ids(["3+4 = 7\n#### 7", "An apple."])
    generateds = chat.batch_response_ids(["It is 12.", "Potato, I think, or maybe a car."])
    return prompts, reals, generateds


def test_concatenated_forward_matches_separate_passes(tiny_model, pairs, tokenizer):
    prompts, reals, generateds = pairs
    real, generated = concatenated_logps(tiny_model, prompts, reals, generateds, tokenizer.pad_token_id)
    assert torch.allclose(real, reference_logps(tiny_model, prompts, reals, tokenizer.pad_token_id), atol=1e-5)
    assert torch.allclose(generated, reference_logps(tiny_model, prompts, generateds, tokenizer.pad_token_id), atol=1e-5)


def test_spin_steps_start_at_log2_and_widen_the_margin(tiny_model, pairs, tokenizer):
    prompts, reals, generateds = pairs
    pad = tokenizer.pad_token_id
    ref_real = reference_logps(tiny_model, prompts, reals, pad)
    ref_generated = reference_logps(tiny_model, prompts, generateds, pad)
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    margins = []
    for step in range(4):
        loss, metrics = spin_step_loss(tiny_model, prompts, reals, generateds, ref_real, ref_generated, pad, beta=0.1)
        if step == 0:
            assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
        margins.append(metrics["rewards/margins"].item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert margins[0] == pytest.approx(0.0, abs=1e-5)
    assert margins[-1] > margins[0] + 0.05
    assert metrics["rewards/accuracies"].item() == 1.0


def test_sft_step_lowers_the_nll(tiny_model, pairs, tokenizer):
    prompts, reals, _ = pairs
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss, metrics = sft_step_loss(tiny_model, prompts, reals, tokenizer.pad_token_id)
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0]
    assert metrics["tokens"].item() == sum(len(r) for r in reals)
