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

from spin_ray.config import Config
from spin_ray.models.adapters import adapter_base, is_adapted
from spin_ray.models.resolution import load_tokenizer, local_model_path
from spin_ray.objectives.algorithms import Algorithm, Example, TrainingDataError, objective
from spin_ray.objectives.logprobs import answer_logps
from spin_ray.objectives.packed_attention import use_packed_kernel
from spin_ray.plan import (
    AUTO_CHECKPOINT_MIN_S,
    AUTO_CHECKPOINT_SHARE,
    FIT_SHARE,
    GPU_RUNTIME_BYTES,
    ModelShape,
    PlanError,
    choose_layout,
    describe_check,
    plan_check,
    training_memory,
    training_shape,
)
from spin_ray.storage import JsonLines, atomic_write_json, join, read_json, read_json_lines
from spin_ray.training.checkpoint import (
    committed_steps,
    copy_export,
    drop_checkpoints,
    export_hf,
    export_merged,
    load_checkpoint,
    save_checkpoint,
    save_checkpoint_async,
)
from spin_ray.training.data import Schedule, examples_from_rows
from spin_ray.training.gpu import GPU_RELEASE_WAIT_S, GPUBusyError, wait_for_free_gpu
from spin_ray.training.measure import PeakMemory, predict_phase, resident_now, settle_cpu_rate
from spin_ray.training.parallel import DTYPES, compute_context, is_sharded, load_for_training, set_accumulating
from spin_ray.training.reference import trainer_reference
from spin_ray.training.summary import TrainingSummary


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
    training = config.training
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if training.optimizer == "rmsprop":
        return torch.optim.RMSprop(trainable, lr=training.learning_rate, weight_decay=training.weight_decay)
    return torch.optim.AdamW(trainable, lr=training.learning_rate, weight_decay=training.weight_decay)


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
    training = config.training
    with precision or contextlib.nullcontext():
        # one concatenated forward over every answer of every example (pairs, triplets, or SFT's single answer)
        policy = answer_logps(model, [e.prompt for e in examples], [e.answers for e in examples], pad_id,
                              pack=training.pack_sequences, logits_chunk_rows=training.logits_chunk_rows,
                              share_prefix=training.prefix_sharing, device=device)
    policy = policy.float()
    lengths = torch.tensor([[len(a) for a in e.answers] for e in examples], dtype=torch.float32, device=device)
    refs = (torch.tensor([e.ref_logps for e in examples], dtype=torch.float32, device=device)
            if examples[0].ref_logps else None)
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
    training = config.training
    mine = examples[context.rank::context.world_size]
    batches = math.ceil(math.ceil(len(examples) / context.world_size) / training.micro_batch_size)
    nll, tokens = 0.0, 0.0
    model.eval()
    with torch.no_grad():
        for number in range(batches):
            batch = mine[number * training.micro_batch_size:(number + 1) * training.micro_batch_size]
            counted = bool(batch)
            batch = batch or examples[:1]
            logps = answer_logps(model, [e.prompt for e in batch], [e.answers[:1] for e in batch], pad_id,
                                 pack=training.pack_sequences, logits_chunk_rows=training.logits_chunk_rows,
                                 device=context.device)
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
) -> TrainingSummary:
    """Train one iteration on `rows` (generation-stage rows) starting from `model_path`; resume if a
    checkpoint is committed under `train_dir`. Returns the final summary (on every rank). With `early_stop`, the
    validation NLL is measured at each epoch's end (`validation_nll` in that step's record) and training ends once
    it stops improving. With LoRA the export is an adapter; `merged_dir` gets the merged model too."""
    run = set_up(config, rows, model_path, train_dir, context or WorkerContext(), source, early_stop)
    for step in range(run.start_step, run.schedule.total_steps):
        metrics = train_step(run, step)
        end_step(run, step, metrics)
        if run.stopping:
            break
    return finish(run, export_dir, merged_dir)


