"""The `spin-ray` command line: one sub-command per stage, errors as one clear line and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from spin_ray import __version__
from spin_ray.config import ConfigError, load_config
from spin_ray.data.prepare import check_inputs, format_summary, validate
from spin_ray.data.records import DataError
from spin_ray.generation.pipeline import run_generation
from spin_ray.generation.shards import GenerationError, parquet_files, shards_dataset
from spin_ray.logs import quiet_library_logs
from spin_ray.models.adapters import ADAPTER_CONFIG, AdapterError, adapter_base
from spin_ray.models.resolution import (
    MODEL_CARD,
    ModelResolutionError,
    folder_complete,
    load_model,
    load_tokenizer,
    local_model_path,
    resolve_model,
)
from spin_ray.objectives.algorithms import TrainingDataError
from spin_ray.plan import Assumptions, PlanError, format_plan, make_plan
from spin_ray.run.cluster import ResourceError
from spin_ray.run.driver import RunAlreadyActive, driver_alive, ray_session, start_driver
from spin_ray.run.evaluation import evaluate_model
from spin_ray.run.layout import RunLayout
from spin_ray.run.lease import describe, live_holder
from spin_ray.run.manifest import Manifest, check_config, resume_config
from spin_ray.run.model_card import HUB_IDS, model_card
from spin_ray.run.report import format_status, format_table, run_state, write_report
from spin_ray.storage import StorageError, download_folder, join, preflight, read_json


class PlanRefused(PlanError):
    """A config whose memory plan does not fit the GPUs its phases ask for."""


# Errors that are the user's input or environment, not our bug: print the message, no traceback, exit 2.
USER_ERRORS = (ConfigError, DataError, ModelResolutionError, GenerationError, TrainingDataError, StorageError,
               RunAlreadyActive, ResourceError, PlanError, AdapterError)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML run config (optional: the defaults, then the overrides)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. training.beta=0.2")


def _config(args: argparse.Namespace):
    """The command's config: its YAML file (if any) with the key=value overrides on top. A first argument that is
    an override rather than a file (`spin-ray run run.name=x`) starts from the defaults."""
    path, overrides = args.config, list(args.overrides)
    if path and "=" in path and not os.path.exists(path):
        path, overrides = None, [path, *overrides]
    return load_config(path, overrides)


def cmd_validate(args: argparse.Namespace) -> int:
    summary = validate(_config(args))
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def cmd_prepare_model(args: argparse.Namespace) -> int:
    import time

    started = time.perf_counter()
    resolved = resolve_model(args.model, args.cache_dir)
    print(f"{resolved.spec} -> {resolved.path} ({resolved.source}, {time.perf_counter() - started:.1f}s)")
    return 0


def _init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    # RAY_ADDRESS (set by `ray job submit`) or --address joins a cluster; otherwise a local instance.
    if not sys.stdout.isatty():
        # a job log or a file: Ray colours the "(Actor pid=...)" prefix and its "[repeated 3x]" notes regardless;
        # colorama (Ray's own dependency) strips escape codes from what this process prints
        import colorama

        colorama.init(strip=True, convert=False)

    # Every process of the job (engines, trainers, Ray Train's controller, Ray Data tasks) runs the library-log
    # filters when it starts: a job-level hook (Ray runs no actor-level one). A job that brings its own keeps it.
    job_env = (json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {})
    hook = (
        {}
        if job_env.get("worker_process_setup_hook")
        else {"worker_process_setup_hook": "spin_ray.logs.quiet_library_logs"}
    )
    # Ray's own INFO lines go to stderr, where a refusal must stand alone as one line; say where we are instead
    context = ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, log_to_driver=True,
                       logging_level=logging.WARNING, runtime_env=hook)
    quiet_library_logs()
    where = f", dashboard {context.dashboard_url}" if getattr(context, "dashboard_url", None) else ""
    print(f"[spin-ray] Ray at {context.address_info.get('gcs_address', 'a local instance')}{where}", flush=True)


def _check_inputs(config, model: str | None = None, train: bool = True, evaluation: bool | None = None) -> None:
    """Model and data refused in seconds, before Ray starts (and, on a cluster, before any node is provisioned)."""
    print(f"[spin-ray] inputs: {check_inputs(config, model, train, evaluation)}", flush=True)


def cmd_generate(args: argparse.Namespace) -> int:
    config = _config(args)
    layout = RunLayout.of(config)
    preflight(layout.root)
    _check_inputs(config, evaluation=False)
    _init_ray(args.address)
    model = resolve_model(config.model.name, config.model.cache_dir).path
    result = run_generation(config, model, layout.generation(0))
    print(result.summary.line())
    print(f"output: {result.output_dir}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    # torch.distributed's checkpoint modules come with it: 0.75 s of every spin-ray command's start otherwise
    from spin_ray.training.trainer import run_training

    config = _config(args)
    layout = RunLayout.of(config)
    preflight(layout.root)
    _init_ray(args.address)
    model = resolve_model(args.model or config.model.name, config.model.cache_dir)
    pairs = shards_dataset(parquet_files(args.pairs)).materialize()
    summary = run_training(config, pairs, model.path, layout.train(args.iteration), layout.model(args.iteration),
                           source=args.pairs)
    shown = {"steps": summary.steps, "resumed_from_step": summary.resumed_from_step, "loss": summary.loss,
             **{k: summary.last_step[k] for k in ("rewards/margins", "rewards/accuracies") if k in summary.last_step},
             "seconds": summary.seconds}
    print("training: " + ", ".join(f"{k} {v}" for k, v in shown.items() if v is not None))
    print(f"model: {summary.export_dir}")
    return 0


def _unwrap_remote(error: Exception) -> Exception:
    """A user error raised inside the driver actor arrives wrapped in a RayTaskError: unwrap it."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, USER_ERRORS) else error


