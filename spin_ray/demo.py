"""The interim main job: SmolLM2 answers real GSM8K prompts, then a few SPIN steps, metrics printed.

It is one self-play iteration in miniature, in a single process: the opponent p_0 generates
y', its reference log-probs are computed once, and the main player (a copy of p_0) takes
SPIN steps on (y human, y' generated). At step 0 the policy equals the reference, so the
loss is exactly log 2 and the margins are 0; the steps then push the margin up.
"""

from __future__ import annotations

import math
import time

import torch

from spin_ray.config import Config
from spin_ray.generation.hf_engine import HFEngine
from spin_ray.models import load_model, load_tokenizer, resolve_model
from spin_ray.prepare import tokenize_split
from spin_ray.tokenization import ChatFormat
from spin_ray.training.step import reference_logps, spin_step_loss

METRIC_COLUMNS = ("loss", "rewards/real", "rewards/generated", "rewards/margins", "rewards/accuracies")


def run_demo(config: Config, prompts: int = 4, steps: int = 3, learning_rate: float = 1e-5, echo=print) -> list[dict]:
    torch.manual_seed(config.training.seed)
    started = time.perf_counter()
    resolved = resolve_model(config.model.name, config.model.cache_dir)
    tokenizer = load_tokenizer(resolved.path, config.model.trust_remote_code)
    chat = ChatFormat(tokenizer)
    opponent = load_model(resolved.path, config.model.dtype, config.model.trust_remote_code)
    echo(f"model {resolved.spec} from {resolved.path} ({time.perf_counter() - started:.1f}s)")

    subset = config.model_copy(update={"data": config.data.model_copy(update={"limit": prompts})})
    data = tokenize_split(config.data.train, subset, chat)
    echo(f"data {data.load.summary()}")

    engine = HFEngine(
        opponent,
        chat,
        max_new_tokens=config.generation.max_new_tokens,
        temperature=config.generation.temperature,
        top_p=config.generation.top_p,
        batch_size=config.generation.batch_size,
    )
    t0 = time.perf_counter()
    completions = engine.generate(data.prompt_ids)
    new_tokens = sum(len(c.token_ids) for c in completions)
    echo(f"opponent answered {len(completions)} prompts: {new_tokens} tokens in {time.perf_counter() - t0:.1f}s")
    generated_ids = [c.token_ids for c in completions]
    pad_id = tokenizer.pad_token_id
    ref_real = reference_logps(opponent, data.prompt_ids, data.response_ids, pad_id)
    ref_generated = reference_logps(opponent, data.prompt_ids, generated_ids, pad_id)

    questions = data.records.column("prompt").to_pylist()
    for question, completion, human in zip(questions, completions, data.records.column("response").to_pylist()):
        echo(f"\nQ: {question[-1]['content'][:160]}")
        echo(f"  human    : {human[:160]!r}")
        echo(f"  opponent : {completion.text[:160]!r} [{completion.finish_reason}]")

    policy = opponent  # p_{t+1} starts from p_t; the reference log-probs above are frozen
    policy.train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=learning_rate)
    echo(
        f"\nSPIN ({config.training.loss_type}, beta {config.training.beta}), AdamW lr {learning_rate}, "
        f"{len(completions)} pairs per step; step 0 is the iteration start where loss = log 2 = {math.log(2):.4f}"
    )
    echo("step  " + "  ".join(f"{c:>18}" for c in METRIC_COLUMNS))
    history = []
    for step in range(steps + 1):
        loss, metrics = spin_step_loss(
            policy, data.prompt_ids, data.response_ids, generated_ids, ref_real, ref_generated,
            pad_id, config.training.beta, config.training.loss_type,
        )
        row = {k: float(v) for k, v in metrics.items()}
        history.append(row)
        echo(f"{step:>4}  " + "  ".join(f"{row[c]:>18.4f}" for c in METRIC_COLUMNS))
        if step == steps:
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), config.training.max_grad_norm)
        optimizer.step()
    echo(f"\ndone in {time.perf_counter() - started:.1f}s")
    return history
