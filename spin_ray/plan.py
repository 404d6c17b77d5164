"""What a run needs before it runs: parameters, memory per training worker and engine replica, time and bytes per
iteration, from the config and the model's config.json alone (no Ray, no weights; torch only to time a CPU's matmul).

Activation memory is counted tensor by tensor from what autograd saves in a Llama-style decoder layer (RMSNorm,
rotary attention through SDPA, gated MLP), checked against torch's saved-tensor hooks on SmolLM2 (within 2% in fp32,
tests/unit/test_plan.py) and against the measured peak RSS of training workers (within 9%, bench/memory.py). Per token
and layer, with e the compute
dtype's bytes, h hidden, q and kv the query and key/value widths, i the MLP width:

    no checkpointing:   2 * (4 + 2e) * h  +  e * (3q + 2kv + 4i)  +  4 * heads
                        (each RMSNorm keeps its float32 input and its two casts; attention keeps q, k, v, its output
                        and the o_proj input; the MLP keeps gate, silu(gate), up and their product)
    checkpointing:      e * h (the layer's input), plus one layer's full activations while it is recomputed

No Ray and no weights: the CLI's `plan` and `run`'s preflight use it before any GPU is paid for.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace

from spin_ray.data.records import BUILTIN_DATASETS, resolve_source
from spin_ray.models.resolution import resolve_model
from spin_ray.objectives.algorithms import objective
from spin_ray.storage import join, read_json

GB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZER_STATES = {"rmsprop": 1, "adamw": 2}  # float32 tensors of the parameters' size (RMSprop: square_avg)
# Model types whose decoder layer the activation formula describes.
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")


class PlanError(ValueError):
    """A model the plan cannot describe; the message names it."""


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Llama-style config.json that memory and FLOPs depend on."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False

    @classmethod
    def from_config(cls, raw: dict, source: str = "config.json") -> "ModelShape":
        model_type = raw.get("model_type")
        if model_type not in LLAMA_LIKE:
            raise PlanError(f"{source}: model_type {model_type!r}: the plan knows Llama-style decoders "
                            f"({', '.join(LLAMA_LIKE)})")
        heads = raw["num_attention_heads"]
        return cls(model_type=model_type, hidden=raw["hidden_size"], intermediate=raw["intermediate_size"],
                   layers=raw["num_hidden_layers"], heads=heads, kv_heads=raw.get("num_key_value_heads") or heads,
                   head_dim=raw.get("head_dim") or raw["hidden_size"] // heads, vocab=raw["vocab_size"],
                   tied=bool(raw.get("tie_word_embeddings", False)),
                   qkv_bias=bool(raw.get("attention_bias", model_type == "qwen2")))

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_parameters(self) -> int:
        h, q, kv = self.hidden, self.q_width, self.kv_width
        attention = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0)
        norms = 2 * h + (2 * self.head_dim if self.model_type == "qwen3" else 0)  # qwen3 norms q and k per head
        return attention + 3 * h * self.intermediate + norms

    @property
    def embedding_parameters(self) -> int:
        """Input embeddings, the LM head (unless tied) and the final norm: FSDP's root unit."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def parameters(self) -> int:
        return self.layers * self.layer_parameters + self.embedding_parameters

    def lora_parameters(self, rank: int, targets: tuple[str, ...]) -> int:
        """Parameters of rank-`rank` LoRA adapters (A: in x r, B: r x out) on the named projections of every layer
        (all-linear: all seven; the LM head is never adapted)."""
        h, q, kv, i = self.hidden, self.q_width, self.kv_width, self.intermediate
        sizes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
                 "up_proj": (h, i), "down_proj": (i, h)}
        chosen = sizes if "all-linear" in targets else {name: sizes[name] for name in targets if name in sizes}
        return self.layers * sum(rank * (fan_in + fan_out) for fan_in, fan_out in chosen.values())

    def activation_bytes_per_token(self, element: int, checkpointing: bool) -> int:
        """Bytes autograd keeps per token per decoder layer (the module docstring's formula)."""
        if checkpointing:
            return element * self.hidden
        h, q, kv, i = self.hidden, self.q_width, self.kv_width, self.intermediate
        return 2 * (4 + 2 * element) * h + element * (3 * q + 2 * kv + 4 * i) + 4 * self.heads


def read_model_config(model: str, cache_dir: str | None = None, trust_remote_code: bool = False) -> dict:
    """The config.json of a model spec: a copy shipped with spin_ray for a few public models (the paper's), an alias
    (its converted folder), a local folder, a storage URL, or the hub (only that file)."""
    from importlib import resources

    shipped = resources.files("spin_ray") / "builtin_data" / "model_configs" / (model.replace("/", "--") + ".json")
    if shipped.is_file():  # a copy of a public model's config.json: no hub round trip (and none offline)
        return json.loads(shipped.read_text())
    try:
        resolved = resolve_model(model, cache_dir)
    except Exception:
        resolved = None
    if resolved is not None and resolved.source != "hub":

        raw = read_json(join(resolved.path, "config.json"))
        if raw is not None:
            return raw
    if resolved is not None and resolved.source == "hub":
        try:
            from huggingface_hub import hf_hub_download

            with open(hf_hub_download(model, "config.json")) as handle:
                return json.load(handle)
        except Exception:  # offline, gated or unknown: the shipped copy, if any
            pass
    raise PlanError(f"model {model!r}: cannot read its config.json (not local, not in the hub cache, hub unreachable)")


@dataclass(frozen=True)
class TrainingShape:
    """What one training worker runs per micro-batch, and how it is laid out."""

    workers: int
    micro_batch: int  # examples per micro-batch
    answers: int  # sequences per example (SPIN 2, T-SPIN 3, SFT 1)
    prompt_tokens: int
    answer_tokens: int
    compute_bytes: int
    checkpointing: bool
    sharded_accumulation: bool
    accumulating: bool  # more than one micro-batch per step
    cpu_offload: bool
    optimizer_states: int
    logits_chunk_rows: int
    shared_prefix: bool = False  # each prompt computed once for its answers (training.prefix_sharing)
    lora_rank: int = 0  # training.lora.rank: only adapters train (0: every weight)
    lora_targets: tuple[str, ...] = ()

    @property
    def sequences(self) -> int:
        return self.micro_batch * self.answers

    @property
    def tokens(self) -> int:
        """Tokens the forward computes: with a shared prefix each prompt once."""
        if self.shared_prefix:
            return self.micro_batch * (self.prompt_tokens + self.answers * self.answer_tokens)
        return self.sequences * (self.prompt_tokens + self.answer_tokens)

    @property
    def answer_token_count(self) -> int:
        return self.sequences * self.answer_tokens


