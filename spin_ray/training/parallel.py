"""FSDP2: shard each decoder layer, then the root, as torchtitan does."""

from __future__ import annotations

import torch
import torch.distributed as dist


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


def apply_fsdp(model: torch.nn.Module, reshard_after_forward: bool = True) -> torch.nn.Module:
    """fully_shard per decoder layer, then the root (embeddings, final norm, head) when a process group exists.

    Per-layer units keep only one layer's full parameters alive at a time. Without a process group,
    or with a group of one (nothing to shard), the model is returned unchanged: FSDP's DTensor
    parameters and per-layer copies add work to every step and save no memory there.
    The distributed checkpoints load either way (DCP reshards to whatever layout loads them).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return model
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    return model


def set_accumulating(model: torch.nn.Module, accumulating: bool) -> None:
    """During gradient accumulation keep gradients and parameters unsharded between micro-batches.

    FSDP2 would otherwise reduce-scatter the gradients after every micro-batch and all-gather the
    parameters again before the next: with k micro-batches per step that is 2k collectives of the
    whole model instead of 2 (one all-gather, one reduce-scatter). The cost is one full copy of the
    parameters and gradients per rank while accumulating. A no-op without FSDP (single process).
    """
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(not accumulating)
        model.set_reshard_after_backward(not accumulating)
