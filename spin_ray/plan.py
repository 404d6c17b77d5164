"""What a run needs before it runs: parameters, memory per training worker and engine replica, time and bytes per
iteration, from the config and the model's config.json alone (no Ray, no torch, no weights).

Activation memory is counted tensor by tensor from what autograd saves in a Llama-style decoder layer (RMSNorm,
rotary attention through SDPA, gated MLP), checked against torch's saved-tensor hooks on SmolLM2 (within 1% in fp32)
and against the measured peak RSS of training workers (bench/memory.py). Per token and layer, with e the compute
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
from dataclasses import dataclass, field

from spin_ray.algorithms import objective

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

    def activation_bytes_per_token(self, element: int, checkpointing: bool) -> int:
        """Bytes autograd keeps per token per decoder layer (the module docstring's formula)."""
        if checkpointing:
            return element * self.hidden
        h, q, kv, i = self.hidden, self.q_width, self.kv_width, self.intermediate
        return 2 * (4 + 2 * element) * h + element * (3 * q + 2 * kv + 4 * i) + 4 * self.heads


def read_model_config(model: str, cache_dir: str | None = None, trust_remote_code: bool = False) -> dict:
    """The config.json of a model spec: an alias (its converted folder), a local folder, a storage URL, the local hub
    cache or the hub (only that file), else a copy shipped with spin_ray for a few public models."""
    from importlib import resources

    from spin_ray.models import resolve_model

    shipped = resources.files("spin_ray") / "builtin_data" / "model_configs" / (model.replace("/", "--") + ".json")
    try:
        resolved = resolve_model(model, cache_dir)
    except Exception:
        resolved = None
    if resolved is not None and resolved.source != "hub":
        from spin_ray.storage import join, read_json

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
    if shipped.is_file():
        return json.loads(shipped.read_text())
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

    @property
    def sequences(self) -> int:
        return self.micro_batch * self.answers

    @property
    def tokens(self) -> int:
        return self.sequences * (self.prompt_tokens + self.answer_tokens)

    @property
    def answer_token_count(self) -> int:
        return self.sequences * self.answer_tokens


def training_shape(config, workers: int | None = None, checkpointing: bool | None = None,
                   sharded_accumulation: bool | None = None) -> TrainingShape:
    """The worst-case micro-batch of a config: every sequence at the longest prompt and answer it allows. Layout
    choices left to auto are taken as given here (None: off, unsharded)."""
    t, d = config.training, config.data
    chosen = objective(config)
    answers = len(chosen.answers.strip("()").split(","))
    if chosen.name == "sppo":
        answers = 2  # its winner and loser
    answer = max(d.max_response_tokens, config.generation.max_new_tokens + 1) if chosen.columns else d.max_response_tokens
    world = workers or t.num_workers[1]
    per_rank = t.global_batch_size // max(1, world)
    return TrainingShape(
        workers=world, micro_batch=t.micro_batch_size, answers=answers, prompt_tokens=d.max_prompt_tokens,
        answer_tokens=answer, compute_bytes=DTYPE_BYTES[t.compute_dtype],
        checkpointing=bool(checkpointing if checkpointing is not None else t.activation_checkpointing is True),
        sharded_accumulation=bool(sharded_accumulation if sharded_accumulation is not None
                                  else t.gradient_accumulation == "sharded"),
        accumulating=per_rank > t.micro_batch_size, cpu_offload=t.cpu_offload,
        optimizer_states=OPTIMIZER_STATES[t.optimizer], logits_chunk_rows=t.logits_chunk_rows)


def micro_batch_flops(shape: ModelShape, run: TrainingShape) -> float:
    """FLOPs of one micro-batch's forward and backward on one worker: the decoder layers' matmuls (2 per parameter and
    token forward, 4 backward, 2 more to recompute with checkpointing), causal attention (each sequence its own
    triangle), and the LM head on answer tokens only (chunked: its logits recomputed in backward)."""
    passes = 4 if run.checkpointing else 3  # forward, backward (2x), and the recompute
    dense = 2 * shape.layers * shape.layer_parameters * run.tokens * passes
    length = run.prompt_tokens + run.answer_tokens
    attention = 2 * shape.layers * run.sequences * length * length * shape.q_width * passes  # QK^T and AV, causal half
    head = 2 * shape.hidden * shape.vocab * run.answer_token_count * (4 if run.logits_chunk_rows else 3)
    return float(dense + attention + head)


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
    states = {"master weights (fp32)": 4 * shard, "gradients (fp32)": 4 * shard,
              "optimizer state (fp32)": 4 * run.optimizer_states * shard}
    memory = Memory()
    (memory.host if run.cpu_offload else memory.device).update(states)
    mixed = e != 4
    if world > 1:
        # FSDP2: one layer gathered, the next prefetched, the root (embeddings, head) for the whole forward
        gathered = e * (2 * shape.layer_parameters + shape.embedding_parameters)
        if run.accumulating and not run.sharded_accumulation:
            # between micro-batches every layer stays gathered, with its unsharded float32 gradient
            gathered = e * n + 4 * n - 4 * shard
        memory.device["gathered parameters"] = gathered
        # all-gather output and reduce-scatter input of one layer (float32 reduction)
        memory.device["communication buffers"] = (e + 4) * shape.layer_parameters
    elif mixed:
        memory.device["autocast weight copies"] = e * n  # one process: each weight's cast, kept for backward
    per_token = shape.activation_bytes_per_token(e, run.checkpointing)
    activations = run.tokens * per_token * shape.layers
    # outside the layers: the final norm's float32 input and cast, rotary tables, the head's input rows
    activations += run.tokens * ((4 + e) * shape.hidden + 8 * shape.head_dim) + run.answer_token_count * e * shape.hidden
    if run.checkpointing:  # one layer's full activations exist while it is recomputed in backward
        activations += run.tokens * shape.activation_bytes_per_token(e, False)
    memory.device["activations"] = activations
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
    t = config.training
    if device_bytes and shape is None:
        return TrainingLayout(t.activation_checkpointing in ("auto", True),
                              t.gradient_accumulation in ("auto", "sharded") and workers > 1,
                              "auto: the plan does not know this model, so checkpointing on and sharded accumulation")
    checkpointing = t.activation_checkpointing
    accumulation = t.gradient_accumulation
    reasons = []
    if accumulation == "auto":
        sharded = False
        if device_bytes and workers > 1:
            full_copy = (DTYPE_BYTES[t.compute_dtype] + 4) * shape.parameters
            sharded = full_copy > UNSHARDED_ACCUMULATION_SHARE * device_bytes
            reasons.append(f"accumulation {'sharded' if sharded else 'unsharded'}: the full copy is "
                           f"{full_copy / GB:.1f} GB of {device_bytes / GB:.0f} GB")
    else:
        sharded = accumulation == "sharded"
    if checkpointing == "auto":
        checkpointing = False
        if device_bytes:
            run = training_shape(config, workers, checkpointing=False, sharded_accumulation=sharded)
            peak = training_memory(shape, run, runtime_bytes).device_total
            checkpointing = peak > FIT_SHARE * device_bytes
            reasons.append(f"checkpointing {'on' if checkpointing else 'off'}: {peak / GB:.1f} GB without it")
    return TrainingLayout(bool(checkpointing), sharded, "; ".join(reasons))