def cmd_plan(args: argparse.Namespace) -> int:
    config = _config(args)
    plan = make_plan(config, Assumptions.parse(args.assume or []))
    print(format_plan(plan, config))
    return 0 if plan.fits else 1


def _check_plan(config) -> None:
    """Refuse, before any model loads or any GPU is paid for, a config whose plan does not fit its node types."""
    if not (config.training.use_gpu or config.generation.use_gpu):
        return  # CPU runs: host memory is the node's, not checked here
    try:
        plan = make_plan(config)
    except PlanError as error:  # a model the plan cannot describe: the run goes on unchecked, and says so
        print(f"[spin-ray] plan: not checked ({error})", flush=True)
        return
    if not plan.fits:
        raise PlanRefused(f"{plan.problems[0]} (spin-ray plan shows the whole plan)")
    summary = f"a training worker needs {plan.memory.device_total / 2**30:.1f} GiB of its {plan.training_gpu} GPU" \
        if config.training.use_gpu else "training on CPU"
    print(f"[spin-ray] plan: fits: {summary}; an engine replica holds {plan.engine.sequences} sequences at once"
          + "".join(f"; not checked: {note}" for note in plan.notes), flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    import ray

    config = _config(args)
    layout = RunLayout.of(config)
    preflight(layout.root)  # a bucket that is missing, unreachable or read-only stops here, before any work
    _check_inputs(config)
    _check_plan(config)
    holder = live_holder(layout.lease)
    ended = None
    if holder is not None:
        # a driver that renewed lately: from another cluster, or alive here, it drives the run (refuse before
        # starting anything); one of this cluster whose job has ended (`ray job stop`) is waited out instead
        joins = args.address or os.environ.get("RAY_ADDRESS")  # a new local instance is never the holder's cluster
        if joins:
            _init_ray(args.address)
        if not joins or holder.get("ray_session") != ray_session() or driver_alive(config):
            raise RunAlreadyActive(f"run {config.run.name!r} at {layout.root} is leased to {describe(holder)}")
        ended = holder.get("token")
    config = resume_config(config, read_json(layout.manifest))
    check_config(config, args.force)  # refuse a changed config before anything starts
    _init_ray(args.address)
    print(f"[spin-ray] run {config.run.name}: {config.iterations.count} iteration(s), model {config.model.name}, "
          f"data {config.data.train}, state in {layout.manifest}", flush=True)
    try:
        driver = start_driver(config, args.force, progress_bars=sys.stdout.isatty(), ended_holder=ended)
        manifest = ray.get(driver.run.remote())
    except ray.exceptions.RayTaskError as exc:
        cause = _unwrap_remote(exc)
        if cause is exc:
            raise
        raise cause from None
    print(format_table(manifest))
    print(f"status: {manifest['status']}; final model: {manifest.get('final_model')}")
    print(f"report: {manifest['report']['markdown']} (plot {manifest['report']['plot']})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    config = _config(args)
    model = resolve_model(args.model, config.model.cache_dir)
    output = args.output or join(config.run.storage_path, "eval", os.path.basename(model.path.rstrip("/")))
    preflight(output)
    held_out = config.model_copy(
        update={"data": config.data.model_copy(update={"eval": args.data or config.data.eval})}
    )
    _check_inputs(held_out, args.model, train=False, evaluation=True)
    _init_ray(args.address)
    metrics = evaluate_model(config, model.path, output, opponent_answers=args.opponent_answers,
                             data=args.data or config.data.eval)
    print(json.dumps(metrics, indent=2))
    print(f"metrics: {output}/metrics.json")
    return 0


def _run_folder(target: str) -> str:
    """A run folder, or a config YAML naming one."""
    if target.endswith((".yaml", ".yml")) and os.path.isfile(target):
        return RunLayout.of(load_config(target)).root
    return target


def cmd_report(args: argparse.Namespace) -> int:
    folder = _run_folder(args.run)
    manifest = Manifest.read(folder)
    if manifest is None:
        raise ConfigError(f"{folder}: no manifest.json; not a spin-ray run folder")
    paths = write_report(RunLayout(folder))
    print(format_table(manifest.data))
    print("\n".join(f"{kind}: {path}" for kind, path in paths.items()))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    folder = _run_folder(args.run)
    manifest = Manifest.read(folder)
    if manifest is None:
        raise ConfigError(f"{folder}: no manifest.json; not a spin-ray run folder (or the run has not started)")
    holder = live_holder(RunLayout(folder).lease)
    job = holder_job_status(holder, args.address or os.environ.get("RAY_ADDRESS"))
    if args.json:
        print(json.dumps({**manifest.data, "state": run_state(manifest.data, holder, job), "lease_holder": holder,
                          "lease_holder_job": job}, indent=2))
    else:
        print(format_status(manifest.data, holder, job))
    return 0


def holder_job_status(holder: dict | None, address: str | None, timeout_s: float = 15.0) -> str | None:
    """Ray's status of the lease holder's job (RUNNING, STOPPED, FAILED, ...), asked of the job server at `address`
    (the dashboard URL `ray job submit` uses). None when there is no holder, no address, or no answer within
    `timeout_s`: the lease alone then decides, and a stopped job's lease expires after run.lease_ttl_s."""
    if holder is None or not holder.get("ray_job_id") or not address:
        return None
    from concurrent.futures import ThreadPoolExecutor

    def ask() -> str | None:
        from ray.job_submission import JobSubmissionClient

        for job in JobSubmissionClient(address).list_jobs():
            if job.job_id == holder["ray_job_id"]:
                return getattr(job.status, "value", str(job.status))
        return None

    pool = ThreadPoolExecutor(max_workers=1)
    try:
        return pool.submit(ask).result(timeout=timeout_s)
    except Exception:  # another cluster, an address that is not a job server, a timeout: no answer
        return None
    finally:
        pool.shutdown(wait=False)


def cmd_export(args: argparse.Namespace) -> int:
    folder = _run_folder(args.run)
    manifest = Manifest.read(folder)
    if manifest is None:
        raise ConfigError(f"{folder}: no manifest.json; not a spin-ray run folder")
    trained = [
        r["iteration"] for r in manifest.data["iterations"] if (r["phases"].get("train") or {}).get("status") == "done"
    ]
    selected = manifest.data.get("selected_model")
    keep = (manifest.data["config"].get("evaluation") or {}).get("keep", "best")
    use_selected = (args.iteration is None and not args.last and keep == "best" and selected is not None
                    and selected.get("value") is not None)  # a value: chosen on a validation split
    if use_selected:
        iteration, why = selected["iteration"], (f"the best model on the validation split, {selected['model']} "
                                                 f"({selected['by']} {selected['value']:.4f})")
    elif args.iteration is not None:
        iteration, why = args.iteration, f"iteration {args.iteration}'s model"
    elif trained:
        iteration, why = trained[-1], f"the last model, p{trained[-1] + 1}"
    else:
        raise ConfigError(f"{folder}: no trained model yet")
    if iteration is not None and iteration not in trained:
        raise ConfigError(f"{folder}: iteration {iteration} has no trained model (trained: {trained or 'none'})")
    # p0 selected: no iteration improved on the start model on the validation split
    source = selected["path"] if iteration is None else RunLayout(folder).model(iteration)
    if iteration is not None and not folder_complete(source):
        raise ConfigError(f"{source}: the export is incomplete (no completion marker)")
    if os.path.exists(args.dir) and os.listdir(args.dir):
        raise ConfigError(f"{args.dir}: exists and is not empty; export into a new folder")
    what = export_model(source, args.dir, manifest.data["config"], args.merged)
    with open(os.path.join(args.dir, MODEL_CARD), "w") as handle:
        handle.write(str(model_card(manifest.data, iteration, merged=args.merged and "merged" in what)))
    print(f"exported {why}: {source} -> {args.dir} ({what}, with its model card)")
    return 0


def export_model(source: str, target: str, config: dict, merged: bool) -> str:
    """Copy a run's model folder to the local folder `target`; a LoRA adapter names the base as the user did (the hub
    id of an alias), or, with `merged`, is written merged into its base. Returns what was written."""
    model = config["model"]
    staged = local_model_path(source, model.get("cache_dir"), weights=False)
    if adapter_base(staged) is None:
        download_folder(source, target)
        return "a whole model"
    if merged:
        load_model(source, model["dtype"], model["trust_remote_code"], model.get("cache_dir")).save_pretrained(target)
        load_tokenizer(source, model["trust_remote_code"], model.get("cache_dir")).save_pretrained(target)
        return f"the LoRA adapter merged into its base, {model['dtype']}"
    download_folder(source, target)
    path = os.path.join(target, ADAPTER_CONFIG)
    with open(path) as handle:
        settings = json.load(handle)
    settings["base_model_name_or_path"] = HUB_IDS.get(model["name"], model["name"])  # not this run's staged copy
    with open(path, "w") as handle:
        json.dump(settings, handle, indent=2, sort_keys=True)
    return f"a LoRA adapter (rank {settings['r']}) of {settings['base_model_name_or_path']}; --merged writes it merged"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spin-ray", description="Self-play fine-tuning (SPIN) of language models on Ray."
    )
    parser.add_argument("--version", action="version", version=f"spin-ray {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("validate", help="parse a config, resolve its model and data, print a summary")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("prepare-model", help="resolve a model spec, converting an alias to safetensors once")
    p.add_argument("model", help="alias (smollm2-135m-instruct), local folder or hub id")
    p.add_argument("--cache-dir", default=None, help="conversion cache (default $SPIN_RAY_CACHE or ~/.cache/spin_ray)")
    p.set_defaults(func=cmd_prepare_model)

    p = sub.add_parser("generate", help="run opponent generation alone (iteration 0, opponent = configured model)")
    _add_config_args(p)
    p.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS, else a local instance)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("train", help="train one iteration (FSDP2 on Ray Train) from a pairs dataset")
    _add_config_args(p)
    p.add_argument("--pairs", required=True, help="parquet file or folder of pairs (a generation output folder)")
    p.add_argument("--model", default=None, help="starting checkpoint p_t (default: model.name)")
    p.add_argument("--iteration", type=int, default=0, help="iteration t: output under {run}/iter_t/ (default 0)")
    p.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS, else a local instance)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", help="run SPIN's self-play iterations (driver actor); resumes a stopped run")
    _add_config_args(p)
    p.add_argument("--force", action="store_true", help="continue a run even though its config changed")
    p.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS, else a local instance)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("eval", help="evaluate one model on held-out data (GSM8K accuracy, NLL, reward accuracy)")
    p.add_argument("model", help="model folder or alias (e.g. a run's iter_0/model, or smollm2-135m-instruct)")
    _add_config_args(p)
    p.add_argument("--data", default=None, help="held-out data (default: data.eval of the config, gsm8k:test)")
    p.add_argument("--output", default=None, help="output folder (default {storage_path}/eval/<model folder name>)")
    p.add_argument("--opponent-answers", default=None,
                   help="answers folder of the opponent's evaluation: adds reward accuracy and margin vs it")
    p.add_argument("--address", default=None, help="Ray address (default: $RAY_ADDRESS, else a local instance)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="write report.md, report.json and report.png of a run")
    p.add_argument("run", help="run folder ({storage_path}/{run.name}) or the run's config YAML")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("export", help="copy a run's model out with its model card: the best on the validation split "
                       "(evaluation.keep: best, the default) or the last")
    p.add_argument("run", help="run folder ({storage_path}/{run.name}, a bucket URL too) or the run's config YAML")
    p.add_argument("dir", help="a new local folder for the model")
    p.add_argument("--iteration", type=int, default=None, help="the model trained in iteration T")
    p.add_argument("--last", action="store_true", help="the last trained model, whatever the selection")
    p.add_argument("--merged", action="store_true", help="a LoRA run's adapter merged into its base: one whole model")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("plan", help="memory per training worker and engine replica, time and bytes per iteration, and "
                       "whether the run fits its GPUs (no Ray; reads the model's config.json only)")
    _add_config_args(p)
    p.add_argument("--assume", action="append", metavar="name=value",
                   help="override an assumption (training_mfu, engine_mfu, prompts, answer_share, ...); repeatable")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("status", help="print where a run stands (phases, attempts, timings)")
    p.add_argument("run", help="run folder ({storage_path}/{run.name}) or the run's config YAML")
    p.add_argument("--json", action="store_true", help="print the whole manifest")
    p.add_argument("--address", default=None,
                   help="Ray dashboard URL (default $RAY_ADDRESS) to ask whether the lease holder's job still runs")
    p.set_defaults(func=cmd_status)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"spin-ray {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