@dataclass
class LoopState:
    """One iteration's training as `train` runs it: what `set_up` built, and what the steps add up."""

    config: Config
    context: WorkerContext
    train_dir: str
    algorithm: Algorithm
    examples: list[Example]
    schedule: Schedule
    tokenizer: object
    memory_layout: object  # plan.TrainingLayout: checkpointing and accumulation as chosen
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: object | None  # float16's loss scale
    prediction: dict | None  # the plan's figures for this phase (rank 0)
    reference: dict  # what the trainer's reference pass reports (empty when the rows carry the reference)
    start_step: int
    log: JsonLines | None  # rank 0's metrics.jsonl
    validation: list[Example]
    patience: int
    history: list[float]  # validation NLL by epoch, resumed ones included
    setup_seconds: float
    started: float = field(default_factory=time.perf_counter)
    meter: PeakMemory | None = None
    peaks: list[int] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    cadence: CheckpointCadence | None = None
    asynchronous: bool = False  # checkpoints written in the background
    pending: object | None = None  # a background save in flight
    checkpoint_seconds: float = 0.0  # what saving held training up
    tokens_this_run: float = 0.0
    last_step: dict = field(default_factory=dict)  # the last step's metrics
    stopping: bool = False

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def precision(self):
        """A fresh forward context of the compute dtype (autocast in one process, FSDP2's policy otherwise)."""
        return compute_context(self.model, DTYPES[self.config.training.compute_dtype], self.context.device)


def set_up(config: Config, rows: list[dict], model_path: str, train_dir: str, context: WorkerContext, source: str,
           early_stop: EarlyStop | None) -> LoopState:
    """Examples and their schedule, the model (sharded, checkpointed as the plan chose), optimizer and schedule, the
    plan's prediction, the trainer's reference pass where it is needed, and a committed checkpoint's state."""
    setup_started = time.perf_counter()
    resident_before = resident_now() or 0  # the plan's runtime share on a CPU: interpreter, libraries, the rows
    training = config.training
    algorithm = objective(config)
    examples = examples_from_rows(rows, source, config)
    schedule = Schedule(len(examples), training.global_batch_size, training.micro_batch_size, training.epochs,
                        training.seed)
    schedule.check_world(context.world_size)
    torch.manual_seed(training.seed)
    refused = read_refusal(train_dir)
    if refused:  # an earlier attempt of this stage was refused; Ray Train's restart must not load the model again
        raise TrainingDataError(refused)
    tokenizer = load_tokenizer(model_path, config.model.trust_remote_code)
    memory_layout, shape = training_layout(config, model_path, context.world_size, context.device)
    if context.device.type == "cuda":  # what an earlier phase's process still holds on this GPU, before the load
        wait_for_gpu_memory(config, shape, memory_layout, context, train_dir)
    model = load_for_training(model_path, config.model.trust_remote_code, context.device, context.rank,
                              training.load_on_rank0, DTYPES[training.compute_dtype], training.cpu_offload,
                              memory_layout.activation_checkpointing, training.lora)
    use_packed_kernel(model, training.attention)
    model.train()
    optimizer = build_optimizer(model, config)
    run = LoopState(
        config, context, train_dir, algorithm, examples, schedule, tokenizer, memory_layout, model, optimizer,
        scheduler=build_scheduler(optimizer, schedule.total_steps, training.warmup_ratio),
        scaler=loss_scaler(model, context.device) if training.compute_dtype == "float16" else None,
        # the plan's figures for this phase, to set the measured ones beside (rank 0 measures its CPU's matmul rate)
        prediction=predict_phase(config, model, examples, memory_layout, context.world_size, context.device,
                                 resident_before) if context.rank == 0 else None,
        reference={}, start_step=0, log=None,
        validation=examples_from_rows(early_stop.rows, "validation", config) if early_stop else [],
        patience=early_stop.patience if early_stop else 0, history=[], setup_seconds=0.0,
        meter=PeakMemory(context.device), cadence=CheckpointCadence(training.checkpoint_every),
        asynchronous=training.async_checkpoint is True or (training.async_checkpoint == "auto"
                                                            and context.device.type == "cuda"))
    if algorithm.uses_reference(config) and not algorithm.reference_in_rows(config):  # before a checkpoint is loaded
        run.examples, run.reference = trainer_reference(model, examples, schedule, config, run.pad_id, train_dir,
                                                        context.rank, context.world_size, context.device,
                                                        run.precision)
    resume(run)
    run.started = time.perf_counter()
    run.setup_seconds = run.started - setup_started  # examples, model and tokenizer, FSDP, optimizer, checkpoint
    return run


