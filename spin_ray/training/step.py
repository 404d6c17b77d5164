"""One forward/loss/backward step of the main player, in plain torch (no Ray, no process group needed)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spin_ray.losses import gathered_logps, sequence_logps, sft_loss, spin_loss
from spin_ray.tokenization import collate_sequences


def concatenated_logps(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    reals: Sequence[Sequence[int]],
    generateds: Sequence[Sequence[int]],
    pad_id: int,
    average: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy log-probs of real and generated responses from ONE forward pass over both halves.

    One pass instead of two halves the kernel launches and, under FSDP, the all-gathers.
    """
    batch = _on_model_device(model, collate_sequences([*prompts, *prompts], [*reals, *generateds], pad_id))
    logps = response_logps(model, batch, average)
    return logps[: len(prompts)], logps[len(prompts) :]


def response_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], average: bool = False) -> torch.Tensor:
    """Summed response log-probs of a collated batch, with the LM head applied only where it counts.

    The vocabulary projection is the largest single matmul of a small model (49k x 576 of
    SmolLM2's 135M parameters) and its [B, T, V] output the largest tensor. Logits are computed
    only for the columns from the first response token to the last (`logits_to_keep` with an index
    tensor; the values are the same as from the full projection), so shared prompt columns and the
    trailing padding cost nothing there. Models without `logits_to_keep` get the full projection.
    """
    mask = batch["loss_mask"]
    columns = mask.any(0).nonzero().flatten()
    if columns.numel() == 0:
        return torch.zeros(mask.shape[0], device=mask.device)
    # logits at position t predict token t+1: keep positions first_response-1 .. last_response-1
    keep = torch.arange(int(columns[0]) - 1, int(columns[-1]), device=mask.device)
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    except TypeError:  # no logits_to_keep in this model's forward
        return sequence_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              batch["input_ids"], mask, average=average)
    labels = batch["input_ids"][:, keep + 1]
    kept_mask = mask[:, keep + 1]
    logps = gathered_logps(logits, labels) * kept_mask
    total = logps.sum(-1)
    return total / kept_mask.sum(-1).clamp(min=1) if average else total


def _on_model_device(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {key: value.to(device) for key, value in batch.items()}


def spin_step_loss(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    reals: Sequence[Sequence[int]],
    generateds: Sequence[Sequence[int]],
    ref_real_logps: torch.Tensor,
    ref_generated_logps: torch.Tensor,
    pad_id: int,
    beta: float,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean SPIN loss of a micro-batch (ready for backward) and its metrics."""
    average = loss_type == "ipo"  # IPO is defined on per-token averaged log-probs
    policy_real, policy_generated = concatenated_logps(model, prompts, reals, generateds, pad_id, average)
    losses, metrics = spin_loss(policy_real, policy_generated, ref_real_logps, ref_generated_logps, beta, loss_type)
    return losses.mean(), metrics


def sft_step_loss(
    model: torch.nn.Module, prompts: Sequence[Sequence[int]], reals: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-averaged NLL of the human responses of a micro-batch."""
    batch = collate_sequences(prompts, reals, pad_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sft_loss(logits, batch["input_ids"], batch["loss_mask"])


@torch.no_grad()
def reference_logps(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 8,
    average: bool = False,
) -> torch.Tensor:
    """Forward-only log-probs of responses under a frozen model (the opponent p_t): [N]."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = collate_sequences(prompts[start : start + batch_size], responses[start : start + batch_size], pad_id)
        out.append(response_logps(model, _on_model_device(model, batch), average).cpu())
    model.train(was_training)
    return torch.cat(out)
