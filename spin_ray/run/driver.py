"""The self-play driver: a named Ray actor that runs the iterations (SPIN, SPPO, T-SPIN) and keeps the run's manifest.

For each iteration t: the opponent p_t answers the training prompts, p_{t+1} is trained on the
pairs (see `spin_ray.run.trainset` for what is mixed in), exported, and evaluated against p_t on held-out
data; every phase is recorded in the manifest. Re-running the same config and run name continues
where the last job stopped. The driver holds the run's lease in storage while it works, so a second
driver on the same run, from any cluster, is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from spin_ray.config import Config, build_config
from spin_ray.generation.oracle import preference_stage
from spin_ray.generation.pipeline import PassTask, run_generation, run_pass
from spin_ray.generation.shards import read_completion, shards_dataset
from spin_ray.logs import quiet_library_logs
from spin_ray.models.resolution import publish_folder, resolve_model
from spin_ray.objectives.algorithms import STABILISERS, objective
from spin_ray.run.attempts import Attempt, end_earlier_attempts
from spin_ray.run.cluster import end_earlier_worker_group, ensure_resources
from spin_ray.run.collapse import collapse_signals
from spin_ray.run.evaluation import (
    VALIDATION_KEYS,
    finish_evaluation,
    prepare_evaluation,
    start_evaluation_cache,
    validation_config,
    validation_source,
)
from spin_ray.run.layout import RunLayout
from spin_ray.run.lease import LeaseHeld, RunLease
from spin_ray.run.manifest import DONE, Manifest
from spin_ray.run.model_card import write_model_card
from spin_ray.run.report import format_table, iteration_rows, write_report
from spin_ray.run.selection import better_model
from spin_ray.run.tracking import Tracker
from spin_ray.run.trainset import iteration_set, rescore_requests, sft_rows
from spin_ray.storage import atomic_write_json, is_local, join, local_copy, read_json

DRIVER_NAMESPACE = "spin_ray"


def driver_name(config: Config) -> str:
    return f"spin-ray-driver:{config.run.storage_path}:{config.run.name}"


class RunAlreadyActive(RuntimeError):
    """Another live driver (this cluster's named actor, or any cluster's lease holder) drives the same run."""


@dataclass(frozen=True)
class GeneratedPairs:
    """What a generate phase leaves: p_t's answers (and their scores) in a generation folder."""
    pairs: str

    def to_record(self) -> dict:
        return {"pairs": self.pairs}

    @classmethod
    def from_record(cls, record: dict) -> "GeneratedPairs":
        return cls(record["pairs"])


@dataclass(frozen=True)
class TrainedModel:
    """What a train (or sft) phase leaves: the export, its training folder, and what it trained on besides."""
    model: str  # p_{t+1}: a Hugging Face folder, or an adapter folder with LoRA
    train: str  # metrics.jsonl and, while it trains, the checkpoints
    merged_model: str | None = None  # with training.lora.export_merged
    inputs: dict[str, str] = field(default_factory=dict)  # folders the training set drew on (T-SPIN's proto, ...)

    def to_record(self) -> dict:
        merged = {"merged_model": self.merged_model} if self.merged_model else {}
        return {"model": self.model, "train": self.train, **merged, **self.inputs}

    @classmethod
    def from_record(cls, record: dict) -> "TrainedModel":
        own = ("model", "train", "merged_model")
        return cls(record["model"], record["train"], record.get("merged_model"),
                   {key: value for key, value in record.items() if key not in own})


@dataclass(frozen=True)
class Evaluation:
    """What an evaluation phase leaves: its folder (metrics, per-prompt scores) and the model's held-out answers,
    the opponent answers of the next evaluation."""
    eval: str
    answers: str

    def to_record(self) -> dict:
        return {"eval": self.eval, "answers": self.answers}

    @classmethod
    def from_record(cls, record: dict) -> "Evaluation":
        return cls(record["eval"], record["answers"])


Artifacts = GeneratedPairs | TrainedModel | Evaluation


