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
    # issue 34's prediction check: one and two workers, micro-batch, length, checkpointing, SPIN pairs (separate
    # sequences and prefix-shared)
    "smol_w1_spin_mb2_len256": ("smollm2", 1, "spin", 2, 128, 128, 1, ["training.prefix_sharing=false"]),
    "smol_w1_spin_mb2_len256_ac": ("smollm2", 1, "spin", 2, 128, 128, 1, ["training.prefix_sharing=false",
                                                                         "training.activation_checkpointing=true"]),
    "smol_w1_spin_mb2_len256_shared": ("smollm2", 1, "spin", 2, 128, 128, 1, []),
    "smol_w1_sft_mb4_len512": ("smollm2", 1, "sft", 4, 256, 256, 1, []),
    "tiny_w1_spin_mb8_len512": ("tiny", 1, "spin", 8, 256, 256, 1, ["training.prefix_sharing=false"]),
    "tiny_w2_spin_mb4_len1024": ("tiny", 2, "spin", 4, 512, 512, 2, ["training.prefix_sharing=false"]),
    "tiny_w2_spin_mb4_len1024_ac": ("tiny", 2, "spin", 4, 512, 512, 2, ["training.prefix_sharing=false",
                                                                       "training.activation_checkpointing=true"]),
    "tiny_w2_spin_mb4_len1024_shared": ("tiny", 2, "spin", 4, 512, 512, 2, []),
    # issue 35's LoRA vs full fine-tuning: rank 8 on every projection, against the same shapes trained in full
    "smol_w1_spin_mb2_len256_shared_lora": ("smollm2", 1, "spin", 2, 128, 128, 1, ["training.lora.rank=8"]),
    "smol_w2_lora": ("smollm2", 2, "sft", 2, 128, 128, 1, ["training.lora.rank=8"]),
    # LoRA's step time on smol_w2_ac_off's shape (longer sequences), rank 16
    "smol_w2_ac_off_lora16": ("smollm2", 2, "sft", 4, 256, 256, 1, ["training.lora.rank=16"]),
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
                     "tokens_per_second": summary.training_tokens_per_second,
                     "training_seconds": summary.training_seconds, "steps": summary.steps}
    if world > 1:
        dist.destroy_process_group()


