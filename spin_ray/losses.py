"""Objectives and log-prob math in plain torch: sequence log-probs, SPIN (sigmoid/hinge/ipo) and SFT.

No Ray here: these functions run the same in a unit test, a single process, torchrun or a
Ray Train worker. Metric names follow DESIGN.md (TRL's with chosen/rejected renamed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SPIN_LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def gathered_logps(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under `logits` at each position ([..., V] and [...] -> [...]), as gather - logsumexp.

    Every log-prob in the project goes through here, so the engine's on-the-fly reference log-probs
    and the trainer's policy log-probs round the same way.
    """
    logits = logits.float()
    picked = torch.gather(logits, -1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs of `labels` under `logits`, shifted so position t is predicted at t-1.

    logits: [B, T, V]; labels: [B, T] token ids (the input ids); mask: [B, T], true on the
    tokens whose log-prob counts (response tokens). Returns (logps [B, T-1], mask [B, T-1]),
    with masked positions set to 0.
    """
    if logits.shape[:2] != labels.shape or labels.shape != mask.shape:
        raise ValueError(f"shape mismatch: logits {tuple(logits.shape)}, labels {tuple(labels.shape)}, mask {tuple(mask.shape)}")
    mask = mask[:, 1:].bool()
    # gather - logsumexp avoids materialising a full [B, T, V] log_softmax.
    logps = gathered_logps(logits[:, :-1], labels[:, 1:]) * mask
    return logps, mask


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, average: bool = False
) -> torch.Tensor:
    """Summed (or, with average=True, per-token mean) response log-prob of each sequence: [B]."""
    logps, mask = token_logps(logits, labels, mask)
    total = logps.sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1)
    return total


def spin_loss(
    policy_real_logps: torch.Tensor,
    policy_generated_logps: torch.Tensor,
    ref_real_logps: torch.Tensor,
    ref_generated_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SPIN per-pair losses and metrics: prefer the human answer (real) over the opponent's (generated).

    h = [lp(y) - lp_ref(y)] - [lp(y') - lp_ref(y')], the reference being the opponent p_t.
      sigmoid: -log sigmoid(beta * h)        (the paper's logistic loss; DPO with chosen = human)
      hinge:   max(0, 1 - beta * h)
      ipo:     (h - 1 / (2 * beta))^2         (IPO; pass per-token-averaged log-probs as IPO does)
    Metrics are batch means, detached.
    """
    real_ratio = policy_real_logps - ref_real_logps
    generated_ratio = policy_generated_logps - ref_generated_logps
    h = real_ratio - generated_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown SPIN loss_type {loss_type!r}; choose one of {SPIN_LOSS_TYPES}")
    real_rewards = (beta * real_ratio).detach()
    generated_rewards = (beta * generated_ratio).detach()
    metrics = {
        "loss": losses.detach().mean(),
        "rewards/real": real_rewards.mean(),
        "rewards/generated": generated_rewards.mean(),
        "rewards/margins": (real_rewards - generated_rewards).mean(),
        "rewards/accuracies": (real_rewards > generated_rewards).float().mean(),
        "logps/real": policy_real_logps.detach().mean(),
        "logps/generated": policy_generated_logps.detach().mean(),
    }
    return losses, metrics


def sft_loss(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-averaged negative log-likelihood of the human response (prompt and padding masked)."""
    logps, mask = token_logps(logits, labels, mask)
    tokens = mask.sum()
    if tokens == 0:
        raise ValueError("sft_loss: the mask selects no response tokens")
    loss = -logps.sum() / tokens
    return loss, {"loss": loss.detach(), "nll": loss.detach(), "tokens": tokens.detach().float()}
