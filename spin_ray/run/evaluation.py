"""Held-out evaluation as Ray Data stages: GSM8K exact match (ours and lm-eval's), human answers' NLL, reward accuracy.

One engine pass of model M over the held-out prompts (the generation pipeline, greedy) gives M's
answers (-> exact match, format, length) and, in the same pass, log p_M(human answer) (-> NLL per
token) and log p_M(p_t's answer), p_t being its opponent, whose held-out answers the engines score as
they go (generation.fuse_reference; false: a forward-only pool after them). That gives the SPIN reward
r(y) = beta * (log p_M(y) - log p_t(y)) of both the human and p_t's answer: reward
accuracy is the share of prompts where the human answer gets the higher reward. It falls toward
0.5 as M reaches the fixed point where it can no longer tell its opponent's answers from human ones.
Per-prompt scores are kept beside the metrics (scores.parquet), so runs can be compared prompt by prompt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from spin_ray.config import Config
from spin_ray.data.gsm8k import final_answer, harness_flexible, harness_match, harness_strict, has_answer_format
from spin_ray.data.records import load_records
from spin_ray.generation.pipeline import PassTask, run_pass, score_under
from spin_ray.generation.shards import ALSO_SCORE_COLUMNS, committed_shards, read_shards, shards_dataset
from spin_ray.models.resolution import content_fingerprint
from spin_ray.storage import atomic_write_bytes, atomic_write_json, exists, join, read_json, remove

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.json"
SCORES_FILE = "scores.parquet"
# What a model's validation evaluation adds to its evaluation metrics, each as validation_<key>.
VALIDATION_KEYS = ("prompts", "accuracy", "nll_per_token", "answer_format_rate", "share_hit_max_new_tokens",
                   "mean_answer_tokens")


def score_answers(batch: pa.Table) -> pa.Table:
    """Per held-out row: exact match by our rule and by lm-eval's strict and flexible rules, whether the answer
    ends in '#### <number>', its length and finish, and the NLL per token of the human answer under the model."""
    real = batch.column("real").to_pylist()
    generated = [g[0] for g in batch.column("generated").to_pylist()]
    # the rows' log-probs are under the model that generated them: the model being evaluated
    model_logp_real = batch.column("ref_logp_real").to_pylist()
    real_tokens = batch.column("real_tokens").to_pylist()
    rows = {"correct": [], "correct_strict": [], "correct_flexible": [], "formatted": [], "nll_per_token": []}
    for human, answer, logp, tokens in zip(real, generated, model_logp_real, real_tokens, strict=True):
        truth = final_answer(human)
        rows["correct"].append(float(truth is not None and final_answer(answer) == truth))
        rows["correct_strict"].append(float(harness_match(harness_strict(answer), human)))
        rows["correct_flexible"].append(float(harness_match(harness_flexible(answer), human)))
        rows["formatted"].append(float(has_answer_format(answer)))
        rows["nll_per_token"].append(-logp / tokens if logp is not None and tokens else math.nan)
    return pa.table(
        {
            "prompt_id": batch.column("prompt_id"),
            **rows,
            "real_tokens": real_tokens,
            "answer_tokens": [g[0] for g in batch.column("generated_tokens").to_pylist()],
            "hit_max_new_tokens": [float(f[0] == "length") for f in batch.column("finish_reasons").to_pylist()],
        }
    )


NEW_MODEL_COLUMNS = ("new_logp_real", "new_logp_generated")


def reward_columns(batch: pa.Table, beta: float) -> pa.Table:
    """SPIN rewards of the new model M against its opponent p_t, on p_t's held-out answers: the opponent's own
    log-probs are the rows' ref_logp_* (it generated them), M's are new_logp_* (scored by `score_under`)."""
    opp_real = batch.column("ref_logp_real").to_pylist()
    opp_generated = [g[0] for g in batch.column("ref_logp_generated").to_pylist()]
    new_real = batch.column("new_logp_real").to_pylist()
    new_generated = [g[0] for g in batch.column("new_logp_generated").to_pylist()]
    reward_real = [beta * (a - b) for a, b in zip(new_real, opp_real, strict=True)]
    reward_generated = [beta * (a - b) for a, b in zip(new_generated, opp_generated, strict=True)]
    margins = [r - g for r, g in zip(reward_real, reward_generated, strict=True)]
    return pa.table({"prompt_id": batch.column("prompt_id"), "reward_real": reward_real,
                     "reward_generated": reward_generated, "reward_margin": margins,
                     "reward_correct": [float(m > 0) for m in margins]})


def eval_config(config: Config) -> Config:
    """The generation settings of evaluation: greedy, one answer, the held-out subset."""
    ev, gen = config.evaluation, config.generation
    return config.model_copy(update={
        "generation": gen.model_copy(update={"temperature": 0.0, "num_samples": 1,
                                             "max_new_tokens": ev.max_new_tokens or gen.max_new_tokens}),
        "data": config.data.model_copy(update={"limit": ev.prompts}),
    })


def evaluation_key(config: Config, model: str, source: str, opponent_answers: str | None) -> dict:
    """What an evaluation's results depend on; a stored metrics.json is reused only when this matches."""
    settings = eval_config(config)
    # the model is named by `model` (its path) below, and by its content in the start-evaluation cache: its spec
    # (an alias, a run's export folder) is not a setting
    shaping = {
        "model": settings.model.model_dump(exclude={"cache_dir", "name"}),
        "data": settings.data.model_dump(exclude={"train", "eval"}),
        "max_new_tokens": settings.generation.max_new_tokens,
        "engine": settings.generation.engine,
        "beta": config.training.beta,
    }
    digest = hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]
    return {"model": model, "data": source, "opponent_answers": opponent_answers, "settings": digest}