def _link_rank(rank: int, world: int, port: int, size: int, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    shard = torch.randn(size // 4 // world)
    full = torch.empty(shard.numel() * world)
    dist.all_gather_into_tensor(full, shard)  # warm-up
    started = time.perf_counter()
    for _ in range(3):
        dist.all_gather_into_tensor(full, shard)
    dist.barrier()
    results[rank] = 3 * size * (world - 1) / world / (time.perf_counter() - started)
    dist.destroy_process_group()


def measure_link(size: int = 256 * MIB, world: int = 2) -> float:
    """Bytes per second a gloo rank receives in an all-gather between `world` processes on this machine (the plan's
    cpu_link_gbs)."""
    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    with context.Manager() as manager, socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        results = manager.dict()
        processes = [context.Process(target=_link_rank, args=(r, world, port, size, results)) for r in range(world)]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        return min(results.values())


def run_setting(name: str, model: str, steps: int, scratch: str) -> dict:
    import torch.multiprocessing as mp

    _, workers, objective, micro, prompt, answer, accumulation, extra = SETTINGS[name]
    global_batch = workers * micro * accumulation
    overrides = setting_overrides(name, model) + ["training.epochs=1", "training.warmup_ratio=0",
                                                  "training.reference_check_tolerance=null",
                                                  "training.checkpoint_every=1000"]
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
    result = {"setting": name, "model": os.path.basename(model.rstrip("/")), "workers": workers,
              "objective": objective, "micro_batch": micro, "prompt_tokens": prompt, "answer_tokens": answer,
              "micro_batches_per_step": accumulation, "overrides": extra, "ranks": ranks,
              "measured_train_peak_mib": round(max(r["train_peak"] for r in ranks) / MIB),
              "measured_load_peak_mib": round(max(r["load_peak"] for r in ranks) / MIB),
              "tokens_per_second": round(sum(r["tokens_per_second"] for r in ranks), 1),
              "seconds_per_step": round(statistics.median(r["training_seconds"] / r["steps"] for r in ranks), 2),
              "export_bytes": sum(f.stat().st_size for f in Path(job["export_dir"]).rglob("*.safetensors"))}
    return result


def setting_overrides(name: str, model: str) -> list[str]:
    """The config of a setting: its model, objective, batch, lengths, workers and layout keys."""
    _, workers, objective, micro, prompt, answer, accumulation, extra = SETTINGS[name]
    return [f"model.name={model}", f"training.objective={'sft' if objective == 'sft' else 'spin'}",
            f"training.global_batch_size={workers * micro * accumulation}", f"training.micro_batch_size={micro}",
            f"training.num_workers=[{workers},{workers}]", f"data.max_prompt_tokens={prompt}",
            f"data.max_response_tokens={answer}", f"generation.max_new_tokens={answer - 1}", *extra]


def compute_dtype(name: str) -> str:
    """The training.compute_dtype a setting runs in (float32 unless its overrides say otherwise)."""
    overrides = SETTINGS[name][7]
    return next((o.split("=", 1)[1] for o in overrides if o.startswith("training.compute_dtype=")), "float32")


def bounded_matmul_flops(dtype: str, limit_s: float = 10.0) -> float:
    """One core's matmul rate in `dtype`: the full measurement (2048-square products) where a probe says it takes at
    most `limit_s`, else the best of three 512-square products."""
    import torch

    from bench.training import matmul_peak_flops

    torch.set_default_dtype(getattr(torch, dtype))
    try:
        torch.set_num_threads(1)
        a, b = torch.randn(512, 512), torch.randn(512, 512)
        best = 0.0
        for _ in range(3):
            started = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * 512**3 / (time.perf_counter() - started))
        full = 26 * 2 * 2048**3 / best  # matmul_peak_flops: 2 warm-ups and 3 trials of 8 products
        return matmul_peak_flops(1) if full <= limit_s else best
    finally:
        torch.set_default_dtype(torch.float32)


def predict(result: dict, model: str, rates: dict, link: float) -> dict:
    """The plan's peak memory and step time for a measured setting (with the runtime measured in that run)."""
    from spin_ray.plan import Assumptions, ModelShape, read_model_config, step_seconds, training_memory, training_shape

    name = result["setting"]
    workers, accumulation = SETTINGS[name][1], SETTINGS[name][6]
    from spin_ray.config import load_config

    config = load_config(None, setting_overrides(name, model))
    t = config.training
    shape = ModelShape.from_config(read_model_config(model))
    run = training_shape(config, workers, checkpointing=t.activation_checkpointing is True,
                         sharded_accumulation=t.gradient_accumulation == "sharded")
    # the process's own memory: interpreter, torch, transformers, gloo, tokenizer, Python objects; what it held with
    # the model loaded, less the loaded weights (the plan's runtime line, as the CUDA context is on a GPU)
    components = training_memory(shape, run).device
    held = ("master weights (fp32)", "frozen base weights", "adapter weights (fp32)")
    weights = sum(components.get(name, 0) for name in held)
    runtime = int(statistics.median(r["rss_loaded"] for r in result["ranks"])) - weights
    plan = training_memory(shape, run, runtime_bytes=runtime)
    predicted = round((plan.device_total + plan.host_total) / MIB)
    share = Assumptions().cpu_single_process_mfu if workers == 1 else CPU_MFU  # the plan's two CPU shares
    seconds = step_seconds(shape, run, accumulation, rates[t.compute_dtype] * share, link)
    return {"predicted_train_peak_mib": predicted,
            "predicted_components_mib": {k: round(v / MIB, 1) for k, v in {**plan.device, **plan.host}.items()},
            "memory_error": round(predicted / result["measured_train_peak_mib"] - 1, 3),
            "predicted_seconds_per_step": round(seconds, 2),
            "time_error": round(seconds / result["seconds_per_step"] - 1, 3),
            "time_predicted": t.compute_dtype == "float32",  # the plan's CPU time model is fp32 matmuls
            "shape": {"parameters": shape.parameters, "tokens_per_micro_batch": run.tokens}}


def _ratio(results: dict, numerator: str, denominator: str, key: str) -> float | None:
    if numerator in results and denominator in results:
        return round(results[numerator][key] / results[denominator][key], 3)
    return None


def summarize(results: list[dict]) -> dict:
    """The issues' checks: every prediction within 20% (memory) and 30% (fp32 step time); the layouts' ratios."""
    by_name = {r["setting"]: r for r in results}
    timed = [r for r in results if r.get("time_predicted")]
    return {
        "memory_within_20pct": all(abs(r["memory_error"]) <= 0.20 for r in results),
        "worst_memory_error": max((r["memory_error"] for r in results), key=abs, default=None),
        "time_within_30pct_fp32": all(abs(r["time_error"]) <= 0.30 for r in timed),
        "worst_time_error_fp32": max((r["time_error"] for r in timed), key=abs, default=None),
        "checkpointing_peak_ratio": _ratio(by_name, "smol_w2_ac_on", "smol_w2_ac_off", "measured_train_peak_mib"),
        "checkpointing_speed_ratio": _ratio(by_name, "smol_w2_ac_on", "smol_w2_ac_off", "tokens_per_second"),
        "sharded_accumulation_peak_ratio": _ratio(by_name, "smol_w2_accum_sharded", "smol_w2_accum_unsharded",
                                                  "measured_train_peak_mib"),
        "sharded_accumulation_speed_ratio": _ratio(by_name, "smol_w2_accum_sharded", "smol_w2_accum_unsharded",
                                                   "tokens_per_second"),
        "rank0_loading_load_peak_ratio": _ratio(by_name, "smol_w2_load_rank0", "smol_w2_load_full",
                                                "measured_load_peak_mib"),
        "bf16_compute_speed_ratio": _ratio(by_name, "smol_w2_bf16", "smol_w2_load_rank0", "tokens_per_second"),
        "lora_w1_peak_ratio": _ratio(by_name, "smol_w1_spin_mb2_len256_shared_lora", "smol_w1_spin_mb2_len256_shared",
                                     "measured_train_peak_mib"),
        "lora_w1_speed_ratio": _ratio(by_name, "smol_w1_spin_mb2_len256_shared_lora", "smol_w1_spin_mb2_len256_shared",
                                      "tokens_per_second"),
        "lora_w2_peak_ratio": _ratio(by_name, "smol_w2_lora", "smol_w2_load_rank0", "measured_train_peak_mib"),
        "lora_w2_speed_ratio": _ratio(by_name, "smol_w2_lora", "smol_w2_load_rank0", "tokens_per_second"),
        "lora_export_bytes_ratio": _ratio(by_name, "smol_w2_lora", "smol_w2_load_rank0", "export_bytes"),
    }


def table(report: dict) -> str:
    """The docs' table: each setting's measured and predicted peak, its load peak, speed and step time."""
    lines = ["| setting | workers | objective, micro-batch x tokens | layout | peak RSS measured / planned (MiB) | "
             "error | load peak (MiB) | tokens/s | s/step measured / planned |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        layout = ", ".join(o.removeprefix("training.") for o in SETTINGS[r["setting"]][7]) or "defaults"
        planned = f"{r['predicted_seconds_per_step']}" if r.get("time_predicted") else "(bf16: not planned on CPU)"
        lines.append(
            f"| {r['setting']} | {r['workers']} | {r['objective']}, {r['micro_batch']} x "
            f"{r['prompt_tokens']}+{r['answer_tokens']} ({r['micro_batches_per_step']}/step) | {layout} | "
            f"{r['measured_train_peak_mib']} / {r['predicted_train_peak_mib']} | {r['memory_error']:+.1%} | "
            f"{r['measured_load_peak_mib']} | {r['tokens_per_second']} | {r['seconds_per_step']} / {planned} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated setting names")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / f"memory-{datetime.date.today()}.json"))
    parser.add_argument("--repredict", default=None, metavar="JSON",
                        help="recompute the predictions of a results file with today's plan (no training)")
    parser.add_argument("--table", default=None, metavar="JSON", help="print a results file as docs' markdown table")
    parser.add_argument("--merge", default=None, metavar="JSON",
                        help="with --only: take the other settings' results from this file")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return 0
    from spin_ray.models.resolution import resolve_model

    smollm2 = resolve_model("smollm2-135m-instruct").path
    models = {"smollm2": smollm2, "tiny": tiny_model_dir(smollm2, os.path.join(ROOT, ".tmp", "bench-tiny-256"))}
    if args.repredict:
        report = json.loads(Path(args.repredict).read_text())
        rates = {k: v * 1e9 for k, v in report["machine"]["matmul_gflops_per_core"].items()}
        if "gloo_allgather_gbs" not in report["machine"]:
            report["machine"]["gloo_allgather_gbs"] = round(measure_link() / 1e9, 3)
        link = report["machine"]["gloo_allgather_gbs"] * 1e9
        for result in report["results"]:
            result["overrides"] = SETTINGS[result["setting"]][7]
            own = result.get("rates") or {}
            own_rates = {k: v * 1e9 for k, v in own.get("matmul_gflops_per_core", {}).items()} or rates
            own_link = own.get("gloo_allgather_gbs", link / 1e9) * 1e9
            result.update(predict(result, models[SETTINGS[result["setting"]][0]], own_rates, own_link))
        report["summary"] = summarize(report["results"])
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report["summary"], indent=2))
        return 0
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 * MIB))
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    import torch

    scratch = tempfile.mkdtemp(prefix="spin-ray-memory-", dir=str(ROOT / ".tmp"))
    link = measure_link()
    names = args.only.split(",") if args.only else list(SETTINGS)
    # a dtype's rate is measured only where a setting computes in it, and within seconds: on an AVX2-only CPU bf16
    # matmul runs at ~1/40 of fp32, and the full measurement alone would have taken ~27 minutes there
    rates = {dtype: bounded_matmul_flops(dtype) for dtype in sorted({compute_dtype(name) for name in names})}
    results = []
    for name in names:
        started = time.perf_counter()
        result = run_setting(name, models[SETTINGS[name][0]], args.steps, scratch)
        # this run's rates go with its results: the machine's speed drifts between runs (81.6-92.3 GFLOP/s here)
        result["rates"] = {"matmul_gflops_per_core": {k: round(v / 1e9, 1) for k, v in rates.items()},
                           "gloo_allgather_gbs": round(link / 1e9, 3)}
        result.update(predict(result, models[SETTINGS[name][0]], rates, link))
        result["wall_seconds"] = round(time.perf_counter() - started, 1)
        results.append(result)
        print(json.dumps({k: result[k] for k in ("setting", "measured_train_peak_mib", "predicted_train_peak_mib",
                                                 "memory_error", "seconds_per_step", "predicted_seconds_per_step",
                                                 "time_error", "tokens_per_second")}), flush=True)
    if args.merge:
        measured = {r["setting"] for r in results}
        results += [r for r in json.loads(Path(args.merge).read_text())["results"] if r["setting"] not in measured]
        results.sort(key=lambda r: list(SETTINGS).index(r["setting"]))
    report = {"benchmark": "memory", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "matmul_gflops_per_core": {k: round(v / 1e9, 1) for k, v in rates.items()},
                          "gloo_allgather_gbs": round(link / 1e9, 3)},
              "assumptions": {"cpu_mfu": CPU_MFU, "MALLOC_MMAP_THRESHOLD_": os.environ["MALLOC_MMAP_THRESHOLD_"]},
              "steps": args.steps, "results": results, "summary": summarize(results)}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
