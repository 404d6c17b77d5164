"""Benchmark: peak memory and speed of training workers per layout, measured against `spin-ray plan`'s prediction.

Each setting trains a few steps of `spin_ray.training.loop.train` (the loop jobs run) on synthetic rows whose every
sequence has exactly the config's longest prompt and answer, so the plan's worst case is the case measured. Workers are
fresh processes (1 or 2 gloo ranks, one core each), as torchrun would start them; no Ray. Per rank:

  rss_start      resident memory after the imports, before any model
  rss_loaded     resident memory with the model loaded and sharded; less the loaded weights, it is the plan's
                 `runtime` line (the interpreter and libraries, as the CUDA context is on a GPU)
  load_peak      peak resident memory up to the first step (the model load and sharding)
  train_peak     peak resident memory over the steps (VmHWM, reset after the load through /proc/self/clear_refs)
  tokens/s       training tokens over the steps' wall time, from the loop's summary

The processes run with MALLOC_MMAP_THRESHOLD_=1 MiB: glibc then maps every large tensor and unmaps it when freed, so
RSS follows what torch holds. (Without it glibc raises its threshold as tensors are freed, keeps them in the heap,
and a high-water mark measures the allocator's leftovers.) The plan's step time is FLOPs / (matmul rate x MFU), with
the matmul rate measured here per worker (one core; fp32 and bf16 apart: bf16 is slower on this CPU) and MFU the
plan's CPU assumption.

    python bench/memory.py [--only NAME,...] [--steps 3] [--out bench/results/memory-DATE.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CPU_MFU = 0.45  # the plan's CPU assumption (docs/performance.md: 37-51% measured for this loop on 2 cores)
MIB = 1024**2

# name: (model, workers, objective, micro-batch, prompt, answer, micro-batches per step, overrides)
SETTINGS = {
    # issue 33's table: SmolLM2, 2 workers, sequence 512 (256 + 256), micro-batch 4 sequences (SFT: one per example)
    "smol_w2_ac_off": ("smollm2", 2, "sft", 4, 256, 256, 1, []),
    "smol_w2_ac_on": ("smollm2", 2, "sft", 4, 256, 256, 1, ["training.activation_checkpointing=true"]),
    "smol_w2_accum_unsharded": ("smollm2", 2, "sft", 2, 128, 128, 2, ["training.gradient_accumulation=unsharded"]),
    "smol_w2_accum_sharded": ("smollm2", 2, "sft", 2, 128, 128, 2, ["training.gradient_accumulation=sharded"]),
    "smol_w2_load_full": ("smollm2", 2, "sft", 2, 128, 128, 1, ["training.load_on_rank0=false"]),
    "smol_w2_load_rank0": ("smollm2", 2, "sft", 2, 128, 128, 1, []),
    "smol_w2_bf16": ("smollm2", 2, "sft", 2, 128, 128, 1, ["training.compute_dtype=bfloat16"]),
    # issue 34's prediction check: one and two workers, micro-batch, length, checkpointing, SPIN pairs
    "smol_w1_spin_mb2_len256": ("smollm2", 1, "spin", 2, 128, 128, 1, []),
    "smol_w1_spin_mb2_len256_ac": ("smollm2", 1, "spin", 2, 128, 128, 1, ["training.activation_checkpointing=true"]),
    "smol_w1_sft_mb4_len512": ("smollm2", 1, "sft", 4, 256, 256, 1, []),
    "tiny_w1_spin_mb8_len512": ("tiny", 1, "spin", 8, 256, 256, 1, []),
    "tiny_w2_spin_mb4_len1024": ("tiny", 2, "spin", 4, 512, 512, 2, []),
    "tiny_w2_spin_mb4_len1024_ac": ("tiny", 2, "spin", 4, 512, 512, 2, ["training.activation_checkpointing=true"]),
}


def tiny_model_dir(tokenizer_dir: str, target: str) -> str:
    """The tests' tiny random Llama, but wide enough that its activations are not lost in the process's noise."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if os.path.exists(os.path.join(target, "config.json")):
        return target
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def synthetic_rows(objective: str, count: int, prompt: int, answer: int) -> list[dict]:
    """Rows whose prompts and answers are exactly `prompt` and `answer` tokens (ids from a fixed range)."""
    import random

    rng = random.Random(0)
    rows = []
    for i in range(count):
        row = {"prompt_id": f"p{i:04d}", "prompt_token_ids": [rng.randrange(100, 20000) for _ in range(prompt)],
               "real_token_ids": [rng.randrange(100, 20000) for _ in range(answer)]}
        if objective == "spin":
            row.update(generated_token_ids=[[rng.randrange(100, 20000) for _ in range(answer)]],
                       ref_logp_real=-5.0 * answer, ref_logp_generated=[-6.0 * answer])
        rows.append(row)
    return rows


