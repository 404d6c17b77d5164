"""Ray Train edge of training: a TorchTrainer (V2) whose workers run `loop.train` on the pairs dataset."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable

from spin_ray.config import Config, build_config
from spin_ray.logs import quiet_library_logs
from spin_ray.objectives.algorithms import TrainingDataError, objective
from spin_ray.storage import atomic_write_json, is_local, join, remove
from spin_ray.training.checkpoint import export_complete
from spin_ray.training.data import Schedule, examples_from_rows
from spin_ray.training.loop import REFUSAL, EarlyStop, WorkerContext, read_refusal, train
from spin_ray.training.parallel import process_group_backend
from spin_ray.training.summary import SUMMARY, TrainingSummary, read_summary
from spin_ray.workers import prepare_compute_process


def _quiet_per_report_lines() -> None:
    """Ray Train logs every `ray.train.report` call at INFO, metrics and all, from a logger named by its
    file path: outside `ray.train`, so RunConfig's LoggingConfig does not reach it. The loop prints its own
    step line, so a job log would show every step twice."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: its lines stay
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


# Written by a training phase's rank 0 under its train folder: the placement group of its worker group, so a driver
# that starts the phase over (restarted by Ray, or a resubmitted job) can end what an earlier attempt left
# (cluster.end_earlier_worker_group).
WORKER_GROUP = "worker_group.json"


def record_worker_group(train_dir: str) -> None:
    """In a training worker: record its worker group's placement group (and the job) under `train_dir`."""
    import ray
    from ray.util import get_current_placement_group

    group = get_current_placement_group()
    if group is not None:
        atomic_write_json(join(train_dir, WORKER_GROUP), {"placement_group": group.id.hex(), "recorded": time.time(),
                                                          "job_id": ray.get_runtime_context().get_job_id()})


def _worker_entry(loop_config: dict) -> None:
    config = build_config(loop_config["config"])
    # One torch thread per reserved CPU, set explicitly: the worker process does not get it from Ray.
    prepare_compute_process(max(1, int(config.training.cpus_per_worker)))
    import ray.train
    import ray.train.torch

    _quiet_per_report_lines()
    quiet_library_logs()  # `spin-ray run`'s job hook did this; a training started otherwise (a benchmark) needs it here
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    if rank == 0:
        record_worker_group(loop_config["train_dir"])
    # Every worker reads the whole pairs set (datasets_to_split=[]): the (seed, epoch) schedule then
    # picks each rank's slice, so any worker count resumes the same data order.
    ingest_started = time.perf_counter()
    rows = list(ray.train.get_dataset_shard("train").iter_rows())
    early_stop = None
    if loop_config.get("early_stop_patience"):
        early_stop = EarlyStop(list(ray.train.get_dataset_shard("validation").iter_rows()),
                               loop_config["early_stop_patience"])
    ingest_seconds = time.perf_counter() - ingest_started
    summary = train(
        config, rows, loop_config["model_path"], loop_config["train_dir"], loop_config["export_dir"],
        WorkerContext(rank, world, ray.train.torch.get_device(), report=lambda metrics: ray.train.report(metrics),
                      on_step=loop_config.get("on_step")),
        source=loop_config["source"], early_stop=early_stop, merged_dir=loop_config.get("merged_dir"),
    )
    if rank == 0:
        # Ray Data's streaming read of the pairs into this worker: with the model load (`setup_seconds`) and Ray
        # Train's worker-group start, part of a training phase's fixed cost
        summary = dataclasses.replace(summary, ingest_seconds=round(ingest_seconds, 2))
        atomic_write_json(join(loop_config["train_dir"], SUMMARY), summary.to_record())


def validate_pairs(config: Config, dataset, source: str) -> None:
    """Refuse bad pairs on the driver, before any worker starts, with the prompt_id and field named.

    Only the ids, reference log-probs and win rates are read (a few floats per row), never the token ids.
    """
    training = config.training
    needed = objective(config).needed_columns(config)
    names = dataset.schema().names if dataset.schema() is not None else []
    missing = [c for c in needed if c not in names]
    if missing:
        hint = "is this a generation output?"
        if "proto_token_ids" in missing:
            hint = ("T-SPIN examples need each prompt's y_0 (proto_token_ids), which `spin-ray run` attaches from "
                    "iteration 0")
        elif "win_rates" in missing:
            hint = "SPPO examples need the oracle's win_rates: generate with algorithm sppo"
        raise TrainingDataError(f"{source}: no column(s) {missing}; {hint}")
    light_columns = [c for c in needed if not c.endswith("token_ids")]
    examples = examples_from_rows(dataset.select_columns(light_columns).take_all(), source, config, with_tokens=False)
    schedule = Schedule(
        len(examples), training.global_batch_size, training.micro_batch_size, training.epochs, training.seed
    )
    low, high = training.num_workers
    for workers in range(low, high + 1):  # an elastic group may run at any size in [min, max]
        schedule.check_world(workers)


