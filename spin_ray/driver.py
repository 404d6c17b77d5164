"""The self-play driver: a named Ray actor that runs the iterations (SPIN, SPPO, T-SPIN) and keeps the run's manifest.

For each iteration t: the opponent p_t answers the training prompts (generation pipeline; SPPO adds
K answers and the oracle's win rates), the pairs (plus the previous iteration's, rescored under p_t,
with iterations.mix_previous; T-SPIN adds the stored y_0 of each prompt) go to the
TorchTrainer through the object store, p_{t+1} is exported and evaluated against p_t on held-out
data, and the manifest is rewritten. Only dataset references and small summaries pass through here.
Re-running the same config and run name continues where the last job stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from spin_ray.config import Config, build_config
from spin_ray.manifest import DONE, Manifest, run_dir

DRIVER_NAMESPACE = "spin_ray"


def driver_name(config: Config) -> str:
    return f"spin-ray-driver:{config.run.storage_path}:{config.run.name}"


class RunAlreadyActive(RuntimeError):
    """Another live job is driving the same run."""


def _phase(manifest: Manifest, name: str, iteration: int | None, echo, body: Callable[[], tuple[dict, dict]]) -> dict:
    """Run one phase unless the manifest says it is done; record its outcome either way."""
    label = name if iteration is None else f"iteration {iteration}: {name}"
    if manifest.is_done(name, iteration):
        echo(f"[spin-ray] {label}: done in an earlier job, skipped")
        return manifest.phase(name, iteration)
    echo(f"[spin-ray] {label}: started")
    manifest.start(name, iteration)
    started = time.perf_counter()
    try:
        metrics, artifacts = body()
    except BaseException as error:
        manifest.fail(name, iteration, error)
        raise
    manifest.finish(name, iteration, time.perf_counter() - started, metrics, artifacts)
    echo(f"[spin-ray] {label}: done in {time.perf_counter() - started:.1f}s")
    return manifest.phase(name, iteration)


def _sft_dataset(config: Config, model_path: str):
    """The SFT data as token-id pairs (no generated answer) for the warm start."""
    import pyarrow as pa
    import ray

    from spin_ray.models import load_tokenizer
    from spin_ray.prepare import tokenize_split
    from spin_ray.tokenization import ChatFormat

    chat = ChatFormat(load_tokenizer(model_path, config.model.trust_remote_code))
    split = tokenize_split(config.data.train, config, chat)
    table = pa.table({"prompt_id": split.records.column("prompt_id"),
                      "prompt_token_ids": pa.array(split.prompt_ids, pa.list_(pa.int32())),
                      "real_token_ids": pa.array(split.response_ids, pa.list_(pa.int32()))})
    return ray.data.from_arrow(table)


def tag_prompt_ids(batch, prefix: str):
    import pyarrow as pa

    ids = pa.array([f"{prefix}{pid}" for pid in batch.column("prompt_id").to_pylist()], pa.string())
    return batch.set_column(batch.schema.get_field_index("prompt_id"), "prompt_id", ids)


def _previous_pairs(config: Config, iteration: int, opponent: str):
    """Iteration t-1's pairs with reference log-probs recomputed under p_t (the reference of iteration t),
    prompt_ids tagged so they stay distinct from this iteration's pairs of the same prompts."""
    from spin_ray.generation.pipeline import _shard_files, generation_dir, score_under, shards_dataset
    from spin_ray.generation.stages import PAIRS_SCHEMA

    previous = shards_dataset(_shard_files(generation_dir(config, iteration - 1)))
    return (
        score_under(previous, config, opponent)
        .map_batches(tag_prompt_ids, fn_kwargs={"prefix": f"iter{iteration - 1}/"}, batch_format="pyarrow",
                     batch_size=None, num_cpus=0)
        .select_columns([f.name for f in PAIRS_SCHEMA])
    )


