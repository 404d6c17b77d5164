"""Opponent generation as a Ray Data pipeline: prompts -> engine pool -> reference pool -> committed shards.

Output lives under {storage_path}/{run}/iter_{t}/generation/: one parquet shard per committed
batch, and _COMPLETE.json once every prompt has exactly one row. A restart skips the prompt_ids
already committed and generates only the missing ones.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spin_ray.config import Config, GenerationConfig
from spin_ray.generation.stages import SHARD_COLUMN, sampling_description
from spin_ray.models import load_tokenizer, resolve_model
from spin_ray.prepare import tokenize_split
from spin_ray.storage import atomic_write_json, read_json
from spin_ray.tokenization import ChatFormat

log = logging.getLogger(__name__)
COMPLETE_MARKER = "_COMPLETE.json"


class GenerationError(RuntimeError):
    """The generation stage cannot run or its output is inconsistent."""


@dataclass
class GenerationResult:
    output_dir: str
    dataset: object  # ray.data.Dataset, materialized in the object store
    summary: dict


def generation_dir(config: Config, iteration: int) -> str:
    return f"{config.run.storage_path.rstrip('/')}/{config.run.name}/iter_{iteration}/generation"


def _shard_files(output_dir: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(output_dir)
    if not fs.exists(path):
        return []
    names = [p for p in fs.ls(path, detail=False) if p.rsplit("/", 1)[-1].startswith("shard-") and p.endswith(".parquet")]
    protocol = output_dir.split("://", 1)[0] + "://" if "://" in output_dir else ""
    return sorted(protocol + p if protocol and not p.startswith(protocol) else p for p in names)


def _read_shard(file: str) -> pa.Table:
    with fsspec.open(file, "rb") as handle:
        return pq.read_table(handle)


def parquet_files(path: str) -> list[str]:
    """The committed shards of a generation folder, else every .parquet file under `path` (or `path` itself)."""
    shards = _shard_files(path)
    if shards:
        return shards
    fs, local = fsspec.core.url_to_fs(path)
    if fs.isfile(local):
        return [path]
    protocol = path.split("://", 1)[0] + "://" if "://" in path else ""
    return sorted(protocol + f if protocol and not f.startswith(protocol) else f
                  for f in fs.find(local) if f.endswith(".parquet"))


def shards_dataset(files: list[str]):
    """A Ray Dataset of parquet files, read by zero-CPU tasks straight into the object store.

    Not `ray.data.read_parquet`: its file-listing task needs a whole CPU, and on a small node whose
    CPUs an actor pool (a scorer, or training workers ingesting the dataset) already holds, that
    task would wait forever. The rows never pass through the caller's memory, only references.
    """
    import ray

    if not files:
        raise GenerationError("no parquet files to read")
    read = ray.remote(num_cpus=0)(_read_shard)
    return ray.data.from_arrow_refs([read.remote(file) for file in files])


def committed_prompt_ids(output_dir: str) -> set[str]:
    """Every prompt_id already committed in a shard."""
    return set(_read_shards(_shard_files(output_dir), ["prompt_id"]).column("prompt_id").to_pylist())


def _summarise(table: pa.Table, seconds: float, max_new_tokens: int, generated_now: int) -> dict:
    lengths = np.array([n for row in table.column("generated_tokens").to_pylist() for n in row])
    reasons = [r for row in table.column("finish_reasons").to_pylist() for r in row]
    total = int(lengths.sum()) if lengths.size else 0
    return {
        "prompts": table.num_rows,
        "prompts_generated_this_run": generated_now,
        "responses": int(lengths.size),
        "generated_tokens": total,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(total / seconds, 2) if seconds > 0 and generated_now else None,
        "mean_response_tokens": round(float(lengths.mean()), 1) if lengths.size else 0.0,
        "max_response_tokens": int(lengths.max()) if lengths.size else 0,
        "share_hit_max_new_tokens": round(reasons.count("length") / max(len(reasons), 1), 4),
        "max_new_tokens": max_new_tokens,
    }


def run_generation(config: Config, iteration: int = 0, model: str | None = None, source: str | None = None,
                   output_dir: str | None = None) -> GenerationResult:
    """Answer every prompt of `source` (default data.train) with the opponent (default: the configured
    model) and score it. Evaluation reuses it on the held-out split with its own output_dir."""
    gen = config.generation
    output_dir = output_dir or generation_dir(config, iteration)
    done = read_json(f"{output_dir}/{COMPLETE_MARKER}")
    if done is not None:
        log.info("generation for iteration %d already complete: %s", iteration, output_dir)
        dataset = shards_dataset(done["shards"]).materialize()
        return GenerationResult(output_dir, dataset, done["summary"])

    resolved = resolve_model(model or config.model.name, config.model.cache_dir)
    tokenizer = load_tokenizer(resolved.path, config.model.trust_remote_code)
    chat = ChatFormat(tokenizer)
    split = tokenize_split(source or config.data.train, config, chat)
    if split.records.num_rows == 0:
        raise GenerationError("no prompts left after the over-length policy; raise data.max_prompt_tokens")
    expected = set(split.records.column("prompt_id").to_pylist())

    already = committed_prompt_ids(output_dir)
    stale = already - expected
    if stale:
        raise GenerationError(
            f"{output_dir} holds {len(stale)} prompt_ids that the current data does not: "
            "the data or config changed under the same run name; use a new run name"
        )
    todo = [i for i, pid in enumerate(split.records.column("prompt_id").to_pylist()) if pid not in already]
    # Sort by prompt length: neighbouring prompts share batches, so batches carry little padding.
    todo.sort(key=lambda i: len(split.prompt_ids[i]))
    log.info("%d prompts, %d already committed, %d to generate", len(expected), len(already), len(todo))

    started = time.perf_counter()
    if todo:
        records = split.records.take(todo)
        table = pa.table(
            {
                "prompt_id": records.column("prompt_id"),
                "prompt": records.column("prompt"),
                "real": records.column("response"),
                "prompt_token_ids": pa.array([split.prompt_ids[i] for i in todo], pa.list_(pa.int32())),
                "real_token_ids": pa.array([split.response_ids[i] for i in todo], pa.list_(pa.int32())),
                "prompt_tokens": pa.array([len(split.prompt_ids[i]) for i in todo], pa.int32()),
                "real_tokens": pa.array([len(split.response_ids[i]) for i in todo], pa.int32()),
                SHARD_COLUMN: pa.array([n // gen.shard_rows for n in range(len(todo))], pa.int64()),
            }
        )
        build = _build_vllm_dataset if gen.engine == "vllm" else _build_dataset
        new_rows = build(config, resolved.path, chat, table, output_dir).materialize()
    seconds = time.perf_counter() - started

    shards = _shard_files(output_dir)
    # Only the columns the check and the summary need; the rows themselves are already in the object store.
    full = _read_shards(shards, ["prompt_id", "generated_tokens", "finish_reasons"])
    stage_seconds = _stage_seconds(shards)
    ids = full.column("prompt_id").to_pylist()
    if len(ids) != len(set(ids)) or set(ids) != expected:
        missing, doubled = len(expected - set(ids)), len(ids) - len(set(ids))
        raise GenerationError(f"{output_dir}: {missing} prompts missing and {doubled} doubled after generation")
    summary = _summarise(full, seconds, gen.max_new_tokens, len(todo))
    summary.update(stage_seconds)
    if stage_seconds["engine_seconds"] > 0:
        summary["engine_tokens_per_second"] = round(summary["generated_tokens"] / stage_seconds["engine_seconds"], 2)
    if config.algorithm == "sppo":
        summary.update(_oracle_summary(_read_shards(shards, ["oracle_scores", "win_rates"])))
    summary.update({"engine": gen.engine, "model": resolved.path, "iteration": iteration,
                    "answers_per_prompt": gen.num_samples,
                    "overlong_dropped": split.lengths.dropped, "overlong_truncated": split.lengths.truncated})
    atomic_write_json(f"{output_dir}/{COMPLETE_MARKER}", {"shards": shards, "summary": summary})
    # Rows generated now are already in the object store; earlier rows are read back once.
    if todo and len(todo) == len(expected):
        dataset = new_rows
    else:
        dataset = shards_dataset(shards).materialize()
    return GenerationResult(output_dir, dataset, summary)


def rows_per_call(gen: GenerationConfig, prompts: int) -> int:
    """Prompts handed to one engine call: whole shards, enough that the engine's slots can refill
    (about 4x its batch), but not so many that a small run cannot spread over the replica pool."""
    wanted = max(gen.shard_rows, 4 * gen.batch_size * gen.num_samples)
    spread = -(-prompts // gen.replicas[1])
    rows = min(wanted, max(spread, gen.shard_rows))
    return -(-rows // gen.shard_rows) * gen.shard_rows


def _threads(gen: GenerationConfig) -> int:
    """torch threads per actor: as configured, else the CPUs Ray reserves for it (at least 1)."""
    return gen.threads_per_replica or max(1, int(gen.cpus_per_replica))


def _build_dataset(config: Config, model_path: str, chat: ChatFormat, table: pa.Table, output_dir: str):
    """The lazy Ray Data plan: engine pool (-> reference pool) -> shard commit."""
    import ray

    from spin_ray.generation.stages import GenerateStage

    gen = config.generation
    # One block per future shard: a shard is the unit of commit and of resume.
    blocks = [table.slice(start, gen.shard_rows) for start in range(0, table.num_rows, gen.shard_rows)]
    threads = _threads(gen)
    common = {"model_path": model_path, "dtype": config.model.dtype, "trust_remote_code": config.model.trust_remote_code}
    dataset = ray.data.from_arrow(blocks).map_batches(
        GenerateStage,
        fn_constructor_kwargs={
            **common,
            "max_new_tokens": gen.max_new_tokens,
            "temperature": gen.temperature,
            "top_p": gen.top_p,
            "batch_size": gen.batch_size,
            "num_samples": gen.num_samples,
            "seed": gen.seed,
            "threads": threads,
            # T-SPIN's reference-free mode needs no reference log-probs: none are computed
            "score_reference": gen.fuse_reference and config.needs_reference,
            "reference_batch_size": gen.reference_batch_size,
        },
        batch_format="pyarrow",
        batch_size=rows_per_call(gen, table.num_rows),
        compute=ray.data.ActorPoolStrategy(min_size=gen.replicas[0], max_size=gen.replicas[1]),
        num_cpus=gen.cpus_per_replica,
    )
    if not gen.fuse_reference and config.needs_reference:
        dataset = _reference_pool(config, model_path, chat, dataset)
    return _commit(_oracle(config, dataset), output_dir)


def _oracle(config: Config, dataset):
    """SPPO: the preference oracle scores every row's K answers before its shard is committed."""
    if config.algorithm != "sppo":
        return dataset
    from spin_ray.oracle import add_preferences

    return add_preferences(dataset, config)


