"""Ray's own autoscaler (fake multi-node provider): a fleet that grows and shrinks, preflight refusals, driver restart.

The head is the one `ray.cluster_utils.AutoscalingCluster` describes (see fake_provider_config), started by the test
itself as a child
process (`ray start --head --autoscaling-config=...` with the fake provider's environment): AutoscalingCluster's
own start() runs a machine-wide `ray stop`, which would end every Ray instance here. The head has no CPUs; a
"gen" node type (max 3) carries accelerator_type:GEN and a "train" type (max 1) accelerator_type:TRAIN, which
the run's generation.accelerator_type and training.accelerator_type ask for.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.cli_output import own_lines
from tests.servers import RayHead, free_port, wait_for

pytestmark = pytest.mark.ray

GEN, TRAIN = "accelerator_type:GEN", "accelerator_type:TRAIN"
SMALL_STORE = 200 * 1024 * 1024  # each fake node's object store: five of Ray's defaults would not fit this box


def fake_provider_config(head_resources: dict, worker_node_types: dict, gcs_address: str) -> dict:
    """The cluster config `AutoscalingCluster` writes for the fake multi-node provider.

    AutoscalingCluster builds it on `fake_multi_node/example.yaml`, which Ray's wheels do not ship (2.60
    has only the provider's code), so its constructor fails on an installed Ray; these are that file's
    provider settings with our node types, as AutoscalingCluster would merge them.
    """
    return {
        "cluster_name": "fake_multinode", "max_workers": sum(t["max_workers"] for t in worker_node_types.values()),
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {**worker_node_types, "ray.head.default": {
            "resources": head_resources, "node_config": {}, "max_workers": 0}},
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.25,
        "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


@pytest.fixture(scope="module")
def autoscaling_head(tmp_path_factory):
    import ray

    if ray.is_initialized():
        ray.shutdown()  # the shared session; the next test that needs it starts it again
    folder = tmp_path_factory.mktemp("autoscaling")
    port = free_port()
    config = fake_provider_config(
        head_resources={"CPU": 0},
        worker_node_types={
            "gen": {"resources": {"CPU": 1, GEN: 1, "object_store_memory": SMALL_STORE}, "node_config": {},
                    "min_workers": 0, "max_workers": 3},
            "train": {"resources": {"CPU": 2, TRAIN: 1, "object_store_memory": SMALL_STORE}, "node_config": {},
                      "min_workers": 0, "max_workers": 1},
        },
        gcs_address=f"127.0.0.1:{port}")  # fake nodes join this head, not port 6379
    path = folder / "autoscaling.json"
    path.write_text(json.dumps(config))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}  # this head's own token
    head = RayHead(folder / "head.log", num_cpus=0, port=port,
                   env={"AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1", **auth},
                   extra=[f"--autoscaling-config={path}", f"--object-store-memory={SMALL_STORE}"])
    saved = {key: os.environ.get(key) for key in auth}
    _use_auth(auth)
    try:
        ray.init(address=head.address, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield head
    finally:
        ray.shutdown()
        head.stop()
        _use_auth(saved)


def _use_auth(settings: dict) -> None:
    """Put this process's Ray client in the auth mode and token of `settings` (None: unset), whatever an earlier
    ray.init in this process chose: Ray caches both, the mode in its config and the token in its loader, and a
    client in the wrong mode is refused by the head ("Authentication token is missing or incorrect")."""
    from ray._raylet import AuthenticationTokenLoader, Config

    for key, value in settings.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    Config.initialize("")  # what Ray itself does after setting RAY_AUTH_MODE: the config reads it again
    AuthenticationTokenLoader.instance().reset_cache()


def _overrides(tmp_path, model, run, *extra):
    return [f"model.name={model}", f"run.storage_path={tmp_path}", f"run.name={run}", "data.limit=72",
            "generation.max_new_tokens=128", "generation.batch_size=1", "generation.shard_rows=4",
            "generation.replicas=[1,3]", f"generation.accelerator_type={GEN.split(':')[1]}",
            "training.num_workers=[2,2]", f"training.accelerator_type={TRAIN.split(':')[1]}",
            "training.global_batch_size=8", "training.epochs=1", "evaluation.enabled=false", "iterations.count=1",
            "run.resource_wait_s=240",
            # the HF engine starts in a second: a vLLM replica's ~30 s start on this 2-core box outlasts this small
            # generation, so the pool would finish before a second replica came up (vLLM runs in test_generation)
            "generation.engine=hf", *extra]


# Enough generation (about 90 s on one replica here) to outlast the 10-25 s a fake node takes to join, Ray Data's
# pool to notice it, and the new replicas to start: every fake node shares this box's two cores with the busy
# first replica, so a replica that starts in 4 s alone took 28-36 s here (41-46 s, and over 70 s on a slower CI
# machine where 240 prompts ended before any grown replica came up, while replicas imported torch at Ray's
# niceness 15). The training that follows only has to land on its node: 7 steps of 48 pairs, not 42 of 8.
FLEET_WORK = ["data.limit=336", "training.global_batch_size=48"]


class Hog:
    """Holds a whole node's worth of resources."""

    def ping(self) -> bool:
        return True