def resume(run: LoopState) -> None:
    """Load the last committed checkpoint, if any, and keep the metrics log and validation history up to it."""
    earlier = read_metrics_log(run.train_dir)  # read by every rank before rank 0 trims it: the validation history
    steps = committed_steps(run.train_dir)
    if steps:
        state = load_checkpoint(run.train_dir, steps[-1], run.model, run.optimizer)
        run.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
        run.start_step = state["step"]
    if run.context.rank == 0:  # drop lines of steps the checkpoint does not contain (all of them on a fresh start)
        run.log = JsonLines(join(run.train_dir, "metrics.jsonl"))
        run.log.keep(lambda record: record["step"] <= run.start_step)
    run.history = [r["validation_nll"] for r in earlier if "validation_nll" in r and r["step"] <= run.start_step]


def train_step(run: LoopState, step: int) -> dict:
    """One optimizer step over this rank's micro-batches (gradients synced as the layout says), clipped and taken;
    its metrics averaged over every rank, with its peak memory and, at an iteration's first step, the largest gap
    between policy and reference (the step-0 canary)."""
    config, context, training = run.config, run.context, run.config.training
    if context.on_step:
        context.on_step(step, context, run.train_dir)
    step_started = time.perf_counter()
    run.meter.reset()
    global_indices = run.schedule.global_batch(step)
    if run.algorithm.token_average:  # FSDP averages over ranks: W / tokens turns the sum into a token average
        scale = context.world_size / _answer_tokens(run.examples, global_indices)
    else:  # FSDP averages over ranks: (1/W) * sum / (G/W) = sum / G
        scale = 1.0 / (training.global_batch_size // context.world_size)
    sums: dict[str, float] = {}
    canary = step == 0 and run.start_step == 0
    worst = (-1.0, None)  # no reference log-probs yet (none at all for reference-free T-SPIN and SFT)
    micros = list(run.schedule.micro_batches(step, context.rank, context.world_size))
    for number, micro in enumerate(micros, start=1):
        # gradients sync on the last micro-batch only, or after each one when accumulation is sharded
        set_accumulating(run.model, number < len(micros), run.memory_layout.sharded_accumulation)
        part = micro_step(run.model, [run.examples[i] for i in micro], run.algorithm, config, run.pad_id, scale,
                          context.device, run.precision(), run.scaler, check_reference=canary)
        if "reference_gap" in part:
            worst = max(worst, (part.pop("reference_gap"), part.pop("reference_gap_at")), key=lambda g: g[0])
        for key, value in part.items():
            sums[key] = sums.get(key, 0.0) + value
    # before the first optimizer step the policy is still the reference
    reference_gap = check_reference(worst[0] if worst[1] else None, worst[1], config, context,
                                    run.train_dir) if canary else None
    grad_norm, lr = optimizer_step(run)
    totals = _all_reduce_sums(sums, context.device)
    run.tokens_this_run += totals["tokens"]
    seconds = time.perf_counter() - step_started
    metrics = _step_metrics(totals, run.algorithm, training.global_batch_size, step, run.schedule, lr, grad_norm,
                            seconds)
    peak = _max_over_ranks(run.meter.peak(), context.device)
    if peak is not None:
        metrics["peak_memory_bytes"] = peak
        run.peaks.append(peak)
    run.step_times.append(seconds)
    if reference_gap is not None:
        metrics["reference_gap"] = reference_gap
    return metrics


def optimizer_step(run: LoopState) -> tuple[float, float]:
    """Clip, step (through float16's loss scale where there is one), zero the gradients, advance the schedule;
    returns the gradient norm before clipping and the learning rate the step used."""
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.config.training.max_grad_norm)
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    if run.scaler is not None:
        run.scaler.step(run.optimizer)  # skipped when the scaled gradients overflowed; the scale then halves
        run.scaler.update()
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    return float(grad_norm), lr


