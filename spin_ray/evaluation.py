"""Held-out evaluation as Ray Data stages: GSM8K exact match, NLL of the human answers, reward accuracy vs the opponent.

One engine pass per model M over the held-out prompts (the generation pipeline, greedy) gives M's
answers (-> exact-match accuracy) and, fused in the prefill, log p_M(human answer) (-> NLL per
token). Against its opponent p_t, one forward-only pass of M over p_t's held-out answers gives the
SPIN reward r(y) = beta * (log p_M(y) - log p_t(y)) of both the human and p_t's answer: reward
accuracy is the share of prompts where the human answer gets the higher reward. It falls toward
0.5 as M reaches the fixed point where it can no longer tell its opponent's answers from human ones.
"""

from __future__ import annotations

import math
import re
import time
from decimal import Decimal, InvalidOperation

import pyarrow as pa

from spin_ray.config import Config
from spin_ray.storage import atomic_write_json, read_json

METRICS_FILE = "metrics.json"
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalise_number(text: str) -> str | None:
    """'$1,200.50' -> '1200.5', '18.00' -> '18', '-3' -> '-3'; None when it is not a number."""
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    normal = value.normalize()
    # normalize() writes 100 as 1E+2: quantize integers back to plain digits
    return str(normal.quantize(Decimal(1))) if normal == normal.to_integral_value() else format(normal, "f")


def final_answer(text: str) -> str | None:
    """GSM8K's final answer: the number after the last '####'; without one, the last number in the text
    (small models often state the answer without the marker)."""
    if text is None:
        return None
    if "####" in text:
        numbers = _NUMBER.findall(text.rsplit("####", 1)[1])
        return normalise_number(numbers[0]) if numbers else None
    numbers = _NUMBER.findall(text)
    return normalise_number(numbers[-1]) if numbers else None


def score_answers(batch: pa.Table) -> pa.Table:
    """Per held-out row: exact match of the model's answer, whether it used '####', NLL/token of the human answer."""
    real = batch.column("real").to_pylist()
    generated = [g[0] for g in batch.column("generated").to_pylist()]
    logp_real = batch.column("ref_logp_real").to_pylist()
    real_tokens = batch.column("real_tokens").to_pylist()
    correct, formatted, nll = [], [], []
    for human, answer, logp, tokens in zip(real, generated, logp_real, real_tokens, strict=True):
        truth, guess = final_answer(human), final_answer(answer)
        correct.append(float(truth is not None and guess == truth))
        formatted.append(float("####" in (answer or "")))
        nll.append(-logp / tokens if logp is not None and tokens else math.nan)
    return pa.table({"prompt_id": batch.column("prompt_id"), "correct": correct, "formatted": formatted,
                     "nll_per_token": nll, "real_tokens": real_tokens})


def keep_opponent_logps(batch: pa.Table) -> pa.Table:
    """Copy the opponent's own log-probs aside before the new model's scoring overwrites the ref_* columns."""
    batch = batch.append_column("opp_logp_real", batch.column("ref_logp_real"))
    first = pa.array([g[0] for g in batch.column("ref_logp_generated").to_pylist()], pa.float64())
    return batch.append_column("opp_logp_generated", first)


def reward_columns(batch: pa.Table, beta: float) -> pa.Table:
    """SPIN rewards of the new model M against its opponent p_t, on p_t's held-out answers."""
    new_real = batch.column("ref_logp_real").to_pylist()
    new_generated = [g[0] for g in batch.column("ref_logp_generated").to_pylist()]
    opp_real = batch.column("opp_logp_real").to_pylist()
    opp_generated = batch.column("opp_logp_generated").to_pylist()
    reward_real = [beta * (a - b) for a, b in zip(new_real, opp_real, strict=True)]
    reward_generated = [beta * (a - b) for a, b in zip(new_generated, opp_generated, strict=True)]
    margins = [r - g for r, g in zip(reward_real, reward_generated, strict=True)]
    return pa.table({"prompt_id": batch.column("prompt_id"), "reward_real": reward_real,
                     "reward_generated": reward_generated, "reward_margin": margins,
                     "reward_correct": [float(m > 0) for m in margins]})


def eval_config(config: Config) -> Config:
    """The generation settings of evaluation: greedy, one answer, the held-out subset, and always the
    human answer's log-prob (NLL) and no oracle, whichever algorithm trains."""
    ev, gen = config.evaluation, config.generation
    return config.model_copy(update={
        "algorithm": "spin",
        "generation": gen.model_copy(update={"temperature": 0.0, "num_samples": 1, "fuse_reference": True,
                                             "max_new_tokens": ev.max_new_tokens or gen.max_new_tokens}),
        "data": config.data.model_copy(update={"limit": ev.prompts}),
    })


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return round(sum(finite) / len(finite), 6) if finite else None


def evaluate_model(config: Config, model_path: str, output_dir: str, opponent_answers: str | None = None,
                   data: str | None = None) -> dict:
    """Evaluate `model_path` on the held-out split; with `opponent_answers` (the answers folder of the
    opponent's own evaluation) also its reward accuracy against that opponent. Results are written to
    {output_dir}/metrics.json (atomically) and reused when present."""
    from spin_ray.generation.pipeline import _shard_files, run_generation, score_under, shards_dataset

    done = read_json(f"{output_dir}/{METRICS_FILE}")
    if done is not None:
        return done
    source = data or config.data.eval
    if source is None:
        raise ValueError("evaluation needs held-out data: set data.eval (e.g. gsm8k:test)")
    answers_dir = f"{output_dir}/answers"
    # The light per-row stages reserve no CPU (num_cpus=0): on a small node the scoring actor holds
    # every CPU, and a stage that waits for one would wait forever.
    result = run_generation(eval_config(config), model=model_path, source=source, output_dir=answers_dir)
    scored = result.dataset.map_batches(score_answers, batch_format="pyarrow", batch_size=None,
                                            num_cpus=0).to_pandas()
    metrics = {
        "model": model_path,
        "data": source,
        "prompts": int(len(scored)),
        "accuracy": _mean(scored["correct"].tolist()),
        "answer_format_rate": _mean(scored["formatted"].tolist()),
        "nll_per_token": _mean(scored["nll_per_token"].tolist()),
        "generation_seconds": result.summary["seconds"],
        "generation_tokens_per_second": result.summary.get("tokens_per_second"),
        "mean_answer_tokens": result.summary["mean_response_tokens"],
        "answers": answers_dir,
    }
    if opponent_answers is not None:
        started = time.perf_counter()
        opponent_rows = shards_dataset(_shard_files(opponent_answers)).map_batches(
            keep_opponent_logps, batch_format="pyarrow", batch_size=None, num_cpus=0)
        rewards = (
            score_under(opponent_rows, config, model_path)
            .map_batches(reward_columns, fn_kwargs={"beta": config.training.beta}, batch_format="pyarrow",
                         batch_size=None, num_cpus=0)
            .to_pandas()
        )
        metrics.update({
            "opponent_answers": opponent_answers,
            "reward_pairs": int(len(rewards)),
            "reward_accuracy": _mean(rewards["reward_correct"].tolist()),
            "reward_margin": _mean(rewards["reward_margin"].tolist()),
            "reward_real": _mean(rewards["reward_real"].tolist()),
            "reward_generated": _mean(rewards["reward_generated"].tolist()),
            "scoring_seconds": round(time.perf_counter() - started, 2),
        })
    atomic_write_json(f"{output_dir}/{METRICS_FILE}", metrics)
    return metrics
