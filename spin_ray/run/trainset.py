"""What a training phase trains on: the SFT rows, or an iteration's pairs plus the previous one's and T-SPIN's y_0.

Everything here is a Ray Dataset in the object store, materialized before training reserves the
CPUs: run lazily inside the trainer, a rescoring actor pool would wait forever for CPUs the training
workers hold. Only references and a few floats per prompt pass through the driver, never training rows;
the answers p_t's pass is asked to score reach it as token ids, as an evaluation's opponent answers do.

What iteration t mixes in needs log-probs under p_t: iteration t-1's generated answers and T-SPIN's y_0.
With the engines' reference (`Config.reference_source`), p_t's engine pass scores them while it answers iteration
t's prompts (`rescore_requests`, the pass's also-scored column); the human answers' log-probs under p_t are that
pass's reference column already. A pass that did not score them (committed by an older version, or a reference
scored outside the engines) leaves the rescoring to a scoring pool here, as before. With the trainer's reference
nothing is scored here: the training workers score every example, mixed-in ones included.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field

import pyarrow as pa

from spin_ray.config import Config
from spin_ray.data.prepare import tokenize_split
from spin_ray.data.tokenization import ChatFormat
from spin_ray.generation.pipeline import score_under
from spin_ray.generation.shards import ALSO_SCORE_COLUMNS, PAIRS_SCHEMA, committed_shards, read_shards, shards_dataset
from spin_ray.models.resolution import load_tokenizer
from spin_ray.objectives.algorithms import objective
from spin_ray.run.layout import RunLayout


@dataclass
class TrainingSet:
    dataset: object  # ray.data.Dataset, materialized
    source: str  # what it holds, for error messages and the manifest
    metrics: dict = field(default_factory=dict)  # recorded with the train phase (T-SPIN: the y_0 hash)
    artifacts: dict = field(default_factory=dict)


def sft_rows(config: Config, model: str, source: str | None = None):
    """The SFT data (data.train, or `source`) as token-id rows (no generated answer) for the warm start."""
    import ray

    chat = ChatFormat(load_tokenizer(model, config.model.trust_remote_code, config.model.cache_dir))
    if source is not None:  # a validation file: already cut to its size, whatever data.limit says of data.train
        config = config.model_copy(update={"data": config.data.model_copy(update={"limit": None})})
    split = tokenize_split(source or config.data.train, config, chat)
    table = pa.table({"prompt_id": split.records.column("prompt_id"),
                      "prompt_token_ids": pa.array(split.prompt_ids, pa.list_(pa.int32())),
                      "real_token_ids": pa.array(split.response_ids, pa.list_(pa.int32()))})
    return ray.data.from_blocks([table])  # metadata taken here, no remote task (generation/pipeline.py says why)


def iteration_set(config: Config, layout: RunLayout, t: int, pairs, opponent: str) -> TrainingSet:
    """Iteration t's training set: its own pairs (`pairs`), with iterations.mix_previous iteration t-1's pairs
    rescored under p_t, and for T-SPIN each row's y_0. Continued SFT (no generated answers, `pairs` None) trains on
    the human answers, twice over with mix_previous, so it takes as many steps as SPIN does on pairs of t and t-1."""
    if not objective(config).columns:
        rows = sft_rows(config, opponent)
        if config.iterations.mix_previous and t > 0:
            tagged = rows.map_batches(tag_prompt_ids, fn_kwargs={"prefix": f"iter{t - 1}/"}, batch_format="pyarrow",
                                      batch_size=None, num_cpus=0)
            return TrainingSet(rows.union(tagged).materialize(), f"{config.data.train} (human answers, twice)")
        return TrainingSet(rows, f"{config.data.train} (human answers)")
    source = layout.generation(t)
    dataset = pairs
    scores = pass_scores(config, layout, t)
    if scores is not None:
        import ray

        scores = ray.put(scores)  # one copy in the object store for every stage that reads it
    if config.iterations.mix_previous and t > 0:
        dataset = dataset.union(previous_pairs(config, layout, t, opponent, scores)).materialize()
        source += f" + iteration {t - 1} pairs"
    result = TrainingSet(dataset, source)
    if objective(config).needs_proto:
        attach_proto(result, config, layout, t, opponent, scores)
    if _rescores(config, t):
        result.metrics["rescored_in_engine_pass"] = scores is not None
    return result


def _rescores(config: Config, t: int) -> bool:
    """Whether iteration t's training set needs log-probs under p_t beyond its own pairs' (see the module doc)."""
    chosen = objective(config)
    return (t > 0 and config.engine_scores_reference and not chosen.needs_oracle
            and (config.iterations.mix_previous or chosen.needs_proto))


def _scored_in_pass(config: Config, t: int) -> bool:
    """Whether p_t's engine pass scores what iteration t mixes in; with `generation.fuse_reference: false` the
    reference pool scores these too."""
    return _rescores(config, t) and config.generation.fuse_reference


def rescore_requests(config: Config, layout: RunLayout, t: int) -> dict[str, list[list[int]]] | None:
    """What p_t's engine pass scores besides iteration t's own pairs, per prompt_id: iteration t-1's generated
    answers (mix_previous), then y_0 (T-SPIN). None when the pass scores nothing of the kind (`_scored_in_pass`)."""
    return _requested(config, layout, t, "generated_token_ids") if _scored_in_pass(config, t) else None


def _requested(config: Config, layout: RunLayout, t: int, column: str) -> dict[str, list]:
    """Per prompt_id, one value of `column` for each response `rescore_requests` asks to score, in its order."""
    read = functools.cache(lambda folder: list(_by_prompt(folder, column)))  # at t = 1 both folders are iteration 0's
    requested: dict[str, list] = {}
    if config.iterations.mix_previous:
        for pid, values in read(layout.generation(t - 1)):
            requested[pid] = list(values)
    if objective(config).needs_proto:
        for pid, values in read(layout.generation(0)):
            requested.setdefault(pid, []).append(values[0])
    return requested


def _by_prompt(folder: str, column: str):
    """(prompt_id, value) of one column of a generation folder's committed rows."""
    table = read_shards(committed_shards(folder), ["prompt_id", column])
    return zip(table.column("prompt_id").to_pylist(), table.column(column).to_pylist(), strict=True)