def _reference_pool(config: Config, model_path: str, chat: ChatFormat, dataset):
    return score_under(dataset, config, model_path, chat.tokenizer.pad_token_id)


def score_under(dataset, config: Config, model_path: str, pad_id: int | None = None):
    """Append a forward-only ReferenceStage pool: each row's ref_logp_* become its answers' log-probs
    under `model_path`. Used for the vLLM path's reference, rescoring the previous iteration's pairs
    (and T-SPIN's y_0) under p_t, and scoring the opponent's held-out answers under p_{t+1}. The pad id
    defaults to `model_path`'s tokenizer's."""
    import ray

    from spin_ray.generation.stages import ReferenceStage

    if pad_id is None:
        pad_id = load_tokenizer(model_path, config.model.trust_remote_code).pad_token_id
    gen = config.generation
    return dataset.map_batches(
        ReferenceStage,
        fn_constructor_kwargs={"model_path": model_path, "dtype": config.model.dtype,
                               "trust_remote_code": config.model.trust_remote_code,
                               "pad_id": pad_id, "batch_size": gen.reference_batch_size,
                               "threads": _threads(gen)},
        batch_format="pyarrow",
        batch_size=gen.shard_rows,
        compute=ray.data.ActorPoolStrategy(min_size=gen.reference_replicas[0], max_size=gen.reference_replicas[1]),
        num_cpus=gen.cpus_per_replica,
        num_gpus=1 if gen.engine == "vllm" else 0,  # on a GPU cluster the scorer sits on a GPU beside the engines
    )