@dataclass
class Produced:
    """What a phase body returns: its metrics for the manifest, what it left in storage, and (a generate phase) the
    pairs as a Ray Dataset for the train phase after it."""
    metrics: dict
    artifacts: Artifacts
    dataset: object | None = None  # ray.data.Dataset


@dataclass
class Outcome:
    """A phase's result as the driver reads it: produced now, or read back from the manifest of an earlier job."""
    metrics: dict
    artifacts: Artifacts
    dataset: object | None = None  # the pairs of a generate phase run now (None when read back)


@dataclass
class Phases:
    """Runs each phase unless the manifest says it is done, recording its outcome either way."""
    manifest: Manifest
    lease: RunLease
    echo: Callable[[str], None]
    config: Config
    tracker: Tracker

    def run(self, name: str, iteration: int | None, body: Callable[[], Produced]) -> Outcome:
        """Run the phase's body and record it, or read back what an earlier job recorded."""
        if self.lease.lost:
            raise RunAlreadyActive(str(self.lease.lost))
        label = name if iteration is None else f"iteration {iteration}: {name}"
        if self.manifest.is_done(name, iteration):
            self.echo(f"[spin-ray] {label}: done in an earlier job, skipped")
            record = self.manifest.phase(name, iteration)
            return Outcome(record["metrics"], PHASE_ARTIFACTS[name].from_record(record["artifacts"]))
        self.echo(f"[spin-ray] {label}: started")
        self.manifest.start(name, iteration)
        started = time.perf_counter()
        try:
            if PHASE_KIND[name] == "train":  # what an earlier attempt's workers still hold is ended first
                ended = end_earlier_worker_group(RunLayout.of(self.config).train(iteration),
                                                 self.config.run.resource_wait_s, self.echo)
                if ended:
                    self.manifest.phase(name, iteration).setdefault("ended_earlier_worker_groups", []).append(ended)
                    self.manifest.save()
            ensure_resources(self.config, PHASE_KIND[name], self.echo)
            out = body()
        except BaseException as error:
            self.manifest.fail(name, iteration, error)
            raise
        seconds = time.perf_counter() - started
        self.manifest.finish(name, iteration, seconds, out.metrics, out.artifacts.to_record())
        # a step per model: p0 at 0, p(t+1) at t+1; generation of iteration t is p_t's, at t
        step = 0 if iteration is None else iteration + (name != "generate")
        # train/* are the per-step metrics at global steps: the training phase's summary goes beside them
        prefix = {"baseline_eval": "evaluate", "train": "train_phase"}.get(name, name)
        self.tracker.scalars(prefix, {**out.metrics, "seconds": seconds}, step)
        self.tracker.flush()
        self.echo(f"[spin-ray] {label}: done in {seconds:.1f}s")
        return Outcome(out.metrics, out.artifacts, out.dataset)


# What each phase asks of the cluster (`spin_ray.run.cluster.phase_requests`).
PHASE_KIND = {"sft": "train", "baseline_eval": "evaluate", "generate": "generate", "train": "train",
              "evaluate": "evaluate"}
PHASE_ARTIFACTS = {"sft": TrainedModel, "baseline_eval": Evaluation, "generate": GeneratedPairs, "train": TrainedModel,
                   "evaluate": Evaluation}


def initial_model(config: Config, layout: RunLayout) -> str:
    """p_0 as every node can load it: with a bucket, an alias (converted here once) or a local folder is uploaded
    into the run (`base_model/`, once per content) and nodes stage it from there; else its local path."""
    resolved = resolve_model(config.model.name, config.model.cache_dir)
    if resolved.source in ("alias", "local") and not is_local(layout.root):
        publish_folder(resolved.path, layout.base_model)
        return layout.base_model
    return resolved.path


