"""The main player's training loop, readable top to bottom; no Ray here (Ray Train, torchrun or one process call it).

Per optimizer step: this rank's slice of the global batch, in micro-batches (one concatenated
forward over every answer of each example), loss scaled so that FSDP's gradient average equals the
single-process gradient of the whole global batch; clip, step, schedule; metrics summed over
ranks; a JSONL line on rank 0; a DCP checkpoint every `checkpoint_every` steps. At the end rank 0
exports a Hugging Face folder: the next opponent.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from spin_ray.config import Config
from spin_ray.training.checkpoint import committed_steps, export_hf, load_checkpoint, save_checkpoint
from spin_ray.training.data import Example, Schedule, examples_from_rows
from spin_ray.training.parallel import apply_fsdp, set_accumulating
from spin_ray.training.step import answer_logps, averages_logps, example_losses



@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Callable[[dict], None] | None = None  # called on every rank with the step's metrics


def build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    t = config.training
    if t.optimizer == "rmsprop":
        return torch.optim.RMSprop(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    """Linear warmup over warmup_ratio of the steps, then linear decay to 0 (the paper's schedule)."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def micro_step(model, examples: list[Example], config: Config, pad_id: int, scale: float, device) -> dict[str, float]:
    """Forward + backward of one micro-batch; returns metric SUMS over its examples (for exact averaging)."""
    objective = config.objective
    prompts = [e.prompt for e in examples]
    pack, chunk = config.training.pack_sequences, config.training.logits_chunk_rows
    if objective == "sft":  # summed NLL of the human answers; the scale turns it into a token average
        reals = [e.answers[0] for e in examples]
        nll = -answer_logps(model, prompts, [(r,) for r in reals], pad_id, pack=pack, logits_chunk_rows=chunk).sum()
        (nll * scale).backward()
        return {"loss": float(nll.detach()), "tokens": float(sum(len(r) for r in reals))}
    # one concatenated forward over every answer of every example (pairs, or T-SPIN's triplets)
    average = averages_logps(objective, config)
    policy = answer_logps(model, prompts, [e.answers for e in examples], pad_id, average, pack, chunk)
    refs = None
    if examples[0].ref_logps:
        refs = torch.tensor([e.ref_logps for e in examples], dtype=torch.float32, device=device)
        if average:  # stored reference log-probs are sums over the answer's tokens
            refs = refs / torch.tensor([[len(a) for a in e.answers] for e in examples], device=device)
    rates = torch.tensor([e.win_rates for e in examples], device=device) if examples[0].win_rates else None
    losses, metrics = example_losses(objective, policy, refs, rates, config)
    (losses.sum() * scale).backward()
    # the loss returns batch means; sums (mean x n) average exactly over ranks and micro-batches
    tokens = sum(e.tokens for e in examples)
    return {**{key: float(value) * len(examples) for key, value in metrics.items()}, "tokens": float(tokens)}


def _all_reduce_sums(sums: dict[str, float], device) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()):
        return sums
    keys = sorted(sums)
    packed = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(packed)
    return dict(zip(keys, packed.tolist(), strict=True))


def _sft_token_total(examples: list[Example], indices) -> int:
    return sum(len(examples[i].answers[0]) for i in indices)


def _maybe_fail(step: int, fail_at_step: int | None, context: WorkerContext, train_dir: str) -> None:
    """Test hook: the last rank exits hard (as on a lost node) at this step, once per run folder."""
    if fail_at_step is None or fail_at_step != step or context.rank != context.world_size - 1:
        return
    marker = os.path.join(train_dir.replace("file://", ""), f".failed_at_{step}")
    if os.path.exists(marker):
        return
    open(marker, "w").close()
    os._exit(1)  # a hard death, as when a node is lost; Ray Train restarts the worker group