def _ray_train_storage(train_dir: str) -> str:
    """Where Ray Train keeps its own bookkeeping. The checkpoints that matter are ours (`train_dir`); Ray's
    records only need to outlive one fit(), so a bucket run keeps them on the driver node's disk."""
    if is_local(train_dir):
        return os.path.abspath(join(train_dir, "ray_train"))
    key = hashlib.sha256(train_dir.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "spin_ray_train", key)


def run_training(config: Config, dataset, model_path: str, train_dir: str, export_dir: str, source: str = "pairs",
                 on_step: Callable | None = None, validation=None, patience: int = 1,
                 merged_dir: str | None = None) -> TrainingSummary:
    """Train the model at `model_path` (p_t) into `export_dir` (p_{t+1}) on a Ray Dataset of pairs; resumes from the
    last checkpoint committed under `train_dir` (also home of metrics.jsonl and summary.json), and returns its
    summary at once if an earlier call finished (the export complete, the summary written). `on_step(step, context,
    train_dir)` runs on every worker before each optimizer step. `validation` (a Ray Dataset of SFT rows) turns on
    early stopping (loop.EarlyStop). With LoRA, `merged_dir` receives the merged model beside the adapter export."""
    import ray.train
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    done = read_summary(train_dir) if export_complete(export_dir) else None
    if done is not None:
        return done
    training = config.training
    validate_pairs(config, dataset, source)
    low, high = training.num_workers
    # The workers' ingest of the (already computed) pairs needs no progress bars in the job log; the
    # dataset carries its own copy of the DataContext into the workers.
    dataset.context.enable_progress_bars = False
    resources = {"CPU": training.cpus_per_worker}
    if training.accelerator_type:
        resources[f"accelerator_type:{training.accelerator_type}"] = 0.001
    trainer = TorchTrainer(
        train_loop_per_worker=_worker_entry,
        train_loop_config={"config": config.to_dict(), "model_path": model_path, "train_dir": train_dir,
                           "export_dir": export_dir, "source": source, "on_step": on_step, "merged_dir": merged_dir,
                           "early_stop_patience": patience if validation is not None else None},
        torch_config=TorchConfig(backend=process_group_backend(training.use_gpu, training.cpu_offload)),
        scaling_config=ScalingConfig(num_workers=low if low == high else (low, high), use_gpu=training.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name="ray_train", storage_path=_ray_train_storage(train_dir),
                             # Ray Train's worker-group notes (starting, started, shutting down, per fit) stay in
                             # its session log files; the job log gets its warnings, and our own phase lines
                             logging_config=LoggingConfig(log_level="WARNING"),
                             # a worker group that cannot start times out after 60 s and counts as a controller
                             # failure; bounded, so an unplaceable group fails after about run.resource_wait_s
                             failure_config=FailureConfig(max_failures=training.max_failures, controller_failure_limit=
                                                          max(1, math.ceil(config.run.resource_wait_s / 60)))),
        datasets={"train": dataset, **({"validation": validation} if validation is not None else {})},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )

    remove(join(train_dir, REFUSAL))  # a refusal of an earlier job is for its config; this one checks again
    try:
        trainer.fit()
    except Exception:
        refused = read_refusal(train_dir)
        if refused:  # a worker refused the stage for a reason no restart fixes: one line, not Ray's traceback
            raise TrainingDataError(refused) from None
        raise
    remove(join(train_dir, WORKER_GROUP))  # Ray Train removed the group with the finished fit
    summary = read_summary(train_dir)
    if summary is None or not export_complete(export_dir):
        raise RuntimeError(f"training into {export_dir} ended without an export")
    return summary


class TrainingRun:
    """The actor that runs one training phase: Ray Train's controller, which `run_training` starts, is its own, and so
    are the controller's workers. Named for its run and driver attempt (`spin_ray.run.attempts`), it lets a later
    attempt
    end all of them by name."""

    def fit(self, arguments: dict) -> TrainingSummary:
        return run_training(**arguments)


def run_training_named(actor_options: dict, **arguments) -> TrainingSummary:
    """`run_training(**arguments)` in a TrainingRun actor with `actor_options` (its name and namespace), on this node
    (Ray Train's controller runs on its starter's node); the actor is ended once the phase is. A user error (bad pairs,
    a refused stage) comes back as itself, not wrapped in Ray's task error."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    runner = ray.remote(num_cpus=0, max_restarts=0)(TrainingRun).options(**actor_options,
                                                                         scheduling_strategy=here).remote()
    try:
        return ray.get(runner.fit.remote(arguments))
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, TrainingDataError):
            raise error.cause from None
        raise
    finally:
        ray.kill(runner)
