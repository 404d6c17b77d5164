"""Packed-row attention: sequence-by-sequence SDPA equals the block-diagonal mask, and engages only where it may."""

import pytest
import torch

from spin_ray.objectives import packed_attention as attention
from spin_ray.objectives.packed_attention import (
    PACKED_SDPA,
    packed_attention,
    packed_sdpa_attention,
    packed_sdpa_supported,
)


class _Heads(torch.nn.Module):
    """What transformers' SDPA reads off an attention module: grouped-query heads, causal."""

    num_key_value_groups = 2
    is_causal = True


def test_sequence_by_sequence_sdpa_equals_the_block_diagonal_mask():
    torch.manual_seed(0)
    lengths = [5, 1, 9, 3]
    total = sum(lengths)
    query = torch.randn(1, 4, total, 8, requires_grad=True)
    key = torch.randn(1, 2, total, 8, requires_grad=True)
    value = torch.randn(1, 2, total, 8, requires_grad=True)
    bounds, start = [], 0
    for length in lengths:
        bounds.append((start, start + length))
        start += length
    owner = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = (owner[:, None] == owner[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(2, dim=1), value.repeat_interleave(2, dim=1), attn_mask=allowed).transpose(1, 2)

    got, weights = packed_sdpa_attention(_Heads(), query, key, value, None, sequence_bounds=bounds, scaling=8 ** -0.5)
    assert weights is None
    assert got.shape == (1, total, 4, 8)
    assert torch.allclose(got, expected, atol=1e-6)
    upstream = torch.randn_like(got)
    grads = torch.autograd.grad((got * upstream).sum(), (query, key, value))
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (query, key, value))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, expected_grads, strict=True))


def test_packed_forward_runs_the_packed_kernel_once_per_layer_with_the_sequence_bounds(
        tiny_model, tokenizer, monkeypatch):
    from spin_ray.objectives.logprobs import packed_response_logps

    calls = []
    real_kernel = attention.packed_sdpa_attention

    def spy(module, query, key, value, attention_mask, **kwargs):
        calls.append((attention_mask, kwargs.get("sequence_bounds")))
        return real_kernel(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(attention, "packed_sdpa_attention", spy)
    prompts, responses = [[5, 6, 7], [8, 9]], [[10, 11], [12, 13, 14, 15]]
    packed = packed_response_logps(tiny_model, prompts, responses)
    assert len(calls) == tiny_model.config.num_hidden_layers
    assert all(mask is None and bounds == [(0, 5), (5, 11)] for mask, bounds in calls)  # no T x T mask built
    assert tiny_model.config._attn_implementation == "sdpa"  # restored after the forward
    # each sequence alone, unpacked, gives the same log-probs
    for number, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        alone = packed_response_logps(tiny_model, [prompt], [response])
        assert torch.allclose(packed[number], alone[0], atol=1e-5)


def test_the_implementation_comes_back_when_the_forward_fails(tiny_model):
    with pytest.raises(RuntimeError, match="boom"):
        with packed_attention(tiny_model, [3, 4]) as extra:
            assert extra == {"sequence_bounds": [(0, 3), (3, 7)]}
            assert tiny_model.config._attn_implementation == PACKED_SDPA
            raise RuntimeError("boom")
    assert tiny_model.config._attn_implementation == "sdpa"


def test_packed_kernel_stays_out_where_it_would_change_the_attention(tiny_model_dir):
    from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="eager")
    assert not packed_sdpa_supported(eager, 10)  # eager was chosen on purpose
    with packed_attention(eager, [4, 6]) as extra:
        assert extra == {} and eager.config._attn_implementation == "eager"

    small = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, attn_implementation="sdpa")
    windowed = MistralForCausalLM(MistralConfig(sliding_window=8, **small))
    assert packed_sdpa_supported(windowed, 8)  # every sequence fits the window: plain causal is the same
    assert not packed_sdpa_supported(windowed, 9)
    assert packed_sdpa_supported(MistralForCausalLM(MistralConfig(sliding_window=None, **small)), 10_000)

    class Unknown(torch.nn.Module):
        config = MistralConfig(**small)

    Unknown.config.model_type = "gpt2"  # attention outside the AttentionInterface: never swapped
    assert not packed_sdpa_supported(Unknown(), 10)


def test_prefix_segments_equal_the_tree_mask_an_answer_blind_to_the_one_before():
    """[prompt 4][answer 1: 3][answer 2: 2]: answer 2 attends to the prompt and causally to itself, not to answer 1."""
    torch.manual_seed(0)
    query = torch.randn(1, 4, 9, 8, requires_grad=True)
    key = torch.randn(1, 2, 9, 8, requires_grad=True)
    value = torch.randn(1, 2, 9, 8, requires_grad=True)
    allowed = torch.zeros(9, 9, dtype=torch.bool)
    allowed[:7, :7] = torch.ones(7, 7, dtype=torch.bool).tril()
    allowed[7:, :4] = True
    allowed[7:, 7:] = torch.ones(2, 2, dtype=torch.bool).tril()
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(2, dim=1), value.repeat_interleave(2, dim=1), attn_mask=allowed).transpose(1, 2)
    got, _ = packed_sdpa_attention(_Heads(), query, key, value, None, sequence_bounds=[(0, 7), (7, 9, 0, 4)],
                                   scaling=8 ** -0.5)
    assert torch.allclose(got, expected, atol=1e-6)
    upstream = torch.randn_like(got)
    grads = torch.autograd.grad((got * upstream).sum(), (query, key, value))
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (query, key, value))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, expected_grads, strict=True))