def train(
    config: Config,
    rows: list[dict],
    model_path: str,
    train_dir: str,
    export_dir: str,
    context: WorkerContext | None = None,
    source: str = "pairs",
    fail_at_step: int | None = None,
) -> dict:
    """Train one iteration on `rows` (generation-stage rows) starting from `model_path`; resume if a
    checkpoint is committed under `train_dir`. Returns the final summary (on every rank)."""
    from spin_ray.models import load_model, load_tokenizer

    context = context or WorkerContext()
    t = config.training
    examples = examples_from_rows(rows, source, config.objective, config.needs_reference)
    schedule = Schedule(len(examples), t.global_batch_size, t.micro_batch_size, t.epochs, t.seed)
    schedule.check_world(context.world_size)
    torch.manual_seed(t.seed)

    tokenizer = load_tokenizer(model_path, config.model.trust_remote_code)
    pad_id = tokenizer.pad_token_id
    model = load_model(model_path, config.model.dtype, config.model.trust_remote_code).to(context.device)
    model.config.use_cache = False
    model = apply_fsdp(model)
    model.train()
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, schedule.total_steps, t.warmup_ratio)

    start_step = 0
    metrics_path = f"{train_dir.rstrip('/')}/metrics.jsonl"
    steps = committed_steps(train_dir)
    if steps:
        state = load_checkpoint(train_dir, steps[-1], model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        start_step = state["step"]
        if context.rank == 0:
            _truncate_log(metrics_path, start_step)  # drop lines of steps the checkpoint does not contain
    per_rank = t.global_batch_size // context.world_size
    scale_spin = 1.0 / per_rank  # FSDP averages over ranks: (1/W) * sum / (G/W) = sum / G

    started = time.perf_counter()
    summary = {}
    tokens_this_run = 0.0
    for step in range(start_step, schedule.total_steps):
        _maybe_fail(step, fail_at_step, context, train_dir)
        step_started = time.perf_counter()
        global_indices = schedule.global_batch(step)
        if config.objective == "sft":
            scale = context.world_size / _sft_token_total(examples, global_indices)  # token average over the global batch
        else:
            scale = scale_spin
        sums: dict[str, float] = {}
        micros = list(schedule.micro_batches(step, context.rank, context.world_size))
        for number, micro in enumerate(micros, start=1):
            set_accumulating(model, number < len(micros))  # sync gradients on the last micro-batch only
            part = micro_step(model, [examples[i] for i in micro], config, pad_id, scale, context.device)
            for key, value in part.items():
                sums[key] = sums.get(key, 0.0) + value
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        totals = _all_reduce_sums(sums, context.device)
        tokens_this_run += totals["tokens"]
        seconds = time.perf_counter() - step_started
        metrics = _step_metrics(totals, config.objective, t.global_batch_size, step, schedule, lr, float(grad_norm), seconds)
        summary = metrics
        if context.rank == 0:
            record = {**metrics, "world_size": context.world_size,
                      "prompt_ids": [examples[i].prompt_id for i in global_indices]}
            _append_log(metrics_path, record)
            print(_progress_line(metrics, schedule.total_steps, time.perf_counter() - started, start_step), flush=True)
        if context.report:
            context.report(metrics)
        done = step + 1
        if done % t.checkpoint_every == 0 and done < schedule.total_steps:
            state = {"scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state().tolist(),
                     "epoch": done // schedule.steps_per_epoch, "samples_seen": done * t.global_batch_size,
                     "world_size": context.world_size}
            save_checkpoint(train_dir, done, model, optimizer, state, context.rank, t.keep_checkpoints)

    train_seconds = time.perf_counter() - started
    export_started = time.perf_counter()
    export_hf(model, tokenizer, export_dir, context.rank)
    return {
        **summary,
        "training_tokens_per_second": round(tokens_this_run / train_seconds, 1) if tokens_this_run else None,
        "training_seconds": round(train_seconds, 2),
        "export_seconds": round(time.perf_counter() - export_started, 2),
        "steps": schedule.total_steps,
        "resumed_from_step": start_step,
        "pairs": len(examples),
        "pairs_left_out_per_epoch": len(examples) - schedule.steps_per_epoch * t.global_batch_size,
        "seconds": round(time.perf_counter() - started, 2),
        "export_dir": export_dir,
    }


def _step_metrics(totals, objective, global_batch, step, schedule, lr, grad_norm, seconds) -> dict:
    metrics = {"step": step + 1, "epoch": step // schedule.steps_per_epoch, "lr": lr, "grad_norm": grad_norm,
               "samples_seen": (step + 1) * global_batch, "seconds": round(seconds, 3),
               "tokens_per_second": round(totals["tokens"] / seconds, 1) if seconds > 0 else None}
    if objective == "sft":
        metrics["loss"] = totals["loss"] / totals["tokens"]
        metrics["nll"] = metrics["loss"]
    else:  # every loss metric is a per-example mean
        metrics.update({key: value / global_batch for key, value in totals.items() if key != "tokens"})
    return metrics


def _progress_line(metrics: dict, total: int, elapsed: float, first_step: int = 0) -> str:
    """A tqdm meter as one log line per step (job logs are not terminals): percentage, bar, steps,
    elapsed < ETA (from this run's step rate, so a resumed run estimates from its own steps), metrics."""
    from tqdm import tqdm

    parts = [f"loss {metrics['loss']:.4f}"]
    if "rewards/margins" in metrics:
        parts += [f"margin {metrics['rewards/margins']:.4f}", f"acc {metrics['rewards/accuracies']:.2f}"]
    parts += [f"lr {metrics['lr']:.2e}", f"{metrics['tokens_per_second']} tok/s"]
    return tqdm.format_meter(metrics["step"], total, elapsed, ncols=140, prefix="train", unit="step",
                             initial=first_step, postfix=", ".join(parts))


def _append_log(url: str, record: dict) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _truncate_log(url: str, last_step: int) -> None:
    import fsspec

    from spin_ray.storage import atomic_write_bytes

    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        return
    with fs.open(path, "r") as handle:
        kept = [line for line in handle if line.strip() and json.loads(line)["step"] <= last_step]
    atomic_write_bytes(url, "".join(kept).encode())


def read_metrics_log(train_dir: str) -> list[dict]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(f"{train_dir.rstrip('/')}/metrics.jsonl")
    if not fs.exists(path):
        return []
    with fs.open(path, "r") as handle:
        return [json.loads(line) for line in handle if line.strip()]