def _with_proto(dataset, config: Config, iteration: int, opponent: str):
    """T-SPIN: attach to every row its proto-synthetic answer y_0 (proto_token_ids, ref_logp_proto).

    y_0 is iteration 0's first answer to the same prompt, drawn by the initial model p_0 and stored
    with the run: generated once, reused in every iteration. With a reference, its log-prob is rescored
    under this iteration's opponent p_t (at t = 0 the opponent is p_0, whose scores are stored).
    Returns the dataset (materialized) and a hash of the y_0 rows used, recorded in the manifest.
    """
    import pyarrow as pa
    import ray

    from spin_ray.generation.pipeline import _shard_files, generation_dir, score_under, shards_dataset

    proto_dir = generation_dir(config, 0)
    rows = shards_dataset(_shard_files(proto_dir))
    if config.needs_reference and iteration > 0:
        rows = score_under(rows, config, opponent)
    table = rows.select_columns(["prompt_id", "generated_token_ids", "ref_logp_generated"]).to_arrow_refs()
    table = pa.concat_tables(ray.get(table)).sort_by("prompt_id")
    ids = table.column("prompt_id").to_pylist()
    tokens = [answers[0] for answers in table.column("generated_token_ids").to_pylist()]
    refs = [(r or [None])[0] for r in table.column("ref_logp_generated").to_pylist()]
    proto = pa.table({"prompt_id": ids, "proto_token_ids": pa.array(tokens, pa.list_(pa.int32())),
                      "ref_logp_proto": pa.array(refs, pa.float64())})
    digest = proto_digest(ids, tokens)
    joined = dataset.map_batches(attach_proto, fn_kwargs={"proto": ray.put(proto), "source": proto_dir},
                                 batch_format="pyarrow", batch_size=None, num_cpus=0).materialize()
    return joined, digest, proto_dir


def proto_digest(ids: list[str], tokens: list[list[int]]) -> str:
    """Content hash of a set of y_0 answers (prompt_id order): equal hashes mean the same y_0 rows."""
    import hashlib
    import json

    lines = sorted(json.dumps([pid, list(t)]) for pid, t in zip(ids, tokens, strict=True))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def attach_proto(batch, proto, source: str):
    """Ray Data stage: look up each row's y_0 by prompt_id (an `iterN/` tag from mixing is stripped)."""
    import pyarrow as pa
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


GENERATION_KEYS = ("prompts", "prompts_generated_this_run", "generated_tokens", "seconds", "tokens_per_second",
                   "engine_seconds", "reference_seconds", "engine_tokens_per_second", "mean_response_tokens",
                   "share_hit_max_new_tokens", "answers_per_prompt", "oracle_mean_score", "oracle_all_tied_share")
TRAINING_KEYS = ("steps", "resumed_from_step", "pairs", "loss", "rewards/real", "rewards/generated",
                 "rewards/margins", "rewards/accuracies", "nll", "training_seconds", "training_tokens_per_second",
                 "export_seconds",
                 # SPPO
                 "rewards/winner", "rewards/loser", "win_rate/winner", "win_rate/loser",
                 # T-SPIN
                 "loss/current", "loss/historical", "rewards/proto", "rewards/historical_margins")


