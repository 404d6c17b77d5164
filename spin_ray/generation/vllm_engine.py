"""vLLM engine (GPU): maps our generation config onto ray.data.llm's vLLM processor. Imported lazily.

vLLM pins its own torch and transformers and cannot be installed on a CPU box, so only the
mapping below runs in CI (validated against Ray's real config class). Prompts arrive already
tokenized with the chat template (the same token ids the trainer sees), so Ray's chat-template
and tokenize stages are switched off.
"""

from __future__ import annotations

from typing import Any

from spin_ray.config import Config
from spin_ray.generation.stages import sample_seed


def processor_kwargs(config: Config, model_path: str) -> dict[str, Any]:
    """Keyword arguments of ray.data.llm.vLLMEngineProcessorConfig for this run."""
    gen = config.generation
    max_model_len = config.data.max_prompt_tokens + gen.max_new_tokens
    kwargs: dict[str, Any] = {
        "model_source": model_path,
        "batch_size": gen.batch_size,
        # a (min, max) pair lets the engine pool autoscale with the GPU node group
        "concurrency": tuple(gen.replicas) if gen.replicas[0] != gen.replicas[1] else gen.replicas[0],
        "engine_kwargs": {
            "tensor_parallel_size": gen.tensor_parallel_size,
            "gpu_memory_utilization": gen.gpu_memory_utilization,
            "max_model_len": max_model_len,
            "dtype": config.model.dtype,
            "trust_remote_code": config.model.trust_remote_code,
            "enable_prefix_caching": True,  # K samples of one prompt share its prefix
        },
        "chat_template_stage": False,
        "tokenize_stage": False,
        "detokenize_stage": True,
    }
    if gen.accelerator_type:
        kwargs["accelerator_type"] = gen.accelerator_type
    return kwargs


def build_processor_config(config: Config, model_path: str):
    from ray.data.llm import vLLMEngineProcessorConfig  # lazy: needs aiohttp, not vllm

    return vLLMEngineProcessorConfig(**processor_kwargs(config, model_path))


def sampling_params(config: Config, prompt_id: str, sample_index: int, stop_token_ids: list[int]) -> dict[str, Any]:
    """vLLM SamplingParams of one sample of one prompt; the seed matches the HF engine's."""
    gen = config.generation
    params: dict[str, Any] = {
        "max_tokens": gen.max_new_tokens,
        "temperature": gen.temperature,
        "top_p": gen.top_p if gen.temperature > 0 else 1.0,
        "stop_token_ids": stop_token_ids,
        "detokenize": True,
        "skip_special_tokens": True,
    }
    if gen.temperature > 0:
        params["seed"] = sample_seed(gen.seed, prompt_id, sample_index) % (2**31)
    return params


def request_row(config: Config, row: dict, sample_index: int, stop_token_ids: list[int]) -> dict[str, Any]:
    """One vLLM request: our chat-templated token ids plus per-sample sampling parameters."""
    return {
        "prompt_id": row["prompt_id"],
        "sample_index": sample_index,
        "tokenized_prompt": list(row["prompt_token_ids"]),
        "sampling_params": sampling_params(config, row["prompt_id"], sample_index, stop_token_ids),
    }


def expand_requests(row: dict, config: Config, stop_token_ids: list[int]) -> list[dict]:
    """One prompt row -> K request rows (vLLM returns one output per request), original columns kept."""
    return [{**row, **request_row(config, row, k, stop_token_ids)} for k in range(config.generation.num_samples)]


def collect_samples(samples: list[dict], stop_token_ids: list[int], model_path: str, sampling: str) -> dict:
    """The K answered request rows of one prompt -> one pairs row (samples in sample_index order)."""
    samples = sorted(samples, key=lambda r: r["sample_index"])
    if [r["sample_index"] for r in samples] != list(range(len(samples))):
        raise ValueError(f"prompt {samples[0]['prompt_id']}: got samples {[r['sample_index'] for r in samples]}")
    row = {key: samples[0][key] for key in ("prompt_id", "prompt", "real", "prompt_token_ids", "real_token_ids",
                                            "prompt_tokens", "real_tokens", "_shard")}
    stops = set(stop_token_ids)
    tokens = [list(r["generated_tokens"]) for r in samples]
    row.update({
        "generated": [r["generated_text"].strip() for r in samples],
        "generated_token_ids": tokens,
        "generated_tokens": [len(t) for t in tokens],
        "finish_reasons": ["stop" if t and t[-1] in stops else "length" for t in tokens],
        "engine": "vllm",
        "model": model_path,
        "sampling": sampling,
        "_engine_seconds": 0.0,
    })
    return row