def _autoscaler_report() -> dict:
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    return json.loads(raw).get("autoscaler_report", {}) if raw else {}


def test_the_fleet_grows_with_the_work_and_shrinks_after_it(autoscaling_head, tmp_path, tiny_model_dir):
    import ray
    from ray._private import state

    from spin_ray.config import load_config
    from spin_ray.run.driver import start_driver
    from spin_ray.storage import read_json

    config = load_config(None, _overrides(tmp_path, tiny_model_dir, "scaling", *FLEET_WORK))
    samples: list[dict] = []
    held: list = []
    stop = threading.Event()

    def observe():
        while not stop.is_set():
            nodes = [n for n in ray.nodes() if n["Alive"]]
            engine_states = [a["State"] for a in state.actors().values() if "GenerateStage" in a["ActorClassName"]]
            manifest = read_json(f"{tmp_path}/scaling/manifest.json") or {}
            phases = (manifest.get("iterations") or [{}])[0].get("phases", {})
            samples.append({"t": time.monotonic(), "gen_nodes": sum(GEN in n["Resources"] for n in nodes),
                            "train_nodes": sum(TRAIN in n["Resources"] for n in nodes),
                            "replicas": engine_states.count("ALIVE"),
                            "starting": sum(s not in ("ALIVE", "DEAD") for s in engine_states),
                            "phase": next((k for k, v in phases.items() if v["status"] == "running"), None),
                            "active": _autoscaler_report().get("active_nodes", {})})
            if samples[-1]["phase"] == "train" and samples[-1]["gen_nodes"] == 1 and not held:
                from ray.autoscaler.v2.sdk import get_cluster_status

                status = get_cluster_status(autoscaling_head.address)
                gen_ids = {n.node_id for n in status.active_nodes + status.idle_nodes if n.ray_node_type_name == "gen"}
                held.extend(sorted({a["ActorClassName"] for a in state.actors().values()
                                    if a["State"] == "ALIVE" and a["Address"]["NodeID"] in gen_ids}))
                held.extend(n.node_activity for n in status.active_nodes if n.node_id in gen_ids)
            time.sleep(1.0)  # the observer shares the two cores with the fleet it watches

    watcher = threading.Thread(target=observe, daemon=True)
    watcher.start()
    try:
        manifest = ray.get(start_driver(config).run.remote(), timeout=900)
        # idle gen nodes leave after the idle timeout (15 s here): keep watching until they are gone
        wait_for(lambda: samples and samples[-1]["gen_nodes"] == 0, 120, "the idle gen nodes to be released")
    finally:
        stop.set()
        watcher.join(timeout=10)
    assert manifest["status"] == "done"
    timeline = "; ".join(f"{s['t'] - samples[0]['t']:.0f}s {s['phase']} gen={s['gen_nodes']} train={s['train_nodes']} "
                         f"replicas={s['replicas']}+{s['starting']}" for s in samples[::2])
    print(timeline, held)  # shown when an assertion below fails
    generating = [s for s in samples if s["phase"] == "generate"]
    training = [s for s in samples if s["phase"] == "train"]
    assert generating and training, "the observer missed a phase"
    assert max(s["gen_nodes"] for s in generating) >= 2, "the autoscaler never launched a second gen node"
    assert max(s["replicas"] for s in generating) >= 2, "the engine pool never grew past one replica"
    assert max(s["gen_nodes"] for s in samples) <= 3 and max(s["replicas"] for s in samples) <= 3  # the config's max
    assert max(s["active"].get("gen", 0) for s in samples) >= 2  # the autoscaler's own account agrees
    assert max(s["train_nodes"] for s in training) == 1 and training[0]["train_nodes"] <= 1
    first_train = training[0]["t"]
    # the fleet shrinks once generation is over; one gen node may stay through training, busy with Ray Train's
    # PreemptionWatcher (a zero-CPU actor Ray places on any node); none is left after the run
    assert min(s["gen_nodes"] for s in training) <= 1, held
    assert samples[-1]["gen_nodes"] == 0
    assert any(s["train_nodes"] == 1 for s in samples if s["t"] >= first_train)  # training got its node
    prompts = manifest["iterations"][0]["phases"]["generate"]["metrics"]["prompts"]
    assert prompts == 336 and manifest["iterations"][0]["phases"]["train"]["metrics"]["steps"] == prompts // 48