def _status(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current RSS


def _worker(rank: int, world: int, port: int, job: dict, results) -> None:
    import torch

    torch.set_num_threads(1)
    import torch.distributed as dist

    from spin_ray.config import load_config
    from spin_ray.training.loop import WorkerContext, train

    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    rss_start = _status("VmRSS")
    marks = {}

    def on_step(step, context, train_dir):
        if step == 0:
            marks["load_peak"] = _status("VmHWM")
            marks["rss_loaded"] = _status("VmRSS")
            _reset_peak()

    config = load_config(None, job["overrides"])
    summary = train(config, job["rows"], job["model"], job["train_dir"], job["export_dir"],
                    WorkerContext(rank, world, on_step=on_step))
    results[rank] = {"rss_start": rss_start, **marks, "train_peak": _status("VmHWM"),
                     "tokens_per_second": summary["training_tokens_per_second"],
                     "training_seconds": summary["training_seconds"], "steps": summary["steps"]}
    if world > 1:
        dist.destroy_process_group()


def run_setting(name: str, model: str, steps: int, scratch: str) -> dict:
    import torch.multiprocessing as mp

    from spin_ray.config import load_config
    from spin_ray.plan import ModelShape, read_model_config, training_memory, training_shape

    _, workers, objective, micro, prompt, answer, accumulation, extra = SETTINGS[name]
    global_batch = workers * micro * accumulation
    overrides = [f"model.name={model}", f"training.objective={'sft' if objective == 'sft' else 'spin'}",
                 f"training.global_batch_size={global_batch}", f"training.micro_batch_size={micro}",
                 f"training.num_workers=[{workers},{workers}]", "training.epochs=1", "training.warmup_ratio=0",
                 f"data.max_prompt_tokens={prompt}", f"data.max_response_tokens={answer}",
                 f"generation.max_new_tokens={answer - 1}", "training.reference_check_tolerance=null",
                 "training.checkpoint_every=1000", *extra]
    job = {"rows": synthetic_rows(objective, global_batch * steps, prompt, answer), "model": model,
           "overrides": overrides, "train_dir": os.path.join(scratch, name, "train"),
           "export_dir": os.path.join(scratch, name, "model")}
    context = mp.get_context("spawn")
    with context.Manager() as manager:
        results = manager.dict()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        processes = [context.Process(target=_worker, args=(r, workers, port, job, results)) for r in range(workers)]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        if any(p.exitcode for p in processes):
            raise RuntimeError(f"{name}: a rank exited with {[p.exitcode for p in processes]}")
        ranks = [dict(results[r]) for r in range(workers)]
    config = load_config(None, overrides)
    shape = ModelShape.from_config(read_model_config(model))
    run = training_shape(config, workers, checkpointing=config.training.activation_checkpointing is True,
                         sharded_accumulation=config.training.gradient_accumulation == "sharded")
    # the process's own memory: interpreter, torch, transformers, gloo, tokenizer, Python objects; what it held with the
    # model loaded, less the loaded weights (the plan's runtime line, as the CUDA context is on a GPU)
    weights = training_memory(shape, run).device["master weights (fp32)"]
    runtime = int(statistics.median(r["rss_loaded"] for r in ranks)) - weights
    plan = training_memory(shape, run, runtime_bytes=runtime)
    return {"setting": name, "model": os.path.basename(model.rstrip("/")), "workers": workers, "objective": objective,
            "micro_batch": micro, "prompt_tokens": prompt, "answer_tokens": answer,
            "micro_batches_per_step": accumulation, "overrides": extra, "ranks": ranks,
            "measured_train_peak_mib": round(max(r["train_peak"] for r in ranks) / MIB),
            "measured_load_peak_mib": round(max(r["load_peak"] for r in ranks) / MIB),
            "predicted_train_peak_mib": round((plan.device_total + plan.host_total) / MIB),
            "predicted_components_mib": {k: round(v / MIB, 1) for k, v in {**plan.device, **plan.host}.items()},
            "tokens_per_second": round(sum(r["tokens_per_second"] for r in ranks), 1),
            "seconds_per_step": round(statistics.median(r["training_seconds"] / r["steps"] for r in ranks), 2),
            "shape": {"parameters": shape.parameters, "tokens_per_micro_batch": run.tokens}}


def predicted_step_seconds(result: dict, model: str, rates: dict) -> float:
    from spin_ray.config import load_config
    from spin_ray.plan import ModelShape, micro_batch_flops, read_model_config, training_shape

    _, workers, objective, micro, prompt, answer, accumulation, extra = SETTINGS[result["setting"]]
    config = load_config(None, [f"training.objective={'sft' if objective == 'sft' else 'spin'}",
                                f"training.micro_batch_size={micro}", f"data.max_prompt_tokens={prompt}",
                                f"data.max_response_tokens={answer}", f"generation.max_new_tokens={answer - 1}",
                                f"training.global_batch_size={workers * micro * accumulation}", *extra])
    run = training_shape(config, workers, checkpointing=config.training.activation_checkpointing is True)
    flops = micro_batch_flops(ModelShape.from_config(read_model_config(model)), run) * accumulation
    rate = rates[config.training.compute_dtype]
    return flops / (rate * CPU_MFU)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated setting names")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / f"memory-{datetime.date.today()}.json"))
    args = parser.parse_args()
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 * MIB))
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    import torch

    from bench.training import matmul_peak_flops
    from spin_ray.models import resolve_model

    smollm2 = resolve_model("smollm2-135m-instruct").path
    scratch = tempfile.mkdtemp(prefix="spin-ray-memory-", dir=str(ROOT / ".tmp"))
    models = {"smollm2": smollm2, "tiny": tiny_model_dir(smollm2, os.path.join(ROOT, ".tmp", "bench-tiny-256"))}
    rates = {"float32": matmul_peak_flops(1)}
    torch.set_default_dtype(torch.bfloat16)
    rates["bfloat16"] = matmul_peak_flops(1)
    torch.set_default_dtype(torch.float32)
    names = args.only.split(",") if args.only else list(SETTINGS)
    results = []
    for name in names:
        started = time.perf_counter()
        result = run_setting(name, models[SETTINGS[name][0]], args.steps, scratch)
        result["predicted_seconds_per_step"] = round(predicted_step_seconds(result, models[SETTINGS[name][0]], rates), 2)
        result["memory_error"] = round(result["predicted_train_peak_mib"] / result["measured_train_peak_mib"] - 1, 3)
        result["time_error"] = round(result["predicted_seconds_per_step"] / result["seconds_per_step"] - 1, 3)
        result["wall_seconds"] = round(time.perf_counter() - started, 1)
        results.append(result)
        print(json.dumps({k: result[k] for k in ("setting", "measured_train_peak_mib", "predicted_train_peak_mib",
                                                 "memory_error", "seconds_per_step", "predicted_seconds_per_step",
                                                 "time_error", "tokens_per_second")}), flush=True)
    report = {"benchmark": "memory", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "matmul_gflops_per_core": {k: round(v / 1e9, 1) for k, v in rates.items()}},
              "assumptions": {"cpu_mfu": CPU_MFU, "MALLOC_MMAP_THRESHOLD_": os.environ["MALLOC_MMAP_THRESHOLD_"]},
              "steps": args.steps, "results": results}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
