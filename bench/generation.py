"""Benchmark: opponent generation on the same prompts: plain loops against our pipeline, HF and vLLM; prints JSON.

Four variants answer the same GSM8K prompts greedily with the same max_new_tokens:
- plain HF loop: what the official SPIN generate.py does (prompts in file order, batches of 8, left
  padding, `model.generate` until the batch's longest answer ends). No reference log-probs.
- our pipeline, HF engine: the local job config on a local Ray instance.
- plain `vllm.LLM` in this process, with the settings our engine uses (in-process engine, the same KV
  cache, prefix caching, raw log-probs) and the same work: the answers with their log-probs, then the
  human answers scored by `prompt_logprobs`. Its start-up is timed apart.
- our pipeline, vLLM engine: the same job config with generation.engine=vllm.
Pipeline times are end to end (actor start-up, model load, generation, reference scoring, shard
commits); "engine" seconds are the engine actors' own time on the shards, start-up excluded.
Ratios compare variants of this run only (the box's speed drifts by more than the gaps measured).

    python bench/generation.py [--prompts 256] [--variants plain_hf,pipeline_hf,plain_vllm,pipeline_vllm]
        [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("plain_hf", "pipeline_hf", "plain_vllm", "pipeline_vllm")


def plain_hf_loop(model, chat, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8) -> dict:
    """File order, fixed batches, `model.generate` with left padding: the official script's loop."""
    stops = chat.stop_token_ids
    pad = chat.tokenizer.pad_token_id
    answers, tokens = [], 0
    started = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, prompt in enumerate(chunk):
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 eos_token_id=stops, pad_token_id=pad, do_sample=False)
        for row in out[:, width:].tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            answers.append(row[:end])
            tokens += end
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "generated_tokens": tokens, "tokens_per_second": round(tokens / seconds, 2),
            "batch_size": batch_size, "answers": answers}