def test_requests_no_node_type_can_hold_fail_at_once(autoscaling_head, tmp_path, tiny_model_dir):
    base = _overrides(tmp_path, tiny_model_dir, "preflight")
    cases = {
        "gpu": (["generation.engine=vllm", "generation.use_gpu=true", "evaluation.enabled=true"],
                "no node type can hold a generation engine replica needing", '"GPU": 1'),
        "replicas": (["generation.replicas=[4,4]"], "4 x generation engine replica", "lower generation.replicas"),
        "label": (["generation.accelerator_type=H100"], "accelerator_type:H100", "generation.accelerator_type"),
    }
    for name, (extra, *fragments) in cases.items():
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "spin_ray.cli", "run", "--address", autoscaling_head.address,
             *base, f"run.name=preflight-{name}", *extra],
            capture_output=True, text=True, timeout=300, env=dict(os.environ))
        lines = own_lines(result.stderr)
        assert result.returncode == 2, result.stderr[-2000:]
        assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        for fragment in fragments:
            assert fragment in lines[0], lines[0]
        assert time.monotonic() - started < 60, f"{name}: refused, but only after {time.monotonic() - started:.0f}s"


def test_a_request_that_fits_but_finds_no_room_fails_after_the_wait(autoscaling_head, tmp_path, tiny_model_dir):
    import ray

    from spin_ray.config import load_config
    from spin_ray.run.cluster import ResourceError, ensure_resources

    # the only train node (max 1) is taken whole by another actor: the request fits the node type, never the cluster
    hog = ray.remote(num_cpus=2, resources={TRAIN: 1})(Hog).remote()
    try:
        ray.get(hog.ping.remote(), timeout=180)
        config = load_config(None, _overrides(tmp_path, tiny_model_dir, "wait", "run.resource_wait_s=8"))
        started = time.monotonic()
        with pytest.raises(ResourceError, match=r"train: waited 8s \(run.resource_wait_s\) for 2 x training worker"):
            ensure_resources(config, "train", echo=lambda line: None)
        assert 8 <= time.monotonic() - started < 40
    finally:
        ray.kill(hog)


def _held(ray) -> str:
    """What holds the cluster now, as Ray's state API lists it: live actors and placement groups."""
    from ray.util.state import list_actors, list_placement_groups

    actors = sorted(f"{a.class_name}:{a.state}" for a in list_actors(filters=[("state", "!=", "DEAD")], limit=500))
    groups = sorted(f"{g.placement_group_id[:8]}:{g.state}" for g in list_placement_groups(limit=500)
                    if g.state != "REMOVED")
    return f"actors {actors}; placement groups {groups}; free {ray.available_resources()}"


