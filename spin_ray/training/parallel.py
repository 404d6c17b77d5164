"""How the main player is laid out over ranks: FSDP2 per decoder layer, mixed precision, activation checkpointing,
sharded or unsharded gradient accumulation, and loading without a full copy per rank.

Master weights, gradients after reduction and optimizer state are always float32; `compute_dtype` is only what the
forward and backward run in (with LoRA the frozen base, which takes no step, is held in it: `hold_frozen_in`). A
model held in bf16 and stepped at the paper's learning rate loses its updates to rounding (measured on SmolLM2: 3
RMSprop steps at lr 5e-7 moved 0.97% of the weights in bf16, 99.89% in fp32).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from spin_ray.models.adapters import adapter_base, inject, load_adapter, lora_config, saved_config
from spin_ray.models.resolution import load_model, local_model_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks of a Hugging Face causal LM (model.model.layers for Llama-likes)."""
    for attribute in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        node = model
        try:
            for part in attribute.split("."):
                node = getattr(node, part)
        except AttributeError:
            continue
        return list(node)
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard")


def process_group_backend(use_gpu: bool, cpu_offload: bool) -> str:
    """The torch.distributed backend of the training workers: gloo on CPU, NCCL on GPUs, and with CPU offload on GPUs
    both, by device. FSDP2's CPUOffloadPolicy keeps the shards' gradients in host memory, so gradient clipping's norm
    is reduced over CPU tensors, which NCCL cannot carry (torchtitan initialises `cuda:nccl,cpu:gloo` for the same
    reason)."""
    if not use_gpu:
        return "gloo"
    return "cpu:gloo,cuda:nccl" if cpu_offload else "nccl"


def distributed_world() -> int:
    """Ranks in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def apply_fsdp(model: torch.nn.Module, compute_dtype: torch.dtype = torch.float32, cpu_offload: bool = False,
               reshard_after_forward: bool = True) -> torch.nn.Module:
    """fully_shard per decoder layer, then the root (embeddings, final norm, head), when a process group of two or
    more ranks exists; the model is returned unchanged otherwise.

    Per-layer units keep only one layer's full parameters alive at a time. Below float32, FSDP2's
    MixedPrecisionPolicy all-gathers the parameters in `compute_dtype` and reduce-scatters the gradients in
    float32 onto the float32 shards the optimizer steps. `cpu_offload` keeps the shards, their gradients and the
    optimizer state in host memory (FSDP2's CPUOffloadPolicy): the step runs on the CPU, the GPU holds only the
    gathered layers and activations. With one rank FSDP adds work to every step and saves no memory, so a single
    process gets its mixed precision from `compute_context` instead. Checkpoints load either way (DCP reshards).
    """
    if distributed_world() == 1:
        return model
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    options = {
        "reshard_after_forward": reshard_after_forward,
        "offload_policy": CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy(),
    }
    if compute_dtype != torch.float32:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync")


def compute_context(model: torch.nn.Module, compute_dtype: torch.dtype, device: torch.device):
    """The forward's (and backward's) precision context: nothing in float32 or under FSDP (its MixedPrecisionPolicy
    casts per module), else autocast to `compute_dtype` over float32 parameters: the one-process equivalent, with
    matmuls in `compute_dtype` and the float32 weights the optimizer steps."""
    if compute_dtype == torch.float32 or is_sharded(model):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=compute_dtype)


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in backward instead of keeping its activations: only each layer's input stays.

    transformers' per-layer checkpointing (non-reentrant torch.utils.checkpoint, so FSDP2's hooks inside a layer
    see the recompute as part of backward). A recompute runs after its forward has returned, so whatever attention
    implementation the forward ran with (the packed kernel is switched on for one forward only) is restored
    around it."""
    config = model.config

    def recompute_as_forward():
        implementation = config._attn_implementation

        @contextlib.contextmanager
        def recompute():
            previous = config._attn_implementation
            config._attn_implementation = implementation
            try:
                yield
            finally:
                config._attn_implementation = previous

        return contextlib.nullcontext(), recompute()

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False,
                                                                       "context_fn": recompute_as_forward})


def set_accumulating(model: torch.nn.Module, accumulating: bool, sharded: bool) -> None:
    """Between the micro-batches of one step, keep gradients and parameters unsharded (`sharded` False) or
    reduce-scatter each micro-batch's gradients at once (`sharded` True).

    Unsharded: FSDP2 skips the reduce-scatter and the re-gather between micro-batches, 2 collectives of the whole
    model per step instead of 2k for k micro-batches, at the cost of one full copy of the parameters (compute dtype)
    and of the gradients (float32 under mixed precision) on every rank while accumulating. Sharded: only each
    rank's float32 gradient shard persists. A no-op without FSDP (single process).
    """
    if is_sharded(model):
        keep_full = accumulating and not sharded
        model.set_requires_gradient_sync(not keep_full)
        model.set_reshard_after_backward(not keep_full)


