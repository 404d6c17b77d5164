"""Objectives and log-prob math in plain torch: sequence log-probs, SPIN (sigmoid/hinge/ipo), SPPO, T-SPIN and SFT.

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


class _LinearTokenLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[token] per row, in row chunks; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, chunk_rows):
        accumulate = torch.promote_types(hidden.dtype, torch.float32)  # fp32 for bf16/fp32 models
        out = torch.empty(hidden.shape[0], dtype=accumulate, device=hidden.device)
        lse = torch.empty_like(out)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = (hidden[rows] @ weight.T).to(accumulate)
            lse[rows] = torch.logsumexp(logits, dim=-1)
            out[rows] = torch.gather(logits, -1, tokens[rows].unsqueeze(-1)).squeeze(-1) - lse[rows]
        ctx.save_for_backward(hidden, weight, tokens, lse)
        ctx.chunk_rows = chunk_rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, tokens, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            g = grad_out[rows].to(lse.dtype).unsqueeze(-1)
            # d logp[token] / d logits = onehot(token) - softmax(logits)
            grad_logits = (hidden[rows] @ weight.T).to(lse.dtype).sub_(lse[rows].unsqueeze(-1)).exp_().mul_(-g)
            grad_logits.scatter_add_(-1, tokens[rows].unsqueeze(-1), g)
            grad_logits = grad_logits.to(weight.dtype)
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, hidden[rows])
        return grad_hidden, grad_weight, None, None


def linear_token_logps(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, chunk_rows: int) -> torch.Tensor:
    """log p(token) per row of `hidden` [N, d] under an LM head `weight` [V, d], in fp32, without ever
    holding the [N, V] logits: rows go through the head `chunk_rows` at a time, and backward recomputes
    each chunk's logits from the saved hidden states (one extra head matmul per chunk).

    The same values as `gathered_logps(hidden @ weight.T, tokens)`. What it saves is memory traffic:
    on a 49k vocabulary a micro-batch's full logits, their log-softmax and their gradient are
    hundreds of MB each, which glibc hands back to the kernel after every step (page faults on the
    next); chunks under 32 MB are reused from the heap. On GPU the peak memory drops by the same size.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return _LinearTokenLogps.apply(hidden, weight, tokens.clamp(min=0), chunk_rows)


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


def sppo_loss(
    policy_winner_logps: torch.Tensor,
    policy_loser_logps: torch.Tensor,
    ref_winner_logps: torch.Tensor,
    ref_loser_logps: torch.Tensor,
    winner_win_rates: torch.Tensor,
    loser_win_rates: torch.Tensor,
    beta: float = 0.001,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SPPO per-prompt losses (arXiv 2405.00675, as in uclaml/SPPO) and metrics.

    With a = lp(y_w) - lp_t(y_w), b = lp(y_l) - lp_t(y_l) and eta = 1/beta, each log-ratio is
    regressed onto eta * (P_hat - 1/2), its response's estimated win rate against the opponent:
      loss = ((a - eta (P_w - 1/2))^2 + (b - eta (P_l - 1/2))^2) / 2
    Equal win rates give targets of 0 for both. Rewards are beta * log-ratio, as in SPIN.
    """
    eta = 1.0 / beta
    winner_ratio = policy_winner_logps - ref_winner_logps
    loser_ratio = policy_loser_logps - ref_loser_logps
    winner_target = eta * (winner_win_rates - 0.5)
    loser_target = eta * (loser_win_rates - 0.5)
    losses = ((winner_ratio - winner_target) ** 2 + (loser_ratio - loser_target) ** 2) / 2
    winner_rewards = (beta * winner_ratio).detach()
    loser_rewards = (beta * loser_ratio).detach()
    metrics = {
        "loss": losses.detach().mean(),
        "rewards/winner": winner_rewards.mean(),
        "rewards/loser": loser_rewards.mean(),
        "rewards/margins": (winner_rewards - loser_rewards).mean(),
        "rewards/accuracies": (winner_rewards > loser_rewards).float().mean(),
        "logps/winner": policy_winner_logps.detach().mean(),
        "logps/loser": policy_loser_logps.detach().mean(),
        "win_rate/winner": winner_win_rates.detach().float().mean(),
        "win_rate/loser": loser_win_rates.detach().float().mean(),
    }
    return losses, metrics


def tspin_loss(
    policy_real_logps: torch.Tensor,
    policy_generated_logps: torch.Tensor,
    policy_proto_logps: torch.Tensor,
    ref_real_logps: torch.Tensor | None = None,
    ref_generated_logps: torch.Tensor | None = None,
    ref_proto_logps: torch.Tensor | None = None,
    alpha: float = 1.0,
    reward_scale: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """T-SPIN per-triplet losses (arXiv 2601.08198, in the form DESIGN.md gives) and metrics.

    Triplet: human answer y, current synthetic y_t (from p_t), proto-synthetic y_0 (from the initial
    model, the same in every iteration). Reward r(y) = lambda * lp(y), or lambda * (lp(y) - lp_t(y))
    when reference log-probs are given (pass all three or none). Pass per-token mean log-probs for
    the length-normalised variant.
      loss = -log sigmoid(r(y) - r(y_t))  -  alpha * log sigmoid(r(y_t) - r(y_0))
             current advantage               historical advantage
    The historical term keeps a signal when y_t has become as likely as y (SPIN's vanishing advantage).
    """
    refs = (ref_real_logps, ref_generated_logps, ref_proto_logps)
    if any(r is None for r in refs) and not all(r is None for r in refs):
        raise ValueError("tspin_loss: pass all three reference log-probs or none (reference-free)")
    if ref_real_logps is None:
        real, generated, proto = policy_real_logps, policy_generated_logps, policy_proto_logps
    else:
        real = policy_real_logps - ref_real_logps
        generated = policy_generated_logps - ref_generated_logps
        proto = policy_proto_logps - ref_proto_logps
    real_rewards, generated_rewards, proto_rewards = reward_scale * real, reward_scale * generated, reward_scale * proto
    current = -F.logsigmoid(real_rewards - generated_rewards)
    historical = -F.logsigmoid(generated_rewards - proto_rewards)
    losses = current + alpha * historical
    metrics = {
        "loss": losses.detach().mean(),
        "loss/current": current.detach().mean(),
        "loss/historical": historical.detach().mean(),
        "rewards/real": real_rewards.detach().mean(),
        "rewards/generated": generated_rewards.detach().mean(),
        "rewards/proto": proto_rewards.detach().mean(),
        "rewards/margins": (real_rewards - generated_rewards).detach().mean(),
        "rewards/historical_margins": (generated_rewards - proto_rewards).detach().mean(),
        "rewards/accuracies": (real_rewards > generated_rewards).float().mean(),
        "logps/real": policy_real_logps.detach().mean(),
        "logps/generated": policy_generated_logps.detach().mean(),
        "logps/proto": policy_proto_logps.detach().mean(),
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