def training_shape(config, workers: int | None = None, checkpointing: bool | None = None,
                   sharded_accumulation: bool | None = None) -> TrainingShape:
    """The worst-case micro-batch of a config: every sequence at the longest prompt and answer it allows. Layout
    choices left to auto are taken as given here (None: off, unsharded)."""
    training, d = config.training, config.data
    chosen = objective(config)
    answers = len([name for name in chosen.answers.strip("()").split(",") if name.strip()])  # SPPO: winner, loser
    answer = (
        max(d.max_response_tokens, config.generation.max_new_tokens + 1) if chosen.columns else d.max_response_tokens
    )
    world = workers or training.num_workers[1]
    per_rank = training.global_batch_size // max(1, world)
    return TrainingShape(
        workers=world,
        micro_batch=training.micro_batch_size,
        answers=answers,
        prompt_tokens=d.max_prompt_tokens,
        answer_tokens=answer,
        compute_bytes=DTYPE_BYTES[training.compute_dtype],
        checkpointing=bool(checkpointing if checkpointing is not None else training.activation_checkpointing is True),
        sharded_accumulation=bool(
            sharded_accumulation if sharded_accumulation is not None else training.gradient_accumulation == "sharded"
        ),
        accumulating=per_rank > training.micro_batch_size,
        cpu_offload=training.cpu_offload,
        optimizer_states=OPTIMIZER_STATES[training.optimizer],
        logits_chunk_rows=training.logits_chunk_rows,
        shared_prefix=training.prefix_sharing and training.pack_sequences and answers > 1,
        lora_rank=training.lora.rank,
        lora_targets=tuple(
            [training.lora.target_modules]
            if isinstance(training.lora.target_modules, str)
            else training.lora.target_modules
        ),
    )


def trainable_parameters(shape: ModelShape, run: TrainingShape) -> int:
    """What gets gradients and optimizer state: the adapters with LoRA, else every parameter."""
    return shape.lora_parameters(run.lora_rank, run.lora_targets) if run.lora_rank else shape.parameters


def micro_batch_flops(shape: ModelShape, run: TrainingShape, forward_only: bool = False) -> float:
    """FLOPs of one micro-batch's forward and backward on one worker: the decoder layers' matmuls (2 per parameter and
    token forward, 4 backward, 2 more to recompute with checkpointing), causal attention (each sequence its own
    triangle), and the LM head on answer tokens only (chunked: its logits recomputed in backward). `forward_only`:
    the forward alone (the trainer's reference pass)."""
    passes = 1 if forward_only else (4 if run.checkpointing else 3)  # forward, backward (2x), and the recompute
    # a frozen weight's backward computes its input's gradient only, not its own (attention has no weights: its
    # backward is whole either way)
    weight_passes = passes - 1 if run.lora_rank and not forward_only else passes
    dense = 2 * shape.layers * shape.layer_parameters * run.tokens * weight_passes
    dense += 2 * shape.lora_parameters(run.lora_rank, run.lora_targets) * run.tokens * passes  # adapters train
    p, a = run.prompt_tokens, run.answer_tokens
    # query-key pairs: a causal sequence of length s has s^2 / 2; a shared answer sees its prompt and itself
    pairs = run.sequences * (p + a) ** 2 / 2
    if run.shared_prefix:
        pairs = run.micro_batch * ((p + a) ** 2 / 2 + (run.answers - 1) * (a * p + a * a / 2))
    attention = 2 * 2 * shape.layers * pairs * shape.q_width * passes  # QK^T and AV
    head_passes = 1 if forward_only else (4 if run.logits_chunk_rows else 3) - bool(run.lora_rank)  # frozen head
    head = 2 * shape.hidden * shape.vocab * run.answer_token_count * head_passes
    return float(dense + attention + head)


def step_communication_bytes(shape: ModelShape, run: TrainingShape, micro_batches: int) -> float:
    """Bytes each rank receives per optimizer step under FSDP2 (ring collectives: (W-1)/W of the whole): parameters
    all-gathered in the compute dtype before each forward and again before each backward (they are resharded after
    forward), gradients reduce-scattered in float32; unsharded accumulation keeps them gathered between micro-batches
    (k + 1 gathers, one reduce-scatter), sharded accumulation does both every micro-batch (2k and k)."""
    if run.workers == 1:
        return 0.0
    share = (run.workers - 1) / run.workers
    if run.sharded_accumulation or micro_batches == 1:
        gathers, reductions = 2 * micro_batches, micro_batches
    else:
        gathers, reductions = micro_batches + 1, 1
    # only trainable parameters have gradients to reduce (the adapters, with LoRA)
    return share * (gathers * run.compute_bytes * shape.parameters + reductions * 4 * trainable_parameters(shape, run))


def step_seconds(shape: ModelShape, run: TrainingShape, micro_batches: int, flops_per_second: float,
                 link_bytes_per_second: float) -> float:
    """One optimizer step: its FLOPs at the worker's effective rate, plus its collectives at the link's rate (not
    overlapped with compute: an upper bound where they could be)."""
    return (micro_batch_flops(shape, run) * micro_batches / flops_per_second
            + step_communication_bytes(shape, run, micro_batches) / link_bytes_per_second)


@dataclass
class Memory:
    """Bytes per worker by component, on the device and in host memory."""

    device: dict[str, int] = field(default_factory=dict)
    host: dict[str, int] = field(default_factory=dict)

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())