def end_step(run: LoopState, step: int, metrics: dict) -> None:
    """After a step: at an epoch's end the validation NLL (the best epoch's weights kept, early stop decided), the
    metrics logged and reported, and a checkpoint when one is due."""
    context = run.context
    if run.validation and (step + 1) % run.schedule.steps_per_epoch == 0:
        metrics["validation_nll"] = validation_nll(run.model, run.validation, run.pad_id, run.config, context)
        run.history.append(metrics["validation_nll"])
        if run.history[-1] == min(run.history):  # the best epoch so far: its weights are kept until a better one
            export_hf(run.model, run.tokenizer, join(run.train_dir, "best_model"), context.rank,
                      run.config.model.dtype)
        run.stopping = len(run.history) - 1 - run.history.index(min(run.history)) >= run.patience
    run.last_step = metrics
    if context.rank == 0:
        global_indices = run.schedule.global_batch(step)
        run.log.append({**metrics, "world_size": context.world_size,
                        "prompt_ids": [run.examples[i].prompt_id for i in global_indices]})
        # not print(): Ray Train's worker patches it to log as well as print when stdout is wrapped (as in a
        # job), and every step line came out twice
        sys.stdout.write(_progress_line(metrics, run.schedule.total_steps, time.perf_counter() - run.started,
                                        run.start_step) + "\n")
        sys.stdout.flush()
    if context.report:
        context.report(metrics)
    checkpoint_if_due(run, step + 1)


def checkpoint_if_due(run: LoopState, done: int) -> None:
    """Commit a finished background save; save when the cadence says (at most one save in flight). The time this
    holds training up adds to `checkpoint_seconds`."""
    training, context = run.config.training, run.context
    blocked = time.monotonic()
    if run.pending is not None and run.pending.written_everywhere(context.device):  # a background save is done
        run.cadence.saved(run.pending.commit())
        run.pending = None
    if done < run.schedule.total_steps and run.cadence.due(done, context.device):
        state = {"scheduler": run.scheduler.state_dict(), "torch_rng": torch.get_rng_state().tolist(),
                 "epoch": done // run.schedule.steps_per_epoch, "samples_seen": done * training.global_batch_size,
                 "world_size": context.world_size}
        if run.pending is not None:  # at most one save in flight
            run.cadence.saved(run.pending.commit())
            run.pending = None
        if run.asynchronous:
            run.pending = save_checkpoint_async(run.train_dir, done, run.model, run.optimizer, state, context.rank,
                                                training.keep_checkpoints)
        else:
            save_checkpoint(run.train_dir, done, run.model, run.optimizer, state, context.rank,
                            training.keep_checkpoints)
            run.cadence.saved(time.monotonic() - blocked)
    run.checkpoint_seconds += time.monotonic() - blocked