def run_iterations(config: Config, force: bool = False, echo: Callable[[str], None] = print) -> dict:
    """SPIN's outer loop (plain function; the driver actor calls it). Returns the final manifest dict."""
    from spin_ray.evaluation import evaluate_model
    from spin_ray.generation.pipeline import run_generation
    from spin_ray.models import resolve_model
    from spin_ray.report import format_table, write_report
    from spin_ray.training.trainer import run_training

    manifest = Manifest.open(config, force)
    root = run_dir(config)
    evaluate = config.evaluation.enabled and config.data.eval is not None
    opponent = resolve_model(config.model.name, config.model.cache_dir).path

    if config.iterations.sft_warm_start:
        def sft():
            sft_config = config.model_copy(update={"training": config.training.model_copy(
                update={"objective": "sft", "epochs": config.iterations.sft_epochs})})
            summary = run_training(sft_config, _sft_dataset(config, opponent), opponent, source=config.data.train,
                                   base_dir=f"{root}/sft")
            return _pick(summary, TRAINING_KEYS), {"model": summary["export_dir"], "train": f"{root}/sft/train"}

        opponent = _phase(manifest, "sft", None, echo, sft)["artifacts"]["model"]

    opponent_eval = None
    if evaluate:
        def baseline():
            metrics = evaluate_model(config, opponent, f"{root}/baseline/eval")
            return metrics, {"eval": f"{root}/baseline/eval", "answers": metrics["answers"]}

        opponent_eval = _phase(manifest, "baseline_eval", None, echo, baseline)["artifacts"]["answers"]

    converged = False
    for t in range(config.iterations.count):
        manifest.iteration(t)["opponent"] = opponent
        holder: dict = {}

        def generate():
            result = run_generation(config, t, model=opponent)
            holder["dataset"] = result.dataset
            return _pick(result.summary, GENERATION_KEYS), {"pairs": result.output_dir}

        _phase(manifest, "generate", t, echo, generate)

        def train():
            # A generation finished by an earlier job is read back from its committed shards.
            dataset = holder["dataset"] if "dataset" in holder else run_generation(config, t, model=opponent).dataset
            source = manifest.phase("generate", t)["artifacts"]["pairs"]
            if config.iterations.mix_previous and t > 0:
                # Materialized here, before training reserves the CPUs: run lazily inside the trainer,
                # the rescoring actors would wait forever for CPUs the training workers hold.
                dataset = dataset.union(_previous_pairs(config, t, opponent)).materialize()
                source += f" + iteration {t - 1} pairs"
            extra_metrics, extra_artifacts = {}, {}
            if config.algorithm == "tspin":
                dataset, proto_hash, proto_dir = _with_proto(dataset, config, t, opponent)
                extra_metrics["proto_hash"], extra_artifacts["proto"] = proto_hash, proto_dir
                source += f" + y_0 from {proto_dir}"
            summary = run_training(config, dataset, opponent, iteration=t, source=source)
            return ({**_pick(summary, TRAINING_KEYS), **extra_metrics},
                    {"model": summary["export_dir"], "train": f"{root}/iter_{t}/train", **extra_artifacts})

        next_model = _phase(manifest, "train", t, echo, train)["artifacts"]["model"]

        if evaluate:
            def evaluation():
                metrics = evaluate_model(config, next_model, f"{root}/iter_{t}/eval", opponent_answers=opponent_eval)
                return metrics, {"eval": f"{root}/iter_{t}/eval", "answers": metrics["answers"]}

            record = _phase(manifest, "evaluate", t, echo, evaluation)
            opponent_eval = record["artifacts"]["answers"]
            accuracy = record["metrics"].get("reward_accuracy")
            threshold = config.iterations.converged_accuracy
            if threshold is not None and accuracy is not None and accuracy <= threshold:
                echo(f"[spin-ray] iteration {t}: held-out reward accuracy {accuracy:.3f} <= {threshold}: "
                     "converged (the model no longer tells its opponent's answers from human ones)")
                manifest.set_status("converged", final_model=next_model, stopped_after_iteration=t)
                converged = True
                opponent = next_model
                break
        opponent = next_model
        echo(format_table(manifest.data))

    if not converged:
        manifest.set_status(DONE, final_model=opponent)
    paths = write_report(root)
    manifest.data["report"] = paths
    manifest.save()
    return manifest.data


def _pick(summary: dict, keys: tuple[str, ...]) -> dict:
    return {k: summary[k] for k in keys if k in summary}


class DriverActor:
    """The named actor the job entrypoint starts (as `ray.remote(DriverActor)`); it owns the run."""

    def __init__(self, config: dict, force: bool):
        self.config = build_config(config, "driver")
        self.force = force

    def run(self) -> dict:
        return run_iterations(self.config, self.force)

    def status(self) -> dict | None:
        manifest = Manifest.read(run_dir(self.config))
        return None if manifest is None else manifest.data


def start_driver(config: Config, force: bool = False):
    """Create the run's named driver actor; refuse if another live job already drives this run."""
    import ray

    name = driver_name(config)
    try:
        ray.get_actor(name, namespace=DRIVER_NAMESPACE)
    except ValueError:
        pass
    else:
        raise RunAlreadyActive(f"run {config.run.name!r} is already being driven by a live job (actor {name!r}); "
                               "stop that job first (ray job stop ...)")
    # num_cpus=0: the driver only orchestrates; every CPU stays free for engines and trainers.
    # Not detached: stopping the job stops the driver, and the manifest lets the next job continue.
    actor_class = ray.remote(num_cpus=0, max_restarts=0)(DriverActor)
    return actor_class.options(name=name, namespace=DRIVER_NAMESPACE).remote(config.to_dict(), force)
