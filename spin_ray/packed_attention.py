"""Attention for packed rows on SDPA: each sequence attends causally within itself, no T x T mask."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

PACKED_SDPA = "spin_ray_packed_sdpa"
# Decoder attention of these model types runs through transformers' AttentionInterface with no extra
# masking of its own, so swapping the implementation name swaps the kernel and nothing else.
PACKED_SDPA_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def packed_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, sequence_bounds: Sequence[tuple[int, int]] | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """SDPA run sequence by sequence over a packed row: query/key/value [1, heads, T, head_dim], one causal
    call per [start, end) of `sequence_bounds`, outputs concatenated to [1, T, heads, head_dim].

    transformers' own SDPA path over a packed row builds a block-diagonal T x T mask and computes all
    of it, so packing paid for the padding it removed with attention across sequences (T^2 instead of
    the sum of the squared lengths). Here each sequence costs its own causal triangle, as with
    flash-attention's varlen kernels on GPU.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if sequence_bounds is None:  # not a packed forward: plain SDPA with whatever mask came
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    outputs = [sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end],
                                      None, is_causal=True, **kwargs)[0] for start, end in sequence_bounds]
    return torch.cat(outputs, dim=1), None


def packed_sdpa_supported(model: torch.nn.Module, longest: int) -> bool:
    """True when `model` runs SDPA attention that the packed kernel can stand in for: a known model type,
    and no sliding window shorter than the longest sequence (the per-sequence calls are plain causal)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in PACKED_SDPA_MODEL_TYPES:
        return False
    if config._attn_implementation not in ("sdpa", PACKED_SDPA):
        return False  # eager was asked for on purpose; flash-attention handles packed rows itself
    window = getattr(config, "sliding_window", None)
    windowed = getattr(config, "use_sliding_window", window is not None)
    return not (windowed and window is not None and longest > window)


@contextlib.contextmanager
def packed_attention(model: torch.nn.Module, lengths: Sequence[int]) -> Iterator[dict]:
    """During one forward over a row packing sequences of `lengths`, route the model's attention through
    `packed_sdpa_attention`. Yields the extra forward kwargs (the sequence bounds; empty when the model
    keeps its own attention). The model's implementation is restored afterwards."""
    if not packed_sdpa_supported(model, max(lengths, default=0)):
        yield {}
        return
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)  # idempotent: a dict entry
    bounds, start = [], 0
    for length in lengths:
        bounds.append((start, start + length))
        start += length
    config = model.config
    previous = config._attn_implementation
    # An implementation with no registered mask function gets no mask built: no T x T tensor either.
    config._attn_implementation = PACKED_SDPA
    try:
        yield {"sequence_bounds": bounds}
    finally:
        config._attn_implementation = previous
