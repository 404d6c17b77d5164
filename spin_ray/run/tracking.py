"""Experiment tracking from the driver: TensorBoard, MLflow and W&B receive the run's metrics, one tracking run per run.

Only the driver talks to trackers. It logs the config as parameters, each phase's summary, each
iteration's report row and the report picture, and follows the training step log (metrics.jsonl,
written by rank 0) while a training phase runs, so step metrics arrive live without a tracker client
in any worker. The tracking run's ids live in the manifest: a resubmitted job continues the same
tracking run instead of starting another. Training steps carry a global step across iterations.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import uuid
from contextlib import contextmanager

from spin_ray.config import Config, flatten
from spin_ray.run.layout import RunLayout
from spin_ray.storage import download_folder, is_local, join, read_json_lines, upload_folder

log = logging.getLogger(__name__)


def _numbers(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    """Event files in {run}/tensorboard (written locally and copied up after each phase when the run is in a bucket)."""

    def __init__(self, layout: RunLayout):
        from torch.utils.tensorboard import SummaryWriter

        self.target = join(layout.root, "tensorboard")
        self.local = self.target if is_local(self.target) else tempfile.mkdtemp(prefix="spin-ray-tb-")
        if not is_local(self.target):

            download_folder(self.target, self.local)  # earlier jobs' event files stay with the run
        self.writer = SummaryWriter(self.local)

    def params(self, flat: dict) -> None:
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in sorted(flat.items())), 0)

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def artifact(self, path: str) -> None:
        pass  # the report picture stays beside the event files in the run folder

    def flush(self) -> None:
        self.writer.flush()
        if self.local != self.target:
            upload_folder(self.local, self.target)

    def close(self, failed: bool = False) -> None:
        self.flush()
        self.writer.close()


class MLflow:
    """One MLflow run per spin-ray run: a local file store in the run folder, or the server
    tracking.mlflow_tracking_uri names."""

    def __init__(self, config: Config, layout: RunLayout, state: dict):
        from mlflow.tracking import MlflowClient

        uri = config.tracking.mlflow_tracking_uri
        if uri is None:  # a file store in the run folder: MLflow 3 keeps it working but wants the opt-in said
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = "file:" + os.path.abspath(join(layout.root, "mlruns"))
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = state.get("mlflow_run_id")
        if self.run_id is None:
            experiment = self.client.get_experiment_by_name(config.tracking.mlflow_experiment)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
                config.tracking.mlflow_experiment)
            self.run_id = self.client.create_run(experiment_id, run_name=config.run.name,
                                                 tags={"spin_ray.run_dir": layout.root}).info.run_id
            state["mlflow_run_id"] = self.run_id
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        state["mlflow_tracking_uri"] = uri

    def params(self, flat: dict) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        fresh = [Param(k, str(v)[:6000]) for k, v in sorted(flat.items()) if k not in existing]
        for start in range(0, len(fresh), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=fresh[start:start + 100])

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def artifact(self, path: str) -> None:
        self.client.log_artifact(self.run_id, path)

    def flush(self) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class WandB:
    """One W&B run per spin-ray run, resumed by id; offline by default (`wandb sync` uploads it later)."""

    def __init__(self, config: Config, layout: RunLayout, state: dict):
        import wandb

        folder = join(layout.root, "wandb") if is_local(layout.root) else tempfile.mkdtemp(prefix="spin-ray-wandb-")
        os.makedirs(folder, exist_ok=True)
        run_id = state.setdefault("wandb_run_id", uuid.uuid4().hex[:12])  # W&B ids: short, alphanumeric
        self.run = wandb.init(project=config.tracking.wandb_project, id=run_id, resume="allow", name=config.run.name,
                              mode=config.tracking.wandb_mode, dir=folder, reinit="create_new")

    def params(self, flat: dict) -> None:
        self.run.config.update(flat, allow_val_change=True)

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def artifact(self, path: str) -> None:
        import wandb

        self.run.log({"report": wandb.Image(path)})

    def flush(self) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class Tracker:
    """The run's configured trackers, fed by the driver; `state` (ids, the last logged step) lives in the manifest."""

    def __init__(self, config: Config, layout: RunLayout, state: dict):
        self.config, self.state, self.backends = config, state, []
        makers = {"tensorboard": lambda: TensorBoard(layout), "mlflow": lambda: MLflow(config, layout, state),
                  "wandb": lambda: WandB(config, layout, state)}
        for name in config.tracking.backends:
            self.backends.append(makers[name]())
        self._lock = threading.Lock()

    def params(self) -> None:
        flat = flatten(self.config.to_dict())
        for backend in self.backends:
            backend.params(flat)

    def scalars(self, prefix: str, metrics: dict, step: int) -> None:
        values = {f"{prefix}/{k}": v for k, v in _numbers(metrics).items()}
        if not values:
            return
        with self._lock:
            for backend in self.backends:
                backend.scalars(values, step)

    def artifact(self, path: str) -> None:
        for backend in self.backends:
            backend.artifact(path)

    def flush(self) -> None:
        for backend in self.backends:
            backend.flush()

    def close(self, failed: bool = False) -> None:
        for backend in self.backends:
            try:
                backend.close(failed)
            except Exception as error:  # closing a tracker must not hide the run's own outcome
                log.warning("tracking: could not close %s: %s", type(backend).__name__, error)

    @contextmanager
    def following(self, train_dir: str, key: str, step_offset: int):
        """While the body runs, log new lines of {train_dir}/metrics.jsonl every tracking.interval_s seconds as train/*
        at global step step_offset + step; after it, the rest. `key` names the stage in the logged-step state."""
        stop = threading.Event()
        logged = self.state.setdefault("logged_steps", {})

        def catch_up() -> None:
            for record in read_json_lines(join(train_dir, "metrics.jsonl")):
                if record["step"] > logged.get(key, 0):
                    skip = ("step", "epoch", "world_size", "samples_seen")
                    self.scalars(
                        "train", {k: v for k, v in record.items() if k not in skip}, step_offset + record["step"]
                    )
                    logged[key] = record["step"]

        def follow() -> None:
            while not stop.wait(self.config.tracking.interval_s):
                try:
                    catch_up()
                except Exception as error:  # a tracker hiccup must not stop training
                    log.warning("tracking: could not follow %s: %s", train_dir, error)

        thread = threading.Thread(target=follow, name="spin-ray-tracking", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=30)
            catch_up()
            self.flush()
