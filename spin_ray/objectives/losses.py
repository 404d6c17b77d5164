"""Objectives in plain torch: SPIN (sigmoid/hinge/ipo), SPPO, T-SPIN and SFT, a loss per example plus named metrics.

No Ray here: these functions run the same in a unit test, a single process, torchrun or a Ray Train
worker. Inputs are summed answer log-probs (`spin_ray.objectives.logprobs`). Metric names are TRL's with
chosen/rejected renamed (real/generated, winner/loser).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SPIN_LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def spin_loss(
    policy_real_logps: torch.Tensor,
    policy_generated_logps: torch.Tensor,
    ref_real_logps: torch.Tensor,
    ref_generated_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    real_tokens: torch.Tensor | None = None,
    generated_tokens: torch.Tensor | None = None,
    nll_weight: float = 0.0,
    dpop_lambda: float = 0.0,
    length_normalize: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SPIN per-pair losses and metrics: prefer the human answer (real) over the opponent's (generated).

    With r = lp(y) - lp_ref(y) and g = lp(y') - lp_ref(y'), the reference being the opponent p_t,
    h = r - g - lambda * max(0, -r):
      sigmoid: -log sigmoid(beta * h)        (the paper's logistic loss; DPO with chosen = human)
      hinge:   max(0, 1 - beta * h)
      ipo:     (h_tok - 1 / (2 * beta))^2     h_tok: h with each log-ratio divided by its answer's token count
                                              (`real_tokens`, `generated_tokens`), as TRL and the IPO authors do
    Stabilisers (all off by default, the paper's SPIN):
      length_normalize: r and g divided by their answers' token counts (LN-DPO), so a long answer
                        earns no reward for its length;
      dpop_lambda:      DPOP's penalty (arXiv 2402.13228): lambda * max(0, lp_ref(y) - lp(y)) inside the
                        sigmoid, so lowering the human answer's likelihood below the opponent's costs;
      nll_weight:       RPO's term (arXiv 2404.19733), alpha * (-lp(y) / |y|) added to each pair's loss.
    Log-probs are sums over the answer's tokens in every mode, so the rewards, beta x summed log-ratio,
    mean the same thing whatever the loss (TRL's rewards/chosen). Metrics are batch means, detached.
    """
    needs_lengths = loss_type == "ipo" or length_normalize or nll_weight > 0
    if needs_lengths and (real_tokens is None or generated_tokens is None):
        raise ValueError("spin_loss: ipo, length_normalize and nll_weight need real_tokens and generated_tokens "
                         "(answer lengths)")
    real_ratio = policy_real_logps - ref_real_logps
    generated_ratio = policy_generated_logps - ref_generated_logps
    if loss_type == "ipo" or length_normalize:
        real_margin = real_ratio / real_tokens.clamp(min=1)
        generated_margin = generated_ratio / generated_tokens.clamp(min=1)
    else:
        real_margin, generated_margin = real_ratio, generated_ratio
    penalty = dpop_lambda * torch.relu(-real_margin)
    h = real_margin - generated_margin - penalty
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
        "rewards/real": real_rewards.mean(),
        "rewards/generated": generated_rewards.mean(),
        "rewards/margins": (real_rewards - generated_rewards).mean(),
        "rewards/accuracies": (real_rewards > generated_rewards).float().mean(),
        "logps/real": policy_real_logps.detach().mean(),
        "logps/generated": policy_generated_logps.detach().mean(),
    }
    if dpop_lambda > 0:
        metrics["dpop/penalty"] = penalty.detach().mean()
    losses = _with_nll(losses, policy_real_logps, real_tokens, nll_weight, metrics)
    return losses, {"loss": losses.detach().mean(), **metrics}


def _with_nll(losses: torch.Tensor, policy_real_logps: torch.Tensor, real_tokens: torch.Tensor | None,
              nll_weight: float, metrics: dict[str, torch.Tensor]) -> torch.Tensor:
    """RPO's NLL term: alpha times the human answer's per-token NLL, added to each example's loss."""
    if nll_weight <= 0:
        return losses
    nll = -policy_real_logps / real_tokens.clamp(min=1)
    metrics["nll/real"] = nll.detach().mean()
    return losses + nll_weight * nll


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
    reward_scale: float = 1.0,
    historical_weight: float = 0.1,
    nll_weight: float = 0.0,
    real_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """T-SPIN per-triplet losses (arXiv 2601.08198, Eq. 7 and Appendix D) and metrics.

    Triplet: human answer y, current synthetic y_t (from p_t), proto-synthetic y_0 (from the initial
    model, the same in every iteration). Reward r(y) = alpha * lp(y) (the paper's reference-free reward,
    alpha = `reward_scale`, 1.0 in the paper), or alpha * (lp(y) - lp_t(y)) when reference log-probs are
    given (pass all three or none; the paper's weaker ablation). Pass per-token mean log-probs for the
    length-normalised variant. With beta = `historical_weight` (0.1 in the paper):
      loss = -log sigmoid(r(y) - r(y_t))  -  beta * log sigmoid(r(y_t) - r(y_0))
             current advantage               historical advantage
    The historical term keeps a signal when y_t has become as likely as y (SPIN's vanishing advantage).
    `nll_weight` adds RPO's alpha * (-lp(y) / |y|) per triplet (`real_tokens`: the human answers' lengths;
    `policy_real_logps` summed, as everywhere).
    """
    if nll_weight > 0 and real_tokens is None:
        raise ValueError("tspin_loss: nll_weight needs real_tokens")
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
    losses = current + historical_weight * historical
    metrics = {
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
    losses = _with_nll(losses, policy_real_logps, real_tokens, nll_weight, metrics)
    return losses, {"loss": losses.detach().mean(), **metrics}


def sft_loss(
    policy_real_logps: torch.Tensor, real_tokens: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SFT: per-example summed negative log-likelihood of the human answer, -lp(y); the trainer divides the
    global batch's sum by its answer tokens, so a step minimises the token-averaged NLL. Metrics: `nll`
    (per token, this batch) and `loss` (its per-example mean NLL sum)."""
    tokens = real_tokens.sum()
    if tokens == 0:
        raise ValueError("sft_loss: the answers have no tokens")
    losses = -policy_real_logps
    nll = losses.detach().sum() / tokens
    return losses, {"loss": losses.detach().mean(), "nll": nll, "logps/real": policy_real_logps.detach().mean()}