def training_memory(shape: ModelShape, run: TrainingShape, runtime_bytes: int = 0) -> Memory:
    """Peak memory of one training worker (see the module docstring; `runtime_bytes` is what the process holds
    before any model: CUDA context, or the interpreter and libraries on a CPU)."""
    n, world, e = shape.parameters, run.workers, run.compute_bytes
    shard = math.ceil(n / world)
    trained = trainable_parameters(shape, run)
    trained_shard = math.ceil(trained / world)  # with LoRA only the adapters have gradients and optimizer state
    if run.lora_rank:  # the frozen base is held in the compute dtype (parallel.hold_frozen_in), the adapters in fp32
        weights = {"frozen base weights": e * shard, "adapter weights (fp32)": 4 * trained_shard}
    else:
        weights = {"master weights (fp32)": 4 * shard}
    states = {**weights, "gradients (fp32)": 4 * trained_shard,
              "optimizer state (fp32)": 4 * run.optimizer_states * trained_shard}
    memory = Memory()
    (memory.host if run.cpu_offload else memory.device).update(states)
    mixed = e != 4
    if world > 1:
        # FSDP2: one layer gathered, the next prefetched, the root (embeddings, head) for the whole forward
        gathered = e * (2 * shape.layer_parameters + shape.embedding_parameters)
        if run.accumulating and not run.sharded_accumulation:
            # between micro-batches every layer stays gathered, with its unsharded float32 gradient
            gathered = e * n + 4 * trained - 4 * trained_shard
        memory.device["gathered parameters"] = gathered
        # all-gather output and reduce-scatter input of one layer (float32 reduction)
        memory.device["communication buffers"] = (e + 4) * shape.layer_parameters
    elif mixed:  # one process: each float32 weight's cast, kept for backward (a frozen base is cast already)
        memory.device["autocast weight copies"] = e * trained if run.lora_rank else e * n
    per_token = shape.activation_bytes_per_token(e, run.checkpointing)
    activations = run.tokens * per_token * shape.layers
    if run.shared_prefix and not run.checkpointing:  # each later answer's attention keeps its own copy of the
        # prompt's keys and values beside its own (the concatenated key/value rows SDPA saves)
        extra = run.micro_batch * (run.answers - 1) * (run.prompt_tokens + run.answer_tokens)
        activations += extra * 2 * shape.kv_width * e * shape.layers
    # outside the layers: the final norm's float32 input and cast, rotary tables, the head's input rows
    activations += (
        run.tokens * ((4 + e) * shape.hidden + 8 * shape.head_dim) + run.answer_token_count * e * shape.hidden
    )
    if run.checkpointing:  # one layer's full activations exist while it is recomputed in backward
        activations += run.tokens * shape.activation_bytes_per_token(e, False)
    memory.device["activations"] = activations
    # the optimizer step's temporaries (torch's foreach RMSprop and AdamW: sqrt of the squared averages, one shard
    # size) come after the activations are freed; the larger of the two is the peak
    memory.device["activations"] = max(activations, 4 * trained_shard)
    rows = run.logits_chunk_rows or run.answer_token_count
    # a chunk's logits in the compute dtype, their float32 copy and float32 gradient
    memory.device["logits"] = min(rows, run.answer_token_count) * shape.vocab * (e + 8)
    if runtime_bytes:
        memory.device["runtime"] = runtime_bytes
    return memory


@dataclass(frozen=True)
class TrainingLayout:
    """How a training worker runs, with training.*'s auto values decided."""

    activation_checkpointing: bool
    sharded_accumulation: bool
    reason: str = ""


# auto accumulation: sharded once the unsharded copy (parameters + float32 gradients) would take more than this share
# of the GPU's memory
UNSHARDED_ACCUMULATION_SHARE = 0.25
# auto checkpointing: on when the planned peak without it exceeds this share of the GPU's memory (allocator slack)
FIT_SHARE = 0.9
# what a training process holds on its GPU before any tensor: the CUDA context and NCCL's buffers (an assumption)
GPU_RUNTIME_BYTES = 1 * GB


def choose_layout(config, shape: ModelShape | None, workers: int, device_bytes: int | None,
                  runtime_bytes: int = 0) -> TrainingLayout:
    """training.activation_checkpointing and training.gradient_accumulation, auto resolved against `device_bytes`
    (a GPU's memory; None on CPU, where auto means off and unsharded). A model the plan cannot describe (`shape`
    None) gets the safe choices on a GPU: checkpointing on, sharded accumulation."""
    training = config.training
    if device_bytes and shape is None:
        return TrainingLayout(training.activation_checkpointing in ("auto", True),
                              training.gradient_accumulation in ("auto", "sharded") and workers > 1,
                              "auto: the plan does not know this model, so checkpointing on and sharded accumulation")
    checkpointing = training.activation_checkpointing
    accumulation = training.gradient_accumulation
    reasons = []
    if accumulation == "auto":
        sharded = False
        if device_bytes and workers > 1:
            full_run = training_shape(config, workers)
            full_copy = DTYPE_BYTES[training.compute_dtype] * shape.parameters + 4 * trainable_parameters(
                shape, full_run
            )
            sharded = full_copy > UNSHARDED_ACCUMULATION_SHARE * device_bytes
            reasons.append(f"accumulation {'sharded' if sharded else 'unsharded'}: the full copy is "
                           f"{full_copy / GB:.1f} GiB of {device_bytes / GB:.0f} GiB")
    else:
        sharded = accumulation == "sharded"
    if checkpointing == "auto":
        checkpointing = False
        if device_bytes:
            run = training_shape(config, workers, checkpointing=False, sharded_accumulation=sharded)
            peak = training_memory(shape, run, runtime_bytes).device_total
            checkpointing = peak > FIT_SHARE * device_bytes
            reasons.append(f"checkpointing {'on' if checkpointing else 'off'}: {peak / GB:.1f} GiB without it")
    return TrainingLayout(bool(checkpointing), sharded, "; ".join(reasons))


# ---- the whole run: node types, engines, time and bytes ------------------------------------------------------------

@dataclass(frozen=True)
class Accelerator:
    """A GPU as Ray names it (the accelerator_type the cluster files declare): memory, dense bf16 peak, bandwidth."""

    memory_gb: float
    peak_tflops: float  # dense bf16 (fp16 for V100 and T4)
    bandwidth_gbs: float


# Datasheet figures (dense, no sparsity). A100 alone is ambiguous (40 or 80 GB): the smaller is assumed; name
# A100-80G (what Ray reports for an 80 GB card) or set training.gpu_memory_gb.
ACCELERATORS = {
    "A100": Accelerator(40, 312, 1555), "A100-40G": Accelerator(40, 312, 1555), "A100-80G": Accelerator(80, 312, 2039),
    "H100": Accelerator(80, 989, 3350), "H200": Accelerator(141, 989, 4800), "B200": Accelerator(180, 2250, 8000),
    "L4": Accelerator(22.5, 121, 300),  # 24 GB on the datasheet, ~22.5 GiB usable
    "L40S": Accelerator(48, 362, 864), "A10G": Accelerator(24, 70, 600),
    "V100": Accelerator(16, 125, 900), "T4": Accelerator(16, 65, 320),
}