def pass_scores(config: Config, layout: RunLayout, t: int) -> pa.Table | None:
    """The log-probs under p_t that p_t's engine pass scored for iteration t's training set, by prompt_id
    (`ref_logp_real`: the human answer; `also_scored_logps`: `rescore_requests`' answers, in order); None when
    the pass did not score every one of them, so a scoring pool does."""
    if not _scored_in_pass(config, t):
        return None
    scored = ALSO_SCORE_COLUMNS[1]
    table = read_shards(committed_shards(layout.generation(t)), ["prompt_id", "ref_logp_real", scored])
    counts = {pid: len(lengths) for pid, lengths in _requested(config, layout, t, "generated_tokens").items()}
    have = dict(zip(table.column("prompt_id").to_pylist(), zip(table.column("ref_logp_real").to_pylist(),
                                                                table.column(scored).to_pylist(), strict=True)))
    for pid, count in counts.items():
        real, logps = have.get(pid, (None, None))
        if real is None or logps is None or len(logps) != count or None in logps:
            return None
    return table.combine_chunks()


def take_pass_scores(batch, scores, proto: bool = False):
    """Ray Data stage: iteration t-1's pairs (or, with `proto`, y_0's rows) get their log-probs under p_t from
    `pass_scores`: the human answer's from its prompt's reference, each generated answer's (with `proto`, y_0's
    alone, the last one scored) from the pass's also-scored log-probs."""
    import ray

    if isinstance(scores, ray.ObjectRef):
        scores = ray.get(scores)
    index = {pid: i for i, pid in enumerate(scores.column("prompt_id").to_pylist())}
    reals, also = scores.column("ref_logp_real").to_pylist(), scores.column(ALSO_SCORE_COLUMNS[1]).to_pylist()
    real_column, generated_column = [], []
    for pid, answers in zip(batch.column("prompt_id").to_pylist(), batch.column("generated_token_ids").to_pylist(),
                            strict=True):
        i = index[pid]
        real_column.append(reals[i])
        generated_column.append([also[i][-1]] if proto else also[i][:len(answers)])
    for name, values, kind in (("ref_logp_real", real_column, pa.float64()),
                               ("ref_logp_generated", generated_column, pa.list_(pa.float64()))):
        batch = batch.set_column(batch.schema.get_field_index(name), name, pa.array(values, kind))
    return batch


def tag_prompt_ids(batch, prefix: str):
    """Ray Data stage: prefix every prompt_id, so mixed-in rows stay distinct from this iteration's of one prompt."""
    ids = pa.array([f"{prefix}{pid}" for pid in batch.column("prompt_id").to_pylist()], pa.string())
    return batch.set_column(batch.schema.get_field_index("prompt_id"), "prompt_id", ids)