def test_a_driver_killed_while_its_controller_restarts_workers_restarts_and_redoes_no_finished_phase(
        autoscaling_head, tmp_path, tiny_model_dir, capsys):
    """The interleaving of the flake: a training worker dies, Ray Train's controller starts a new worker group, and
    the driver is killed at that moment. The restarted driver ends what the dead attempt left (its TrainingRun, and
    with it the controller and its groups) and its own workers start within 90 s of the kill."""
    import psutil
    import ray
    from ray.util.placement_group import placement_group_table

    from spin_ray.config import load_config
    from spin_ray.run.driver import start_driver
    from spin_ray.storage import read_json

    config = load_config(None, _overrides(tmp_path, tiny_model_dir, "restart", "data.limit=24",
                                          "generation.max_new_tokens=16", "training.epochs=4",
                                          "training.checkpoint_every=1", "evaluation.enabled=true",
                                          "evaluation.prompts=4"))
    driver = start_driver(config)
    pid = ray.get(driver.pid.remote(), timeout=60)
    run = driver.run.remote()

    def training_with_a_checkpoint():
        manifest = read_json(f"{tmp_path}/restart/manifest.json") or {}
        phases = (manifest.get("iterations") or [{}])[0].get("phases", {})
        training = phases.get("train", {}).get("status") == "running"
        return training and list((tmp_path / "restart" / "iter_0" / "train" / "checkpoints").glob("*/_COMMITTED.json"))

    wait_for(training_with_a_checkpoint, 600, "iteration 0's training to commit a checkpoint")
    worker_group = tmp_path / "restart" / "iter_0" / "train" / "worker_group.json"
    first_group = json.loads(worker_group.read_text())["placement_group"]

    def groups() -> set[str]:
        return {group for group, entry in placement_group_table().items() if entry["state"] != "REMOVED"}

    before = groups()
    workers = [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
    workers[0].kill()  # the controller restarts its worker group from the last checkpoint
    wait_for(lambda: groups() - before, 120, "the controller's new worker group", interval=0.05)
    os.kill(pid, signal.SIGKILL)  # the driver's process dies, as on a crash, while its controller restarts workers
    killed = time.time()

    def restarted_workers():  # the restarted attempt's rank 0 records its own worker group when it starts
        record = json.loads(worker_group.read_text()) if worker_group.exists() else {}
        return record.get("placement_group") not in (None, first_group) and record.get("recorded", 0) > killed \
            and record

    try:
        started = wait_for(restarted_workers, 300, "the restarted attempt's training workers to start")
    except AssertionError as error:
        raise AssertionError(f"{error}; {_held(ray)}") from None
    # what the dead attempt held is ended, not waited out (run.resource_wait_s is 240 s): what remains is the driver's
    # restart, its phase checks and Ray Train's worker-group start
    with capsys.disabled():  # in the test run's output, for the record of how close to its limit it runs
        print(f"\n[restart] the restarted attempt's workers started {started['recorded'] - killed:.1f}s after the "
              f"driver was killed", flush=True)
    assert started["recorded"] - killed < 90, f"workers started {started['recorded'] - killed:.0f}s after the kill"
    manifest = ray.get(run, timeout=900)  # Ray restarts the actor and retries run() on it
    assert ray.get(driver.pid.remote(), timeout=60) != pid
    assert manifest["status"] == "done"
    assert manifest["phases"]["baseline_eval"]["attempts"] == 1
    phases = manifest["iterations"][0]["phases"]
    assert phases["generate"]["attempts"] == 1 and phases["evaluate"]["attempts"] == 1
    assert phases["train"]["attempts"] == 2 and phases["train"]["metrics"]["resumed_from_step"] >= 1
    assert len(manifest["jobs"]) == 2  # the restarted driver opened the manifest again, as a resubmitted job does
    for ended in manifest.get("ended_earlier_attempts", []):  # only this run's earlier attempt, if it was still there
        assert all(":train:iter_0" in name or ":pass:" in name for name in ended["actors"])


class Predecessor:
    """Stands in for a dead attempt's Ray Train controller: it creates a worker group's placement group and dies."""

    def hold(self, bundles: list[dict]) -> str:
        from ray.util.placement_group import placement_group

        group = placement_group(bundles, strategy="PACK")
        group.wait(timeout_seconds=240)
        return group.id.hex()


def test_a_dead_attempts_worker_group_is_ended_not_waited_out(autoscaling_head, tmp_path, tiny_model_dir):
    """Ray keeps a placement group whose creator actor died for as long as its job lives: the training node's CPUs stay
    taken, and a restarted driver of the same job would wait for them until run.resource_wait_s. The group its worker
    recorded is ended instead, and the phase's resources come back at once."""
    import ray
    from ray.util.placement_group import PlacementGroup, placement_group_table

    from spin_ray.config import load_config
    from spin_ray.run.cluster import end_earlier_worker_group, ensure_resources
    from spin_ray.training.trainer import WORKER_GROUP

    config = load_config(None, _overrides(tmp_path, tiny_model_dir, "ended", "run.resource_wait_s=30"))
    bundles = [{"CPU": 1.0, TRAIN: 0.001}] * 2  # what Ray Train's worker group of this config reserves
    predecessor = ray.remote(num_cpus=0)(Predecessor).remote()
    group_id = ray.get(predecessor.hold.remote(bundles), timeout=300)
    group = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id)))
    train_dir = tmp_path / "ended" / "iter_0" / "train"
    train_dir.mkdir(parents=True)
    (train_dir / WORKER_GROUP).write_text(json.dumps({"placement_group": group_id, "recorded": time.time()}))
    ray.kill(predecessor)
    time.sleep(3)
    assert placement_group_table(group)["state"] == "CREATED"  # its creator is dead, the group holds on
    lines: list[str] = []
    ended = end_earlier_worker_group(str(train_dir), 60, lines.append)
    assert ended["placement_group"] == group_id and ended["bundles"] == 2 and not ended["controller_was_alive"]
    assert ended["seconds"] < 20 and "ended the worker group an earlier attempt left" in lines[0]
    assert placement_group_table(group)["state"] == "REMOVED" and not (train_dir / WORKER_GROUP).exists()
    started = time.monotonic()
    ensure_resources(config, "train", echo=lines.append)  # the training node's CPUs are free again
    assert time.monotonic() - started < 20
    assert end_earlier_worker_group(str(train_dir), 60, lines.append) is None  # nothing left: nothing to do
