"""Benchmark: opponent generation pipeline vs a plain single-process HF `generate` loop; prints JSON.

The baseline is what the official SPIN generate.py does: prompts in file order, batches of 8,
left padding, `model.generate` until the longest answer of the batch ends. The pipeline runs
with the local job config's own defaults (jobs/gsm8k_smollm2_cpu.yaml) on a local Ray
instance that is already up, and its time includes everything a run pays: actor start-up,
model loads, generation, reference log-prob scoring and atomic shard commits. Both answer the
same GSM8K prompts greedily with the same max_new_tokens, in the same process.

    python bench/generation.py [--prompts 64] [--max-new-tokens N] [key=value overrides]
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


def plain_loop(model, chat, prompts: list[list[int]], max_new_tokens: int, batch_size: int = 8) -> dict:
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
            out = model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                eos_token_id=stops, pad_token_id=pad, do_sample=False,
            )
        for row in out[:, width:].tolist():
            end = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
            answers.append(row[:end])
            tokens += end
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "generated_tokens": tokens, "tokens_per_second": round(tokens / seconds, 2),
            "batch_size": batch_size, "answers": answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--config", default=str(ROOT / "jobs" / "gsm8k_smollm2_cpu.yaml"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import ray

    from spin_ray.config import load_config
    from spin_ray.generation.pipeline import run_generation
    from spin_ray.models import load_model, load_tokenizer, resolve_model
    from spin_ray.prepare import tokenize_split
    from spin_ray.tokenization import ChatFormat

    storage = tempfile.mkdtemp(prefix="bench-gen-", dir=os.environ.get("RAY_TMPDIR"))
    config = load_config(args.config, [f"data.limit={args.prompts}", f"run.storage_path={storage}", "run.name=bench",
                                       *args.overrides])
    gen = config.generation
    resolved = resolve_model(config.model.name, config.model.cache_dir)
    tokenizer = load_tokenizer(resolved.path)
    chat = ChatFormat(tokenizer)
    split = tokenize_split(config.data.train, config, chat)  # the same prompts, in file order

    torch.set_num_threads(os.cpu_count() or 1)
    model = load_model(resolved.path, config.model.dtype)
    baseline = plain_loop(model, chat, split.prompt_ids, gen.max_new_tokens)
    del model

    ray.init(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    started = time.perf_counter()
    result = run_generation(config)
    seconds = time.perf_counter() - started
    rows = {r["prompt_id"]: r["generated_token_ids"][0] for r in result.dataset.take_all()}
    ray.shutdown()

    ids = split.records.column("prompt_id").to_pylist()
    identical = sum(rows[pid] == answer for pid, answer in zip(ids, baseline.pop("answers"), strict=True))
    tokens = result.summary["generated_tokens"]
    pipeline = {
        "seconds_end_to_end": round(seconds, 2),
        "generated_tokens": tokens,
        "tokens_per_second": round(tokens / seconds, 2),
        "engine_seconds": result.summary["engine_seconds"],
        "reference_seconds": result.summary["reference_seconds"],
        "engine_tokens_per_second": result.summary.get("engine_tokens_per_second"),
        "settings": {k: getattr(gen, k) for k in ("engine", "batch_size", "replicas", "cpus_per_replica",
                                                  "threads_per_replica", "shard_rows", "fuse_reference")},
    }
    print(json.dumps({
        "benchmark": "generation",
        "model": config.model.name,
        "prompts": len(ids),
        "max_new_tokens": gen.max_new_tokens,
        "decoding": "greedy" if gen.temperature == 0 else f"T={gen.temperature}, top_p={gen.top_p}",
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()},
        "baseline_plain_hf_generate_loop": baseline,
        "pipeline": pipeline,
        "ratio_tokens_per_second": round(pipeline["tokens_per_second"] / baseline["tokens_per_second"], 3),
        "identical_greedy_answers": f"{identical}/{len(ids)}",
        "target_ratio": 1.3,
    }, indent=2))


if __name__ == "__main__":
    main()
