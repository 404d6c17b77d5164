"""What a phase asks of the cluster, whether the cluster can ever give it, and a bounded wait until it does.

Before each phase the driver checks the phase's minimum actors (engine replicas, scorers, training
workers) against the cluster's node types: the autoscaler's node groups (its config in the GCS, or
the autoscaling config the head's monitor runs with), else the live nodes of a fixed cluster. A
request no node type can ever hold fails at once, naming the resource and the config key. A request
that fits is waited for with a placement group of those bundles (which also tells the autoscaler to
launch nodes), for at most `run.resource_wait_s`; then it fails saying what was asked and what the
cluster offered. Nothing waits without a limit.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import yaml

from spin_ray.objectives.algorithms import objective
from spin_ray.storage import join, read_json, remove


class ResourceError(RuntimeError):
    """A phase's resources that the cluster cannot give (ever, or within run.resource_wait_s)."""


@dataclass(frozen=True)
class Request:
    """`count` actors of one kind, each needing `bundle` (Ray resources); `key` is the config key that sets them."""

    what: str
    key: str
    bundle: dict
    count: int


@dataclass(frozen=True)
class NodeType:
    name: str
    resources: dict
    max_count: int


def _accelerator(bundle: dict, accelerator: str | None) -> dict:
    # how Ray asks for an accelerator type: a sliver of the node's `accelerator_type:<name>` resource
    return {**bundle, f"accelerator_type:{accelerator}": 0.001} if accelerator else bundle


def _engine_bundle(gen, gpus: int) -> dict:
    bundle = {"CPU": gen.cpus_per_replica, **({"GPU": gpus} if gen.use_gpu else {})}
    return _accelerator(bundle, gen.accelerator_type)


def phase_requests(config, phase: str) -> list[Request]:
    """The minimum actors a phase starts at once: generate/evaluate (engines, scorers, oracle), train (workers)."""
    gen, train = config.generation, config.training
    if phase == "train":
        bundle = _accelerator({"CPU": train.cpus_per_worker, **({"GPU": 1} if train.use_gpu else {})},
                              train.accelerator_type)
        keys = "training.num_workers, training.cpus_per_worker, training.use_gpu, training.accelerator_type"
        return [Request("training worker", keys, bundle, train.num_workers[0])]
    requests = [Request("generation engine replica", "generation.replicas, generation.cpus_per_replica, "
                        "generation.use_gpu, generation.tensor_parallel_size, generation.accelerator_type",
                        _engine_bundle(gen, gen.tensor_parallel_size), gen.replicas[0])]
    # a reference pool runs beside the engines only when scoring is not fused into the engine pass (then
    # evaluation's scoring of the opponent's answers is a pool of its own after generation, with an engine's bundle)
    scoring = not gen.fuse_reference and (phase == "evaluate" or config.engine_scores_reference)
    if scoring:
        requests.append(Request("reference scorer", "generation.reference_replicas, generation.cpus_per_replica, "
                                "generation.use_gpu", _engine_bundle(gen, 1), gen.reference_replicas[0]))
    if phase == "generate" and objective(config).needs_oracle and config.sppo.oracle == "reward_model":
        sppo = config.sppo
        bundle = {"CPU": sppo.reward_cpus_per_replica, **({"GPU": 1} if sppo.reward_use_gpu else {})}
        requests.append(Request("reward model replica", "sppo.reward_replicas, sppo.reward_cpus_per_replica, "
                                "sppo.reward_use_gpu", bundle, sppo.reward_replicas[0]))
    return requests


def _autoscaling_config_path() -> str | None:
    """The autoscaling config the head's monitor process runs with (`ray start --head --autoscaling-config=...`)."""
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        args = process.info.get("cmdline") or []
        if any(a.endswith("monitor.py") for a in args):
            for arg in args:
                if arg.startswith("--autoscaling-config="):
                    return arg.split("=", 1)[1]
    return None