def load_for_training(model_path: str, trust_remote_code: bool, device: torch.device, rank: int,
                      on_rank0_only: bool, compute_dtype: torch.dtype, cpu_offload: bool,
                      checkpointing: bool, lora=None) -> torch.nn.Module:
    """The model with float32 master weights, checkpointed and sharded as asked.

    With `on_rank0_only` and two or more ranks, rank 0 alone reads the weights (on the CPU); every rank builds the
    model on the meta device, shards it, allocates only its shards and receives them by broadcast
    (`set_model_state_dict(..., broadcast_from_rank0=True)`). Else every rank loads the whole model, then shards
    it: a full float32 copy per rank in host and device memory.

    LoRA: a `model_path` holding an adapter (an earlier iteration's export) is its base with that adapter, trained
    on; a whole model with `lora.rank` > 0 gets a fresh adapter (`training.lora`). Only the adapter is trainable.
    """
    path = local_model_path(model_path)
    base = adapter_base(path)
    weights = local_model_path(base) if base else path
    adapter = path if base else None
    if not (on_rank0_only and distributed_world() > 1):
        model = _with_adapter(load_model(weights, "float32", trust_remote_code), adapter, lora, model_path)
        return _prepare(hold_frozen_in(model, compute_dtype).to(device), compute_dtype, cpu_offload, checkpointing)
    from accelerate import init_empty_weights
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from transformers import AutoConfig, AutoModelForCausalLM

    full = {}
    if rank == 0:  # a fresh adapter's random A comes from here too, so every rank gets the same one
        full = _with_adapter(load_model(weights, "float32", trust_remote_code), adapter, lora, model_path).state_dict()
    model_config = AutoConfig.from_pretrained(weights, trust_remote_code=trust_remote_code)
    # parameters on the meta device, buffers real: the ones a checkpoint leaves out (rotary frequencies) are
    # computed at construction, and allocating the shards below would overwrite them
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.tie_weights()  # the meta-device hook made the tied head a parameter of its own
    model = hold_frozen_in(_with_adapter(model, adapter, lora, model_path, weights=False), compute_dtype)
    buffers = {name: value.clone() for name, value in model.named_buffers()}
    model = _prepare(model, compute_dtype, cpu_offload, checkpointing)
    model.to_empty(device="cpu" if cpu_offload else device)  # offloaded shards live on the CPU
    for name, value in buffers.items():  # buffers go on the compute device (nn.Module keeps their persistence)
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, leaf, value.to(device))
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                               cpu_offload=cpu_offload))
    return model


def hold_frozen_in(model: torch.nn.Module, compute_dtype: torch.dtype) -> torch.nn.Module:
    """With LoRA, hold the frozen base in the compute dtype; the adapters stay float32.

    A frozen weight takes no optimizer step, so float32 keeps nothing for it: in bf16 it is the weight the forward
    used anyway (FSDP2 gathers in bf16, autocast casts to it) and the one the engines serve (model.dtype), and it
    halves the base's memory and drops autocast's cast copies: the paper's 7B recipe on one A100-80G plans at 20 GiB
    instead of 48 (`spin-ray plan`, an estimate). Buffers (rotary tables) are not parameters and stay float32."""
    if compute_dtype == torch.float32 or not any(not p.requires_grad for p in model.parameters()):
        return model
    for parameter in model.parameters():
        if not parameter.requires_grad:
            parameter.data = parameter.data.to(compute_dtype)
    return model


def _with_adapter(model, adapter: str | None, lora, base: str, weights: bool = True):
    """`model` with the adapter saved in `adapter` (its weights only when `weights`: a meta-device model receives
    them by broadcast), or with a fresh one when `lora.rank` > 0, or as it is."""
    if adapter:
        return load_adapter(model, adapter) if weights else inject(model, saved_config(adapter))
    if lora is not None and lora.rank > 0:
        return inject(model, lora_config(lora, base))
    return model


def _prepare(model, compute_dtype, cpu_offload, checkpointing):
    model.config.use_cache = False
    if checkpointing:
        enable_activation_checkpointing(model)  # before fully_shard, as torchtitan orders them
    return apply_fsdp(model, compute_dtype, cpu_offload)
