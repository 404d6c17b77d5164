"""Ray Train edge of training: a TorchTrainer (V2) whose workers run `loop.train` on the pairs dataset."""

from __future__ import annotations

import os

from spin_ray.config import Config, build_config
from spin_ray.storage import atomic_write_json, read_json
from spin_ray.training.checkpoint import export_complete
from spin_ray.training.data import TrainingDataError


def iteration_dir(config: Config, iteration: int) -> str:
    return f"{config.run.storage_path.rstrip('/')}/{config.run.name}/iter_{iteration}"


def _absolute(url: str) -> str:
    return url if "://" in url else os.path.abspath(url)


def _worker_entry(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    from spin_ray.training.loop import WorkerContext, train

    import torch

    from spin_ray.priority import claim_normal_priority

    claim_normal_priority()
    # One torch thread per reserved CPU, set explicitly: the worker process does not get it from Ray.
    torch.set_num_threads(max(1, int(loop_config["config"]["training"]["cpus_per_worker"])))
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    # Every worker reads the whole pairs set (datasets_to_split=[]): the (seed, epoch) schedule then
    # picks each rank's slice, so any worker count resumes the same data order.
    rows = list(ray.train.get_dataset_shard("train").iter_rows())
    summary = train(
        build_config(loop_config["config"]),
        rows,
        loop_config["model_path"],
        loop_config["train_dir"],
        loop_config["export_dir"],
        WorkerContext(rank, world, ray.train.torch.get_device(), report=lambda metrics: ray.train.report(metrics)),
        source=loop_config["source"],
        fail_at_step=loop_config.get("fail_at_step"),
    )
    if rank == 0:
        atomic_write_json(f"{loop_config['train_dir']}/summary.json", summary)


def validate_pairs(config: Config, dataset, source: str) -> None:
    """Refuse bad pairs on the driver, before any worker starts, with the prompt_id and field named.

    Only the ids, reference log-probs and win rates are read (a few floats per row), never the token ids.
    """
    from spin_ray.training.data import Schedule, examples_from_rows, needed_columns

    t = config.training
    needed = needed_columns(config.objective, config.needs_reference)
    names = dataset.schema().names if dataset.schema() is not None else []
    missing = [c for c in needed if c not in names]
    if missing:
        hint = "is this a generation output?"
        if "proto_token_ids" in missing:
            hint = "T-SPIN examples need each prompt's y_0 (proto_token_ids), which `spin-ray run` attaches from iteration 0"
        elif "win_rates" in missing:
            hint = "SPPO examples need the oracle's win_rates: generate with algorithm sppo"
        raise TrainingDataError(f"{source}: no column(s) {missing}; {hint}")
    light_columns = [c for c in needed if not c.endswith("token_ids")]
    rows = dataset.select_columns(light_columns).take_all()

    def with_dummy_tokens(row: dict) -> dict:
        answers = max(len(row.get("ref_logp_generated") or []), len(row.get("win_rates") or []), 1)
        return {**row, "prompt_token_ids": [0], "real_token_ids": [0], "generated_token_ids": [[0]] * answers,
                "proto_token_ids": [0]}

    pairs = examples_from_rows([with_dummy_tokens(r) for r in rows], source, config.objective, config.needs_reference)
    schedule = Schedule(len(pairs), t.global_batch_size, t.micro_batch_size, t.epochs, t.seed)
    low, high = t.num_workers
    for workers in range(low, high + 1):  # an elastic group may run at any size in [min, max]
        schedule.check_world(workers)


def run_training(config: Config, dataset, model_path: str, iteration: int = 0, source: str = "pairs",
                 fail_at_step: int | None = None, base_dir: str | None = None) -> dict:
    """Train p_{t+1} from p_t (`model_path`) on a Ray Dataset of pairs; resumes from the last committed
    checkpoint, and returns at once if this iteration's export is already complete.

    Output goes under `base_dir` (default {run}/iter_{iteration}): train/ (checkpoints, metrics.jsonl,
    summary.json) and model/ (the export)."""
    import ray.train
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    base = base_dir or iteration_dir(config, iteration)
    train_dir, export_dir = f"{base}/train", f"{base}/model"
    if export_complete(export_dir):
        return read_json(f"{train_dir}/summary.json") or {"export_dir": export_dir}
    t = config.training
    validate_pairs(config, dataset, source)
    low, high = t.num_workers
    # The workers' ingest of the (already computed) pairs needs no progress bars in the job log; the
    # dataset carries its own copy of the DataContext into the workers.
    dataset.context.enable_progress_bars = False
    trainer = TorchTrainer(
        train_loop_per_worker=_worker_entry,
        train_loop_config={"config": config.to_dict(), "model_path": model_path, "train_dir": train_dir,
                           "export_dir": export_dir, "source": source, "fail_at_step": fail_at_step},
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=low if low == high else (low, high), use_gpu=t.use_gpu,
                                     resources_per_worker={"CPU": t.cpus_per_worker}),
        run_config=RunConfig(name="ray_train", storage_path=_absolute(base),
                             failure_config=FailureConfig(max_failures=t.max_failures)),
        datasets={"train": dataset},
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    trainer.fit()
    summary = read_json(f"{train_dir}/summary.json")
    if summary is None or not export_complete(export_dir):
        raise RuntimeError(f"training of iteration {iteration} ended without an export at {export_dir}")
    return summary
