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


@pytest.mark.parametrize("chunk_rows", [0, 3])  # 3: the LM head runs in many chunks of 3 positions
def test_packed_forward_equals_padded_in_values_and_gradients(tiny_model, pairs, tokenizer, chunk_rows):
    from spin_ray.training.step import answer_logps

    prompts, reals, generateds = pairs
    answers = [(r, g, r[:3]) for r, g in zip(reals, generateds, strict=True)]  # triplets: [B, 3]
    grads = {}
    for pack in (False, True):
        tiny_model.zero_grad()
        logps = answer_logps(tiny_model, prompts, answers, tokenizer.pad_token_id, pack=pack,
                             logits_chunk_rows=chunk_rows)
        assert logps.shape == (2, 3)
        logps.sum().backward()
        grads[pack] = (logps.detach(), [p.grad.clone() for p in tiny_model.parameters()])
    assert torch.allclose(grads[False][0], grads[True][0], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads[False][1], grads[True][1], strict=True))
    averaged = answer_logps(tiny_model, prompts, answers, tokenizer.pad_token_id, average=True, pack=True,
                            logits_chunk_rows=chunk_rows)
    lengths = torch.tensor([[len(a) for a in group] for group in answers])
    assert torch.allclose(averaged, grads[True][0] / lengths, atol=1e-5)


@pytest.mark.parametrize("pack", [False, True])
def test_chunked_lm_head_equals_full_logits_in_values_and_gradients(tiny_model, pairs, tokenizer, pack):
    from spin_ray.training.step import answer_logps, chunked_head_supported

    assert chunked_head_supported(tiny_model)
    prompts, reals, generateds = pairs
    answers = [(r, g) for r, g in zip(reals, generateds, strict=True)]
    weights = torch.tensor([[1.0, -2.0], [0.5, 3.0]])  # unequal upstream gradients per answer
    results = {}
    for chunk_rows in (0, 1, 4, 10_000):
        tiny_model.zero_grad()
        logps = answer_logps(tiny_model, prompts, answers, tokenizer.pad_token_id, pack=pack,
                             logits_chunk_rows=chunk_rows)
        (logps * weights).sum().backward()
        results[chunk_rows] = (logps.detach(), [p.grad.clone() for p in tiny_model.parameters()])
    assert type(tiny_model.get_output_embeddings()) is torch.nn.Linear  # the real head is back
    full_logps, full_grads = results[0]
    assert full_logps.abs().min() > 1.0  # real log-probs, not zeros
    for chunk_rows in (1, 4, 10_000):
        logps, grads = results[chunk_rows]
        assert torch.allclose(logps, full_logps, atol=1e-5), chunk_rows
        # fp32 rounding of a different summation order: ~5e-5 on gradients of size ~14
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-4) for a, b in zip(grads, full_grads, strict=True)), chunk_rows


def test_models_outside_the_list_or_with_a_head_bias_keep_the_full_logits(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from spin_ray.training.step import chunked_head_supported

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert chunked_head_supported(model)
    model.config.model_type = "gemma2"  # soft-caps its logits after the head
    assert not chunked_head_supported(model)
    model.config.model_type = "llama"
    model.lm_head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    assert not chunked_head_supported(model)


@pytest.mark.parametrize("overrides", [["algorithm=spin"], ["algorithm=tspin", "tspin.length_normalize=true"],
                                       ["algorithm=sppo", "generation.num_samples=2", "generation.temperature=1"],
                                       ["training.objective=sft"]])
def test_micro_step_is_the_same_packed_or_padded_chunked_or_not(tiny_model, pairs, tokenizer, overrides):
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
    for pack, chunk_rows in ((False, 0), (True, 0), (False, 5), (True, 5)):
        tiny_model.zero_grad()
        variant = config.model_copy(update={"training": config.training.model_copy(
            update={"pack_sequences": pack, "logits_chunk_rows": chunk_rows})})
        sums = micro_step(tiny_model, examples, variant, tokenizer.pad_token_id, 0.5, torch.device("cpu"))
        results[pack, chunk_rows] = (sums, [p.grad.clone() for p in tiny_model.parameters()])
    baseline_sums, baseline_grads = results[False, 0]
    for variant, (sums, grads) in results.items():
        assert sums.keys() == baseline_sums.keys()
        for key, value in baseline_sums.items():
            assert sums[key] == pytest.approx(value, rel=1e-5, abs=1e-5), (variant, key)
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-4) for a, b in zip(grads, baseline_grads, strict=True)), variant


def test_progress_line_is_a_tqdm_meter_with_this_runs_eta():
    from spin_ray.training.loop import _progress_line

    metrics = {"step": 3, "loss": 0.69, "rewards/margins": 0.1, "rewards/accuracies": 0.5, "lr": 1e-6,
               "tokens_per_second": 90.1}
    line = _progress_line(metrics, 12, elapsed=45.0)
    assert "25%" in line and "3/12" in line and "00:45<02:15" in line and "margin 0.1000" in line
    # resumed at step 2: one step in 10 s this run, 9 to go
    assert "00:10<01:30" in _progress_line(metrics, 12, elapsed=10.0, first_step=2)