def plain_vllm(config, model_path: str, chat, prompts: list[list[int]], reals: list[list[int]]) -> dict:
    """vllm.LLM as our engine builds it, on the same work: answers with log-probs, then the human answers scored."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from spin_ray.generation.engine import EngineSpec
    from spin_ray.generation.vllm_engine import VLLMEngine, sampling_params, scoring_params

    spec = EngineSpec.from_config(config, model_path, score_reference=True)
    started = time.perf_counter()
    engine = VLLMEngine(
        model_path, chat, spec.max_new_tokens, 0.0, 1.0, spec.batch_size, spec.dtype, spec.max_model_len
    )
    startup = time.perf_counter() - started
    params = SamplingParams(**sampling_params(spec.max_new_tokens, 0.0, 1.0, 0, chat.stop_token_ids, True))
    started = time.perf_counter()
    outputs = engine.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    generation = time.perf_counter() - started
    started = time.perf_counter()
    engine.llm.generate([TokensPrompt(prompt_token_ids=[*p, *r]) for p, r in zip(prompts, reals, strict=True)],
                        SamplingParams(**scoring_params()), use_tqdm=False)
    scoring = time.perf_counter() - started
    answers = [list(o.outputs[0].token_ids) for o in outputs]
    tokens = sum(len(a) for a in answers)
    del engine
    return {"startup_seconds": round(startup, 2), "generation_seconds": round(generation, 2),
            "scoring_seconds": round(scoring, 2), "engine_seconds": round(generation + scoring, 2),
            "generated_tokens": tokens, "generation_tokens_per_second": round(tokens / generation, 2),
            "engine_tokens_per_second": round(tokens / (generation + scoring), 2), "answers": answers}


def pipeline(config, model_path: str, output_dir: str) -> dict:
    from spin_ray.generation.pipeline import run_generation

    started = time.perf_counter()
    result = run_generation(config, model_path, output_dir)
    seconds = time.perf_counter() - started
    rows = {r["prompt_id"]: r["generated_token_ids"][0] for r in result.dataset.take_all()}
    summary = result.summary
    tokens = summary.generated_tokens
    gen = config.generation
    return {
        "seconds_end_to_end": round(seconds, 2), "generated_tokens": tokens,
        "tokens_per_second": round(tokens / seconds, 2),
        "startup_seconds": summary.startup_seconds, "engine_seconds": summary.engine_seconds,
        "reference_seconds": summary.reference_seconds, "engine_tokens_per_second": summary.engine_tokens_per_second,
        "settings": {k: getattr(gen, k) for k in ("engine", "batch_size", "replicas", "cpus_per_replica",
                                                  "threads_per_replica", "shard_rows", "fuse_reference")},
        "answers_by_id": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--config", default=str(ROOT / "jobs" / "gsm8k_smollm2_cpu.yaml"))
    parser.add_argument("--out", default=None, help="also write the JSON here (engines log to stdout too)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    variants = args.variants.split(",")

    import ray

    from spin_ray.config import load_config
    from spin_ray.data.prepare import tokenize_split
    from spin_ray.data.tokenization import ChatFormat
    from spin_ray.models.resolution import load_model, load_tokenizer, resolve_model

    storage = tempfile.mkdtemp(prefix="bench-gen-", dir=os.environ.get("RAY_TMPDIR"))
    config = load_config(args.config, [f"data.limit={args.prompts}", f"run.storage_path={storage}", "run.name=bench",
                                       "generation.engine=hf", *args.overrides])
    model_path = resolve_model(config.model.name, config.model.cache_dir).path
    chat = ChatFormat(load_tokenizer(model_path))
    split = tokenize_split(config.data.train, config, chat)  # the same prompts, in file order
    ids = split.records.column("prompt_id").to_pylist()
    results: dict = {}
    torch.set_num_threads(os.cpu_count() or 1)
    if "plain_hf" in variants:
        model = load_model(model_path, config.model.dtype)
        results["plain_hf"] = plain_hf_loop(model, chat, split.prompt_ids, config.generation.max_new_tokens)
        del model
    if "plain_vllm" in variants:
        results["plain_vllm"] = plain_vllm(config, model_path, chat, split.prompt_ids, split.response_ids)
    if {"pipeline_hf", "pipeline_vllm"} & set(variants):
        ray.init(include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        for engine in ("hf", "vllm"):
            if f"pipeline_{engine}" in variants:
                engine_config = config.model_copy(
                    update={"generation": config.generation.model_copy(update={"engine": engine})}
                )
                results[f"pipeline_{engine}"] = pipeline(engine_config, model_path, f"{storage}/{engine}")
        ray.shutdown()

    def answers_of(result: dict) -> list:
        if "answers" in result:
            return result.pop("answers")
        by_id = result.pop("answers_by_id")
        return [by_id[pid] for pid in ids]

    answers = {name: answers_of(r) for name, r in results.items()}
    reference = answers.get("plain_hf") or next(iter(answers.values()))
    identical = {
        name: f"{sum(a == b for a, b in zip(found, reference, strict=True))}/{len(ids)}"
        for name, found in answers.items()
    }
    ratios = {}
    if "plain_hf" in results:
        base = results["plain_hf"]["tokens_per_second"]
        for name in ("pipeline_hf", "pipeline_vllm"):
            if name in results:
                ratios[f"{name}_vs_plain_hf_end_to_end"] = round(results[name]["tokens_per_second"] / base, 3)
    if "plain_vllm" in results and "pipeline_vllm" in results:
        ratios["pipeline_vllm_vs_plain_vllm_engine_only"] = round(
            results["pipeline_vllm"]["engine_tokens_per_second"] / results["plain_vllm"]["engine_tokens_per_second"], 3)
    report = json.dumps(
        {
            "benchmark": "generation",
            "model": config.model.name,
            "prompts": len(ids),
            "max_new_tokens": config.generation.max_new_tokens,
            "decoding": "greedy",
            "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
            "command": "python bench/generation.py " + " ".join(sys.argv[1:]),
            "variants": results,
            "ratios": ratios,
            "identical_greedy_answers_vs_plain_hf": identical,
            "targets": {
                "pipeline_vllm_vs_plain_hf_end_to_end": ">= 2.0",
                "pipeline_vllm_vs_plain_vllm_engine_only": ">= 0.85",
            },
        },
        indent=2,
    )
    if args.out:
        Path(args.out).write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
