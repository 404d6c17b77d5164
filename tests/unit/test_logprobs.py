"""Log-prob math: masking, one concatenated or packed forward equal to separate padded passes, the chunked LM head."""

import math

import pytest
import torch

from spin_ray.objectives.logprobs import (
    answer_logps,
    chunked_head_supported,
    gathered_logps,
    linear_token_logps,
    score_responses,
    sequence_logps,
    token_logps,
)


def _logits_from_probs(rows):
    return torch.log(torch.tensor(rows, dtype=torch.float32))


@pytest.fixture
def handmade():
    # One sequence of 3 tokens over a 3-token vocabulary. Position 0 predicts token 1 with p=0.25,
    # position 1 predicts token 2 with p=0.7; position 2's logits predict past the end (unused).
    logits = _logits_from_probs([[[0.5, 0.25, 0.25], [0.1, 0.2, 0.7], [0.3, 0.3, 0.4]]])
    labels = torch.tensor([[0, 1, 2]])
    return logits, labels


def test_sequence_logps_sums_only_masked_response_tokens(handmade):
    logits, labels = handmade
    both = sequence_logps(logits, labels, torch.tensor([[0, 1, 1]]))
    assert both.item() == pytest.approx(math.log(0.25) + math.log(0.7), abs=1e-6)
    last = sequence_logps(logits, labels, torch.tensor([[0, 0, 1]]))
    assert last.item() == pytest.approx(math.log(0.7), abs=1e-6)


def test_sequence_logps_average_divides_by_response_tokens(handmade):
    logits, labels = handmade
    mean = sequence_logps(logits, labels, torch.tensor([[0, 1, 1]]), average=True)
    assert mean.item() == pytest.approx((math.log(0.25) + math.log(0.7)) / 2, abs=1e-6)


def test_masked_positions_do_not_matter_but_response_tokens_do():
    torch.manual_seed(0)
    batch, length, vocab = 2, 9, 11
    logits = torch.randn(batch, length, vocab)
    labels = torch.randint(0, vocab, (batch, length))
    # Rows: 3 prompt tokens, 4 response tokens, 2 padding tokens.
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[:, 3:7] = True
    reference = sequence_logps(logits, labels, mask)

    perturbed_logits, perturbed_labels = logits.clone(), labels.clone()
    perturbed_labels[:, :3] = torch.randint(0, vocab, (batch, 3))  # prompt tokens
    perturbed_labels[:, 7:] = -100  # padding labels, even invalid ids
    perturbed_logits[:, :2] += 5 * torch.randn(batch, 2, vocab)  # logits predicting prompt tokens
    perturbed_logits[:, 6:] += 5 * torch.randn(batch, 3, vocab)  # logits predicting padding / past the end
    assert torch.allclose(sequence_logps(perturbed_logits, perturbed_labels, mask), reference)

    changed = labels.clone()
    changed[:, 5] = (changed[:, 5] + 1) % vocab  # a response token
    assert not torch.allclose(sequence_logps(logits, changed, mask), reference)


def test_prompt_tokens_cannot_leak_through_a_real_model(tiny_model, tokenizer):
    """Perturbing prompt tokens changes the conditioning, not which tokens are summed: only response
    positions count, so a sequence whose response mask is empty scores exactly 0."""
    from spin_ray.objectives.logprobs import collate_sequences

    batch = collate_sequences([[5, 6, 7, 8]], [[9, 10, 11]], tokenizer.pad_token_id)
    logits = tiny_model(input_ids=batch["input_ids"]).logits
    empty = torch.zeros_like(batch["loss_mask"])
    assert sequence_logps(logits, batch["input_ids"], empty).item() == 0.0
    scored = sequence_logps(logits, batch["input_ids"], batch["loss_mask"])
    per_token, mask = token_logps(logits, batch["input_ids"], batch["loss_mask"])
    assert mask.sum().item() == 3  # the three response tokens, nothing of the prompt or padding
    assert scored.item() == pytest.approx(per_token[mask].sum().item(), abs=1e-5)


def test_concatenated_forward_matches_separate_passes(tiny_model, pairs, tokenizer):
    prompts, reals, generateds = pairs
    both = answer_logps(tiny_model, prompts, list(zip(reals, generateds, strict=True)), tokenizer.pad_token_id)
    assert torch.allclose(both[:, 0], score_responses(tiny_model, prompts, reals, tokenizer.pad_token_id), atol=1e-5)
    assert torch.allclose(
        both[:, 1], score_responses(tiny_model, prompts, generateds, tokenizer.pad_token_id), atol=1e-5
    )


@pytest.mark.parametrize("chunk_rows", [0, 3])  # 3: the LM head runs in many chunks of 3 positions
def test_packed_forward_equals_padded_in_values_and_gradients(tiny_model, pairs, tokenizer, chunk_rows):
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


@pytest.mark.parametrize("pack", [False, True])
def test_chunked_lm_head_equals_full_logits_in_values_and_gradients(tiny_model, pairs, tokenizer, pack):
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
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-4) for a, b in zip(grads, full_grads, strict=True)), (
            chunk_rows
        )


def test_models_outside_the_list_or_with_a_head_bias_keep_the_full_logits(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert chunked_head_supported(model)
    model.config.model_type = "gemma2"  # soft-caps its logits after the head
    assert not chunked_head_supported(model)
    model.config.model_type = "llama"
    model.lm_head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    assert not chunked_head_supported(model)


def test_linear_token_logps_matches_full_logits_and_its_gradients_are_exact():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 50, (37,))
    logits = hidden @ weight.T
    expected = torch.gather(logits, -1, tokens[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
    assert torch.allclose(gathered_logps(logits, tokens).double(), expected, atol=1e-5)  # same quantity, fp32
    for chunk_rows in (1, 8, 37, 100):
        assert torch.allclose(linear_token_logps(hidden, weight, tokens, chunk_rows), expected, atol=1e-12)
    # analytic backward (recomputed per chunk) against finite differences
    assert torch.autograd.gradcheck(lambda h, w: linear_token_logps(h, w, tokens, 8), (hidden, weight))
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_token_logps(hidden, weight, tokens, 0)


def test_linear_token_logps_keeps_fp32_for_bf16_inputs():
    hidden, weight = torch.randn(5, 8).bfloat16(), torch.randn(11, 8).bfloat16()
    out = linear_token_logps(hidden, weight, torch.randint(0, 11, (5,)), 2)
    assert out.dtype == torch.float32 and bool((out < 0).all())