def _generate(config: Config, layout: RunLayout, t: int, opponent: str, attempt: Attempt) -> Produced:
    """p_t's answers to the training prompts: done already when the engine pass that evaluated p_t generated them."""
    stage = None
    if objective(config).needs_oracle:

        stage = preference_stage(config)
    in_evaluation_pass = read_completion(layout.generation(t)) is not None
    also_score = None if in_evaluation_pass else rescore_requests(config, layout, t)
    result = run_generation(config, opponent, layout.generation(t), preference_stage=stage, also_score=also_score,
                            tally_options=attempt.options(f"pass:iter_{t}/generation"))
    summary = result.summary
    if in_evaluation_pass:  # the engines that answered them started in the evaluation phase's pass, counted there
        summary = dataclasses.replace(summary, engine_starts=0)
    metrics = summary.to_record()
    if in_evaluation_pass:
        metrics["answered_in"] = "the engine pass that evaluated the opponent"
    return Produced(metrics, GeneratedPairs(result.output_dir), result.dataset)


def _next_generation(config: Config, layout: RunLayout, t: int):
    """The generation of iteration t (p_t's answers to the training prompts, and the log-probs under p_t of what
    iteration t mixes in) as a prompt set of the engine pass that evaluates p_t, or None where it cannot join it:
    beyond the last iteration, continued SFT (no answers), SPPO (its oracle scores the answers before they commit)."""
    chosen = objective(config)
    if t >= config.iterations.count or not chosen.columns or chosen.needs_oracle:
        return None
    return PassTask(config, layout.generation(t), config.data.train, config.engine_scores_reference,
                    also_score=rescore_requests(config, layout, t))


def _train(config: Config, layout: RunLayout, t: int | None, dataset, opponent: str, source: str, attempt: Attempt,
           extra_metrics: dict | None = None, extra_artifacts: dict | None = None, validation=None) -> Produced:
    """Train p_{t+1} (the SFT warm start's model when t is None) in a TrainingRun actor named for the attempt."""
    # torch.distributed's checkpoint modules come with it: 0.75 s of every spin-ray command's start otherwise
    from spin_ray.training.trainer import run_training_named

    merged = layout.merged_model(t) if config.training.lora.export_merged else None
    summary = run_training_named(attempt.options("train:" + ("sft" if t is None else f"iter_{t}")), config=config,
                                 dataset=dataset, model_path=opponent, train_dir=layout.train(t),
                                 export_dir=layout.model(t), source=source, validation=validation,
                                 patience=config.iterations.sft_patience, merged_dir=merged)
    trained = TrainedModel(summary.export_dir, layout.train(t), merged, dict(extra_artifacts or {}))
    return Produced({**summary.metrics(), **(extra_metrics or {})}, trained)


def _evaluate(config: Config, model: str, output_dir: str, opponent_answers: str | None, attempt: Attempt,
              validation: str | None = None, then_generate=None) -> Produced:
    """Held-out evaluation of `model` on data.eval, and with `validation` (a source) its validation metrics too.
    Without data.eval (a run that must not see the test split: a settings grid) the validation split is the
    held-out set, reward accuracy included. `then_generate` (a PassTask: the next iteration's answers, `model` being
    the next opponent) joins the same engine pass, so the model's engines start once for all of it."""
    if config.data.eval is None:
        evaluations = {"held_out": prepare_evaluation(validation_config(config), model, output_dir, opponent_answers,
                                                      data=validation)}
    else:
        evaluations = {"held_out": prepare_evaluation(config, model, output_dir, opponent_answers)}
        if validation is not None:
            evaluations["validation"] = prepare_evaluation(validation_config(config), model,
                                                           join(output_dir, "validation"), data=validation)
    # a dict is a set evaluated by an earlier job (its metrics); the others need this engine pass
    pending = {name: evaluation for name, evaluation in evaluations.items() if not isinstance(evaluation, dict)}
    names = [*pending, *(["then_generate"] if then_generate is not None else [])]
    tasks = [evaluation.task for evaluation in pending.values()] + ([then_generate] if then_generate else [])
    label = "/".join(output_dir.rstrip("/").split("/")[-2:])
    results = dict(zip(names, run_pass(config, model, tasks, tally_options=attempt.options(f"pass:{label}")),
                       strict=True)) if tasks else {}
    done = {name: finish_evaluation(pending[name], results[name]) if name in pending else evaluation
            for name, evaluation in evaluations.items()}
    metrics = dict(done["held_out"])
    validated = done["held_out"] if config.data.eval is None else done.get("validation")
    if validated is not None:
        metrics.update({f"validation_{key}": validated.get(key) for key in VALIDATION_KEYS})
    # every set answered now carries the pass's count; sets read back from an earlier job add nothing
    metrics["engine_starts"] = max((r.summary.engine_starts for r in results.values() if r.generated_now),
                                   default=0)
    if then_generate is not None:
        metrics["pass_generated"] = then_generate.output_dir
    return Produced({k: v for k, v in metrics.items() if k != "key"}, Evaluation(output_dir, metrics["answers"]))


