"""Log-prob math in plain torch for generation and training: token and answer log-probs, packing, the chunked LM head.

No Ray here. Every log-prob in the project goes through `gathered_logps` (or its chunked twin
`linear_token_logps`), so the engine's on-the-fly reference log-probs, the reference scorer and the
trainer's policy log-probs round the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from spin_ray.objectives.packed_attention import packed_attention, packed_sdpa_supported


def collate_sequences(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-padded batch of prompt+response sequences.

    Returns input_ids, attention_mask, and loss_mask (1 exactly on response tokens, so that
    neither prompt nor padding contributes to log-probs or losses).
    """
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    loss_mask = torch.zeros((len(lengths), width), dtype=torch.bool)
    for row, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        n_prompt, n_total = len(prompt), len(prompt) + len(response)
        input_ids[row, :n_total] = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        attention_mask[row, :n_total] = 1
        loss_mask[row, n_prompt:n_total] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def gathered_logps(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under `logits` at each position ([..., V] and [...] -> [...]), as gather - logsumexp.

    Every log-prob in the project goes through here, so the engine's on-the-fly reference log-probs
    and the trainer's policy log-probs round the same way.
    """
    logits = logits.float()
    picked = torch.gather(logits, -1, tokens.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


class _LinearTokenLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[token] per row, in row chunks; backward recomputes each chunk's logits.

    The matmuls run in the forward's dtype (hidden's under FSDP mixed precision, autocast's in one process; autocast
    does not reach a custom backward, so the dtype is kept for it), the log-softmax in float32, and the head's
    gradient sums its chunks in float32."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, chunk_rows):
        compute = torch.get_autocast_dtype(hidden.device.type) if torch.is_autocast_enabled(hidden.device.type) \
            else hidden.dtype
        accumulate = torch.promote_types(compute, torch.float32)
        w = weight.to(compute)
        out = torch.empty(hidden.shape[0], dtype=accumulate, device=hidden.device)
        lse = torch.empty_like(out)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = (hidden[rows].to(compute) @ w.T).to(accumulate)
            lse[rows] = torch.logsumexp(logits, dim=-1)
            out[rows] = torch.gather(logits, -1, tokens[rows].unsqueeze(-1)).squeeze(-1) - lse[rows]
        ctx.save_for_backward(hidden, weight, tokens, lse)
        ctx.chunk_rows, ctx.compute = chunk_rows, compute
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, tokens, lse = ctx.saved_tensors
        compute = ctx.compute
        w = weight.to(compute)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=lse.dtype) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            rows = slice(start, start + ctx.chunk_rows)
            h = hidden[rows].to(compute)
            g = grad_out[rows].to(lse.dtype).unsqueeze(-1)
            # d logp[token] / d logits = onehot(token) - softmax(logits)
            grad_logits = (h @ w.T).to(lse.dtype).sub_(lse[rows].unsqueeze(-1)).exp_().mul_(-g)
            grad_logits.scatter_add_(-1, tokens[rows].unsqueeze(-1), g)
            grad_logits = grad_logits.to(compute)
            if grad_hidden is not None:
                grad_hidden[rows] = grad_logits @ w
            if grad_weight is not None:
                if compute == grad_weight.dtype:
                    grad_weight.addmm_(grad_logits.T, h)
                else:
                    grad_weight += grad_logits.T @ h
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def linear_token_logps(
    hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, chunk_rows: int
) -> torch.Tensor:
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
        raise ValueError(
            f"shape mismatch: logits {tuple(logits.shape)}, labels {tuple(labels.shape)}, mask {tuple(mask.shape)}"
        )
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


def answer_logps(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[Sequence[int]]],
    pad_id: int,
    pack: bool = False,
    logits_chunk_rows: int = 0,
    share_prefix: bool = False,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Summed log-probs [B, n] of each prompt's n answers (a pair, T-SPIN's triplet, SFT's one) from ONE forward pass.

    One pass instead of n halves the kernel launches and, under FSDP, the all-gathers. With `pack`
    the sequences are concatenated into one row without padding (see `packed_response_logps`); with
    `share_prefix` too, each prompt is computed once for all its answers (see `shared_prefix_logps`); with
    `logits_chunk_rows` > 0 the LM head runs chunk by chunk (see `linear_token_logps`). `device` is where the forward
    runs (default: the first parameter's); a trainer passes its own, as FSDP2's CPU offload keeps the parameters'
    shards in host memory while the forward runs on the GPU.
    """
    device = device or model_device(model)
    n = len(answers[0])
    if any(len(group) != n for group in answers):
        raise ValueError("every example of a micro-batch must have the same number of answers")
    longest = max(len(p) + len(a) for p, group in zip(prompts, answers, strict=True) for a in group)
    if pack and share_prefix and n > 1 and packed_sdpa_supported(model, longest):
        return shared_prefix_logps(model, prompts, answers, logits_chunk_rows, device)
    # answer-major order: all first answers, then all second answers, ...
    flat_prompts = [p for _ in range(n) for p in prompts]
    flat_answers = [group[k] for k in range(n) for group in answers]
    if pack:
        logps = packed_response_logps(model, flat_prompts, flat_answers, logits_chunk_rows, device)
    else:
        batch = collate_sequences(flat_prompts, flat_answers, pad_id)
        logps = response_logps(model, {key: value.to(device) for key, value in batch.items()}, logits_chunk_rows)
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
                          responses: Sequence[Sequence[int]], logits_chunk_rows: int = 0,
                          device: torch.device | None = None) -> torch.Tensor:
    """Summed response log-probs [N] of N sequences packed into one row.

    Positions restart per sequence and attention stays inside each one, so the values equal the
    padded path's. No FLOPs go to padding, and the LM head runs only at the positions that predict a
    response token. For SDPA models attention runs sequence by sequence (`packed_attention`), each
    costing its own causal triangle; other models get transformers' handling of packed position_ids
    (a block-diagonal mask, or flash-attention's varlen kernels).
    """
    packed = pack_sequences(prompts, responses)
    device = device or model_device(model)
    mask = packed["loss_mask"][0].to(device)
    targets = mask.nonzero().flatten()  # every response token; its predictor sits one position earlier
    inputs = {"input_ids": packed["input_ids"].to(device), "position_ids": packed["position_ids"].to(device),
              "attention_mask": None, "use_cache": False, "logits_to_keep": targets - 1}
    tokens = packed["input_ids"][0].to(device)[targets]
    with packed_attention(model, [len(p) + len(r) for p, r in zip(prompts, responses, strict=True)]) as extra:
        token_lps = _kept_token_logps(model, {**inputs, **extra}, torch.arange(len(targets), device=device), tokens,
                                      logits_chunk_rows)
    owner = packed["sequence"].to(device)[targets]
    return torch.zeros(len(prompts), dtype=token_lps.dtype, device=device).index_add(0, owner, token_lps)