def _mean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return round(sum(finite) / len(finite), 6) if finite else None


@dataclass
class PendingEvaluation:
    """An evaluation still to run: the engine-pass `task` that answers its prompts, and what `finish_evaluation`
    needs to turn the answers into metrics."""

    config: Config
    model: str
    output_dir: str
    source: str
    key: dict
    opponent_answers: str | None
    opponent: dict | None  # the opponent's held-out rows, when its answers are scored in the pass
    task: object  # generation.pipeline.PassTask


def prepare_evaluation(config: Config, model: str, output_dir: str, opponent_answers: str | None = None,
                       data: str | None = None) -> PendingEvaluation | dict:
    """The evaluation of `model` on `data` (default data.eval) into `output_dir`: its metrics when a finished one
    there has the same model, data and settings, else the plan of its engine pass (an earlier result of another
    model or settings is removed). With `opponent_answers` (the answers folder of the opponent's own evaluation)
    the pass also scores the opponent's answers under `model`, for the reward accuracy."""
    source = data or config.data.eval
    if source is None:
        raise ValueError("evaluation needs held-out data: set data.eval (e.g. gsm8k:test)")
    key = evaluation_key(config, model, source, opponent_answers)
    done = read_json(join(output_dir, METRICS_FILE))
    if done is not None and done.get("key") == key:
        return done
    if done is not None:
        log.warning("%s holds an evaluation of %s (settings %s); evaluating %s again there", output_dir,
                    done.get("model"), (done.get("key") or {}).get("settings"), model)
        print(f"[spin-ray] {output_dir} held an evaluation of another model or settings ({done.get('model')}): "
              f"replacing it", flush=True)
        remove(output_dir)
    # The opponent's held-out answers are scored under `model` by the same engines that answer the prompts
    # (generation.fuse_reference), not by a second model copy in a pool of its own after them.
    opponent = _opponent_rows(opponent_answers) if opponent_answers is not None else None
    fused = opponent is not None and config.generation.fuse_reference
    also_score = {pid: [answers[0]] for pid, answers in zip(opponent["prompt_id"], opponent["generated_token_ids"],
                                                           strict=True)} if fused else None
    task = PassTask(eval_config(config), join(output_dir, "answers"), source, score_reference=True,
                    also_score=also_score)
    return PendingEvaluation(
        config, model, output_dir, source, key, opponent_answers, opponent if fused else None, task
    )


