"""Every shipped YAML loads, has the fields Ray needs, and agrees with the job configs it runs."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

from spin_ray.config import load_config

ROOT = Path(__file__).resolve().parents[2]
LAUNCHERS = [ROOT / "cluster" / "aws.yaml", ROOT / "cluster" / "gcp.yaml"]
RAYJOB = ROOT / "cluster" / "kuberay-rayjob.yaml"
GPU_JOB = ROOT / "jobs" / "gsm8k_smollm2_gpu.yaml"


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_job_configs_validate(path):
    config = load_config(path)
    assert config.iterations.count >= 1


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_yaml_has_what_ray_needs_and_fits_the_gpu_job(path):
    cluster = _yaml(path)
    for key in ("cluster_name", "max_workers", "provider", "available_node_types", "head_node_type",
                "head_start_ray_commands", "worker_start_ray_commands", "setup_commands"):
        assert key in cluster, f"{path.name}: missing {key}"
    assert cluster["provider"]["type"] in ("aws", "gcp")
    types = cluster["available_node_types"]
    assert cluster["head_node_type"] in types
    for name, node in types.items():
        for key in ("node_config", "resources", "min_workers", "max_workers"):
            assert key in node, f"{path.name}: node type {name} lacks {key}"
        assert 0 <= node["min_workers"] <= node["max_workers"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    assert sum(node["max_workers"] for n, node in types.items() if n != cluster["head_node_type"]) <= cluster["max_workers"]

    job = load_config(GPU_JOB)
    generation = types["gpu_generation"]
    assert generation["min_workers"] == 0, "the generation fleet scales to zero between iterations"
    gpus_per_replica = job.generation.tensor_parallel_size
    assert generation["max_workers"] * generation["resources"]["GPU"] >= job.generation.replicas[1] * gpus_per_replica
    assert generation["resources"]["CPU"] >= job.generation.cpus_per_replica
    training = types["gpu_training"]
    assert training["resources"]["GPU"] * training["max_workers"] >= job.training.num_workers[1]
    assert training["resources"]["CPU"] >= job.training.num_workers[1] * job.training.cpus_per_worker
    assert "ray start --head" in " ".join(cluster["head_start_ray_commands"])
    assert any("--autoscaling-config" in c for c in cluster["head_start_ray_commands"])


def test_rayjob_manifest_runs_a_shipped_job_with_autoscaling():
    manifest = _yaml(RAYJOB)
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayJob"
    spec = manifest["spec"]
    words = shlex.split(spec["entrypoint"])
    assert words[:2] == ["spin-ray", "run"]
    job_path = ROOT / words[2]
    assert job_path.is_file(), f"entrypoint names {words[2]}, which does not exist"
    job = load_config(job_path, [w for w in words[3:] if "=" in w])
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["rayVersion"] == "2.60.0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    generation, training = groups["gpu-generation"], groups["gpu-training"]
    assert generation["minReplicas"] == 0
    assert generation["maxReplicas"] * int(generation["rayStartParams"]["num-gpus"]) >= job.generation.replicas[1]
    assert training["maxReplicas"] * int(training["rayStartParams"]["num-gpus"]) >= job.training.num_workers[1]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        container = group["template"]["spec"]["containers"][0]
        assert container["image"] and container["resources"]["limits"]
    for group in cluster["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert str(limits["nvidia.com/gpu"]) == group["rayStartParams"]["num-gpus"]


def test_jobs_readme_submits_shipped_configs():
    text = (ROOT / "jobs" / "README.md").read_text()
    named = set(re.findall(r"spin-ray run (jobs/\S+\.yaml)", text))
    assert named == {"jobs/gsm8k_smollm2_cpu.yaml", "jobs/gsm8k_smollm2_gpu.yaml"}
    assert all((ROOT / p).is_file() for p in named)
    assert "ray job submit" in text
