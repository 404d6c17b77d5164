"""vLLM path: our config maps onto Ray's real vLLMEngineProcessorConfig (vLLM itself is not installed here)."""

import importlib.util

import pytest

from spin_ray.config import load_config
from spin_ray.generation.vllm_engine import build_processor_config, processor_kwargs, request_row


def test_vllm_is_not_imported_and_not_needed_for_the_mapping():
    assert importlib.util.find_spec("vllm") is None  # the CPU box cannot install it
    config = load_config(overrides=[
        "generation.engine=vllm", "generation.replicas=[1,8]", "generation.tensor_parallel_size=2",
        "generation.accelerator_type=H100", "generation.max_new_tokens=256", "data.max_prompt_tokens=512",
        "model.dtype=bfloat16", "generation.batch_size=48",
    ])
    processor = build_processor_config(config, "/models/p1")
    assert processor.model_source == "/models/p1"
    assert processor.concurrency == (1, 8)
    assert processor.accelerator_type == "H100"
    assert processor.engine_kwargs["tensor_parallel_size"] == 2
    assert processor.engine_kwargs["max_model_len"] == 768
    assert processor.engine_kwargs["dtype"] == "bfloat16"
    assert processor.batch_size == 48


def test_fixed_pool_and_request_rows():
    config = load_config(overrides=["generation.replicas=[2,2]", "generation.temperature=0.7", "generation.top_p=0.9"])
    assert processor_kwargs(config, "m")["concurrency"] == 2
    row = {"prompt_id": "abc", "prompt_token_ids": [1, 2, 3]}
    first, second = (request_row(config, row, k, [2]) for k in (0, 1))
    assert first["tokenized_prompt"] == [1, 2, 3]
    assert first["sampling_params"]["temperature"] == 0.7 and first["sampling_params"]["top_p"] == 0.9
    assert first["sampling_params"]["stop_token_ids"] == [2]
    assert first["sampling_params"]["seed"] != second["sampling_params"]["seed"]
    assert request_row(config, row, 0, [2]) == first  # reproducible
    greedy = request_row(load_config(), row, 0, [2])["sampling_params"]
    assert greedy["temperature"] == 0.0 and "seed" not in greedy


def test_k_requests_per_prompt_and_regrouping():
    from spin_ray.generation.vllm_engine import collect_samples, expand_requests

    config = load_config(overrides=["generation.num_samples=3", "generation.temperature=0.7"])
    row = {"prompt_id": "p1", "prompt": [{"role": "user", "content": "q"}], "real": "a", "prompt_token_ids": [5, 6],
           "real_token_ids": [7, 2], "prompt_tokens": 2, "real_tokens": 2, "_shard": 0}
    requests = expand_requests(row, config, [2])
    assert [r["sample_index"] for r in requests] == [0, 1, 2]
    assert len({r["sampling_params"]["seed"] for r in requests}) == 3 and all(r["real"] == "a" for r in requests)
    # what the vLLM stage adds, delivered out of order
    answered = [{**r, "generated_text": f" answer {r['sample_index']} ", "generated_tokens": [9] * r["sample_index"] + [2]}
                for r in reversed(requests)]
    answered[0]["generated_tokens"] = [9, 9, 9]  # sample 2 hit the token limit
    pair = collect_samples(answered, [2], "/m", "{}")
    assert pair["generated"] == ["answer 0", "answer 1", "answer 2"]
    assert pair["finish_reasons"] == ["stop", "stop", "length"]
    assert pair["generated_tokens"] == [1, 2, 3] and pair["engine"] == "vllm" and pair["prompt_id"] == "p1"
    with pytest.raises(ValueError, match="samples"):
        collect_samples(answered[:2], [2], "/m", "{}")
