"""Attention for packed rows: each sequence attends causally within itself (a shared prompt's answers to it and
themselves), no T x T mask: SDPA per sequence, or one FlashAttention-2 varlen call over the row."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

PACKED_SDPA = "spin_ray_packed_sdpa"
PACKED_VARLEN = "spin_ray_packed_varlen"
PACKED_IMPLEMENTATIONS = {"sdpa": PACKED_SDPA, "flash_varlen": PACKED_VARLEN}
# Decoder attention of these model types runs through transformers' AttentionInterface with no extra
# masking of its own, so swapping the implementation name swaps the kernel and nothing else.
PACKED_SDPA_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def packed_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, sequence_bounds: Sequence[tuple[int, ...]] | None = None,
                          **kwargs) -> tuple[torch.Tensor, None]:
    """SDPA run segment by segment over a packed row: query/key/value [1, heads, T, head_dim], outputs concatenated to
    [1, T, heads, head_dim]. The segments of `sequence_bounds` tile the row in order:

      (start, end)                        a sequence: rows [start, end) attend causally among themselves
      (start, end, prefix_start, prefix_end)  an answer sharing a prompt: rows [start, end) attend to all of the
                                          prompt's rows [prefix_start, prefix_end) and causally among themselves,
                                          never to the answers between (prefix-shared pairs)

    transformers' own SDPA path over a packed row builds a block-diagonal T x T mask and computes all
    of it, so packing paid for the padding it removed with attention across sequences (T^2 instead of
    the sum of the squared lengths). Here each sequence costs its own causal triangle, as with
    flash-attention's varlen kernels on GPU.
    """
    from torch.nn.attention.bias import causal_lower_right
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if sequence_bounds is None:  # not a packed forward: plain SDPA with whatever mask came
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    outputs = []
    for start, end, *prefix in sequence_bounds:
        if not prefix:
            outputs.append(sdpa_attention_forward(module, query[:, :, start:end], key[:, :, start:end],
                                                  value[:, :, start:end], None, is_causal=True, **kwargs)[0])
            continue
        first, last = prefix
        keys = torch.cat([key[:, :, first:last], key[:, :, start:end]], dim=2)
        values = torch.cat([value[:, :, first:last], value[:, :, start:end]], dim=2)
        # row i of the answer sees every prompt column and answer columns <= i: the causal mask aligned to the lower
        # right corner. As torch's CausalBias (not a bool tensor) SDPA may still take a fused kernel for it (the
        # memory-efficient one on GPUs); an explicit mask rules out the flash kernel and costs a T x T tensor.
        allowed = causal_lower_right(end - start, last - first + end - start)
        queries = query[:, :, start:end]
        if torch.is_autocast_enabled(query.device.type):  # CausalBias checks dtypes before autocast would cast them
            common = torch.get_autocast_dtype(query.device.type)
            queries, keys, values = queries.to(common), keys.to(common), values.to(common)
        outputs.append(sdpa_attention_forward(module, queries, keys, values, allowed,
                                              is_causal=False, **kwargs)[0])
    return torch.cat(outputs, dim=1), None


def varlen_segments(bounds: Sequence[tuple[int, ...]], device: torch.device | None = None):
    """A packed row's segments (`packed_sdpa_attention`'s) as varlen inputs: the key rows each segment attends to
    (a shared prompt's rows, then its own), and the cumulative query and key lengths with their maxima. The queries
    are the row itself: its segments tile it in order."""
    key_rows, query_lengths, key_lengths = [], [], []
    for start, end, *prefix in bounds:
        rows = list(range(prefix[0], prefix[1])) if prefix else []
        key_rows += rows + list(range(start, end))
        query_lengths.append(end - start)
        key_lengths.append(len(rows) + end - start)

    def cumulative(lengths):
        return torch.tensor([0, *lengths], dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)

    return (torch.tensor(key_rows, device=device), cumulative(query_lengths), cumulative(key_lengths),
            max(query_lengths), max(key_lengths))


def packed_varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None,
                            sequence_bounds: Sequence[tuple[int, ...]] | None = None, varlen=None,
                            **kwargs) -> tuple[torch.Tensor, None]:
    """The segments of `packed_sdpa_attention` in one FlashAttention-2 varlen call (torch.nn.attention.varlen, CUDA):
    each segment's queries against its keys, causal aligned to the lower right (a shared prompt's answer sees all of
    the prompt). query/key/value [1, heads, T, head_dim]; out [1, T, heads, head_dim]. `varlen` stands in for the
    kernel (same signature) where it cannot run."""
    if sequence_bounds is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if varlen is None:
        from torch.nn.attention.varlen import varlen_attn as varlen
    key_rows, cu_query, cu_key, longest_query, longest_key = varlen_segments(sequence_bounds, query.device)
    queries, keys, values = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, heads, head_dim]
    if torch.is_autocast_enabled(query.device.type):  # the kernel takes one dtype; autocast would not cast for it
        common = torch.get_autocast_dtype(query.device.type)
        queries, keys, values = queries.to(common), keys.to(common), values.to(common)
    out = varlen(queries, keys[key_rows], values[key_rows], cu_query, cu_key, longest_query, longest_key,
                 scale=kwargs.get("scaling"), window_size=(-1, 0), enable_gqa=queries.shape[1] != keys.shape[1])
    return out.unsqueeze(0), None


def use_packed_kernel(model: torch.nn.Module, kernel: str) -> torch.nn.Module:
    """Choose the kernel `packed_attention` routes `model`'s packed rows through (training.attention: sdpa or
    flash_varlen); flash_varlen is refused in one line where torch has no FlashAttention-2 kernel for the device."""
    if kernel == "flash_varlen":
        device = next(model.parameters()).device
        capable = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)
        if not capable:
            raise ValueError(f"training.attention flash_varlen: torch's FlashAttention-2 kernels need an sm80+ CUDA "
                             f"GPU, and this worker's model is on {device}"
                             + (f" (sm{''.join(map(str, torch.cuda.get_device_capability(device)))})"
                                if device.type == "cuda" else "") + "; set training.attention=sdpa")
    model.packed_attention_kernel = kernel
    return model


def packed_sdpa_supported(model: torch.nn.Module, longest: int) -> bool:
    """True when `model` runs SDPA attention that the packed kernel can stand in for: a known model type,
    and no sliding window shorter than the longest sequence (the per-sequence calls are plain causal)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in PACKED_SDPA_MODEL_TYPES:
        return False
    if config._attn_implementation not in ("sdpa", *PACKED_IMPLEMENTATIONS.values()):
        return False  # eager was asked for on purpose; flash-attention handles packed rows itself
    window = getattr(config, "sliding_window", None)
    windowed = getattr(config, "use_sliding_window", window is not None)
    return not (windowed and window is not None and longest > window)