START_METRICS = "start_metrics.json"  # written last into a start-evaluation cache folder: the whole phase's metrics


def _evaluate_start(config: Config, model: str, layout: RunLayout, validation: str | None, echo,
                    attempt: Attempt) -> Produced:
    """p_0's evaluation, through the cache of start-model evaluations keyed by the model's content, the evaluation
    data and settings: runs that start from the same model (benchmark arms, a resubmitted run under a new name)
    evaluate it once."""
    cache = start_evaluation_cache(config, model, validation)
    then_generate = _next_generation(config, layout, 0)
    if cache is None:  # a hub model: no content to key on
        return _evaluate(config, model, layout.evaluation(None), None, attempt, validation, then_generate)
    cached = read_json(join(cache, START_METRICS))
    if cached is not None:
        echo(f"[spin-ray] baseline_eval: the same model, data and settings were evaluated before: reusing {cache}")
        return Produced({**cached, "model": model, "cached": True, "engine_starts": 0},
                        Evaluation(cache, cached["answers"]))
    produced = _evaluate(config, model, cache, None, attempt, validation, then_generate)
    atomic_write_json(join(cache, START_METRICS), {k: v for k, v in produced.metrics.items() if k != "pass_generated"})
    return produced


def run_iterations(config: Config, force: bool = False, echo: Callable[[str], None] = print,
                   lease_token: str | None = None, owner: str | None = None, ended_holder: str | None = None) -> dict:
    """The self-play outer loop (a plain function; the driver actor calls it). Returns the final manifest dict.
    `ended_holder`: the lease token of a driver whose job is known to have ended (its lease is waited out). Each call
    is a driver attempt: the actors it starts are named for it, and those an earlier attempt of the run left are
    ended before anything else (`spin_ray.run.attempts`)."""
    layout = RunLayout.of(config)
    lease = RunLease(layout.lease, config.run.lease_ttl_s, token=lease_token, owner=owner, ray_session=ray_session())
    try:
        lease.acquire(echo, ended=ended_holder)
    except LeaseHeld as error:
        raise RunAlreadyActive(str(error)) from None
    lease.start_heartbeat()
    run = None
    try:
        run = open_run(config, layout, lease, force, echo)
        opponent = warm_start(run, run.manifest.data["base_model"])
        answers = baseline(run, opponent)
        for iteration in range(config.iterations.count):
            opponent, answers, stopped = run_iteration(run, iteration, opponent, answers)
            if stopped:
                break
        else:
            run.manifest.set_status(DONE, final_model=opponent)
        return close_run(run)
    finally:
        if run is not None and run.tracker is not None:  # the run failed: what was logged stays, marked failed
            run.tracker.close(failed=True)
        lease.release()


@dataclass
class DriverRun:
    """One driver attempt's run as `run_iterations` drives it."""
    config: Config
    layout: RunLayout
    manifest: Manifest
    phases: Phases
    tracker: Tracker | None  # None once closed
    attempt: Attempt
    echo: Callable[[str], None]
    validation: str | None  # the validation split's source, with evaluation on
    evaluate: bool  # held-out evaluation after each model (evaluation.enabled and a held-out set)