@dataclass(frozen=True)
class Assumptions:
    """What the plan cannot read from a config; each can be set with `spin-ray plan --assume name=value`."""

    training_mfu: float = 0.40  # GPU training (FSDP2, bf16); the CPU's measured share is cpu_training_mfu
    # this loop's share of a CPU's measured matmul rate: FSDP2 ranks (2+ workers; bench/memory.py's two-worker settings
    # fit it within 10%), and one unsharded worker, which ran 24-42% faster than that in all its bench/memory.py
    # settings and the demo's trainings (docs/performance.md)
    cpu_training_mfu: float = 0.45
    cpu_single_process_mfu: float = 0.60
    engine_mfu: float = 0.30  # decoding's share of the peak when compute-bound (large batches)
    cpu_engine_gflops: float = 0.0  # a CPU engine's matmul rate; 0 measures this machine's
    cpu_training_gflops: float = 0.0  # a CPU worker's matmul rate (per core); 0 measures this machine's
    prompt_share: float = 0.5  # mean prompt length / data.max_prompt_tokens
    answer_share: float = 0.5  # mean answer length / its limit (generated and human alike)
    prompts: int = 0  # prompts per iteration; 0 takes data.limit, else counts the local data file's rows
    engine_overhead_gb: float = 2.0  # vLLM's activations and CUDA graphs per GPU, beside weights and KV cache
    engine_step_ms: float = 5.0  # vLLM's shortest decoding step (scheduling, sampling): small models' bound
    engine_prefill_mfu: float = 0.50  # prefill's share of the peak: prompts and scored answers, big matmuls
    # A CPU engine's rates over cpu_engine_gflops (torch.mm's fp32 rate at 1024^2, which vLLM's CPU kernels beat on a
    # prompt's big matmuls): SmolLM2 on 2 cores decoded at 0.75x its FLOPs, prefilled at 1.5x and scored at 1.4x
    # (bench/results/plan-terms-2026-12-07.json)
    cpu_decode_vs_mm: float = 0.75
    cpu_prefill_vs_mm: float = 1.5
    engine_start_s: float = 90.0  # a GPU replica's vLLM start beside reading its weights: compile, CUDA graphs
    cpu_engine_start_s: float = 5.0  # the same on a CPU engine, eager: SmolLM2 started in 5.8 s, 0.5 s of it weights
    disk_read_gbs: float = 1.0  # reading a staged model from a node's local disk
    staging_gbs: float = 0.5  # one node downloading a model folder from run.storage_path
    gpu_link_gbs: float = 150.0  # NCCL's bus bandwidth between a node's GPUs (NVLink; PCIe cards far less)
    # one rank writing its checkpoint shards to a bucket (fsspec through DCP: one stream per rank)
    checkpoint_write_gbs: float = 0.15
    host_copy_gbs: float = 10.0  # an asynchronous save's staging: a GPU's shards copied to host memory
    cpu_link_gbs: float = 0.25  # gloo's between CPU workers on one machine (bench/results/memory-*.json measures it)

    @classmethod
    def parse(cls, pairs: list[str]) -> "Assumptions":
        values = {}
        for pair in pairs:
            name, _, raw = pair.partition("=")
            if name not in cls.__dataclass_fields__ or not raw:
                known = ", ".join(cls.__dataclass_fields__)
                raise PlanError(f"--assume {pair!r}: expected name=value with name one of {known}")
            kind = type(getattr(cls(), name))
            values[name] = kind(float(raw)) if kind is int else kind(raw)
        return cls(**values)


def accelerator(name: str | None, memory_gb: float | None) -> tuple[str, Accelerator | None]:
    """(a label for it, the GPU) of a phase's accelerator_type and gpu_memory_gb keys; memory_gb overrides the
    table's memory (and names a GPU the table does not know, with the A100's rates)."""
    known = ACCELERATORS.get(name) if name else None
    if memory_gb:
        base = known or ACCELERATORS["A100"]
        return f"{name or 'GPU'} {memory_gb:g} GB", Accelerator(memory_gb, base.peak_tflops, base.bandwidth_gbs)
    if known is None:
        return name or "GPU (unknown type)", None
    return name if name.endswith("G") and name[-3:-1].isdigit() else f"{name} {known.memory_gb:g} GB", known


@dataclass
class EnginePlan:
    """One engine replica of size tensor_parallel_size, per GPU."""

    weights: int
    kv_cache: int
    kv_per_sequence: int
    sequences: int  # sequences of the config's lengths whose KV cache fits at once
    tokens_per_second: float  # decoding
    prefill_tokens_per_second: float  # prompts: the decoder layers (the LM head runs on a prompt's last token only)
    scoring_tokens_per_second: float  # scored answers: the decoder layers and the LM head on every token
    fits: bool
    why: str = ""
    scoring_bytes: int = 0  # a prompt-scoring request's logits and float32 log-softmax, outside vLLM's profile
    scoring_room: int = 0  # what generation.gpu_memory_utilization leaves of the GPU for them


