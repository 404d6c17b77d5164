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


def test_packed_forward_equals_padded_in_values_and_gradients(tiny_model, pairs, tokenizer):
    from spin_ray.training.step import answer_logps

    prompts, reals, generateds = pairs
    answers = [(r, g, r[:3]) for r, g in zip(reals, generateds, strict=True)]  # triplets: [B, 3]
    grads = {}
    for pack in (False, True):
        tiny_model.zero_grad()
        logps = answer_logps(tiny_model, prompts, answers, tokenizer.pad_token_id, pack=pack)
        assert logps.shape == (2, 3)
        logps.sum().backward()
        grads[pack] = (logps.detach(), [p.grad.clone() for p in tiny_model.parameters()])
    assert torch.allclose(grads[False][0], grads[True][0], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads[False][1], grads[True][1], strict=True))
    averaged = answer_logps(tiny_model, prompts, answers, tokenizer.pad_token_id, average=True, pack=True)
    lengths = torch.tensor([[len(a) for a in group] for group in answers])
    assert torch.allclose(averaged, grads[True][0] / lengths, atol=1e-5)


@pytest.mark.parametrize("overrides", [["algorithm=spin"], ["algorithm=tspin", "tspin.length_normalize=true"],
                                       ["algorithm=sppo", "generation.num_samples=2", "generation.temperature=1"],
                                       ["training.objective=sft"]])
def test_micro_step_is_the_same_packed_or_padded(tiny_model, pairs, tokenizer, overrides):
    from spin_ray.config import load_config
    from spin_ray.training.data import Example
    from spin_ray.training.loop import micro_step

    prompts, reals, generateds = pairs
    config = load_config(None, overrides)
    objective = config.objective
    examples = []
    for i, (p, r, g) in enumerate(zip(prompts, reals, generateds, strict=True)):
        answers = {"sft": (r,), "spin": (r, g), "sppo": (r, g), "tspin": (r, g, r[:2])}[objective]
        refs = {"sft": (), "spin": (-5.0, -9.0), "sppo": (-5.0, -9.0), "tspin": ()}[objective]
        rates = (0.75, 0.25) if objective == "sppo" else ()
        examples.append(Example(f"p{i}", p, answers, refs, rates))
    results = {}
    for pack in (False, True):
        tiny_model.zero_grad()
        packed = config.model_copy(update={"training": config.training.model_copy(update={"pack_sequences": pack})})
        sums = micro_step(tiny_model, examples, packed, tokenizer.pad_token_id, 0.5, torch.device("cpu"))
        results[pack] = (sums, [p.grad.clone() for p in tiny_model.parameters()])
    assert results[False][0].keys() == results[True][0].keys()
    for key, value in results[False][0].items():
        assert results[True][0][key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(results[False][1], results[True][1], strict=True))


def test_progress_line_is_a_tqdm_meter_with_this_runs_eta():
    from spin_ray.training.loop import _progress_line

    metrics = {"step": 3, "loss": 0.69, "rewards/margins": 0.1, "rewards/accuracies": 0.5, "lr": 1e-6,
               "tokens_per_second": 90.1}
    line = _progress_line(metrics, 12, elapsed=45.0)
    assert "25%" in line and "3/12" in line and "00:45<02:15" in line and "margin 0.1000" in line
    # resumed at step 2: one step in 10 s this run, 9 to go
    assert "00:10<01:30" in _progress_line(metrics, 12, elapsed=10.0, first_step=2)