def finish(run: LoopState, export_dir: str, merged_dir: str | None) -> TrainingSummary:
    """The last background save committed, the plan checked, the model exported (the best epoch's where a later
    one was worse on validation; with LoRA the adapter, and `merged_dir` the merged model), the checkpoints dropped;
    returns the phase's summary."""
    config, context, training = run.config, run.context, run.config.training
    if run.pending is not None:  # the last background save counts before the export supersedes it
        run.pending.commit()
    train_seconds = time.perf_counter() - run.started
    checked = {}
    if context.rank == 0:
        prediction = settle_cpu_rate(run.prediction, context.device, training.cpus_per_worker,
                                     context.world_size)
        checked = check_against_plan(prediction, run.peaks, run.step_times)
    export_started = time.perf_counter()
    stopped = {}
    if run.history:
        best = run.history.index(min(run.history))
        stopped = {"epochs_run": len(run.history), "best_epoch": best + 1,
                   "validation_nll": round(run.history[best], 6),
                   "validation_nll_by_epoch": [round(v, 6) for v in run.history]}
    if run.history and stopped["best_epoch"] < len(run.history):
        copy_export(join(run.train_dir, "best_model"), export_dir, context.rank)  # a later epoch was worse
    else:
        export_hf(run.model, run.tokenizer, export_dir, context.rank, config.model.dtype)
    if merged_dir and is_adapted(run.model):
        export_merged(export_dir, merged_dir, config.model.dtype, config.model.trust_remote_code, context.rank)
    drop_checkpoints(run.train_dir, context.rank)
    return TrainingSummary(
        export_dir=export_dir,
        steps=run.last_step.get("step", run.schedule.total_steps) if stopped else run.schedule.total_steps,
        resumed_from_step=run.start_step,
        pairs=len(run.examples),
        pairs_left_out_per_epoch=len(run.examples) - run.schedule.steps_per_epoch * training.global_batch_size,
        last_step=run.last_step,
        seconds=round(time.perf_counter() - run.started, 2),
        setup_seconds=round(run.setup_seconds, 2),
        training_seconds=round(train_seconds, 2),
        checkpoint_seconds=round(run.checkpoint_seconds, 2),  # what saving held training up, not background writes
        export_seconds=round(time.perf_counter() - export_started, 2),
        training_tokens_per_second=round(run.tokens_this_run / train_seconds, 1) if run.tokens_this_run else None,
        compute_dtype=training.compute_dtype,
        lora_rank=run.model.peft_config["default"].r if is_adapted(run.model) else 0,
        trainable_parameters=trainable_parameters(run.model),
        activation_checkpointing=run.memory_layout.activation_checkpointing,
        sharded_accumulation=run.memory_layout.sharded_accumulation,
        reference_source=config.reference_source if run.algorithm.uses_reference(config) else None,
        plan_check=checked,
        **run.reference,
        **stopped,
    )


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
    """(memory layout, model shape): training.activation_checkpointing and training.gradient_accumulation with auto
    decided by the memory plan against this worker's GPU (on CPU auto means off and unsharded), and the model's shape
    as the plan reads it (None on CPU, or for a model the plan does not describe)."""
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


def wait_for_gpu_memory(config: Config, shape, memory_layout, context: WorkerContext, train_dir: str) -> None:
    """Before the load: wait (bounded) until this worker's GPU has the memory the plan gives a worker free, else refuse
    the stage in one line naming the processes that hold it (no restart: recorded as a refusal). A model the plan does
    not describe needs 90% of the GPU free."""
    index = context.device.index if context.device.index is not None else torch.cuda.current_device()
    if shape is not None:
        run = training_shape(config, context.world_size, memory_layout.activation_checkpointing,
                             memory_layout.sharded_accumulation)
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
    training = config.training
    if config.reference_source == "trainer":
        cause = ("the reference came from this same forward before training, so the forward is not repeatable: "
                 "dropout (training.lora.dropout) or a nondeterministic kernel; set training.reference_check_tolerance "
                 "to what it varies by")
    elif config.model.dtype != training.compute_dtype:
        cause = (f"the reference was scored in model.dtype {config.model.dtype} and training computes in "
                 f"training.compute_dtype {training.compute_dtype}; set training.reference=trainer (training scores "
                 "its own reference), score and train in the same dtype, or raise the tolerance")
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