def open_run(config: Config, layout: RunLayout, lease: RunLease, force: bool, echo) -> DriverRun:
    """End what an earlier attempt left running, open the manifest and the tracking run."""
    attempt = Attempt.of(config)
    ended = end_earlier_attempts(attempt, config.run.resource_wait_s, echo)
    manifest = Manifest.open(config, force)
    if ended:
        manifest.data.setdefault("ended_earlier_attempts", []).append(ended)
    tracker = Tracker(config, layout, manifest.data.setdefault("tracking", {}))
    try:
        tracker.params()
        manifest.save()  # the tracking run's ids: a resubmitted job continues it
        manifest.data["base_model"] = initial_model(config, layout)
        validation = validation_source(config, layout.validation_data) if config.evaluation.enabled else None
    except BaseException:  # what was logged stays, the tracking run ends as failed
        tracker.close(failed=True)
        raise
    evaluate = config.evaluation.enabled and (config.data.eval is not None or validation is not None)
    return DriverRun(config, layout, manifest, Phases(manifest, lease, echo, config, tracker), tracker, attempt, echo,
                     validation, evaluate)


def warm_start(run: DriverRun, opponent: str) -> str:
    """With iterations.sft_warm_start, SFT on the human answers first (epochs by validation NLL with auto); the
    model p_0 self-play starts from."""
    config, layout = run.config, run.layout
    if not config.iterations.sft_warm_start:
        return opponent
    it = config.iterations
    auto = it.sft_epochs == "auto"
    sft_config = config.model_copy(update={"training": config.training.model_copy(  # SFT takes no stabiliser
        update={"objective": "sft", "epochs": it.sft_max_epochs if auto else it.sft_epochs, **STABILISERS})})

    def sft() -> Produced:
        held_out = sft_rows(config, opponent, validation_source(config, layout.validation_data)) if auto else None
        with run.tracker.following(layout.train(None), "sft", 0):
            return _train(sft_config, layout, None, sft_rows(config, opponent), opponent, config.data.train,
                          run.attempt, validation=held_out)

    trained = run.phases.run("sft", None, sft).artifacts
    write_model_card(layout, run.manifest.data, None)
    return trained.model


def baseline(run: DriverRun, opponent: str) -> str | None:
    """p_0's held-out evaluation (its answers are the first opponent answers); None without evaluation."""
    if not run.evaluate:
        return None
    outcome = run.phases.run("baseline_eval", None, lambda: _evaluate_start(
        run.config, opponent, run.layout, run.validation, run.echo, run.attempt))
    _select(run.config, run.manifest, None, opponent, run.echo)
    return outcome.artifacts.answers


def run_iteration(run: DriverRun, iteration: int, opponent: str,
                  opponent_answers: str | None) -> tuple[str, str | None, bool]:
    """Iteration t: p_t's answers, p_{t+1} trained and exported, then evaluated against p_t. Returns the next
    opponent, its held-out answers, and whether the run stops here (collapse, convergence)."""
    config, layout, manifest, phases, attempt = run.config, run.layout, run.manifest, run.phases, run.attempt
    manifest.iteration(iteration)["opponent"] = opponent
    pairs = None
    if objective(config).columns:  # continued SFT (training.objective sft) reads no generated answers
        generated = phases.run("generate", iteration, lambda: _generate(config, layout, iteration, opponent, attempt))
        pairs = generated.dataset
        if pairs is None:  # generated by an earlier job: read back from its committed shards
            pairs = shards_dataset(read_completion(generated.artifacts.pairs).shards).materialize()

    def train() -> Produced:
        trainset = iteration_set(config, layout, iteration, pairs, opponent)
        with run.tracker.following(layout.train(iteration), f"iter_{iteration}",
                                   steps_before(manifest.data, iteration)):
            return _train(iteration_config(config, iteration), layout, iteration, trainset.dataset, opponent,
                          trainset.source, attempt, trainset.metrics, trainset.artifacts)

    next_model = phases.run("train", iteration, train).artifacts.model
    write_model_card(layout, manifest.data, iteration)
    if run.evaluate:
        evaluated = phases.run("evaluate", iteration, lambda: _evaluate(
            config, next_model, layout.evaluation(iteration), opponent_answers, attempt, run.validation,
            _next_generation(config, layout, iteration + 1)))
        opponent_answers = evaluated.artifacts.answers
        _select(config, manifest, iteration, next_model, run.echo)
        write_model_card(layout, manifest.data, iteration)  # now with its held-out metrics
        if _collapsing(config, manifest, iteration, run.echo):
            manifest.set_status("collapsed", final_model=opponent, stopped_after_iteration=iteration)
            return opponent, opponent_answers, True
        if _converged(config, evaluated.metrics.get("reward_accuracy"), iteration, run.echo):
            manifest.set_status("converged", final_model=next_model, stopped_after_iteration=iteration)
            return next_model, opponent_answers, True
    run.echo(format_table(manifest.data))
    return next_model, opponent_answers, False


