"""What every generation engine shares: the Completion it returns, per-sample seeds, the sampling description, and
letting go of device memory."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field


@dataclass
class Completion:
    token_ids: list[int]  # generated tokens, end-of-turn included when the model stopped by itself
    text: str  # decoded answer with the end-of-turn marker removed
    finish_reason: str  # "stop" (end-of-turn/eos) or "length" (hit max_new_tokens)
    logp: float | None = None  # summed log-prob of token_ids under the engine's model (temperature 1, no top_p)
    scored_logp: float | None = None  # summed log-prob of the request's `score` tokens, when it had any
    # summed log-probs of the request's `also_score` responses (e.g. the opponent's answers in an evaluation)
    also_scored: list[float] | None = None


def sample_seed(base_seed: int, prompt_id: str, sample_index: int) -> int:
    """Seed of one sample of one prompt: independent of batching, replicas and restarts."""
    digest = hashlib.sha256(f"{base_seed}:{prompt_id}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def sampling_description(max_new_tokens: int, temperature: float, top_p: float, num_samples: int, seed: int) -> str:
    """The `sampling` column: how every answer of a row was drawn, whichever engine drew it."""
    return json.dumps({"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                       "num_samples": num_samples, "seed": seed}, sort_keys=True)


@dataclass(frozen=True)
class EngineSpec:
    """Everything an engine replica needs, picklable for Ray: which engine, which model, how to sample."""

    engine: str  # "hf" or "vllm"
    model: str  # a spec `local_model_path` resolves on the replica's node (alias, folder, storage URL, hub id)
    dtype: str
    trust_remote_code: bool
    cache_dir: str | None
    max_new_tokens: int
    temperature: float
    top_p: float
    batch_size: int
    num_samples: int
    seed: int
    threads: int
    score_reference: bool  # return the answers' log-probs and score the human answer in the same pass
    reference_batch_size: int
    max_model_len: int  # vLLM: the longest sequence, prompt + answer (scored human answers included)
    use_gpu: bool
    tensor_parallel_size: int
    gpu_memory_utilization: float
    engine_kwargs: dict = field(default_factory=dict)  # vLLM: extra engine arguments, over ours
    serve_merged: bool = False  # vLLM, a LoRA model: serve base + adapter merged on the node, not as LoRA requests

    @classmethod
    def from_config(cls, config, model: str, score_reference: bool) -> "EngineSpec":
        gen, data = config.generation, config.data
        return cls(
            engine=gen.engine,
            model=model,
            dtype=config.model.dtype,
            trust_remote_code=config.model.trust_remote_code,
            cache_dir=config.model.cache_dir,
            max_new_tokens=gen.max_new_tokens,
            temperature=gen.temperature,
            top_p=gen.top_p,
            batch_size=gen.batch_size,
            num_samples=gen.num_samples,
            seed=gen.seed,
            threads=replica_threads(gen),
            score_reference=score_reference,
            reference_batch_size=gen.reference_batch_size,
            max_model_len=data.max_prompt_tokens + max(gen.max_new_tokens, data.max_response_tokens),
            use_gpu=gen.use_gpu,
            tensor_parallel_size=gen.tensor_parallel_size,
            gpu_memory_utilization=gen.gpu_memory_utilization,
            engine_kwargs=dict(gen.vllm_engine_kwargs),
            serve_merged=gen.serves_lora_merged,
        )


# Where the distributions put tcmalloc's minimal build (Debian/Ubuntu libtcmalloc-minimal4, RHEL gperftools-libs).
TCMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
)


def cpu_preload(gen) -> list[str]:
    """Libraries to preload into each CPU vLLM replica: `generation.cpu_preload`, or tcmalloc where this node has it.

    vLLM's CPU guide asks for tcmalloc and, on x86, Intel OpenMP in LD_PRELOAD. Our engine runs in the replica's
    own process, so the preload must be in its environment when Ray starts it. Measured with SmolLM2 on the
    2-core box (bench/vllm_cpu.py, two rounds): tcmalloc decoded 6% faster and started 4% sooner, same answers;
    Intel OpenMP, alone or with it, moved decode by -6% to +11% between rounds, so it is not preloaded."""
    if gen.engine != "vllm" or gen.use_gpu:
        return []
    if gen.cpu_preload is not None:
        return list(gen.cpu_preload)
    return [path for path in TCMALLOC_PATHS if os.path.exists(path)][:1]


def replica_threads(gen) -> int:
    """torch threads per generation actor: as configured, else the CPUs Ray reserves for it (at least 1)."""
    return gen.threads_per_replica or max(1, int(gen.cpus_per_replica))


def release_device_memory() -> None:
    """Collect what an engine or scorer dropped and hand CUDA's cached blocks back to the device."""
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