def evaluate_model(config: Config, model: str, output_dir: str, opponent_answers: str | None = None,
                   data: str | None = None) -> dict:
    """Evaluate `model` on the held-out split (`prepare_evaluation`, one engine pass, `finish_evaluation`). Results go
    to {output_dir}/metrics.json and scores.parquet (per prompt)."""
    pending = prepare_evaluation(config, model, output_dir, opponent_answers, data)
    if isinstance(pending, dict):
        return pending
    (result,) = run_pass(config, model, [pending.task])
    return finish_evaluation(pending, result)


def finish_evaluation(pending: PendingEvaluation, result) -> dict:
    """Metrics of a prepared evaluation from its engine pass's `result` (a GenerationResult): exact match, format,
    length and NLL per prompt, and the rewards against the opponent; written to metrics.json and scores.parquet."""
    import ray

    config, model, opponent_answers = pending.config, pending.model, pending.opponent_answers
    # The light per-row stages reserve no CPU (num_cpus=0): on a small node the scoring actor holds
    # every CPU, and a stage that waits for one would wait forever.
    scored = result.dataset.map_batches(
        score_answers, batch_format="pyarrow", batch_size=None, num_cpus=0
    ).to_arrow_refs()
    scores = pa.concat_tables(ray.get(scored)).sort_by("prompt_id")
    metrics = {
        "key": pending.key, "model": model, "data": pending.source, "prompts": scores.num_rows,
        "accuracy": _mean(scores.column("correct").to_pylist()),
        "accuracy_lm_eval_strict": _mean(scores.column("correct_strict").to_pylist()),
        "accuracy_lm_eval_flexible": _mean(scores.column("correct_flexible").to_pylist()),
        "answer_format_rate": _mean(scores.column("formatted").to_pylist()),
        "nll_per_token": _mean(scores.column("nll_per_token").to_pylist()),
        "mean_answer_tokens": _mean(scores.column("answer_tokens").to_pylist()),
        "share_hit_max_new_tokens": _mean(scores.column("hit_max_new_tokens").to_pylist()),
        "generation_seconds": result.summary.seconds,
        "generation_tokens_per_second": result.summary.tokens_per_second,
        "answers": result.output_dir,
    }
    if opponent_answers is not None:
        started = time.perf_counter()
        fused = pending.opponent is not None
        rewards = _fused_rewards(result.dataset, pending.opponent, config.training.beta) if fused else None
        scored_in = "engine pass" if rewards is not None else "reference pool"
        if rewards is None:  # a separate forward-only pool; also for answers committed without the fused scores
            rewards = score_under(shards_dataset(committed_shards(opponent_answers)), config, model, NEW_MODEL_COLUMNS)
            rewards = rewards.map_batches(reward_columns, fn_kwargs={"beta": config.training.beta},
                                          batch_format="pyarrow", batch_size=None, num_cpus=0).to_arrow_refs()
            rewards = pa.concat_tables(ray.get(rewards)).sort_by("prompt_id")
        metrics.update({
            "opponent_answers": opponent_answers,
            "reward_scoring": scored_in,
            "reward_pairs": rewards.num_rows,
            "reward_accuracy": _mean(rewards.column("reward_correct").to_pylist()),
            "reward_margin": _mean(rewards.column("reward_margin").to_pylist()),
            "reward_real": _mean(rewards.column("reward_real").to_pylist()),
            "reward_generated": _mean(rewards.column("reward_generated").to_pylist()),
            "scoring_seconds": round(time.perf_counter() - started, 2),
        })
        scores = scores.join(rewards, "prompt_id", join_type="left outer").sort_by("prompt_id")
    sink = pa.BufferOutputStream()
    pq.write_table(scores, sink)
    output_dir = pending.output_dir
    atomic_write_bytes(join(output_dir, SCORES_FILE), sink.getvalue().to_pybytes())
    atomic_write_json(join(output_dir, METRICS_FILE), metrics)
    return metrics