def _commit(dataset, output_dir: str):
    from spin_ray.generation.stages import commit_shard

    # Writing a shard is I/O: it reserves no CPU, so it never waits behind the engine actors.
    return dataset.map_batches(
        commit_shard, fn_kwargs={"output_dir": output_dir}, batch_format="pyarrow", batch_size=None, num_cpus=0
    )


def _build_vllm_dataset(config: Config, model_path: str, chat: ChatFormat, table: pa.Table, output_dir: str):
    """GPU plan: K request rows per prompt -> ray.data.llm vLLM processor -> regroup per prompt ->
    reference pool -> shard commit. NOT RUN IN CI: vLLM cannot be installed on the CPU build box."""
    import ray
    from ray.data.llm import build_processor

    from spin_ray.generation.vllm_engine import build_processor_config, collect_samples, expand_requests

    gen = config.generation
    stops = chat.stop_token_ids
    sampling = sampling_description(gen.max_new_tokens, gen.temperature, gen.top_p, gen.num_samples, gen.seed)
    processor = build_processor(
        build_processor_config(config, model_path),
        postprocess=lambda row: {**row, "generated_text": row["generated_text"],
                                 "generated_tokens": list(row["generated_tokens"])},
    )
    requests = ray.data.from_arrow(table).flat_map(lambda row: expand_requests(row, config, stops))
    answered = processor(requests)
    rows = answered.groupby("prompt_id").map_groups(
        lambda group: pa.Table.from_pylist([collect_samples(group.to_pylist(), stops, model_path, sampling)]),
        batch_format="pyarrow",
    )
    if config.needs_reference:
        rows = _reference_pool(config, model_path, chat, rows)
    return _commit(_oracle(config, rows), output_dir)


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