def close_run(run: DriverRun) -> dict:
    """Write the report, log its rows and plot to the tracker, close the tracking run; the final manifest."""
    manifest, tracker = run.manifest, run.tracker
    manifest.data["report"] = write_report(run.layout)
    manifest.save()
    for row in iteration_rows(manifest.data):
        tracker.scalars("report", row, 0 if row["iteration"] is None else row["iteration"] + 1)
    with local_copy(manifest.data["report"]["plot"]) as picture:
        tracker.artifact(picture)
    tracker.close()
    run.tracker = None
    return manifest.data


def iteration_config(config: Config, t: int) -> Config:
    """The config iteration t trains with: its learning rate from iterations.learning_rates, when set."""
    rates = config.iterations.learning_rates
    if not rates:
        return config
    rate = rates[min(t, len(rates) - 1)]
    return config.model_copy(update={"training": config.training.model_copy(update={"learning_rate": rate})})


def steps_before(manifest: dict, t: int) -> int:
    """Optimizer steps of the training stages before iteration t (the SFT warm start, iterations < t): the global
    step at which iteration t's training metrics start."""
    stages = [manifest["phases"].get("sft"), *(r["phases"].get("train") for r in manifest["iterations"][:t])]
    return sum(((stage or {}).get("metrics") or {}).get("steps", 0) for stage in stages)


def _select(config: Config, manifest: Manifest, t: int | None, model: str, echo) -> None:
    """After p_{t+1}'s evaluation (p_0's when t is None): keep it as the run's selected model if it is the best so far
    on the validation split (evaluation.select_by); without a validation split the newest model is selected."""
    metrics = (manifest.phase("baseline_eval") if t is None else manifest.iteration(t)["phases"]["evaluate"])["metrics"]
    label = "p0" if t is None else f"p{t + 1}"
    current = manifest.data.get("selected_model")
    chosen = better_model(
        current, {"model": label, "iteration": t, "path": model}, metrics, config.evaluation.select_by
    )
    if chosen is not current:
        manifest.data["selected_model"] = chosen
        manifest.save()
        if chosen.get("value") is not None and t is not None:
            echo(f"[spin-ray] iteration {t}: {label} is the best model so far on the validation split "
                 f"({chosen['by']} {chosen['value']:.4f})")


def _collapsing(config: Config, manifest: Manifest, t: int, echo) -> bool:
    """The collapse watch after iteration t's evaluation: p_{t+1} against its opponent p_t (the baseline evaluation for
    t = 0). Signals go to the job log and the manifest; True when they should end the run
    (iterations.stop_on_collapse)."""
    previous = (
        manifest.data["phases"].get("baseline_eval") if t == 0 else manifest.iteration(t - 1)["phases"].get("evaluate")
    )
    current = manifest.iteration(t)["phases"].get("evaluate")
    if not previous or not current:
        return False
    it = config.iterations
    signals = collapse_signals(previous.get("metrics") or {}, current.get("metrics") or {}, it.collapse_nll_tolerance,
                               it.collapse_share_tolerance)
    manifest.iteration(t)["collapse_signals"] = signals
    manifest.save()
    if not signals:
        return False
    stop = it.stop_on_collapse
    echo(f"[spin-ray] iteration {t}: WARNING collapse watch: p{t + 1} vs p{t}: {'; '.join(signals.values())}"
         + (f"; stopping (iterations.stop_on_collapse) and keeping p{t}" if stop else ""))
    return stop


