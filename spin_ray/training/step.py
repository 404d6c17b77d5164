"""One forward/loss/backward step of the main player, in plain torch (no Ray, no process group needed)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spin_ray.losses import gathered_logps, linear_token_logps, sequence_logps, sft_loss, spin_loss, sppo_loss, tspin_loss
from spin_ray.tokenization import collate_sequences
from spin_ray.training.attention import packed_attention


def concatenated_logps(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    reals: Sequence[Sequence[int]],
    generateds: Sequence[Sequence[int]],
    pad_id: int,
    average: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Policy log-probs of real and generated responses from ONE forward pass over both halves."""
    logps = answer_logps(model, prompts, [(r, g) for r, g in zip(reals, generateds, strict=True)], pad_id, average)
    return logps[:, 0], logps[:, 1]


def answer_logps(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[Sequence[int]]],
    pad_id: int,
    average: bool = False,
    pack: bool = False,
    logits_chunk_rows: int = 0,
) -> torch.Tensor:
    """Policy log-probs [B, n] of each prompt's n answers (a pair, or T-SPIN's triplet) from ONE forward pass.

    One pass instead of n halves the kernel launches and, under FSDP, the all-gathers. With `pack`
    the sequences are concatenated into one row without padding (see `packed_response_logps`); with
    `logits_chunk_rows` > 0 the LM head runs chunk by chunk (see `linear_token_logps`).
    """
    n = len(answers[0])
    if any(len(group) != n for group in answers):
        raise ValueError("every example of a micro-batch must have the same number of answers")
    # answer-major order: all first answers, then all second answers, ...
    flat_prompts = [p for _ in range(n) for p in prompts]
    flat_answers = [group[k] for k in range(n) for group in answers]
    if pack:
        logps = packed_response_logps(model, flat_prompts, flat_answers, average, logits_chunk_rows)
    else:
        logps = response_logps(model, _on_model_device(model, collate_sequences(flat_prompts, flat_answers, pad_id)),
                               average, logits_chunk_rows)
    return logps.view(n, len(prompts)).T


def pack_sequences(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """All prompt+response sequences concatenated into ONE row, no padding: input_ids and position_ids
    [1, T] (positions restart at 0 for each sequence), loss_mask [1, T] (response tokens) and
    sequence [T] (which sequence each token belongs to)."""
    ids, positions, mask, sequence = [], [], [], []
    for number, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        length = len(prompt) + len(response)
        ids += [*prompt, *response]
        positions += range(length)
        mask += [False] * len(prompt) + [True] * len(response)
        sequence += [number] * length
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions]),
            "loss_mask": torch.tensor([mask]), "sequence": torch.tensor(sequence)}


def packed_response_logps(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                          responses: Sequence[Sequence[int]], average: bool = False,
                          logits_chunk_rows: int = 0) -> torch.Tensor:
    """Summed (or mean) response log-probs [N] of N sequences packed into one row.

    Positions restart per sequence and attention stays inside each one, so the values equal the
    padded path's. No FLOPs go to padding, and the LM head runs only at the positions that predict a
    response token. For SDPA models attention runs sequence by sequence (`packed_attention`), each
    costing its own causal triangle; other models get transformers' handling of packed position_ids
    (a block-diagonal mask, or flash-attention's varlen kernels).
    """
    packed = pack_sequences(prompts, responses)
    device = next(model.parameters()).device
    mask = packed["loss_mask"][0].to(device)
    targets = mask.nonzero().flatten()  # every response token; its predictor sits one position earlier
    inputs = {"input_ids": packed["input_ids"].to(device), "position_ids": packed["position_ids"].to(device),
              "attention_mask": None, "use_cache": False, "logits_to_keep": targets - 1}
    tokens = packed["input_ids"][0].to(device)[targets]
    with packed_attention(model, [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]) as extra:
        token_lps = _kept_token_logps(model, {**inputs, **extra}, torch.arange(len(targets), device=device), tokens,
                                      logits_chunk_rows)
    owner = packed["sequence"].to(device)[targets]
    total = torch.zeros(len(prompts), dtype=token_lps.dtype, device=device).index_add(0, owner, token_lps)
    if average:
        counts = torch.bincount(owner, minlength=len(prompts)).clamp(min=1)
        return total / counts
    return total