def sequence_bounds(lengths: Sequence[int]) -> list[tuple[int, int]]:
    """The (start, end) segments of sequences of `lengths` packed one after another."""
    bounds, start = [], 0
    for length in lengths:
        bounds.append((start, start + length))
        start += length
    return bounds


@contextlib.contextmanager
def packed_attention(model: torch.nn.Module, lengths: Sequence[int],
                     bounds: Sequence[tuple[int, ...]] | None = None) -> Iterator[dict]:
    """During one forward over a row packing sequences of `lengths` (or the segments `bounds`, see
    `packed_sdpa_attention`; `lengths` then the longest context a query sees), route the model's attention through
    `packed_sdpa_attention`. Yields the extra forward kwargs (the segments; empty when the model keeps its own
    attention). The model's implementation is restored afterwards."""
    if not packed_sdpa_supported(model, max(lengths, default=0)):
        yield {}
        return
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)  # idempotent: a dict entry
    AttentionInterface.register(PACKED_VARLEN, packed_varlen_attention)
    bounds = list(bounds) if bounds is not None else sequence_bounds(lengths)
    config = model.config
    previous = config._attn_implementation
    # An implementation with no registered mask function gets no mask built: no T x T tensor either.
    config._attn_implementation = PACKED_IMPLEMENTATIONS[getattr(model, "packed_attention_kernel", "sdpa")]
    try:
        yield {"sequence_bounds": bounds}
    finally:
        config._attn_implementation = previous