def _stage_seconds(shards: list[str]) -> dict:
    """Sum of the per-shard seconds each stage recorded in its shard's metadata."""
    totals = {"engine_seconds": 0.0, "reference_seconds": 0.0}
    for file in shards:
        with fsspec.open(file, "rb") as handle:
            meta = pq.read_schema(handle).metadata or {}
        timing = json.loads(meta.get(b"spin_ray", b"{}"))
        for key in totals:
            totals[key] += float(timing.get(key, 0.0))
    return {key: round(value, 2) for key, value in totals.items()}


def _read_shards(files: list[str], columns: list[str]) -> pa.Table:
    from spin_ray.generation.stages import PAIRS_SCHEMA

    schema = pa.schema([PAIRS_SCHEMA.field(c) for c in columns])
    tables = []
    for file in files:
        with fsspec.open(file, "rb") as handle:
            tables.append(pq.read_table(handle, columns=columns).cast(schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def format_generation_summary(summary: dict) -> str:
    tps = summary["tokens_per_second"]
    return (
        f"generation: {summary['prompts']} prompts ({summary['prompts_generated_this_run']} generated this run), "
        f"{summary['generated_tokens']:,} tokens in {summary['seconds']}s"
        + (f" = {tps} tok/s" if tps else "")
        + f" (engine {summary.get('engine_seconds', 0)}s, reference {summary.get('reference_seconds', 0)}s of actor time)"
        + f"; response tokens mean {summary['mean_response_tokens']}, max {summary['max_response_tokens']}; "
        f"{summary['share_hit_max_new_tokens']:.1%} hit max_new_tokens ({summary['max_new_tokens']})"
    )