def shared_prefix_logps(model: torch.nn.Module, prompts: Sequence[Sequence[int]],
                        answers: Sequence[Sequence[Sequence[int]]], logits_chunk_rows: int = 0,
                        device: torch.device | None = None) -> torch.Tensor:
    """Summed log-probs [B, n] with each prompt computed once: one packed row of [prompt][answer 1]...[answer n] per
    example, each answer's positions continuing from its prompt's end, attending to its prompt and itself and never to
    the answers before it (`packed_sdpa_attention`'s prefix segments); an answer's first token is predicted from the
    prompt's last position. The values equal the unshared layout's (arXiv 2410.20305's prefix sharing); the prompt's
    forward and backward run once instead of n times."""
    ids, positions, bounds, targets, predictors, owners = [], [], [], [], [], []
    n = len(answers[0])
    for example, (prompt, group) in enumerate(zip(prompts, answers, strict=True)):
        start = len(ids)
        ids += prompt
        positions += range(len(prompt))
        prompt_end = len(ids)
        for number, answer in enumerate(group):
            answer_start = len(ids)
            ids += answer
            positions += range(len(prompt), len(prompt) + len(answer))
            targets += range(answer_start, len(ids))
            predictors += [prompt_end - 1, *range(answer_start, len(ids) - 1)]
            owners += [example * n + number] * len(answer)
            bounds.append((start, len(ids)) if number == 0 else (answer_start, len(ids), start, prompt_end))
    device = device or model_device(model)
    row = torch.tensor(ids, device=device)
    inputs = {"input_ids": row[None], "position_ids": torch.tensor([positions], device=device),
              "attention_mask": None, "use_cache": False, "logits_to_keep": torch.tensor(predictors, device=device)}
    longest = max(len(p) + len(a) for p, group in zip(prompts, answers, strict=True) for a in group)
    with packed_attention(model, [longest], bounds) as extra:
        token_lps = _kept_token_logps(model, {**inputs, **extra}, torch.arange(len(targets), device=device),
                                      row[torch.tensor(targets, device=device)], logits_chunk_rows)
    owner = torch.tensor(owners, device=device)
    return (
        torch.zeros(len(prompts) * n, dtype=token_lps.dtype, device=device).index_add(0, owner, token_lps).view(-1, n)
    )


def response_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], logits_chunk_rows: int = 0) -> torch.Tensor:
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
    # only the response tokens count: rows of the flattened [B, K] kept positions
    rows = mask[:, keep + 1].flatten().nonzero().flatten()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "logits_to_keep": keep}
    try:
        token_lps = _kept_token_logps(model, inputs, rows, batch["input_ids"][:, keep + 1].flatten()[rows],
                                      logits_chunk_rows)
    except TypeError:  # no logits_to_keep in this model's forward
        return sequence_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                              batch["input_ids"], mask)
    return torch.zeros(mask.shape[0], dtype=token_lps.dtype, device=mask.device).index_add(
        0, rows // len(keep), token_lps
    )


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


def model_device(model: torch.nn.Module) -> torch.device:
    """Where a model held whole computes: its first parameter's device."""
    return next(model.parameters()).device


def _on_model_device(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    device = model_device(model)
    return {key: value.to(device) for key, value in batch.items()}


@torch.no_grad()
def score_responses(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 8,
) -> torch.Tensor:
    """Forward-only summed log-probs [N] of responses under a frozen model, `batch_size` sequences
    per padded forward: the reference log-probs of the opponent p_t, or any model's score of an answer."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(prompts), batch_size):
        batch = collate_sequences(prompts[start : start + batch_size], responses[start : start + batch_size], pad_id)
        out.append(response_logps(model, _on_model_device(model, batch)).cpu())
    model.train(was_training)
    return torch.cat(out)
