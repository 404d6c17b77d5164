"""The main player's training loop, readable top to bottom; no Ray here (Ray Train, torchrun or one process call it).

Per optimizer step: this rank's slice of the global batch, in micro-batches (one concatenated
forward over every answer of each example), loss scaled so that FSDP's gradient average equals the
single-process gradient of the whole global batch; clip, step, schedule; metrics summed over
ranks; a JSONL line on rank 0; a DCP checkpoint every `checkpoint_every` steps or, with auto, by time (written in
the background on GPUs). At the end rank 0 exports a Hugging Face folder: the next opponent.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from spin_ray.algorithms import Algorithm, Example, TrainingDataError, objective
from spin_ray.config import Config
from spin_ray.logprobs import answer_logps
from spin_ray.packed_attention import use_packed_kernel
from spin_ray.storage import JsonLines, atomic_write_json, join, read_json, read_json_lines
from spin_ray.adapters import adapter_base, is_adapted
from spin_ray.training.checkpoint import (committed_steps, copy_export, drop_checkpoints, export_hf, export_merged,
                                         load_checkpoint, save_checkpoint, save_checkpoint_async)
from spin_ray.training.data import Schedule, examples_from_rows
from spin_ray.training.parallel import DTYPES, compute_context, load_for_training, set_accumulating
from spin_ray.plan import AUTO_CHECKPOINT_MIN_S, AUTO_CHECKPOINT_SHARE
from spin_ray.training.measure import PeakMemory, predict_phase, resident_now, settle_cpu_rate
from spin_ray.training.reference import trainer_reference


@dataclass
class WorkerContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Callable[[dict], None] | None = None  # called on every rank with the step's metrics
    # called on every rank before each optimizer step s (0-based) with (s, context, train_dir): a place for
    # a caller's own bookkeeping, and for tests to fail a worker at a chosen step
    on_step: Callable[[int, "WorkerContext", str], None] | None = None


def build_optimizer(model: torch.nn.Module, config: Config) -> torch.optim.Optimizer:
    """Over the trainable parameters: all of them, or the adapters alone with LoRA (no state for the frozen base)."""
    t = config.training
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if t.optimizer == "rmsprop":
        return torch.optim.RMSprop(trainable, lr=t.learning_rate, weight_decay=t.weight_decay)
    return torch.optim.AdamW(trainable, lr=t.learning_rate, weight_decay=t.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    """Linear warmup over warmup_ratio of the steps, then linear decay to 0 (the paper's schedule)."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def micro_step(model, examples: list[Example], algorithm: Algorithm, config: Config, pad_id: int, scale: float,
               device, precision=None, scaler=None, check_reference: bool = False) -> dict[str, float]:
    """Forward + backward of one micro-batch; returns metric SUMS over its examples (for exact averaging), the
    sum of its per-example losses, its forward tokens and its first answers' tokens. `precision` is the forward's
    context (`parallel.compute_context`), `scaler` a float16 loss scale. With `check_reference` the largest
    |policy - reference| log-prob per answer token comes back too (`reference_gap`), with where it is
    (`reference_gap_at`: prompt_id, answer index)."""
    t = config.training
    with precision or contextlib.nullcontext():
        # one concatenated forward over every answer of every example (pairs, triplets, or SFT's single answer)
        policy = answer_logps(model, [e.prompt for e in examples], [e.answers for e in examples], pad_id,
                              pack=t.pack_sequences, logits_chunk_rows=t.logits_chunk_rows,
                              share_prefix=t.prefix_sharing, device=device)
    policy = policy.float()
    lengths = torch.tensor([[len(a) for a in e.answers] for e in examples], dtype=torch.float32, device=device)
    refs = torch.tensor([e.ref_logps for e in examples], dtype=torch.float32, device=device) if examples[0].ref_logps else None
    rates = torch.tensor([e.win_rates for e in examples], device=device) if examples[0].win_rates else None
    losses, metrics = algorithm.loss(policy, refs, rates, lengths, config)
    loss = losses.sum() * scale
    (scaler.scale(loss) if scaler is not None else loss).backward()
    # the loss returns batch means; sums (mean x n) average exactly over ranks and micro-batches
    sums = {**{key: float(value) * len(examples) for key, value in metrics.items()},
            "loss_sum": float(losses.detach().sum()), "tokens": float(sum(e.tokens for e in examples)),
            "answer_tokens": float(lengths[:, 0].sum())}
    if check_reference and refs is not None:
        gaps = ((policy.detach() - refs).abs() / lengths.clamp(min=1)).flatten()
        worst = int(gaps.argmax())
        sums["reference_gap"] = float(gaps[worst])
        sums["reference_gap_at"] = examples[worst // refs.shape[1]].prompt_id, worst % refs.shape[1]
    return sums


def _all_reduce_sums(sums: dict[str, float], device) -> dict[str, float]:
    if not (dist.is_available() and dist.is_initialized()):
        return sums
    keys = sorted(sums)
    packed = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(packed)
    return dict(zip(keys, packed.tolist(), strict=True))


def _answer_tokens(examples: list[Example], indices) -> int:
    return sum(len(examples[i].answers[0]) for i in indices)


@dataclass
class EarlyStop:
    """Stop when the human answers' NLL on validation rows has not improved for `patience` epochs; the best epoch's
    weights become the export. The schedule (warmup, linear decay) spans training.epochs, the cap."""

    rows: list[dict]  # validation rows: prompt_id, prompt_token_ids, real_token_ids
    patience: int = 1


def validation_nll(model, examples: list[Example], pad_id: int, config: Config, context: WorkerContext) -> float:
    """Per-token NLL of the examples' first answers under `model`. Collective: each rank scores its slice, and every
    rank runs the same number of forwards (FSDP gathers parameters in each), the short ones on a discarded example."""
    t = config.training
    mine = examples[context.rank::context.world_size]
    batches = math.ceil(math.ceil(len(examples) / context.world_size) / t.micro_batch_size)
    nll, tokens = 0.0, 0.0
    model.eval()
    with torch.no_grad():
        for number in range(batches):
            batch = mine[number * t.micro_batch_size:(number + 1) * t.micro_batch_size]
            counted = bool(batch)
            batch = batch or examples[:1]
            logps = answer_logps(model, [e.prompt for e in batch], [e.answers[:1] for e in batch], pad_id,
                                 pack=t.pack_sequences, logits_chunk_rows=t.logits_chunk_rows, device=context.device)
            if counted:
                nll -= float(logps[:, 0].sum())
                tokens += sum(len(e.answers[0]) for e in batch)
    model.train()
    sums = _all_reduce_sums({"nll": nll, "tokens": tokens}, context.device)
    return sums["nll"] / sums["tokens"]


def train(
    config: Config,
    rows: list[dict],
    model_path: str,
    train_dir: str,
    export_dir: str,
    context: WorkerContext | None = None,
    source: str = "pairs",
    early_stop: EarlyStop | None = None,
    merged_dir: str | None = None,
) -> dict:
    """Train one iteration on `rows` (generation-stage rows) starting from `model_path`; resume if a
    checkpoint is committed under `train_dir`. Returns the final summary (on every rank). With `early_stop`, the
    validation NLL is measured at each epoch's end (`validation_nll` in that step's record) and training ends once
    it stops improving. With LoRA the export is an adapter; `merged_dir` gets the merged model too."""
    from spin_ray.models import load_tokenizer

    setup_started = time.perf_counter()
    resident_before = resident_now() or 0  # the plan's runtime share on a CPU: interpreter, libraries, the rows
    context = context or WorkerContext()
    t = config.training
    algorithm = objective(config)
    examples = examples_from_rows(rows, source, config)
    schedule = Schedule(len(examples), t.global_batch_size, t.micro_batch_size, t.epochs, t.seed)
    schedule.check_world(context.world_size)
    torch.manual_seed(t.seed)

    refused = read_refusal(train_dir)
    if refused:  # an earlier attempt of this stage was refused; Ray Train's restart must not load the model again
        raise TrainingDataError(refused)
    tokenizer = load_tokenizer(model_path, config.model.trust_remote_code)
    pad_id = tokenizer.pad_token_id
    layout, shape = training_layout(config, model_path, context.world_size, context.device)
    if context.device.type == "cuda":  # what an earlier phase's process still holds on this GPU, before the load
        wait_for_gpu_memory(config, shape, layout, context, train_dir)
    compute_dtype = DTYPES[t.compute_dtype]
    model = load_for_training(model_path, config.model.trust_remote_code, context.device, context.rank,
                              t.load_on_rank0, compute_dtype, t.cpu_offload, layout.activation_checkpointing, t.lora)
    use_packed_kernel(model, t.attention)
    model.train()
    precision = lambda: compute_context(model, compute_dtype, context.device)  # noqa: E731 (a fresh context per use)
    optimizer = build_optimizer(model, config)
    scaler = loss_scaler(model, context.device) if t.compute_dtype == "float16" else None
    scheduler = build_scheduler(optimizer, schedule.total_steps, t.warmup_ratio)

    # the plan's figures for this phase, to set the measured ones beside (rank 0 measures its CPU's matmul rate)
    prediction = predict_phase(config, model, examples, layout, context.world_size, context.device,
                               resident_before) if context.rank == 0 else None
    meter, peaks, step_times = PeakMemory(context.device), [], []
    cadence, pending, checkpoint_seconds = CheckpointCadence(t.checkpoint_every), None, 0.0
    asynchronous = t.async_checkpoint is True or (t.async_checkpoint == "auto" and context.device.type == "cuda")
    reference = {}
    if algorithm.uses_reference(config) and not algorithm.reference_in_rows(config):  # before a checkpoint is loaded
        examples, reference = trainer_reference(model, examples, schedule, config, pad_id, train_dir, context.rank,
                                                context.world_size, context.device, precision)

    start_step = 0
    earlier = read_metrics_log(train_dir)  # read by every rank before rank 0 trims it: the validation history
    log = JsonLines(join(train_dir, "metrics.jsonl")) if context.rank == 0 else None
    steps = committed_steps(train_dir)
    if steps:
        state = load_checkpoint(train_dir, steps[-1], model, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        start_step = state["step"]
    if log is not None:  # drop lines of steps the checkpoint does not contain (all of them on a fresh start)
        log.keep(lambda record: record["step"] <= start_step)
    per_rank = t.global_batch_size // context.world_size
    per_example_scale = 1.0 / per_rank  # FSDP averages over ranks: (1/W) * sum / (G/W) = sum / G

    validation = examples_from_rows(early_stop.rows, "validation", config) if early_stop else []
    started = time.perf_counter()
    setup_seconds = started - setup_started  # examples, model and tokenizer load, FSDP, optimizer, checkpoint load
    summary = {}
    tokens_this_run = 0.0
    history = [r["validation_nll"] for r in earlier if "validation_nll" in r and r["step"] <= start_step]
    best_dir = join(train_dir, "best_model")
    stopping = False
    for step in range(start_step, schedule.total_steps):
        if context.on_step:
            context.on_step(step, context, train_dir)
        step_started = time.perf_counter()
        meter.reset()
        global_indices = schedule.global_batch(step)
        if algorithm.token_average:  # FSDP averages over ranks: W / tokens turns the sum into a token average
            scale = context.world_size / _answer_tokens(examples, global_indices)
        else:
            scale = per_example_scale
        sums: dict[str, float] = {}
        reference_gap = None
        # the step-0 canary: over every micro-batch of the iteration's first step, the largest gap and where it is
        canary = step == 0 and start_step == 0
        worst = (-1.0, None)  # no reference log-probs yet (none at all for reference-free T-SPIN and SFT)
        micros = list(schedule.micro_batches(step, context.rank, context.world_size))
        for number, micro in enumerate(micros, start=1):
            # gradients sync on the last micro-batch only, or after each one when accumulation is sharded
            set_accumulating(model, number < len(micros), layout.sharded_accumulation)
            part = micro_step(model, [examples[i] for i in micro], algorithm, config, pad_id, scale, context.device,
                              precision(), scaler, check_reference=canary)
            if "reference_gap" in part:
                worst = max(worst, (part.pop("reference_gap"), part.pop("reference_gap_at")), key=lambda g: g[0])
            for key, value in part.items():
                sums[key] = sums.get(key, 0.0) + value
        if canary:  # before the first optimizer step: the policy is still the reference
            reference_gap = check_reference(worst[0] if worst[1] else None, worst[1], config, context, train_dir)
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        if scaler is not None:
            scaler.step(optimizer)  # skipped when the scaled gradients overflowed; the scale then halves
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        totals = _all_reduce_sums(sums, context.device)
        tokens_this_run += totals["tokens"]
        seconds = time.perf_counter() - step_started
        metrics = _step_metrics(totals, algorithm, t.global_batch_size, step, schedule, lr, float(grad_norm), seconds)
        peak = _max_over_ranks(meter.peak(), context.device)
        if peak is not None:
            metrics["peak_memory_bytes"] = peak
            peaks.append(peak)
        step_times.append(seconds)
        if reference_gap is not None:
            metrics["reference_gap"] = reference_gap
        if validation and (step + 1) % schedule.steps_per_epoch == 0:
            metrics["validation_nll"] = validation_nll(model, validation, pad_id, config, context)
            history.append(metrics["validation_nll"])
            if history[-1] == min(history):  # the best epoch so far: its weights are kept until a better one
                export_hf(model, tokenizer, best_dir, context.rank, config.model.dtype)
            stopping = len(history) - 1 - history.index(min(history)) >= early_stop.patience
        summary = metrics
        if context.rank == 0:
            record = {**metrics, "world_size": context.world_size,
                      "prompt_ids": [examples[i].prompt_id for i in global_indices]}
            log.append(record)
            # not print(): Ray Train's worker patches it to log as well as print when stdout is wrapped (as in a
            # job), and every step line came out twice
            sys.stdout.write(_progress_line(metrics, schedule.total_steps, time.perf_counter() - started, start_step) + "\n")
            sys.stdout.flush()
        if context.report:
            context.report(metrics)
        done = step + 1
        blocked = time.monotonic()
        if pending is not None and pending.written_everywhere(context.device):  # a background save is done
            cadence.saved(pending.commit())
            pending = None
        if done < schedule.total_steps and cadence.due(done, context.device):
            state = {"scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state().tolist(),
                     "epoch": done // schedule.steps_per_epoch, "samples_seen": done * t.global_batch_size,
                     "world_size": context.world_size}
            if pending is not None:  # at most one save in flight
                cadence.saved(pending.commit())
                pending = None
            if asynchronous:
                pending = save_checkpoint_async(train_dir, done, model, optimizer, state, context.rank,
                                                t.keep_checkpoints)
            else:
                save_checkpoint(train_dir, done, model, optimizer, state, context.rank, t.keep_checkpoints)
                cadence.saved(time.monotonic() - blocked)
        checkpoint_seconds += time.monotonic() - blocked
        if stopping:
            break
    if pending is not None:  # the last background save counts before the export supersedes it
        pending.commit()

    train_seconds = time.perf_counter() - started
    if context.rank == 0:
        prediction = settle_cpu_rate(prediction, context.device, t.cpus_per_worker)
    checked = check_against_plan(prediction, peaks, step_times) if context.rank == 0 else {}
    export_started = time.perf_counter()
    stopped = {}
    if history:
        best = history.index(min(history))
        stopped = {"epochs_run": len(history), "best_epoch": best + 1, "validation_nll": round(history[best], 6),
                   "validation_nll_by_epoch": [round(v, 6) for v in history]}
    if history and stopped["best_epoch"] < len(history):
        copy_export(best_dir, export_dir, context.rank)  # a later epoch was worse on validation
    else:
        export_hf(model, tokenizer, export_dir, context.rank, config.model.dtype)
    if merged_dir and is_adapted(model):
        export_merged(export_dir, merged_dir, config.model.dtype, config.model.trust_remote_code, context.rank)
    drop_checkpoints(train_dir, context.rank)
    return {
        **summary,
        **stopped,
        **reference,
        "reference_source": config.reference_source if algorithm.uses_reference(config) else None,
        "training_tokens_per_second": round(tokens_this_run / train_seconds, 1) if tokens_this_run else None,
        "setup_seconds": round(setup_seconds, 2),
        "compute_dtype": t.compute_dtype,
        "lora_rank": model.peft_config["default"].r if is_adapted(model) else 0,
        "trainable_parameters": trainable_parameters(model),
        "activation_checkpointing": layout.activation_checkpointing,
        "sharded_accumulation": layout.sharded_accumulation,
        "training_seconds": round(train_seconds, 2),
        "checkpoint_seconds": round(checkpoint_seconds, 2),  # what saving held training up (background writes not)
        **({"plan_check": checked} if checked else {}),
        "export_seconds": round(time.perf_counter() - export_started, 2),
        "steps": summary.get("step", schedule.total_steps) if stopped else schedule.total_steps,
        "resumed_from_step": start_step,
        "pairs": len(examples),
        "pairs_left_out_per_epoch": len(examples) - schedule.steps_per_epoch * t.global_batch_size,
        "seconds": round(time.perf_counter() - started, 2),
        "export_dir": export_dir,
    }


class CheckpointCadence:
    """Whether a step is followed by a checkpoint: every `every` steps, or with "auto" by time (plan.AUTO_CHECKPOINT_*).
    Ranks agree: an auto decision is any rank's (a MAX over ranks), as each reads its own clock."""

    def __init__(self, every, clock=time.monotonic):
        self.every, self.clock = every, clock
        self.last, self.cost = clock(), 0.0

    def due(self, done: int, device=None) -> bool:
        if self.every != "auto":
            return done % self.every == 0
        due = self.clock() - self.last >= max(AUTO_CHECKPOINT_MIN_S, AUTO_CHECKPOINT_SHARE * self.cost)
        return bool(_max_over_ranks(int(due), device)) if device is not None else due

    def saved(self, seconds: float) -> None:
        """A save that took `seconds` (staging and writing) has just been committed."""
        self.last, self.cost = self.clock(), seconds


def _max_over_ranks(value: int | None, device) -> int | None:
    """The largest of every rank's `value` (a collective: every rank calls it)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    packed = torch.tensor([-1 if value is None else value], dtype=torch.float64, device=device)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return None if packed.item() < 0 else int(packed.item())


def check_against_plan(prediction: dict | None, peaks: list[int], step_times: list[float]) -> dict:
    """This run's steps against the plan: the largest peak memory and the median step time, each beside its
    prediction; one warning line in the log for what is past the plan's tolerance."""
    from spin_ray.plan import describe_check, plan_check

    if not prediction or not step_times:
        return {}
    measured = {"peak_memory": max(peaks) if peaks else None, "step_seconds": statistics.median(step_times)}
    checked = plan_check(measured, {"peak_memory": prediction["peak_memory_bytes"],
                                    "step_seconds": prediction["step_seconds"]})
    warning = describe_check(checked)
    if warning:
        sys.stdout.write(f"[spin-ray] WARNING {warning}\n")
        sys.stdout.flush()
    return checked


def trainable_parameters(model: torch.nn.Module) -> int:
    """Trainable parameters of the whole model (FSDP2 shards count their global size)."""
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)


def _step_metrics(totals, algorithm: Algorithm, global_batch, step, schedule, lr, grad_norm, seconds) -> dict:
    metrics = {"step": step + 1, "epoch": step // schedule.steps_per_epoch, "lr": lr, "grad_norm": grad_norm,
               "samples_seen": (step + 1) * global_batch, "seconds": round(seconds, 3),
               "tokens_per_second": round(totals["tokens"] / seconds, 1) if seconds > 0 else None}
    counters = ("loss_sum", "tokens", "answer_tokens")
    # every loss metric is a per-example mean over the global batch
    metrics.update({key: value / global_batch for key, value in totals.items() if key not in counters})
    if algorithm.token_average:  # what the step minimised: the per-token mean over the whole global batch
        metrics["loss"] = metrics["nll"] = totals["loss_sum"] / totals["answer_tokens"]
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


# Written by rank 0 when a stage is refused for a reason a restart cannot fix; Ray Train's restarts then stop at once,
# and the driver raises its message (training/trainer.py).
REFUSAL = "refused.json"


def read_refusal(train_dir: str) -> str | None:
    return (read_json(join(train_dir, REFUSAL)) or {}).get("error")


def training_layout(config: Config, model_path: str, world: int, device: torch.device):
    """(layout, model shape): training.activation_checkpointing and training.gradient_accumulation with auto decided
    by the memory plan against this worker's GPU (on CPU auto means off and unsharded), and the model's shape as the
    plan reads it (None on CPU, or for a model the plan does not describe)."""
    from spin_ray.models import local_model_path
    from spin_ray.plan import GPU_RUNTIME_BYTES, ModelShape, PlanError, choose_layout

    device_bytes = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    shape = None
    if device_bytes:
        folder = local_model_path(model_path, weights=False)
        base = adapter_base(folder)  # an adapter's shape is its base's
        raw = read_json(join(local_model_path(base, weights=False) if base else folder, "config.json")) or {}
        try:
            shape = ModelShape.from_config(raw, model_path)
        except (PlanError, KeyError):
            shape = None
    return choose_layout(config, shape, world, device_bytes, GPU_RUNTIME_BYTES), shape


def wait_for_gpu_memory(config: Config, shape, layout, context: WorkerContext, train_dir: str) -> None:
    """Before the load: wait (bounded) until this worker's GPU has the memory the plan gives a worker free, else refuse
    the stage in one line naming the processes that hold it (no restart: recorded as a refusal). A model the plan does
    not describe needs 90% of the GPU free."""
    from spin_ray.plan import FIT_SHARE, GPU_RUNTIME_BYTES, training_memory, training_shape
    from spin_ray.training.gpu import GPU_RELEASE_WAIT_S, GPUBusyError, wait_for_free_gpu

    index = context.device.index if context.device.index is not None else torch.cuda.current_device()
    if shape is not None:
        run = training_shape(config, context.world_size, layout.activation_checkpointing, layout.sharded_accumulation)
        # this process's CUDA context is part of the runtime share, and already allocated
        needed = training_memory(shape, run, GPU_RUNTIME_BYTES).device_total - GPU_RUNTIME_BYTES
    else:
        needed = int(FIT_SHARE * torch.cuda.get_device_properties(index).total_memory)
    try:
        wait_for_free_gpu(index, needed, min(config.run.resource_wait_s, GPU_RELEASE_WAIT_S))
    except GPUBusyError as error:
        message = f"rank {context.rank}: {error}"
        atomic_write_json(join(train_dir, REFUSAL), {"error": message})
        raise TrainingDataError(message) from None


def loss_scaler(model, device: torch.device):
    """float16's dynamic loss scale (bfloat16 has float32's range and needs none); FSDP's scaler agrees on overflow
    over all ranks."""
    from spin_ray.training.parallel import is_sharded

    if is_sharded(model):
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device=device.type)
    return torch.amp.GradScaler(device.type)