def response_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], average: bool = False,
                   logits_chunk_rows: int = 0) -> torch.Tensor:
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
    kept_mask = mask[:, keep + 1]
    # only the response tokens count: rows of the flattened [B, K] kept positions
    rows = kept_mask.flatten().nonzero().flatten()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "logits_to_keep": keep}
    try:
        token_lps = _kept_token_logps(model, inputs, rows, batch["input_ids"][:, keep + 1].flatten()[rows],
                                      logits_chunk_rows)
    except TypeError:  # no logits_to_keep in this model's forward
        return sequence_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              batch["input_ids"], mask, average=average)
    total = torch.zeros(mask.shape[0], dtype=token_lps.dtype, device=mask.device).index_add(
        0, rows // len(keep), token_lps)
    return total / kept_mask.sum(-1).clamp(min=1) if average else total


# Causal LMs whose forward ends in exactly `logits = self.lm_head(hidden_states[:, logits_to_keep])`: no
# logit scaling or soft-capping after the head, so the head can be swapped for `_TokenLogpsHead`.
CHUNKED_HEAD_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def chunked_head_supported(model: torch.nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return (getattr(getattr(model, "config", None), "model_type", None) in CHUNKED_HEAD_MODEL_TYPES
            and isinstance(head, torch.nn.Linear) and head.bias is None)


class _TokenLogpsHead(torch.nn.Module):
    """Stands in for the LM head during one forward: returns log p(token) at the chosen rows of the
    flattened kept positions instead of logits. It reads the real head's weight at call time, so under
    FSDP2 it gets the unsharded parameter the root module gathered for this forward."""

    def __init__(self, head: torch.nn.Linear, rows: torch.Tensor, tokens: torch.Tensor, chunk_rows: int):
        super().__init__()
        self.head, self.rows, self.tokens, self.chunk_rows = head, rows, tokens, chunk_rows

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.rows)
        return linear_token_logps(flat, self.head.weight, self.tokens, self.chunk_rows)


def _kept_token_logps(model: torch.nn.Module, inputs: dict, rows: torch.Tensor, tokens: torch.Tensor,
                      chunk_rows: int) -> torch.Tensor:
    """log p(tokens) at `rows` of the flattened [B, K] positions kept by inputs["logits_to_keep"]: through
    the chunked head when `chunk_rows` > 0 and the model allows it, else from the full logits."""
    if not (chunk_rows and chunked_head_supported(model)):
        logits = model(**inputs).logits
        return gathered_logps(logits.reshape(-1, logits.shape[-1]).index_select(0, rows), tokens)
    # the model runs with its LM head swapped for `_TokenLogpsHead`; the real head is back afterwards
    head = model.get_output_embeddings()
    model.set_output_embeddings(_TokenLogpsHead(head, rows, tokens, chunk_rows))
    try:
        return model(**inputs).logits
    finally:
        model.set_output_embeddings(head)


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


def example_losses(
    objective: str,
    policy: torch.Tensor,
    refs: torch.Tensor | None,
    win_rates: torch.Tensor | None,
    config,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-example losses and metrics of a self-play objective, from the answers' policy log-probs [B, n]
    (and reference log-probs [B, n] and SPPO win rates [B, 2] where the objective has them)."""
    if objective == "spin":
        t = config.training
        return spin_loss(policy[:, 0], policy[:, 1], refs[:, 0], refs[:, 1], t.beta, t.loss_type)
    if objective == "sppo":
        return sppo_loss(policy[:, 0], policy[:, 1], refs[:, 0], refs[:, 1], win_rates[:, 0], win_rates[:, 1],
                         config.sppo.beta)
    if objective == "tspin":
        ref = (None, None, None) if refs is None else (refs[:, 0], refs[:, 1], refs[:, 2])
        return tspin_loss(policy[:, 0], policy[:, 1], policy[:, 2], *ref, alpha=config.tspin.alpha,
                          reward_scale=config.tspin.reward_scale)
    raise ValueError(f"unknown self-play objective {objective!r}")


def averages_logps(objective: str, config) -> bool:
    """Whether an objective works on per-token mean log-probs (IPO, length-normalised T-SPIN) rather than sums."""
    return (objective == "spin" and config.training.loss_type == "ipo") or (
        objective == "tspin" and config.tspin.length_normalize)


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
