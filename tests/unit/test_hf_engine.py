"""The continuous-batching HF engine: same answers as `model.generate`, exact free log-probs, seeded sampling."""

import pytest
import torch

from spin_ray.generation.hf_engine import HFEngine
from spin_ray.objectives.logprobs import score_responses


@pytest.fixture(scope="module")
def varied_model(varied_model_dir):
    from spin_ray.models.resolution import load_model

    return load_model(varied_model_dir).eval()


@pytest.fixture
def prompts(chat):
    questions = [f"Question {i}: add {i} and {i * 7}." + " Please be brief." * (i % 4) for i in range(7)]
    return chat.batch_prompt_ids([[{"role": "user", "content": q}] for q in questions])


def _static(engine: HFEngine) -> HFEngine:
    engine._supports_continuous = lambda: False  # force the model.generate fallback
    return engine


def _early_stops(model, chat, prompts, max_new_tokens=12) -> set[int]:
    """Stop tokens taken from the model's own greedy answers at different depths, so rows finish at different steps."""
    probe = _static(HFEngine(model, chat, max_new_tokens, batch_size=8)).generate(prompts)
    return {probe[row].token_ids[depth] for row, depth in ((0, 3), (2, 6), (4, 1), (5, 8))}


def test_continuous_batching_matches_model_generate(varied_model, chat, prompts):
    stops = _early_stops(varied_model, chat, prompts)
    static = _static(HFEngine(varied_model, chat, 12, batch_size=3))
    static.stop_ids = stops
    continuous = HFEngine(varied_model, chat, 12, batch_size=3, prefill_rows=2)
    continuous.stop_ids = stops
    expected = static.generate(prompts)
    got = continuous.generate(prompts)
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert [c.finish_reason for c in got] == [c.finish_reason for c in expected]
    reasons = {c.finish_reason for c in got}
    assert reasons == {"stop", "length"}, "rows must finish at different steps for this test to mean anything"
    # 7 prompts through 3 slots: finished rows were dropped and their slots refilled several times
    assert continuous.stats.prefill_passes >= 4
    assert continuous.stats.to_dict()["mean_active_rows"] <= 3


def test_free_logps_equal_a_separate_forward(varied_model, chat, prompts, tokenizer):
    tiny_model = varied_model
    reals = chat.batch_response_ids([f"The sum is {i * 8}.\n#### {i * 8}" for i in range(len(prompts))])
    engine = HFEngine(tiny_model, chat, 10, batch_size=4, prefill_rows=3)
    out = engine.generate(prompts, score=reals)
    pad = tokenizer.pad_token_id
    generated = score_responses(tiny_model, prompts, [c.token_ids for c in out], pad, batch_size=1)
    real = score_responses(tiny_model, prompts, reals, pad, batch_size=1)
    assert torch.allclose(torch.tensor([c.logp for c in out]), generated, atol=1e-4)
    assert torch.allclose(torch.tensor([c.scored_logp for c in out]), real, atol=1e-4)
    # the scored answer must not disturb generation: same tokens as without scoring
    plain = HFEngine(tiny_model, chat, 10, batch_size=4, prefill_rows=3).generate(prompts)
    assert [c.token_ids for c in plain] == [c.token_ids for c in out]
    assert all(c.scored_logp is None for c in plain)


def test_sampling_depends_on_the_seed_not_the_batch(varied_model, chat, prompts):
    tiny_model = varied_model
    seeds = [11, 12, 13, 14, 15, 16, 17]
    a = HFEngine(tiny_model, chat, 8, temperature=1.0, top_p=0.9, batch_size=7).generate(prompts, seeds)
    b = HFEngine(tiny_model, chat, 8, temperature=1.0, top_p=0.9, batch_size=2, prefill_rows=1).generate(prompts, seeds)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    other = HFEngine(tiny_model, chat, 8, temperature=1.0, top_p=0.9, batch_size=7).generate(
        prompts, [s + 100 for s in seeds]
    )
    assert [c.token_ids for c in other] != [c.token_ids for c in a]
    greedy = HFEngine(tiny_model, chat, 8, batch_size=7).generate(prompts, seeds)
    assert [c.token_ids for c in greedy] != [c.token_ids for c in a]
    assert len({tuple(c.token_ids) for c in a}) == len(prompts)  # sampled answers differ per prompt


def test_stream_yields_every_prompt_once_and_checks_arguments(tiny_model, chat, prompts):
    engine = HFEngine(tiny_model, chat, 4, batch_size=2)
    seen = [index for index, _ in engine.stream(prompts)]
    assert sorted(seen) == list(range(len(prompts)))
    assert engine.generate([]) == []
    with pytest.raises(ValueError, match="seeds"):
        engine.generate(prompts, seeds=[1, 2])
    for completion in engine.generate(prompts):
        assert completion.finish_reason == "length" and len(completion.token_ids) == 4