def check_reference(gap: float | None, where: tuple | None, config: Config, context: WorkerContext,
                    train_dir: str) -> float | None:
    """The step-0 canary. Until an iteration's first optimizer step the policy IS the reference p_t, so every answer's
    policy-minus-reference log-prob should be ~0; a reference scored in another dtype, by another kernel or on other
    token ids shows here first. Collective: the largest gap per answer token over every rank's micro-batches of that
    step (the whole global batch); past training.reference_check_tolerance every rank raises, rank 0 having recorded
    the refusal. Returns the gap, logged as the step's `reference_gap`."""
    gathered = [(-1.0 if gap is None else gap, where)]
    if context.world_size > 1 and dist.is_available() and dist.is_initialized():
        gathered = [None] * context.world_size
        dist.all_gather_object(gathered, (-1.0 if gap is None else gap, where))
    worst, at = max(gathered, key=lambda entry: entry[0])
    tolerance = config.reference_tolerance
    if worst < 0:  # no reference log-probs (reference-free T-SPIN, SFT)
        return None
    if tolerance is None or worst <= tolerance:  # measured and logged either way
        return worst
    prompt_id, answer = at
    names = objective(config).answers.strip("()").split(", ")
    t = config.training
    if config.reference_source == "trainer":
        cause = ("the reference came from this same forward before training, so the forward is not repeatable: "
                 "dropout (training.lora.dropout) or a nondeterministic kernel; set training.reference_check_tolerance "
                 "to what it varies by")
    elif config.model.dtype != t.compute_dtype:
        cause = (f"the reference was scored in model.dtype {config.model.dtype} and training computes in "
                 f"training.compute_dtype {t.compute_dtype}; set training.reference=trainer (training scores its "
                 "own reference), score and train in the same dtype, or raise the tolerance")
    else:
        cause = ("the reference came from another kernel or model than the one training starts from (set "
                 "training.reference=trainer), or from other token ids than training reads (a tokenizer or chat "
                 "template that differs between the engines and training)")
    message = (f"reference check failed: at the iteration's first step the policy is its own reference p_t, yet its "
               f"log-prob of the {names[answer]} answer of prompt_id {prompt_id} differs from the stored reference by "
               f"{worst:.3f} nats per token (training.reference_check_tolerance {tolerance}); likely cause: {cause}")
    if context.rank == 0:
        atomic_write_json(join(train_dir, REFUSAL), {"error": message})
    raise TrainingDataError(message)


def read_metrics_log(train_dir: str) -> list[dict]:
    """The JSON-lines step log of a training stage ([] before its first step)."""
    return read_json_lines(join(train_dir, "metrics.jsonl"))