def previous_pairs(config: Config, layout: RunLayout, t: int, opponent: str, scores=None):
    """Iteration t-1's pairs with reference log-probs under p_t (the reference of iteration t): from p_t's engine
    pass (`scores`, see `pass_scores`), else recomputed by a scoring pool; prompt_ids tagged `iter{t-1}/`."""
    previous = shards_dataset(committed_shards(layout.generation(t - 1)))
    if not config.engine_scores_reference:  # the training workers score them (or nothing needs them)
        rescored = previous
    elif scores is None:
        rescored = score_under(previous, config, opponent)
    else:
        rescored = previous.map_batches(take_pass_scores, fn_kwargs={"scores": scores}, batch_format="pyarrow",
                                        batch_size=None, num_cpus=0)
    return (
        rescored
        .map_batches(tag_prompt_ids, fn_kwargs={"prefix": f"iter{t - 1}/"}, batch_format="pyarrow",
                     batch_size=None, num_cpus=0)
        .select_columns(PAIRS_SCHEMA.names)
    )


def proto_digest(ids: list[str], tokens: list[list[int]]) -> str:
    """Content hash of a set of y_0 answers: equal hashes mean the same y_0 rows."""
    lines = sorted(json.dumps([pid, list(t)]) for pid, t in zip(ids, tokens, strict=True))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def attach_proto(training: TrainingSet, config: Config, layout: RunLayout, t: int, opponent: str,
                 scores=None) -> None:
    """T-SPIN: attach to every row its proto-synthetic answer y_0 (proto_token_ids, ref_logp_proto).

    y_0 is iteration 0's first answer to the same prompt, drawn by the initial model p_0 and stored with the
    run: generated once, reused in every iteration. With a reference, its log-prob under this iteration's
    opponent p_t comes from p_t's engine pass (`scores`) or is rescored by a scoring pool (at t = 0 the opponent
    is p_0, whose scores are stored). The hash of the y_0 rows used is recorded with the train phase.
    """
    import ray

    proto_dir = layout.generation(0)
    rows = shards_dataset(committed_shards(proto_dir))
    if config.engine_scores_reference and t > 0:
        rows = (score_under(rows, config, opponent) if scores is None else
                rows.map_batches(take_pass_scores, fn_kwargs={"scores": scores, "proto": True},
                                 batch_format="pyarrow", batch_size=None, num_cpus=0))
    table = pa.concat_tables(ray.get(rows.select_columns(["prompt_id", "generated_token_ids", "ref_logp_generated"])
                                     .to_arrow_refs())).sort_by("prompt_id")
    ids = table.column("prompt_id").to_pylist()
    tokens = [answers[0] for answers in table.column("generated_token_ids").to_pylist()]
    refs = [(r or [None])[0] for r in table.column("ref_logp_generated").to_pylist()]
    proto = pa.table({"prompt_id": ids, "proto_token_ids": pa.array(tokens, pa.list_(pa.int32())),
                      "ref_logp_proto": pa.array(refs, pa.float64())})
    training.dataset = training.dataset.map_batches(
        join_proto, fn_kwargs={"proto": ray.put(proto), "source": proto_dir}, batch_format="pyarrow",
        batch_size=None, num_cpus=0).materialize()
    training.source += f" + y_0 from {proto_dir}"
    training.metrics["proto_hash"] = proto_digest(ids, tokens)
    training.artifacts["proto"] = proto_dir


def join_proto(batch, proto, source: str):
    """Ray Data stage: look up each row's y_0 by prompt_id (an `iterN/` tag from mixing is stripped)."""
    import ray

    if isinstance(proto, ray.ObjectRef):
        proto = ray.get(proto)
    index = {pid: i for i, pid in enumerate(proto.column("prompt_id").to_pylist())}
    positions = []
    for pid in batch.column("prompt_id").to_pylist():
        key = pid.rsplit("/", 1)[-1]
        if key not in index:
            raise ValueError(f"{source}: no proto-synthetic answer y_0 for prompt_id {key}; the data changed "
                             "since iteration 0 of this run, use a new run name")
        positions.append(index[key])
    picked = proto.take(pa.array(positions, pa.int64()))
    for name in ("proto_token_ids", "ref_logp_proto"):
        if name in batch.column_names:
            batch = batch.drop_columns([name])
        batch = batch.append_column(name, picked.column(name))
    return batch