def test_a_prefix_segment_reaches_sdpa_as_a_causal_bias_not_a_materialised_mask(monkeypatch):
    """The answer's mask goes to SDPA as torch's lower-right CausalBias, which fused kernels accept (a bool tensor rules
    out the flash kernel and costs a T x T tensor); a plain sequence goes as is_causal."""
    from torch.nn.attention.bias import CausalBias, CausalVariant
    from transformers.integrations import sdpa_attention

    seen = []
    forward = sdpa_attention.sdpa_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        seen.append((attention_mask, kwargs.get("is_causal")))
        return forward(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", spy)
    query, key, value = torch.randn(1, 4, 9, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    packed_sdpa_attention(_Heads(), query, key, value, None, sequence_bounds=[(0, 7), (7, 9, 0, 4)], scaling=8 ** -0.5)
    (first, first_causal), (second, second_causal) = seen
    assert first is None and first_causal
    assert isinstance(second, CausalBias) and second.variant == CausalVariant.LOWER_RIGHT and not second_causal
    assert (second.seq_len_q, second.seq_len_kv) == (2, 6)


def _varlen_on_cpu(query, key, value, cu_query, cu_key, longest_query, longest_key, *, scale=None,
                   window_size=(-1, -1), enable_gqa=False):
    """FlashAttention-2 varlen's contract (torch.nn.attention.varlen_attn runs on CUDA only), written out: each
    segment's queries against its keys, window (-1, 0) causal aligned to the lower right, as an explicit mask."""
    assert window_size == (-1, 0) and int(cu_query[-1]) == query.shape[0] and int(cu_key[-1]) == key.shape[0]
    outputs = []
    for i in range(len(cu_query) - 1):
        q = query[cu_query[i]:cu_query[i + 1]].transpose(0, 1)
        k, v = (x[cu_key[i]:cu_key[i + 1]].transpose(0, 1) for x in (key, value))
        assert q.shape[1] <= longest_query and k.shape[1] <= longest_key
        allowed = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril(diagonal=k.shape[1] - q.shape[1])
        outputs.append(torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, scale=scale, enable_gqa=enable_gqa).transpose(0, 1))
    return torch.cat(outputs)


def test_one_varlen_call_over_a_row_of_prefix_shared_answers_equals_sdpa_per_sequence():
    """Row: [prompt 4 + answer 3][answer 5 sharing the prompt][a separate sequence of 6]. The varlen segments attend
    to keys 0-6, 0-3 + 7-11, 12-17; the outputs and gradients equal the SDPA path's."""
    from spin_ray.objectives.packed_attention import packed_varlen_attention, varlen_segments

    bounds = [(0, 7), (7, 12, 0, 4), (12, 18)]
    rows, cu_query, cu_key, longest_query, longest_key = varlen_segments(bounds)
    assert rows.tolist() == [*range(0, 7), *range(0, 4), *range(7, 12), *range(12, 18)]
    assert cu_query.tolist() == [0, 7, 12, 18] and cu_key.tolist() == [0, 7, 16, 22]
    assert (longest_query, longest_key) == (7, 9) and cu_query.dtype == torch.int32
    torch.manual_seed(0)
    query = torch.randn(1, 4, 18, 8, requires_grad=True)
    key = torch.randn(1, 2, 18, 8, requires_grad=True)
    value = torch.randn(1, 2, 18, 8, requires_grad=True)
    expected, _ = packed_sdpa_attention(_Heads(), query, key, value, None, sequence_bounds=bounds, scaling=8 ** -0.5)
    got, weights = packed_varlen_attention(_Heads(), query, key, value, None, sequence_bounds=bounds,
                                           varlen=_varlen_on_cpu, scaling=8 ** -0.5)
    assert weights is None and got.shape == expected.shape == (1, 18, 4, 8)
    assert torch.allclose(got, expected, atol=1e-6)
    upstream = torch.randn_like(got)
    grads = torch.autograd.grad((got * upstream).sum(), (query, key, value))
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (query, key, value))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, expected_grads, strict=True))


def test_a_model_set_to_flash_varlen_routes_prefix_shared_rows_through_it_and_cpu_is_refused(tiny_model, monkeypatch):
    """training.attention flash_varlen: every layer's packed attention is one varlen call, the log-probs are the SDPA
    path's; on a CPU the choice is refused in one line naming the key."""
    from spin_ray.objectives.logprobs import shared_prefix_logps
    from spin_ray.objectives.packed_attention import use_packed_kernel

    with pytest.raises(ValueError, match=r"^training.attention flash_varlen: .* on cpu; set training.attention=sdpa$"):
        use_packed_kernel(tiny_model, "flash_varlen")
    prompts, answers = [[5, 6, 7], [8, 9]], [[[10, 11], [12, 13, 14]], [[15], [16, 17]]]
    expected = shared_prefix_logps(tiny_model, prompts, answers)
    calls = []
    real_kernel = attention.packed_varlen_attention

    def on_cpu(module, query, key, value, attention_mask, **kwargs):
        calls.append(kwargs.get("sequence_bounds"))
        return real_kernel(module, query, key, value, attention_mask, varlen=_varlen_on_cpu, **kwargs)

    monkeypatch.setattr(attention, "packed_varlen_attention", on_cpu)
    tiny_model.packed_attention_kernel = "flash_varlen"  # what use_packed_kernel sets on a GPU
    try:
        got = shared_prefix_logps(tiny_model, prompts, answers)
    finally:
        del tiny_model.packed_attention_kernel
    assert len(calls) == tiny_model.config.num_hidden_layers and all(len(b) == 4 for b in calls)
    assert any(len(segment) == 4 for segment in calls[0])  # the second answers attend to their prompts
    assert torch.allclose(got, expected, atol=1e-5)
    assert tiny_model.config._attn_implementation == "sdpa"