def _converged(config: Config, accuracy: float | None, t: int, echo) -> bool:
    """The paper's fixed point: p_{t+1} no longer tells its opponent's answers from human ones
    (iterations.converged_accuracy)."""
    threshold = config.iterations.converged_accuracy
    if threshold is None or accuracy is None or accuracy > threshold:
        return False
    echo(f"[spin-ray] iteration {t}: held-out reward accuracy {accuracy:.3f} <= {threshold}: "
         "converged (the model no longer tells its opponent's answers from human ones)")
    return True


class DriverActor:
    """The named actor the job entrypoint starts (as `ray.remote(DriverActor)`); it owns the run.

    Restarted by Ray after a crash (run.driver_max_restarts), it continues from the manifest as a
    resubmitted job does, and takes the lease back: its token is the job's, which survives the restart."""
    def __init__(self, config: dict, force: bool, lease_token: str, owner: str, progress_bars: bool = False,
                 ended_holder: str | None = None):
        import ray

        self.config = build_config(config, "driver")
        context = ray.data.DataContext.get_current()
        # An actor pool whose minimum never starts fails after run.resource_wait_s instead of waiting forever.
        context.wait_for_min_actors_s = self.config.run.resource_wait_s
        context.enable_progress_bars = progress_bars
        quiet_library_logs()
        self.force = force
        self.lease_token, self.owner, self.ended_holder = lease_token, owner, ended_holder

    def run(self) -> dict:
        return run_iterations(self.config, self.force, lease_token=self.lease_token, owner=self.owner,
                              ended_holder=self.ended_holder)

    def pid(self) -> int:
        return os.getpid()


def submission_name() -> str:
    """How a user knows this job: its `ray job submit` id when it is one, else this process."""
    metadata = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("metadata") or {}
    submission = metadata.get("job_submission_id")
    return f"ray job {submission}" if submission else f"spin-ray run (pid {os.getpid()})"


def ray_session() -> str | None:
    """The connected Ray cluster's session name (None without Ray): which cluster a lease holder ran in."""
    import ray

    return ray.get_runtime_context().get_session_name() if ray.is_initialized() else None


def driver_alive(config: Config) -> bool:
    """Whether this cluster has a live driver actor for the run (it is not detached: it dies with its job)."""
    import ray

    try:
        ray.get_actor(driver_name(config), namespace=DRIVER_NAMESPACE)
    except ValueError:
        return False
    return True


def start_driver(config: Config, force: bool = False, progress_bars: bool = False, ended_holder: str | None = None):
    """Create the run's named driver actor on the head node; refuse if a live driver of this cluster drives the run.
    `ended_holder`: the lease token of a driver of this cluster whose job has ended (see run_iterations)."""
    import ray

    name = driver_name(config)
    if driver_alive(config):
        raise RunAlreadyActive(f"run {config.run.name!r} is already being driven by a live job (actor {name!r}); "
                               "stop that job first (ray job stop ...)")
    token = f"{ray.get_runtime_context().get_job_id()}:{name}"
    owner = f"{submission_name()} on {socket.gethostname()}"
    restarts = config.run.driver_max_restarts
    # num_cpus=0: the driver only orchestrates; every CPU stays free for engines and trainers. The head node (or
    # the node type run.driver_resource names): autoscaled worker nodes come and go. Not detached: stopping the
    # job stops the driver, and the manifest lets the next job continue.
    actor_class = ray.remote(num_cpus=0, max_restarts=restarts, max_task_retries=restarts)(DriverActor)
    place = config.run.driver_resource or "node:__internal_head__"
    # Ray Train's placement-group cleaner finds its cluster through the state API with no address; on a machine that
    # runs two Ray instances (a laptop, a test suite) that lookup fails and its monitor thread dies with a traceback.
    # Ray's own address variable, inherited by every process the driver starts, names this cluster.
    setup = {"env_vars": {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}}
    return actor_class.options(name=name, namespace=DRIVER_NAMESPACE, resources={place: 0.001},
                               runtime_env=setup).remote(
        config.to_dict(), force, token, owner, progress_bars, ended_holder)
