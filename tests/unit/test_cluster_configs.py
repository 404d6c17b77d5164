"""The shipped cluster files, checked by their owners' validators and against the job configs they run.

Launcher YAML: Ray's own `validate_config` after `prepare_config`. RayJob: KubeRay v1.7.0's RayJob CRD schema
(vendored under tests/schemas/) with `jsonschema`, unknown fields rejected. Then every phase of the GPU job
must fit a node type that declares its accelerator label, by the same check the driver runs before each phase.
"""

import copy
import gzip
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from spin_ray.config import load_config
from spin_ray.run.cluster import NodeType, check_feasible, phase_requests

ROOT = Path(__file__).resolve().parents[2]
LAUNCHERS = [ROOT / "cluster" / "aws.yaml", ROOT / "cluster" / "gcp.yaml"]
RAYJOB = ROOT / "cluster" / "kuberay-rayjob.yaml"
GPU_JOB = ROOT / "jobs" / "gsm8k_smollm2_gpu.yaml"
RECIPE = ROOT / "jobs" / "spin_zephyr7b_ultrachat.yaml"
LORA_RECIPE = ROOT / "jobs" / "spin_zephyr7b_lora_1gpu.yaml"
CRD = ROOT / "tests" / "schemas" / "kuberay-v1.7.0" / "ray.io_rayjobs.yaml.gz"
PHASES = ("generate", "train", "evaluate")


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", sorted((ROOT / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_job_configs_validate(path):
    config = load_config(path)
    assert config.iterations.count >= 1


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_yaml_passes_rays_validator_and_holds_the_gpu_job(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    cluster = _yaml(path)
    validate_config(prepare_config(copy.deepcopy(cluster)))  # raises on what Ray would refuse at `ray up`
    types = cluster["available_node_types"]
    head = cluster["head_node_type"]
    assert types[head]["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    nodes = [
        NodeType(name, spec["resources"], 1 if name == head else spec["max_workers"]) for name, spec in types.items()
    ]
    for phase in PHASES:  # the LoRA recipe: its engine and its training worker take turns on one 80 GB GPU
        check_feasible(phase_requests(load_config(LORA_RECIPE), phase), path.name, nodes)
    for job in (load_config(GPU_JOB), load_config(RECIPE)):  # the recipe trains on the 80 GB node type
        for phase in PHASES:  # the driver's own preflight, on this file's node types
            check_feasible(phase_requests(job, phase), path.name, nodes)
        engines = [n for n in nodes if n.resources.get(f"accelerator_type:{job.generation.accelerator_type}")]
        trainers = [n for n in nodes if n.resources.get(f"accelerator_type:{job.training.accelerator_type}")]
        assert engines and trainers and {n.name for n in engines}.isdisjoint(n.name for n in trainers)
        assert all(types[n.name]["min_workers"] == 0 for n in engines), "the generation fleet scales to zero"


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launchers_run_token_auth_on_loopback_with_storage_access_everywhere(path):
    cluster = _yaml(path)
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert any("--dashboard-host=127.0.0.1" in c for c in cluster["head_start_ray_commands"])
    assert "~/.ray/auth_token" in cluster["file_mounts"]
    credential = {"aws": "IamInstanceProfile", "gcp": "serviceAccounts"}[cluster["provider"]["type"]]
    for name, spec in cluster["available_node_types"].items():
        assert credential in spec["node_config"], f"{path.name}: node type {name} gets no storage credentials"


def _strict(schema):
    """A CRD's OpenAPI schema as a JSON schema that rejects unknown fields (the API server would prune them)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


def _rayjob_schema() -> dict:
    crd = yaml.safe_load(gzip.decompress(CRD.read_bytes()))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return _strict(version["schema"]["openAPIV3Schema"])


def test_rayjob_passes_the_kuberay_crd_schema():
    import jsonschema

    schema = _rayjob_schema()
    manifest = _yaml(RAYJOB)
    jsonschema.validate(manifest, schema)
    broken = copy.deepcopy(manifest)
    broken["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {"num-cpus": "8"}  # a typo
    with pytest.raises(jsonschema.ValidationError, match="rayStartParam"):
        jsonschema.validate(broken, schema)


def _kuberay_node_types(cluster: dict) -> list[NodeType]:
    def resources(group) -> dict:
        params = group["rayStartParams"]
        found = {"CPU": float(params.get("num-cpus", 0)), "GPU": float(params.get("num-gpus", 0))}
        if "resources" in params:  # KubeRay's format: a quoted JSON object
            found.update(json.loads(json.loads(params["resources"])))
        return found

    head = NodeType("head", resources(cluster["headGroupSpec"]), 1)
    return [head] + [NodeType(g["groupName"], resources(g), g["maxReplicas"]) for g in cluster["workerGroupSpecs"]]


def test_rayjob_runs_a_shipped_job_that_fits_its_groups_and_survives_what_the_issue_lists():
    manifest = _yaml(RAYJOB)
    spec = manifest["spec"]
    words = shlex.split(spec["entrypoint"])
    checkout = Path(IMAGE_CHECKOUT)  # where the Dockerfile puts this repository in the image
    assert words[:2] == ["spin-ray", "run"] and Path(words[2]).is_relative_to(checkout)
    job_file = ROOT / Path(words[2]).relative_to(checkout)
    assert job_file.is_file(), "the entrypoint's job file comes with the image"
    overrides = [w.replace("$SPIN_RAY_STORAGE_PATH", "s3://bucket/runs") for w in words[3:] if "=" in w]
    job = load_config(job_file, overrides)
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    from_map = {e["name"]: e["valueFrom"]["configMapKeyRef"] for e in head["env"]}
    assert from_map["SPIN_RAY_STORAGE_PATH"] == {"name": "spin-ray", "key": "storage_path"}
    assert spec["backoffLimit"] == 0 and spec["activeDeadlineSeconds"] > 0
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True and cluster["rayVersion"] == "2.60.0"
    assert cluster["authOptions"]["mode"] == "token"
    for phase in PHASES:
        check_feasible(phase_requests(job, phase), RAYJOB.name, _kuberay_node_types(cluster))
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"], "bucket access comes with the pod's service account"
        mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        shm = {v["name"]: v for v in pod["volumes"]}["dshm"]
        assert "/dev/shm" in mounts and shm["emptyDir"]["medium"] == "Memory"
    for group in cluster["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert str(limits["nvidia.com/gpu"]) == group["rayStartParams"]["num-gpus"]


IMAGE_CHECKOUT = "/home/ray/spin_ray"


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.lower()] = version
    return pins


def test_the_gpu_install_is_one_resolved_list_that_the_image_and_every_cluster_file_install():
    """The GPU extra names one vLLM minor; scripts/lock_gpu.sh resolved it with PyPI's CUDA wheels for Linux x86_64
    into cluster/requirements-gpu.txt, within the bounds pyproject.toml and vLLM set; the Dockerfile and both
    launcher files install exactly that list (spin_ray itself --no-deps) on the same pinned Ray image; the RayJob
    runs that image, named once; no file under cluster/ waits for a CHANGE-ME."""
    import tomllib
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    vllm = Requirement(project["optional-dependencies"]["vllm"][0])
    assert vllm.name == "vllm" and str(vllm.specifier) == "==0.32.*"
    lock = ROOT / "cluster" / "requirements-gpu.txt"
    pins = _pins(lock)
    assert pins["vllm"] in vllm.specifier and pins["vllm"].startswith("0.32.")
    for spec in project["dependencies"]:  # torch, transformers, ray ... each within our own bounds
        requirement = Requirement(spec)
        assert requirement.name.lower() in pins, requirement.name
        assert requirement.specifier.contains(pins[requirement.name.lower()], prereleases=True), requirement
    assert pins["torch"] in SpecifierSet(">=2.6") and pins["transformers"] in SpecifierSet(">=5.16.1,<5.20")
    assert "nvidia-nccl-cu13" in pins and "s3fs" in pins and "gcsfs" in pins  # CUDA wheels; both buckets' clients
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)$", dockerfile, re.M).group(1)
    assert re.fullmatch(r"rayproject/ray:2\.60\.0-py311", base)  # the Ray the lock pins, the Python it was resolved for
    assert pins["ray"] == "2.60.0"
    assert "pip install --no-cache-dir -r /tmp/requirements-gpu.txt" in dockerfile
    assert f"--no-deps -e {IMAGE_CHECKOUT}" in dockerfile and f"WORKDIR {IMAGE_CHECKOUT}" in dockerfile
    for path in LAUNCHERS:
        cluster = _yaml(path)
        assert cluster["docker"]["image"] == base, path.name
        setup = " && ".join(cluster["setup_commands"])
        assert "pip install -q -r ~/spin_ray/cluster/requirements-gpu.txt" in setup
        assert "--no-deps -e ~/spin_ray" in setup and cluster["file_mounts"]["~/spin_ray"] == "."
    text = RAYJOB.read_text()
    images = re.findall(r"image: (\S+)", text)
    assert images[0].startswith("&image ") or images[0] == "&image", images
    assert set(images[1:]) == {"*image"} and len(images) == 1 + len(
        _yaml(RAYJOB)["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert not [p.name for p in (ROOT / "cluster").iterdir() if "CHANGE-ME" in p.read_text()]


def test_the_one_gpu_recipe_has_a_one_gpu_node_type_in_every_cluster_file():
    """The LoRA recipe's engine and worker take turns on one 80 GB GPU: each cluster file offers a node type with one
    such GPU, so nobody is billed for 8 to use 1."""
    job = load_config(LORA_RECIPE)
    label = f"accelerator_type:{job.training.accelerator_type}"
    assert job.generation.accelerator_type == job.training.accelerator_type
    for path in LAUNCHERS:
        types = _yaml(path)["available_node_types"]
        single = [
            name for name, spec in types.items() if spec["resources"].get(label) and spec["resources"]["GPU"] == 1
        ]
        assert single, path.name
    groups = _kuberay_node_types(_yaml(RAYJOB)["spec"]["rayClusterSpec"])
    assert any(g.resources.get(label) and g.resources["GPU"] == 1 for g in groups)
    for phase in PHASES:
        check_feasible(phase_requests(job, phase), RAYJOB.name, groups)


def test_a_job_the_cluster_cannot_hold_is_refused_by_the_same_check():
    from spin_ray.run.cluster import ResourceError

    nodes = [
        NodeType(n.name, n.resources, n.max_count) for n in _kuberay_node_types(_yaml(RAYJOB)["spec"]["rayClusterSpec"])
    ]
    too_many = load_config(GPU_JOB, ["generation.replicas=[9,12]"])
    with pytest.raises(ResourceError, match="9 x generation engine replica.*lower generation.replicas"):
        check_feasible(phase_requests(too_many, "generate"), "the RayJob's groups", nodes)
    wrong_label = load_config(GPU_JOB, ["generation.accelerator_type=B200"])
    with pytest.raises(ResourceError, match="accelerator_type:B200"):
        check_feasible(phase_requests(wrong_label, "generate"), "the RayJob's groups", nodes)


def test_node_types_with_one_name_each_count():
    # fixed clusters name live nodes by address, and several nodes can share one (one machine, one NAT)
    from spin_ray.run.cluster import ResourceError

    job = load_config(None, ["generation.replicas=[2,2]", "generation.cpus_per_replica=1"])
    two_workers = [NodeType("10.0.0.1", {"CPU": 2.0}, 1), NodeType("10.0.0.1", {"CPU": 2.0}, 1),
                   NodeType("10.0.0.1", {}, 1)]
    check_feasible(phase_requests(job, "generate"), "the live nodes", two_workers)
    greedy = load_config(None, ["generation.replicas=[5,5]", "generation.cpus_per_replica=1"])
    with pytest.raises(ResourceError, match=r"can ever hold \(4\)"):
        check_feasible(phase_requests(greedy, "generate"), "the live nodes", two_workers)


def test_a_reference_pool_is_asked_for_only_beside_unfused_engines():
    # fused (the default): the engine pass scores; a scorer reserved beside it would never fit a node that
    # holds exactly one replica (the 2-CPU job in tests/e2e waited out run.resource_wait_s for it)
    fused = load_config(None, ["generation.cpus_per_replica=2"])
    assert [r.what for r in phase_requests(fused, "evaluate")] == ["generation engine replica"]
    assert [r.what for r in phase_requests(fused, "generate")] == ["generation engine replica"]
    apart = load_config(None, ["generation.fuse_reference=false"])
    for phase in ("generate", "evaluate"):
        assert [r.what for r in phase_requests(apart, phase)] == ["generation engine replica", "reference scorer"]


def test_jobs_readme_submits_shipped_configs():
    text = (ROOT / "jobs" / "README.md").read_text()
    named = set(re.findall(r"spin-ray run (jobs/\S+\.yaml)", text))
    assert named >= {"jobs/gsm8k_smollm2_cpu.yaml", "jobs/gsm8k_smollm2_gpu.yaml"}
    assert all((ROOT / p).is_file() for p in named)
    assert "ray job submit" in text and "RAY_AUTH_MODE=token" in text