def engine_plan(config, shape: ModelShape, gpu: Accelerator | None, assumptions: Assumptions,
                cpu_gflops: float) -> EnginePlan:
    """Weights and KV cache per GPU of one replica, how many sequences run at once, and its rates. Decoding: each step
    reads the weights once and every running sequence's KV cache (at the mean context: the prompt and half the
    answer) when bandwidth-bound, or computes 2 N FLOPs per sequence when compute-bound, whichever is slower.
    Prefill: 2 FLOPs a decoder parameter and prompt token at engine_prefill_mfu of the peak; scoring (vLLM's prompt
    log-probs) adds the LM head on every token."""
    gen = config.generation
    tp = gen.tensor_parallel_size
    element = DTYPE_BYTES[config.model.dtype]
    weights = math.ceil(shape.parameters * element / tp)
    kv_per_token = 2 * shape.layers * shape.kv_width * element // tp
    length = config.data.max_prompt_tokens + gen.max_new_tokens
    kv_per_sequence = kv_per_token * length
    if gpu is None:  # CPU: vLLM's KV cache space is its own setting (VLLM_CPU_KVCACHE_SPACE); batch as configured
        sequences = gen.batch_size
        rate = cpu_gflops * 1e9 * assumptions.cpu_decode_vs_mm / (2 * shape.parameters)  # compute-bound on a CPU
        prefill, scoring = prefill_rates(shape, cpu_gflops * 1e9 * assumptions.cpu_prefill_vs_mm)
        return EnginePlan(weights, kv_per_sequence * sequences, kv_per_sequence, sequences, rate, prefill, scoring,
                          True)
    budget = gpu.memory_gb * GB * gen.gpu_memory_utilization - weights - assumptions.engine_overhead_gb * GB
    sequences = max(0, int(budget // kv_per_sequence))
    fits = sequences >= 1
    batch = max(1, min(sequences, gen.batch_size))
    context = (
        config.data.max_prompt_tokens * assumptions.prompt_share + gen.max_new_tokens * assumptions.answer_share / 2
    )
    step = max((shape.parameters * element / tp + batch * kv_per_token * context) / (gpu.bandwidth_gbs * 1e9),
               2 * shape.parameters * batch / tp / (gpu.peak_tflops * 1e12 * assumptions.engine_mfu),
               assumptions.engine_step_ms / 1e3)
    why = "" if fits else (f"the weights ({weights / GB:.1f} GB per GPU) leave no room for one sequence's KV cache at "
                           f"generation.gpu_memory_utilization {gen.gpu_memory_utilization}; raise "
                           "generation.tensor_parallel_size or use a larger GPU")
    scoring, room = prompt_scoring_bytes(config, shape), int(gpu.memory_gb * GB * (1 - gen.gpu_memory_utilization))
    if fits and scoring + SCORING_MARGIN_BYTES > room:
        fits = False
        why = (f"scoring a prompt (vLLM's prompt log-probs: the human answers' in evaluation, and the reference with "
               f"training.reference engine) takes {scoring / GB:.2f} GiB outside vLLM's memory profile, and "
               f"generation.gpu_memory_utilization {gen.gpu_memory_utilization} leaves {room / GB:.2f} GiB of the GPU "
               f"(with {SCORING_MARGIN_BYTES / GB:.1f} GiB kept for the allocator); lower "
               "generation.gpu_memory_utilization, or generation.vllm_engine_kwargs.max_num_batched_tokens")
    prefill, scored = prefill_rates(shape, tp * gpu.peak_tflops * 1e12 * assumptions.engine_prefill_mfu)
    return EnginePlan(weights, max(0, int(budget)), kv_per_sequence, sequences, batch / step, prefill, scored, fits,
                      why, scoring, room)


def prefill_rates(shape: ModelShape, flops_per_second: float) -> tuple[float, float]:
    """Tokens a second of prompt prefill (the decoder layers) and of scoring (the LM head on every token too)."""
    layers = 2 * shape.layers * shape.layer_parameters
    return flops_per_second / layers, flops_per_second / (layers + 2 * shape.hidden * shape.vocab)


# Kept free beside prompt scoring's tensors: the CUDA caching allocator's fragmentation and NCCL's buffers.
SCORING_MARGIN_BYTES = GB // 2


def prompt_scoring_bytes(config, shape: ModelShape) -> int:
    """Peak memory of vLLM's prompt log-probs, which its memory profile does not count (vllm-project/vllm#5907): per
    request (vLLM 0.32 scores one request's chunk at a time) the logits of its prompt tokens in the model's dtype and
    their float32 log-softmax. A request is at most max_model_len tokens, and a chunk at most max_num_batched_tokens."""
    gen, data = config.generation, config.data
    tokens = data.max_prompt_tokens + max(gen.max_new_tokens, data.max_response_tokens)
    batched = gen.vllm_engine_kwargs.get("max_num_batched_tokens")
    if batched:
        tokens = min(tokens, int(batched))
    return tokens * shape.vocab * (DTYPE_BYTES[config.model.dtype] + 4)  # vLLM gathers the whole vocabulary


def count_prompts(config, assumptions: Assumptions) -> tuple[int, str]:
    """Prompts per iteration and where the number comes from."""
    if assumptions.prompts:
        return assumptions.prompts, "--assume prompts"
    if config.data.limit:
        return config.data.limit, "data.limit"

    source, _ = resolve_source(config.data.train, config.data)
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(source)
        if config.data.train.lower() in BUILTIN_DATASETS or (fs.protocol in ("file", ("file", "local"))
                                                              and path.endswith((".jsonl", ".ndjson"))):
            with fs.open(path, "rb") as handle:
                return sum(1 for line in handle if line.strip()), f"rows of {config.data.train}"
        if path.endswith(".parquet"):
            import pyarrow.parquet as pq

            with fs.open(path, "rb") as handle:
                return pq.ParquetFile(handle).metadata.num_rows, f"rows of {config.data.train}"
    except (OSError, ValueError):
        pass
    raise PlanError(f"cannot count the prompts of {config.data.train} without reading it: set data.limit or "
                    "--assume prompts=N")


@dataclass
class Plan:
    """Everything `spin-ray plan` prints, and what `spin-ray run` refuses on."""

    shape: ModelShape
    assumptions: Assumptions
    training_gpu: str
    generation_gpu: str
    workers: int
    memory_layout: TrainingLayout
    memory: Memory
    memory_without_checkpointing: Memory
    engine: EnginePlan
    prompts: int
    prompts_source: str
    seconds: dict[str, float]
    bytes: dict[str, int]
    problems: list[str]  # why it does not fit, each naming the key to change
    notes: list[str] = field(default_factory=list)  # what the plan could not check

    @property
    def fits(self) -> bool:
        return not self.problems


def make_plan(config, assumptions: Assumptions | None = None, model_config: dict | None = None) -> Plan:
    """The plan of a run: training memory per worker on its node type, each engine replica, time and bytes per
    iteration, and whether it fits."""
    assumptions = assumptions or Assumptions()
    raw = model_config or read_model_config(config.model.name, config.model.cache_dir, config.model.trust_remote_code)
    shape = ModelShape.from_config(raw, config.model.name)
    training, gen = config.training, config.generation
    workers = training.num_workers[1]
    train_label, train_gpu = (
        accelerator(training.accelerator_type, training.gpu_memory_gb) if training.use_gpu else ("CPU", None)
    )
    gen_label, gen_gpu = accelerator(gen.accelerator_type, gen.gpu_memory_gb) if gen.use_gpu else ("CPU", None)
    problems, notes = [], []
    if training.use_gpu and train_gpu is None:
        notes.append(
            f"training.accelerator_type {training.accelerator_type!r}: its GPU memory is unknown, training memory "
            f"not checked; set training.gpu_memory_gb (known types: {', '.join(ACCELERATORS)})"
        )
        train_gpu = ACCELERATORS["A100"]  # for the time estimate only
        device_known = False
    else:
        device_known = True
    if gen.use_gpu and gen_gpu is None:
        notes.append(f"generation.accelerator_type {gen.accelerator_type!r}: its GPU memory is unknown, the engines "
                     f"not checked; set generation.gpu_memory_gb (known types: {', '.join(ACCELERATORS)})")
    device_bytes = int(train_gpu.memory_gb * GB) if train_gpu and device_known else None
    runtime = GPU_RUNTIME_BYTES if training.use_gpu else 0
    memory_layout = choose_layout(config, shape, workers, device_bytes, runtime)
    run = training_shape(config, workers, memory_layout.activation_checkpointing, memory_layout.sharded_accumulation)
    memory = training_memory(shape, run, runtime)
    without = training_memory(
        shape, training_shape(config, workers, False, memory_layout.sharded_accumulation), runtime
    )
    if device_bytes and memory.device_total > FIT_SHARE * device_bytes:
        problems.append(_training_refusal(config, memory, device_bytes, train_label, memory_layout))
    cpu_rate = assumptions.cpu_engine_gflops or (measured_cpu_gflops(gen.threads_per_replica or
                                                                     int(gen.cpus_per_replica) or 1)
                                                if not gen.use_gpu else 0.0)
    engine = engine_plan(config, shape, gen_gpu or (ACCELERATORS["A100"] if gen.use_gpu else None), assumptions,
                         cpu_rate)
    if gen_gpu is not None and not engine.fits:
        problems.append(f"generation: a {gen_label} engine replica does not fit: {engine.why}")
    try:
        prompts, source = count_prompts(config, assumptions)
    except PlanError as error:
        prompts, source = 0, "nowhere"
        notes.append(f"the time and bytes per iteration: {error}")
    seconds = iteration_seconds(config, shape, train_gpu, engine, prompts, memory_layout, assumptions)
    return Plan(
        shape,
        assumptions,
        train_label,
        gen_label,
        workers,
        memory_layout,
        memory,
        without,
        engine,
        prompts,
        source,
        seconds,
        iteration_bytes(config, shape, prompts, assumptions),
        problems,
        notes,
    )


def _training_refusal(config, memory: Memory, device_bytes: int, label: str, memory_layout: TrainingLayout) -> str:
    training = config.training
    biggest = max(memory.device, key=memory.device.get)
    keys = []
    if biggest == "activations":
        keys += ["training.micro_batch_size", "data.max_prompt_tokens / data.max_response_tokens"]
        if not memory_layout.activation_checkpointing:
            keys.append("training.activation_checkpointing=true")
    if not training.cpu_offload and training.num_workers[0] > 1:
        keys.append("training.cpu_offload=true")
    if not memory_layout.sharded_accumulation and training.num_workers[0] > 1:
        keys.append("training.gradient_accumulation=sharded")
    keys += ["more training.num_workers", "a GPU with more memory (training.accelerator_type)"]
    return (f"training: a worker needs {memory.device_total / GB:.1f} GiB of its {label} GPU, over the "
            f"{FIT_SHARE:.0%} planned ({FIT_SHARE * device_bytes / GB:.1f} GiB), {biggest} "
            f"{memory.device[biggest] / GB:.1f} GiB of it; change {', '.join(keys)}")


def measured_cpu_gflops(threads: int) -> float:
    """This machine's fp32 matmul rate at `threads` threads (half a second of torch.mm)."""
    import time

    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        torch.mm(a, b)
        best = 0.0
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(4):
                torch.mm(a, b)
            best = max(best, 4 * 2 * 1024**3 / (time.perf_counter() - started))
        return best / 1e9
    finally:
        torch.set_num_threads(previous)


def iteration_seconds(config, shape: ModelShape, gpu: Accelerator | None, engine: EnginePlan, prompts: int,
                      memory_layout: TrainingLayout, assumptions: Assumptions) -> dict[str, float]:
    """One iteration, one line per kind of work, in the order they run: p_t staged on the nodes, the engines' start,
    generation's prefill and scoring (prompts, the reference's human answers and what the iteration mixes in, with
    training.reference engine) and its decoding, the trainer's reference pass, rank 0 loading p_t, training, the
    checkpoints' hold-ups, the export of p_t+1, evaluation (its answers and scoring)."""
    training, gen, d = config.training, config.generation, config.data
    seconds = handoff_seconds(config, shape, gpu, engine, assumptions)
    seconds.update(generation_seconds(config, engine, prompts, assumptions))
    pairs = prompts * (2 if config.iterations.mix_previous else 1)
    workers = training.num_workers[1]
    per_rank = max(1, training.global_batch_size // workers)  # examples a rank computes per step, at the mean lengths
    micro_batches = max(1, per_rank // training.micro_batch_size)
    # the worst-case shape at the mean lengths, with a rank's whole share of the step as one micro-batch
    step = replace(
        training_shape(config, workers),
        micro_batch=per_rank,
        prompt_tokens=int(d.max_prompt_tokens * assumptions.prompt_share),
        answer_tokens=int(max(d.max_response_tokens, gen.max_new_tokens) * assumptions.answer_share),
        checkpointing=memory_layout.activation_checkpointing,
        sharded_accumulation=memory_layout.sharded_accumulation,
        accumulating=micro_batches > 1,
    )
    rate, link = training_rates(config, gpu, assumptions)
    if objective(config).uses_reference(config) and config.reference_source == "trainer":
        # once per iteration over every example: each micro-batch's forward, its parameters all-gathered once
        gathers = (workers - 1) / workers * micro_batches * step.compute_bytes * shape.parameters
        seconds["reference pass (training workers)"] = pairs / training.global_batch_size * (
            micro_batch_flops(shape, step, forward_only=True) / rate + gathers / link)
    # rank 0 reads the weights and broadcasts them to the others in float32 (FSDP2's rank-0 loading)
    seconds["loading (rank 0 reads, broadcasts)"] = (shape.parameters * DTYPE_BYTES[config.model.dtype]
                                                     / (assumptions.disk_read_gbs * 1e9)
                                                     + (workers > 1) * shape.parameters * 4 / link)
    steps = pairs * training.epochs / training.global_batch_size
    seconds["training"] = steps * (micro_batch_flops(shape, step) / rate
                                   + step_communication_bytes(shape, step, micro_batches) / link)
    seconds["checkpoints (training held up)"] = checkpoint_seconds(config, shape, steps, seconds["training"],
                                                                   assumptions)
    # rank 0 gathers the trained weights in float32 and writes them in model.dtype (adapters in float32) from one stream
    trained = trainable_parameters(shape, training_shape(config))
    seconds["export (rank 0 writes p_t+1)"] = ((workers - 1) / workers * trained * 4 / link
                                               + export_bytes(config, shape) / (assumptions.checkpoint_write_gbs * 1e9))
    seconds["evaluation"] = evaluation_seconds(config, engine, assumptions) if config.evaluation.enabled else 0.0
    seconds["total"] = sum(seconds.values())
    return seconds


def training_rates(config, gpu: Accelerator | None, assumptions: Assumptions) -> tuple[float, float]:
    """A training worker's effective FLOP/s and its link's bytes/s."""
    if gpu is not None:
        return gpu.peak_tflops * 1e12 * assumptions.training_mfu, assumptions.gpu_link_gbs * 1e9
    training = config.training
    rate = cpu_training_flops(training.cpus_per_worker, training.num_workers[1], assumptions)
    return rate, assumptions.cpu_link_gbs * 1e9


def cpu_training_flops(cpus: float, workers: int, assumptions: Assumptions) -> float:
    """A CPU training worker's effective FLOP/s: its cores at torch.mm's fp32 rate on one thread (measured here unless
    --assume cpu_training_gflops) times this loop's share: cpu_single_process_mfu for one unsharded worker,
    cpu_training_mfu for FSDP2 ranks (their per-layer gathers and reductions cost more than the link time the plan
    adds for them)."""
    per_core = assumptions.cpu_training_gflops or measured_cpu_gflops(1)
    share = assumptions.cpu_single_process_mfu if workers == 1 else assumptions.cpu_training_mfu
    return max(1, int(cpus)) * per_core * 1e9 * share


def handoff_seconds(config, shape: ModelShape, gpu: Accelerator | None, engine: EnginePlan,
                    assumptions: Assumptions) -> dict[str, float]:
    """Handing p_t to the engines: each node downloads the export (in parallel: one download's time; with LoRA the
    adapter alone, and served merged each node then merges it, a read and write of the whole model), then every
    replica starts (in parallel): vLLM's start (compile, graphs, profiling) and reading the staged weights."""
    element = DTYPE_BYTES[config.model.dtype]
    lora = config.training.lora.rank > 0
    staging = export_bytes(config, shape) / (assumptions.staging_gbs * 1e9)
    if lora and config.generation.serves_lora_merged and config.generation.engine == "vllm":
        staging += 2 * shape.parameters * element / (assumptions.disk_read_gbs * 1e9)
    start = assumptions.engine_start_s if config.generation.use_gpu else assumptions.cpu_engine_start_s
    start += engine.weights / (assumptions.disk_read_gbs * 1e9)
    return {"staging (p_t on each node)": staging if objective(config).columns else 0.0,
            "engine start (one per pass)": start}


def generation_seconds(config, engine: EnginePlan, prompts: int, assumptions: Assumptions) -> dict[str, float]:
    """Generation's two kinds of engine work, over the fleet. Prefill: each prompt once (its samples share it), and
    with the engines scoring the reference (training.reference engine) each human answer after its prompt and each
    response the iteration mixes in (the previous iteration's answers, T-SPIN's y_0) after its own: vLLM's prompt
    log-probs read no prefix cache, so a scored request prefills its prompt again. Decoding: the answers' tokens."""
    gen, d = config.generation, config.data
    if not objective(config).columns:
        return {"generation: prefill and scoring": 0.0, "generation: decoding": 0.0}
    prompt = d.max_prompt_tokens * assumptions.prompt_share
    human = d.max_response_tokens * assumptions.answer_share
    answer = gen.max_new_tokens * assumptions.answer_share
    scored = 0.0
    if config.engine_scores_reference:
        mixed = gen.num_samples * config.iterations.mix_previous + objective(config).needs_proto
        scored = prompt + human + mixed * (prompt + answer)
    fleet = gen.replicas[1]
    return {"generation: prefill and scoring": prompts / fleet * (prompt / engine.prefill_tokens_per_second
                                                                  + scored / engine.scoring_tokens_per_second),
            "generation: decoding": prompts * gen.num_samples * answer / (engine.tokens_per_second * fleet)}


def evaluation_seconds(config, engine: EnginePlan, assumptions: Assumptions) -> float:
    """The held-out and validation sets: each prompt's greedy answer, then its prompt with the human answer and with
    the opponent's answer scored."""
    ev, gen, d = config.evaluation, config.generation, config.data
    evaluated = (ev.prompts or 0) + (ev.validation_prompts or 0)
    prompt = d.max_prompt_tokens * assumptions.prompt_share
    answer = (ev.max_new_tokens or gen.max_new_tokens) * assumptions.answer_share
    scored = 2 * prompt + d.max_response_tokens * assumptions.answer_share + answer
    return evaluated * (answer / engine.tokens_per_second + prompt / engine.prefill_tokens_per_second
                        + scored / engine.scoring_tokens_per_second) / gen.replicas[1]


# training.checkpoint_every auto: a checkpoint once training has run this many times as long as the last save took,
# and at least this long since it (saving then stays within ~5% of training, background writes aside)
AUTO_CHECKPOINT_SHARE = 20
AUTO_CHECKPOINT_MIN_S = 600.0


def checkpoint_seconds(config, shape: ModelShape, steps: float, training_seconds: float,
                       assumptions: Assumptions) -> float:
    """What an iteration's checkpoints hold training up: each save writes a rank's share of the trainable weights and
    their optimizer state (at checkpoint_write_gbs a rank); a blocking save stops training for all of it, a
    background one (training.async_checkpoint, auto on GPUs) for the copy to host memory. Saves come every
    checkpoint_every steps, or with auto once training has run 20x a save's time and at least 10 minutes."""
    training = config.training
    trained = trainable_parameters(shape, training_shape(config))
    per_rank = trained * 4 * (1 + OPTIMIZER_STATES[training.optimizer]) / max(1, training.num_workers[1])
    save = per_rank / (assumptions.checkpoint_write_gbs * 1e9)
    if training.checkpoint_every == "auto":
        saves = training_seconds / max(AUTO_CHECKPOINT_MIN_S, AUTO_CHECKPOINT_SHARE * save)
    else:
        saves = steps / training.checkpoint_every
    background = training.async_checkpoint is True or (training.async_checkpoint == "auto" and training.use_gpu)
    return saves * (per_rank / (assumptions.host_copy_gbs * 1e9) if background else save)


def export_bytes(config, shape: ModelShape) -> int:
    """An iteration's export: the model in model.dtype, or with LoRA its adapters (kept in float32)."""
    if config.training.lora.rank:
        return trainable_parameters(shape, training_shape(config)) * 4
    return shape.parameters * DTYPE_BYTES[config.model.dtype]


def iteration_bytes(config, shape: ModelShape, prompts: int, assumptions: Assumptions) -> dict[str, int]:
    """What one iteration writes to run.storage_path: the export, the checkpoints while it trains (removed once the
    export is complete), the generation shards (int32 token ids and float log-probs, before parquet's compression)."""
    training, gen, d = config.training, config.generation, config.data
    trained = trainable_parameters(shape, training_shape(config))
    checkpoint = trained * 4 * (1 + OPTIMIZER_STATES[training.optimizer])  # with LoRA: the adapters and their state
    row = 4 * (d.max_prompt_tokens * assumptions.prompt_share + d.max_response_tokens * assumptions.answer_share
               + gen.num_samples * gen.max_new_tokens * assumptions.answer_share) + 8 * (gen.num_samples + 2)
    return {"export": export_bytes(config, shape),
            "checkpoints (while training)": checkpoint * training.keep_checkpoints,
            "generation shards": int(row * prompts)}


def format_plan(plan: Plan, config) -> str:
    """The table `spin-ray plan` prints."""
    training, gen = config.training, config.generation
    gb = lambda value: f"{value / GB:8.2f} GiB"  # noqa: E731
    s = plan.shape
    held = f"adapters float32, frozen base {training.compute_dtype}" if training.lora.rank else "master weights float32"
    lines = [
        f"model {config.model.name}: {s.model_type}, {s.parameters:,} parameters ({s.layers} layers, hidden "
        f"{s.hidden}, {s.heads} heads / {s.kv_heads} kv, vocab {s.vocab}{', tied' if s.tied else ''})",
        "",
        f"training, per worker ({plan.workers} x {plan.training_gpu}; compute {training.compute_dtype}, "
        f"{held}, "
        f"micro-batch {training.micro_batch_size} x {training_shape(config).answers} answers x "
        f"{config.data.max_prompt_tokens}+{training_shape(config).answer_tokens} tokens)",
    ]
    if training.lora.rank:
        adapters = s.lora_parameters(training.lora.rank, training_shape(config).lora_targets)
        lines.append(
            f"  LoRA rank {training.lora.rank}: {adapters:,} trainable parameters ({adapters / s.parameters:.2%}); "
            f"gradients and optimizer state for them only"
        )
    for name, value in plan.memory.device.items():
        lines.append(f"  {name:<40}{gb(value)}")
    for name, value in plan.memory.host.items():
        lines.append(f"  {name + ' (host, offloaded)':<40}{gb(value)}")
    lines.append(f"  {'total per GPU' if training.use_gpu else 'total per worker':<40}{gb(plan.memory.device_total)}"
                 + (f"  (+ {plan.memory.host_total / GB:.2f} GiB of host memory)" if plan.memory.host else ""))
    checkpointing = "on" if plan.memory_layout.activation_checkpointing else "off"
    lines.append(f"  activation checkpointing {checkpointing} (training.activation_checkpointing "
                 f"{training.activation_checkpointing}); without it the activations are "
                 f"{plan.memory_without_checkpointing.device['activations'] / GB:.2f} GiB, total "
                 f"{plan.memory_without_checkpointing.device_total / GB:.2f} GiB")
    lines.append(f"  gradient accumulation {'sharded' if plan.memory_layout.sharded_accumulation else 'unsharded'} "
                 f"(training.gradient_accumulation {training.gradient_accumulation})"
                 + (f"; {plan.memory_layout.reason}" if plan.memory_layout.reason else ""))
    e = plan.engine
    lines += [
        "",
        f"generation, each engine replica ({gen.replicas[1]} at most, {plan.generation_gpu}, "
        f"tensor_parallel_size {gen.tensor_parallel_size}, {config.model.dtype})",
        f"  {'weights' + (' per GPU' if gen.use_gpu else ''):<40}{gb(e.weights)}",
        f"  {'KV cache' + (' per GPU' if gen.use_gpu else ''):<40}{gb(e.kv_cache)}"
        + (f"  (gpu_memory_utilization {gen.gpu_memory_utilization})" if gen.use_gpu else ""),
        f"  sequences of {config.data.max_prompt_tokens}+{gen.max_new_tokens} tokens at once: {e.sequences}"
        f" ({e.kv_per_sequence / 2**20:.1f} MB of KV cache each)",
        f"  decoding: ~{e.tokens_per_second:,.0f} tokens/s per replica; prefill ~{e.prefill_tokens_per_second:,.0f}"
        f", scoring ~{e.scoring_tokens_per_second:,.0f}",
        *(
            [
                f"  {'prompt scoring (outside the profile)':<40}{gb(e.scoring_bytes)}  (of {e.scoring_room / GB:.2f} "
                f"GiB gpu_memory_utilization leaves)"
            ]
            if gen.use_gpu
            else []
        ),
        "",
        f"time per iteration ({plan.prompts:,} prompts, from {plan.prompts_source}; an estimate)",
    ]
    for name, value in plan.seconds.items():
        lines.append(f"  {name:<40}{value / 3600:8.2f} h ({value:,.0f} s)")
    lines += ["", "bytes per iteration in run.storage_path"]
    for name, value in plan.bytes.items():
        lines.append(f"  {name:<40}{gb(value)}")
    a = plan.assumptions
    lines += ["", "assumptions (--assume name=value): " + ", ".join(f"{k}={getattr(a, k)}"
                                                                      for k in a.__dataclass_fields__)]
    lines.append("")
    lines += [f"not checked: {note}" for note in plan.notes]
    if plan.fits:
        lines.append(f"verdict: fits ({plan.training_gpu} for training, {plan.generation_gpu} for generation)")
    else:
        lines += ["verdict: does NOT fit", *(f"  - {problem}" for problem in plan.problems)]
    return "\n".join(lines)


# ---- the plan against a run: what a training phase measures, beside what the plan predicts for it ----------------

# How far a measurement may be from its prediction before a run says so: peak memory was within 9% in all 17 CPU
# settings of bench/memory.py, step time within 30% in 12 of 14 (docs/performance.md).
PLAN_TOLERANCE = {"peak_memory": 0.20, "step_seconds": 0.30}


def phase_prediction(config, shape: ModelShape, workers: int, checkpointing: bool, sharded_accumulation: bool,
                     longest: tuple[int, int], mean: tuple[int, int], runtime_bytes: int, flops_per_second: float,
                     link_bytes_per_second: float) -> dict:
    """The plan for a training phase as it runs: peak memory of a worker at the phase's longest micro-batch
    (`longest`: prompt and answer tokens), and the step time at its mean lengths (`mean`), at the given rates."""
    training = config.training
    worst = replace(training_shape(config, workers, checkpointing, sharded_accumulation),
                    prompt_tokens=longest[0], answer_tokens=longest[1])
    per_rank = max(1, training.global_batch_size // workers)
    micro_batches = max(1, per_rank // training.micro_batch_size)
    # one micro-batch at the mean lengths, run micro_batches times a step
    step = replace(
        worst,
        micro_batch=min(per_rank, training.micro_batch_size),
        prompt_tokens=mean[0],
        answer_tokens=mean[1],
        accumulating=micro_batches > 1,
    )
    compute = micro_batch_flops(shape, step) * micro_batches / flops_per_second
    return {"peak_memory_bytes": training_memory(shape, worst, runtime_bytes).device_total,
            "step_seconds": step_seconds(shape, step, micro_batches, flops_per_second, link_bytes_per_second),
            "step_compute_seconds": compute, "flops_per_second": flops_per_second}


def plan_check(measured: dict, planned: dict) -> dict:
    """Measured vs planned, per quantity: both values, measured/planned - 1, and whether that is past the plan's
    tolerance (PLAN_TOLERANCE)."""
    checked = {}
    for key, tolerance in PLAN_TOLERANCE.items():
        got, want = measured.get(key), planned.get(key)
        if got is None or not want:
            continue
        error = got / want - 1
        checked[key] = {"measured": got, "planned": want, "error": round(error, 3), "tolerance": tolerance,
                        "off": abs(error) > tolerance}
    return checked


def describe_check(checked: dict) -> str | None:
    """One warning line for the quantities past their tolerance, or None."""
    off = [
        f"{key.replace('_', ' ')} {entry['measured']:.3g} against {entry['planned']:.3g} planned "
        f"({entry['error']:+.0%}, beyond {entry['tolerance']:.0%})"
        for key, entry in checked.items()
        if entry["off"]
    ]
    return ("plan check: " + "; ".join(off) + " (spin-ray plan's assumptions: --assume)") if off else None