def _opponent_rows(answers_dir: str) -> dict:
    """The opponent's held-out answers and their log-probs under the opponent (it generated them)."""
    return read_shards(committed_shards(answers_dir),
                       ["prompt_id", "generated_token_ids", "ref_logp_real", "ref_logp_generated"]).to_pydict()


def _fused_rewards(dataset, opponent: dict, beta: float) -> pa.Table | None:
    """reward_columns from the evaluation pass's own scores: the model's log-prob of the human answer (ref_logp_real
    of its rows) and of the opponent's answer (also_scored_logps). None when a row lacks them (answers committed
    by a version that did not score them in the pass)."""
    import ray

    also = ALSO_SCORE_COLUMNS[1]
    if also not in dataset.columns():
        return None
    table = pa.concat_tables(ray.get(dataset.select_columns(["prompt_id", "ref_logp_real", also]).to_arrow_refs()))
    mine = {pid: (real, scored) for pid, real, scored in zip(*table.to_pydict().values(), strict=True)}
    rows = {
        "prompt_id": [],
        "ref_logp_real": [],
        "ref_logp_generated": [],
        "new_logp_real": [],
        "new_logp_generated": [],
    }
    for pid, real, generated in zip(opponent["prompt_id"], opponent["ref_logp_real"], opponent["ref_logp_generated"],
                                    strict=True):
        if pid not in mine:
            continue  # a held-out prompt this evaluation does not have: no reward, as with the separate pool
        new_real, scored = mine[pid]
        if new_real is None or not scored:
            return None
        for column, value in zip(rows, (pid, real, generated, new_real, scored), strict=True):
            rows[column].append(value)
    return reward_columns(pa.table(rows), beta).sort_by("prompt_id")


def validation_source(config: Config, carved_file: str) -> str | None:
    """The run's validation data: data.validation, or the records carved out of data.train, written once (up to
    evaluation.validation_prompts of them) to `carved_file`, so every evaluation reads the same file; None when the
    run has no validation split."""
    if config.data.validation is not None:
        return config.data.validation
    if config.data.validation_fraction <= 0:
        return None
    if not exists(carved_file):
        records, _ = load_records(config.data.train, config.data.model_copy(
            update={"limit": config.evaluation.validation_prompts}), part="validation")
        column = config.data.messages_column
        lines = [json.dumps({column: [*prompt, {"role": "assistant", "content": response}]}, ensure_ascii=False)
                 for prompt, response in zip(records.column("prompt").to_pylist(),
                                             records.column("response").to_pylist(), strict=True)]
        atomic_write_bytes(carved_file, ("\n".join(lines) + "\n").encode("utf-8"))
    return carved_file


def validation_config(config: Config) -> Config:
    """The config of an evaluation on the validation split: evaluation.validation_prompts of it."""
    return config.model_copy(update={"evaluation": config.evaluation.model_copy(
        update={"prompts": config.evaluation.validation_prompts})})


def start_evaluation_cache(config: Config, model: str, validation: str | None) -> str | None:
    """Where the evaluation of the start model `model` is kept for every run that starts from the same content with
    the same evaluation data and settings ({storage_path}/_cache/start_eval/<key>); None when the model's content
    cannot be fingerprinted (a hub id). A changed setting, data file or model gives another key."""
    import os

    fingerprint = content_fingerprint(model)
    if fingerprint is None:
        return None

    def data_identity(source: str | None) -> list | None:
        if source is None:
            return None
        local = source.removeprefix("file://")
        stat = os.stat(local) if os.path.isfile(local) else None  # a user's file: its size and time, not just its name
        return [source, stat.st_size if stat else None, stat.st_mtime_ns if stat else None]

    data = config.data
    carved = validation is not None and data.validation is None
    key = {
        "model": fingerprint,
        "settings": evaluation_key(config, model, config.data.eval or "", None)["settings"],
        "eval": data_identity(config.data.eval),
        "prompts": config.evaluation.prompts,
        "validation": [data_identity(data.train), data.validation_fraction]
        if carved
        else data_identity(data.validation),
        "validation_prompts": config.evaluation.validation_prompts if validation is not None else None,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return join(config.run.storage_path, "_cache", "start_eval", digest)