def node_types() -> tuple[str, list[NodeType]]:
    """(where they came from, the node types) of the connected cluster; see the module docstring."""
    import ray

    # Private: Ray 2.60 has no public API for the autoscaler's node groups (what the cluster may grow to); the
    # public ray.nodes() only lists the nodes alive now.
    config = ray._private.state.state.get_cluster_config()
    if config is not None and config.node_group_configs:
        return "the autoscaler's node groups", [
            NodeType(g.name, dict(g.resources), g.max_count if g.max_count >= 0 else math.inf)
            for g in config.node_group_configs]
    path = _autoscaling_config_path()
    if path:
        with open(path) as handle:
            scaling = yaml.safe_load(handle)
        head_type = scaling.get("head_node_type")
        types = []
        for name, spec in (scaling.get("available_node_types") or {}).items():
            count = 1 if name == head_type else min(spec.get("max_workers", 0), scaling.get("max_workers", math.inf))
            types.append(NodeType(name, dict(spec.get("resources") or {}), count))
        return f"the autoscaling config {path}", types
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    # several nodes can share an address (one machine, or containers behind one IP): name them by id too
    return "the live nodes (no autoscaler)", [
        NodeType(f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})", dict(n["Resources"]), 1) for n in nodes]


def _fits(bundle: dict, resources: dict) -> int:
    """How many `bundle`s one node with `resources` holds."""
    counts = [math.floor(resources.get(name, 0) / amount + 1e-9) for name, amount in bundle.items() if amount > 0]
    return min(counts) if counts else 0


def _show(resources: dict) -> str:
    # placement groups' own resources (CPU_group_<id>) and node ids say nothing to a user
    return json.dumps({k: v for k, v in resources.items() if not k.startswith("node:") and k != "object_store_memory"
                       and k != "memory" and "_group_" not in k}, sort_keys=True)


def check_feasible(requests: list[Request], source: str, types: list[NodeType]) -> None:
    """Raise ResourceError if some request can never be met by these node types."""
    for request in requests:
        capacity = sum(_fits(request.bundle, kind.resources) * kind.max_count for kind in types)
        if capacity == 0:
            offered = "; ".join(f"{kind.name}: {_show(kind.resources)}" for kind in types) or "no nodes"
            raise ResourceError(f"no node type can hold a {request.what} needing {_show(request.bundle)} (set by "
                                f"{request.key}); {source} offers {offered}")
        if capacity < request.count:
            raise ResourceError(f"{request.count} x {request.what} ({_show(request.bundle)} each) exceed what "
                                f"{source} can ever hold ({capacity}); lower {request.key}")


def _placement_groups() -> dict[str, "gcs_pb2.PlacementGroupTableData"]:  # noqa: F821
    """Every placement group of the cluster by id (hex), as the GCS holds it: with its creator actor and job and
    whether they died."""
    import ray
    from ray.core.generated import gcs_pb2

    groups = {}
    # Private: neither ray.util.placement_group_table() nor ray.util.state.list_placement_groups() (Ray 2.60) gives a
    # group's creator actor or whether it died, which is what tells an orphan apart
    for raw in ray._private.state.state._connect_and_get_accessor().get_placement_group_table():
        group = gcs_pb2.PlacementGroupTableData.FromString(raw)
        groups[group.placement_group_id.hex()] = group
    return groups


def _remove_group(group_id: str) -> None:
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))


def release_orphaned_groups(echo=print) -> int:
    """Remove this job's placement groups whose creating actor has died; return how many.

    Ray frees a placement group only once both its creator actor and its job are gone. A driver actor that
    Ray restarts lives on in the same job, so the groups of what it had started (Ray Train's worker group,
    Ray Data's pools) would hold their nodes until the job ends, and the restarted driver would wait on
    them for `run.resource_wait_s` and fail (seen with Ray 2.60's Ray Train).
    """
    import ray
    from ray.core.generated import gcs_pb2

    job = ray.get_runtime_context().get_job_id()
    removed = 0
    nil = "f" * 32  # created by the job's driver process, not by an actor: the job's own, never an orphan
    for group_id, group in _placement_groups().items():
        orphaned = (group.creator_actor_dead and not group.creator_job_dead and not group.is_detached
                    and group.creator_actor_id.hex() != nil)
        if orphaned and group.creator_job_id.hex() == job and group.state != gcs_pb2.PlacementGroupTableData.REMOVED:
            _remove_group(group_id)
            removed += 1
    if removed:
        echo(f"[spin-ray] released {removed} placement group(s) left by actors that died (a restarted driver's)")
    return removed


