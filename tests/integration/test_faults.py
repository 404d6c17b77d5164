"""Faults on a schedule: a seeded run of two SPIN iterations on a multi-node Ray cluster (ray.cluster_utils) loses, at
chosen points, an engine replica, a training worker, its driver actor and a worker node, and still ends with the weights
of the same run left alone.

Each fault kills a process as a crash would (SIGKILL) or removes a node as a cloud reclaims it (the test then adds a
node back, as an autoscaler would). The run uses the trainer's reference (training.reference trainer), which is scored
from the model in training's own micro-batches and stored, so a restarted stage and an engine pass redone in other
batches give the same reference; greedy answers of the tiny model do not depend on their batch either. With the worker
count fixed ([2, 2]) a restart resumes the exact data position from a checkpoint, so the weights must agree to 1e-6.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from spin_ray.training.loop import read_metrics_log

pytestmark = pytest.mark.ray

# Moments of a run, in the order they happen: an engine pass after 2 of the 8 shards of the next iteration's answers
# (p_0's pass answers iteration 0's prompts as it evaluates p_0, p_1's answers iteration 1's), a training phase after
# a step of its 8; and the phase each one falls in (a phase the driver dies in is the one phase run twice).
ORDER = [("pass", "iter_0/generation", 2), ("train", "iter_0", 2), ("train", "iter_0", 6),
         ("pass", "iter_1/generation", 2), ("train", "iter_1", 2), ("train", "iter_1", 6)]
PASS_MOMENTS = [moment for moment in ORDER if moment[0] == "pass"]
TRAIN_MOMENTS = [moment for moment in ORDER if moment[0] == "train"]
PHASE_OF = {
    ("pass", "iter_0/generation", 2): ("baseline_eval", None),
    ("pass", "iter_1/generation", 2): ("evaluate", 0),
    **{moment: ("train", int(moment[1][-1])) for moment in TRAIN_MOMENTS},
}
KINDS = ("engine replica", "training worker", "driver", "worker node")


def schedule(seed: int) -> list[tuple[tuple, str]]:
    """Four faults at four distinct moments, in run order: an engine replica dies during a pass, a training worker
    during training, the driver and a worker node at any moment."""
    rng = random.Random(seed)
    while True:
        engine, worker = rng.choice(PASS_MOMENTS), rng.choice(TRAIN_MOMENTS)
        driver, node = rng.choice(ORDER), rng.choice(ORDER)
        moments = [engine, worker, driver, node]
        if len(set(moments)) == 4:
            return sorted(zip(moments, KINDS, strict=True), key=lambda entry: ORDER.index(entry[0]))


@pytest.fixture(scope="module")
def cluster():
    """A head with no CPUs (the driver's) and three 2-CPU worker nodes: a training group of 2 fits on any, so a lost
    node costs a restart, not the run, and the two left hold what a run asks at once (the engine, or the workers).
    (The test removes nodes and adds none: `Cluster.add_node` installs a signal handler, which only the main thread,
    busy waiting on the run, may do.)"""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # the shared session; the next test that needs it starts it again
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(3):
        nodes.add_node(num_cpus=2)
    ray.init(address=nodes.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield nodes
    ray.shutdown()
    nodes.shutdown()


def _overrides(tmp_path: Path, model: str, run: str) -> list[str]:
    return [f"model.name={model}", f"run.storage_path={tmp_path}", f"run.name={run}", "data.limit=16",
            "generation.engine=hf", "generation.max_new_tokens=16", "generation.batch_size=2",
            "generation.shard_rows=2", "generation.replicas=[1,1]", "training.num_workers=[2,2]",
            "training.global_batch_size=4", "training.micro_batch_size=1", "training.epochs=2",
            "training.checkpoint_every=1", "training.learning_rate=1e-5", "training.reference=trainer",
            "iterations.count=2", "evaluation.prompts=4", "run.resource_wait_s=240"]


def _processes(marker: str) -> list:
    import psutil

    return [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]


def _reached(run: Path, moment: tuple) -> bool:
    try:
        return _reached_now(run, moment)
    except (OSError, ValueError):  # a step log line being written, a folder being committed: look again
        return False


def _reached_now(run: Path, moment: tuple) -> bool:
    kind, where, count = moment
    if kind == "pass":
        folder = run / where
        return not (folder / "_COMPLETE.json").exists() and len(list(folder.glob("*.parquet"))) >= count
    train = run / where / "train"
    return not (run / where / "model").exists() and len(read_metrics_log(str(train))) >= count


def _node_of(cluster, pid: int):
    """The cluster node whose raylet started process `pid` (a Ray worker is its raylet's child)."""
    import psutil

    parents = {p.pid for p in psutil.Process(pid).parents()}
    for node in cluster.worker_nodes:
        raylets = {info.process.pid for info in node.all_processes.get("raylet", [])}
        if raylets & parents:
            return node
    raise AssertionError(f"no worker node runs pid {pid}")


def inject(cluster, run: Path, faults: list, driver_pid, done: threading.Event, log: list) -> None:
    """Wait for each fault's moment in turn and cause it; what happened goes to `log`."""
    log_start = time.time()
    for moment, kind in faults:
        while not _reached(run, moment):
            if done.wait(0.1):
                return
        started = time.time()
        victims = _processes("RayTrainWorker" if moment[0] == "train" else "GenerateStage")
        if not victims:  # the moment passed before a process could be found: the schedule did not happen
            log.append({"moment": list(moment), "fault": f"missed {kind}"})
            continue
        if kind in ("engine replica", "training worker"):
            victims[0].kill()
        elif kind == "driver":
            os.kill(driver_pid(), signal.SIGKILL)
        else:  # the node of the training worker or engine replica that runs now, as a cloud reclaims it
            cluster.remove_node(_node_of(cluster, victims[0].pid))
        log.append({"moment": list(moment), "fault": kind, "seconds_into_run": round(started - log_start, 1)})


def run_with_faults(cluster, tmp_path: Path, model: str, run: str, faults: list) -> tuple[dict, list]:
    import ray

    from spin_ray.config import load_config
    from spin_ray.run.driver import start_driver

    config = load_config(None, _overrides(tmp_path, model, run))
    driver = start_driver(config)
    pid = {"now": ray.get(driver.pid.remote(), timeout=120)}

    def driver_pid() -> int:
        return pid["now"]

    log, done = [], threading.Event()
    def injecting() -> None:
        try:
            inject(cluster, tmp_path / run, faults, driver_pid, done, log)
        except Exception as error:  # shown by the test's check that every fault happened
            log.append({"fault": f"injector failed: {error!r}"})

    injector = threading.Thread(target=injecting, daemon=True)
    injector.start()
    try:
        manifest = ray.get(driver.run.remote(), timeout=1200)  # Ray restarts a killed driver and retries run() on it
    finally:
        done.set()
        injector.join(timeout=30)
    return manifest, log


def _weights(path: Path) -> dict:
    return load_file(str(path / "model.safetensors"))


def _phase_seconds(manifest: dict) -> dict:
    return {
        name + (f" {t}" if t is not None else ""): record["seconds"]
        for t, phases in [(None, manifest["phases"]), *((t, i["phases"]) for t, i in enumerate(manifest["iterations"]))]
        for name, record in phases.items()
    }


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory, tiny_model_dir):
    """The same run left alone: its folder, wall seconds and phase seconds."""
    folder = tmp_path_factory.mktemp("faults")
    started = time.time()
    manifest, _ = run_with_faults(cluster, folder, tiny_model_dir, "whole", [])
    assert manifest["status"] == "done"
    return folder / "whole", time.time() - started, _phase_seconds(manifest)


@pytest.mark.parametrize("seed", [1, 2])
def test_a_run_that_loses_an_engine_a_worker_its_driver_and_a_node_ends_with_the_uninterrupted_weights(
        cluster, uninterrupted, tmp_path, tiny_model_dir, seed, capsys):
    faults = schedule(seed)
    started = time.time()
    manifest, log = run_with_faults(cluster, tmp_path, tiny_model_dir, "faulty", faults)
    seconds = time.time() - started

    def say(line: str) -> None:  # in the test run's output, passed or not
        with capsys.disabled():
            print(f"\n[faults] seed {seed}: {line}", flush=True)

    say(f"schedule {json.dumps([[list(m), k] for m, k in faults])}")
    say(f"caused {json.dumps(log)}")
    assert [entry["fault"] for entry in log] == [kind for _, kind in faults], "every scheduled fault happened"
    assert manifest["status"] == "done"
    # no finished phase is redone: the one phase that ran twice is the one the driver died in
    driver_moment = next(tuple(entry["moment"]) for entry in log if entry["fault"] == "driver")
    redone = {(name, t) for t, iteration in enumerate(manifest["iterations"])
              for name, record in iteration["phases"].items() if record["attempts"] > 1}
    redone |= {(name, None) for name, record in manifest["phases"].items() if record["attempts"] > 1}
    assert redone == {PHASE_OF[driver_moment]}, (redone, driver_moment)
    differences = {}
    for t in (0, 1):
        expected = _weights(uninterrupted[0] / f"iter_{t}" / "model")
        got = _weights(tmp_path / "faulty" / f"iter_{t}" / "model")
        assert set(got) == set(expected)
        differences[f"iter_{t}"] = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    whole, whole_seconds, whole_phases = uninterrupted
    say(f"largest weight difference from the uninterrupted run {differences}; the run took {seconds:.0f}s against "
        f"{whole_seconds:.0f}s uninterrupted; phase seconds {json.dumps(_phase_seconds(manifest))} against "
        f"{json.dumps(whole_phases)}")
    assert all(value <= 1e-6 for value in differences.values()), differences
