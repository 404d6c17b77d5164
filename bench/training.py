"""Benchmark: SPIN training throughput of this trainer vs TRL's DPOTrainer, plus MFU; prints JSON.

Same model (SmolLM2-135M-Instruct, fp32), same pairs (GSM8K prompts, human answer vs the model's own
greedy answer), same global batch, micro-batch, epochs, optimizer (AdamW), schedule and sigmoid
loss, all in this process, one after another:

  ours_ray        the trainer as jobs run it: Ray Train TorchTrainer, FSDP2 over gloo, the reference
                  log-probs precomputed (they come from the generation pass), workers as configured,
                  default config (micro-batches packed into one unpadded row, attention per sequence)
  ours_process    the same training loop in this process without Ray (2 torch threads)
  ours_padded     ours_process with training.pack_sequences=false: micro-batches padded, as TRL does
  ours_process_beside_ray  ours_process while an idle local Ray instance runs on the same cores
                  (its raylet, GCS, dashboard agent, log monitor): what Ray's own processes cost
  trl_default     TRL DPOTrainer with its defaults: a live reference model forward in every step
  trl_precomputed TRL DPOTrainer with precompute_ref_log_probs=True (TRL runs that reference pass in
                  DPOTrainer.__init__, outside the timed train(), as our reference scoring is part of
                  generation)

Training tokens/s = policy tokens (prompt + answer, for both answers of every pair, every epoch)
over the wall time of the training steps (ours: the logged step times; TRL: its `train()` call).
MFU = model FLOPs (6 x parameters + attention, per token) x tokens/s over the fp32 matmul peak of
this machine, measured here with torch.mm at the same thread count.

Every variant runs --repeats times, in rounds whose order rotates; the JSON gives each trial's
speed, the details (seconds, steps, losses) of the median trial, and compares medians, and records per trial the share
of CPU time the hypervisor stole (this box is a
shared VM: a slow spell can halve one trial's speed).

    python bench/training.py [--pairs 16] [--global-batch 4] [--repeats 3] [--only ours_ray,trl_default ...]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VARIANTS = ("ours_ray", "ours_process", "ours_padded", "ours_process_beside_ray", "trl_default", "trl_precomputed")


def matmul_peak_flops(threads: int, size: int = 2048, repeats: int = 8, trials: int = 3) -> float:
    """Best observed fp32 FLOP/s of torch.mm at `threads` threads: the denominator of MFU."""
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        torch.mm(a, b)
    best = 0.0
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - started))
    return best


def cpu_steal_seconds() -> float | None:
    """CPU seconds the hypervisor has taken from this VM since boot, summed over CPUs (None off Linux)."""
    try:
        with open("/proc/stat") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else None


def build_pairs(model_path: str, pairs: int, max_new_tokens: int) -> list[dict]:
    """GSM8K prompts, human answers, and SmolLM2's own greedy answers with their reference log-probs
    (computed the way the generation stage does: summed while decoding, human answer in the prefill)."""
    from spin_ray.config import load_config
    from spin_ray.data.prepare import tokenize_split
    from spin_ray.data.tokenization import ChatFormat
    from spin_ray.generation.hf_engine import HFEngine
    from spin_ray.models.resolution import load_model, load_tokenizer

    config = load_config(None, [f"data.limit={pairs}", "data.max_prompt_tokens=256", "data.max_response_tokens=256"])
    chat = ChatFormat(load_tokenizer(model_path))
    split = tokenize_split("gsm8k", config, chat)
    engine = HFEngine(load_model(model_path).eval(), chat, max_new_tokens, 0.0, 1.0, batch_size=pairs)
    completions = engine.generate(split.prompt_ids, score=split.response_ids)
    records = split.records.to_pylist()
    return [
        {"prompt_id": r["prompt_id"], "prompt": r["prompt"], "real": r["response"], "generated": [c.text],
         "prompt_token_ids": p, "real_token_ids": y, "generated_token_ids": [c.token_ids],
         "ref_logp_real": c.scored_logp, "ref_logp_generated": [c.logp]}
        for r, p, y, c in zip(records, split.prompt_ids, split.response_ids, completions, strict=True)
    ]


def model_flops_per_token(model_path: str, mean_sequence: float) -> float:
    """6N (forward + backward of every weight) + 12 L d T (attention scores and values), per token."""
    from transformers import AutoConfig

    from spin_ray.models.resolution import load_model

    params = load_model(model_path).num_parameters()
    cfg = AutoConfig.from_pretrained(model_path)
    return 6 * params + 12 * cfg.num_hidden_layers * cfg.hidden_size * mean_sequence


def _config(args, workers: int, cpus: float, pack: bool = True):
    from spin_ray.config import load_config

    return load_config(None, [f"training.pack_sequences={str(pack).lower()}",
        "training.optimizer=adamw", f"training.learning_rate={args.lr}", "training.loss_type=sigmoid",
        "training.beta=0.1", f"training.global_batch_size={args.global_batch}",
        f"training.micro_batch_size={args.micro_batch}", f"training.epochs={args.epochs}",
        "training.checkpoint_every=100000", f"training.num_workers=[{workers},{workers}]",
        f"training.cpus_per_worker={cpus}", "training.warmup_ratio=0.1",
    ])


def _from_log(train_dir: str) -> dict:
    from spin_ray.training.loop import read_metrics_log

    log = read_metrics_log(train_dir)
    seconds = sum(r["seconds"] for r in log)
    tokens = sum(r["tokens_per_second"] * r["seconds"] for r in log)
    return {"steps": len(log), "seconds": round(seconds, 2), "tokens": round(tokens),
            "tokens_per_second": round(tokens / seconds, 2), "final_loss": round(log[-1]["loss"], 5),
            "final_margin": round(log[-1]["rewards/margins"], 5)}


def run_ours_process(args, rows, model_path, scratch, pack: bool = True) -> dict:
    from spin_ray.training.loop import train

    torch.set_num_threads(args.threads)
    folder = f"{scratch}/{'proc' if pack else 'padded'}"
    with contextlib.redirect_stdout(sys.stderr):  # the loop's progress lines; stdout is for the JSON
        train(_config(args, 1, args.threads, pack), rows, model_path, f"{folder}/train", f"{folder}/model")
    return {**_from_log(f"{folder}/train"), "threads": args.threads}


def run_ours_beside_ray(args, rows, model_path, scratch) -> dict:
    import ray

    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        time.sleep(5)  # let Ray's start-up settle: the idle steady state is what a training job sits beside
        return run_ours_process(args, rows, model_path, f"{scratch}/beside")
    finally:
        ray.shutdown()


def run_ours_ray(args, rows, model_path, scratch) -> dict:
    import ray

    from spin_ray.run.layout import RunLayout
    from spin_ray.training.trainer import run_training

    workers, cpus = args.ray_workers, args.threads / args.ray_workers
    ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    config = _config(args, workers, cpus).model_copy(update={"run": _config(args, 1, 1).run.model_copy(
        update={"storage_path": scratch, "name": "ray"})})
    layout = RunLayout.of(config)
    started = time.perf_counter()
    run_training(config, ray.data.from_items(rows), model_path, layout.train(0), layout.model(0))
    wall = time.perf_counter() - started
    ray.shutdown()
    return {**_from_log(f"{scratch}/ray/iter_0/train"), "workers": workers, "threads_per_worker": int(cpus),
            "job_wall_seconds_incl_startup_and_export": round(wall, 2)}


def run_trl(args, rows, model_path, scratch, precompute: bool) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from spin_ray.models.resolution import load_model, load_tokenizer

    torch.set_num_threads(args.threads)
    dataset = Dataset.from_list([
        {"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["real"]}],
         "rejected": [{"role": "assistant", "content": r["generated"][0]}]} for r in rows])
    config = DPOConfig(
        output_dir=f"{scratch}/trl-{precompute}",
        loss_type=["sigmoid"],
        beta=0.1,
        learning_rate=args.lr,
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.global_batch // args.micro_batch,
        num_train_epochs=args.epochs,
        max_length=1024,
        optim="adamw_torch",
        lr_scheduler_type="linear",
        warmup_steps=math.ceil(0.1 * args.epochs * (len(rows) // args.global_batch)),
        max_grad_norm=1.0,
        seed=0,
        precompute_ref_log_probs=precompute,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )

    class StepClock(TrainerCallback):
        seconds = 0.0

        def on_step_begin(self, *a, **k):
            self.started = time.perf_counter()

        def on_step_end(self, *a, **k):
            StepClock.seconds += time.perf_counter() - self.started

    trainer = DPOTrainer(model=load_model(model_path), args=config, train_dataset=dataset,
                         processing_class=load_tokenizer(model_path), callbacks=[StepClock()])
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # TRL prints its logs; stdout is for the JSON
        result = trainer.train()
    wall = time.perf_counter() - started
    prepared = trainer.train_dataset
    tokens = args.epochs * sum(
        2 * len(p) + len(c) + len(r)
        for p, c, r in zip(prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"], strict=True)
    )
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "steps": trainer.state.global_step,
        "seconds": round(wall, 2),
        "step_seconds": round(StepClock.seconds, 2),
        "tokens": tokens,
        "tokens_per_second": round(tokens / wall, 2),
        "tokens_per_second_steps_only": round(tokens / StepClock.seconds, 2),
        "final_loss": round(losses[-1], 5) if losses else None,
        "train_runtime": result.metrics.get("train_runtime"),
        "precompute_ref_log_probs": precompute,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--ray-workers", type=int, default=1, help="Ray Train workers sharing --threads CPUs")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all variants, order rotated")
    parser.add_argument("--only", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    args = parser.parse_args()
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    os.environ.setdefault("TQDM_DISABLE", "1")

    from spin_ray.models.resolution import resolve_model

    model_path = resolve_model("smollm2-135m-instruct").path
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    rows = build_pairs(model_path, args.pairs, args.max_new_tokens)
    # Only whole global batches, so both trainers see exactly the same pairs (ours drops a last partial batch).
    rows = rows[: len(rows) // args.global_batch * args.global_batch]
    mean_sequence = sum(len(r["prompt_token_ids"]) + (len(r["real_token_ids"]) + len(r["generated_token_ids"][0])) / 2
                        for r in rows) / len(rows)
    flops_per_token = model_flops_per_token(model_path, mean_sequence)
    peak = matmul_peak_flops(args.threads)

    runners = {"ours_ray": run_ours_ray, "ours_process": run_ours_process,
               "ours_padded": lambda *a: run_ours_process(*a, pack=False),
               "ours_process_beside_ray": run_ours_beside_ray,
               "trl_default": lambda *a: run_trl(*a, precompute=False),
               "trl_precomputed": lambda *a: run_trl(*a, precompute=True)}
    names = args.only.split(",")
    trials: dict[str, list[dict]] = {name: [] for name in names}
    peaks = [peak]
    with tempfile.TemporaryDirectory(prefix="spin-ray-bench-", dir=os.environ.get("RAY_TMPDIR")) as scratch:
        # Rounds rotate the order, so a slow spell of this shared machine lands on different variants; the
        # medians over rounds are what get compared. Each trial records the CPU time stolen by the
        # hypervisor while it ran, to show which trials were disturbed.
        for round_index in range(args.repeats):
            order = names[round_index % len(names):] + names[:round_index % len(names)]
            for name in order:
                stolen = cpu_steal_seconds()
                started = time.perf_counter()
                trial = runners[name](args, rows, model_path, f"{scratch}/{round_index}")
                wall = time.perf_counter() - started
                if stolen is not None:
                    trial["steal_share"] = round((cpu_steal_seconds() - stolen) / (wall * (os.cpu_count() or 1)), 3)
                trial["mfu"] = round(trial["tokens_per_second"] * flops_per_token / peaks[-1], 4)
                trials[name].append(trial)
                print(f"round {round_index} {name}: {trial}", file=sys.stderr, flush=True)
            peaks.append(matmul_peak_flops(args.threads))  # the box is noisy: bracket every round

    results: dict[str, dict] = {}
    for name, runs in trials.items():
        speeds = [r["tokens_per_second"] for r in runs]
        # seconds, steps, losses ... of the trial whose speed is the (lower) median, not of round 0
        median_trial = next(r for r in runs if r["tokens_per_second"] == statistics.median_low(speeds))
        results[name] = {**median_trial, "tokens_per_second": round(statistics.median(speeds), 2),
                         "tokens_per_second_trials": speeds,
                         "mfu": round(statistics.median(speeds) * flops_per_token / statistics.median(peaks), 4)}
        if "steal_share" in median_trial:
            results[name]["steal_share_trials"] = [r["steal_share"] for r in runs]
        results[name].pop("steal_share", None)

    ratios = {}
    for ours in ("ours_ray", "ours_process", "ours_padded", "ours_process_beside_ray"):
        for theirs in ("trl_default", "trl_precomputed"):
            if ours in results and theirs in results:
                ratios[f"{ours}_vs_{theirs}"] = round(results[ours]["tokens_per_second"] /
                                                      results[theirs]["tokens_per_second"], 3)
    import transformers

    try:  # only the TRL variants need TRL: a run of ours alone records it as absent
        trl_version = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        trl_version = None
    print(json.dumps({
        "benchmark": "training",
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "platform": platform.platform(),
                    "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl_version},
        "setup": {"model": "SmolLM2-135M-Instruct fp32", "pairs": len(rows), "global_batch": args.global_batch,
                  "micro_batch": args.micro_batch, "epochs": args.epochs, "max_new_tokens": args.max_new_tokens,
                  "mean_sequence_tokens": round(mean_sequence, 1), "loss": "sigmoid, beta 0.1", "optimizer": "adamw"},
        "repeats": args.repeats, "statistic": "median over rounds (MFU: median tokens/s over median peak)",
        "matmul_peak_gflops": round(statistics.median(peaks) / 1e9, 1),
        "matmul_peak_gflops_trials": [round(p / 1e9, 1) for p in peaks],
        "model_gflop_per_token": round(flops_per_token / 1e9, 3),
        "results": results, "ratios": ratios,
        "targets": {"ours_vs_trl_default": 1.5, "ours_vs_trl_precomputed": 1.1, "mfu": 0.35},
    }, indent=2))


if __name__ == "__main__":
    main()