def end_earlier_worker_group(train_dir: str, limit_s: float, echo=print) -> dict | None:
    """Before a training phase asks for workers: end the worker group an earlier attempt of this phase (this run's
    train folder) left alive, and wait up to `limit_s` until its resources are back. Its controller, which would
    start the workers again, is fate-shared with the driver that died; it is waited for, then the group removed,
    which ends the workers in it. Returns what was ended and how long it took, or None when nothing was left."""
    from ray.core.generated import gcs_pb2

    # torch.distributed's checkpoint modules come with the trainer: 0.75 s of every spin-ray command's start otherwise
    from spin_ray.training.trainer import WORKER_GROUP

    record = read_json(join(train_dir, WORKER_GROUP))
    if not record:
        return None
    group_id = record["placement_group"]
    started = time.monotonic()
    deadline = started + limit_s
    removed_state = gcs_pb2.PlacementGroupTableData.REMOVED
    group = _placement_groups().get(group_id)
    if group is None or group.state == removed_state:
        remove(join(train_dir, WORKER_GROUP))
        return None
    controller = group.creator_actor_id.hex()
    controller_deadline = started + min(limit_s, 60)
    while not group.creator_actor_dead and time.monotonic() < controller_deadline:  # it dies with its dead driver
        time.sleep(0.5)
        group = _placement_groups().get(group_id, group)
    controller_ended = group.creator_actor_dead
    _remove_group(group_id)
    while time.monotonic() < deadline:
        current = _placement_groups().get(group_id)
        if current is None or current.state == removed_state:
            break
        time.sleep(0.5)
    else:
        raise ResourceError(f"train: the worker group an earlier attempt left (placement group {group_id}) was not "
                            f"removed within {limit_s:.0f}s (run.resource_wait_s)")
    seconds = time.monotonic() - started
    remove(join(train_dir, WORKER_GROUP))
    ended = {"placement_group": group_id, "bundles": len(group.bundles), "controller": controller,
             "controller_was_alive": not controller_ended, "seconds": round(seconds, 2)}
    echo(f"[spin-ray] train: ended the worker group an earlier attempt left (placement group {group_id[:12]}, "
         f"{len(group.bundles)} worker bundle(s), its Ray Train controller "
         f"{'dead' if controller_ended else 'still alive after ' + format(min(limit_s, 60), '.0f') + 's'}); "
         f"its resources came back in {seconds:.1f}s")
    return ended


def ensure_resources(config, phase: str, echo=print) -> None:
    """Fail at once if the phase's minimum actors can never be placed; else wait (bounded) until they can be."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    requests = [r for r in phase_requests(config, phase) if r.count > 0]
    source, types = node_types()
    check_feasible(requests, source, types)
    release_orphaned_groups(echo)
    bundles = [dict(r.bundle) for r in requests for _ in range(r.count)]
    wait = config.run.resource_wait_s
    group = placement_group(bundles, strategy="PACK", name=f"spin-ray-preflight-{phase}")
    deadline = time.monotonic() + wait
    try:
        ready = group.wait(timeout_seconds=min(5, wait))
        if not ready:
            echo(f"[spin-ray] {phase}: waiting up to {wait:.0f}s for "
                 + ", ".join(f"{r.count} x {r.what} {_show(r.bundle)}" for r in requests))
        # PlacementGroup.wait may return a little before its timeout: wait out the whole limit
        while not ready and time.monotonic() < deadline:
            # a group whose creator died after the first look (a dead driver's Ray Train controller dies some time
            # after its driver) is released as soon as it is orphaned, not after the whole wait
            release_orphaned_groups(echo)
            ready = group.wait(timeout_seconds=max(1, min(10, math.ceil(deadline - time.monotonic()))))
        if not ready:
            available = ray.available_resources()
            raise ResourceError(
                f"{phase}: waited {wait:.0f}s (run.resource_wait_s) for "
                + ", ".join(f"{r.count} x {r.what} {_show(r.bundle)} ({r.key})" for r in requests)
                + f"; the cluster offered {_show(available)} free of {_show(ray.cluster_resources())}")
    finally:
        remove_placement_group(group)
