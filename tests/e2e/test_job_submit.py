"""The job as users run it: `ray start --head`, `ray job submit`, `ray job stop` mid-training, submit again.

Tiny model, one iteration, on a local folder and on S3 (moto's server). The first job is stopped during
iteration 0's training once a checkpoint is committed; `spin-ray status` then says interrupted at once; the
second job (same config, same run name) must finish the run. The manifest then shows the baseline evaluation
and the generation ran once, and the training ran twice, resumed from its checkpoint. On S3, while the first job runs,
a `spin-ray run` of the same run from another Ray
instance is refused naming the lease holder; the second job takes the lease over once it has expired.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import BUCKET
from tests.servers import RayHead
from tests.servers import wait_for as _wait

pytestmark = [pytest.mark.ray, pytest.mark.e2e]


def _manifest(run: str) -> dict:
    from spin_ray.storage import read_json

    try:
        return read_json(f"{run}/manifest.json") or {}
    except json.JSONDecodeError:  # the atomic write means never a partial file
        return {}


# 2 CPUs, and actors that take both, as `make demo` has on the 2-core box: a stage that waits for a
# CPU an actor pool holds would hang here.
@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    """One head for both storages: each test's run lives under its own storage path, with its own lease and driver."""
    import ray

    if ray.is_initialized():  # the shared in-process instance would compete for the 2 cores
        ray.shutdown()
    # This head listens on loopback only, inside the test, so the test's client goes without a token.
    head = RayHead(tmp_path_factory.mktemp("head") / "head.log", num_cpus=2, env={"RAY_AUTH_MODE": "disabled"})
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        yield head.dashboard
    finally:
        head.stop()  # this head and what it started, nothing else
        os.environ.pop("RAY_AUTH_MODE", None)


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_stopped_job_resumes_on_resubmit(storage, head_node, tmp_path, tiny_model_dir, request):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from spin_ray.models.resolution import load_model, local_model_path
    from spin_ray.storage import exists, list_dir

    env_vars = {"MALLOC_ARENA_MAX": "2", "SPIN_RAY_CACHE": os.environ["SPIN_RAY_CACHE"]}
    if storage == "s3":
        env_vars.update(request.getfixturevalue("s3").client_env())
        storage_path = f"s3://{BUCKET}/jobs"
    else:
        storage_path = str(tmp_path / "runs")
    config = tmp_path / "tiny.yaml"
    config.write_text(f"""
model: {{name: {tiny_model_dir}}}
data: {{train: gsm8k, eval: gsm8k:test, limit: 16}}
generation: {{engine: hf, max_new_tokens: 8, batch_size: 16, replicas: [1, 1], shard_rows: 8, cpus_per_replica: 2}}
training: {{global_batch_size: 4, micro_batch_size: 2, epochs: 4, checkpoint_every: 2, learning_rate: 1.0e-4}}
run: {{name: submitted, storage_path: {storage_path}, lease_ttl_s: 30}}
iterations: {{count: 1}}
evaluation: {{prompts: 4}}
""")
    run = f"{storage_path}/submitted"
    client = _wait(lambda: _client(JobSubmissionClient, head_node), 60, "the job server")
    entrypoint = f"{sys.executable} -m spin_ray.cli run {config}"
    env = {"env_vars": env_vars}

    first = client.submit_job(entrypoint=entrypoint, runtime_env=env)

    def committed_checkpoint():
        return any(exists(f"{step}/_COMMITTED.json") for step in list_dir(f"{run}/iter_0/train/checkpoints"))

    _wait(lambda: committed_checkpoint() or client.get_job_status(first) in (JobStatus.FAILED, JobStatus.SUCCEEDED),
          600, "a committed checkpoint in iteration 0's training")
    assert client.get_job_status(first) == JobStatus.RUNNING, client.get_job_logs(first)[-3000:]
    if storage == "s3":  # the same run from another Ray instance (a subprocess of its own) while the first job lives
        other = subprocess.run([sys.executable, "-m", "spin_ray.cli", "run", str(config)], capture_output=True,
                               text=True, timeout=300, env={**os.environ, **env_vars, "RAY_ADDRESS": ""})
        assert other.returncode == 2 and "is leased to spin-ray driver" in other.stderr, other.stderr[-2000:]
        assert f"ray job {first}" in other.stderr  # the holder is named as the user knows it
    client.stop_job(first)
    _wait(lambda: client.get_job_status(first) == JobStatus.STOPPED, 120, "the first job to stop")
    stopped = _manifest(run)
    assert stopped["iterations"][0]["phases"]["train"]["status"] != "done"
    # the stopped driver's lease is still fresh (30 s TTL), but Ray says its job is over
    status = subprocess.run([sys.executable, "-m", "spin_ray.cli", "status", run, "--address", head_node],
                            capture_output=True, text=True, timeout=120, env={**os.environ, **env_vars})
    assert status.returncode == 0, status.stderr[-2000:]
    assert ": interrupted," in status.stdout and "its driver's Ray job is STOPPED" in status.stdout, status.stdout

    second = client.submit_job(entrypoint=entrypoint, runtime_env=env)
    _wait(lambda: client.get_job_status(second) in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED),
          600, "the second job to finish", interval=2)
    logs = client.get_job_logs(second)
    assert client.get_job_status(second) == JobStatus.SUCCEEDED, logs[-3000:]
    assert "iteration 0: generate: done in an earlier job, skipped" in logs
    assert "report:" in logs and "reward acc" in logs  # the final table and the report path
    if storage == "s3":  # the stopped job's driver left its lease behind: the second one waited it out
        assert "taking it over when it expires" in logs

    manifest = _manifest(run)
    assert manifest["status"] == "done" and len(manifest["jobs"]) == 2
    assert manifest["phases"]["baseline_eval"]["attempts"] == 1
    phases = manifest["iterations"][0]["phases"]
    assert phases["generate"]["attempts"] == 1 and phases["evaluate"]["attempts"] == 1
    train = phases["train"]
    assert train["status"] == "done" and train["attempts"] == 2
    assert train["metrics"]["resumed_from_step"] >= 2  # from the checkpoint in the run's storage
    assert train["metrics"]["steps"] == 4 * (16 // 4)
    assert manifest["final_model"] == f"{run}/iter_0/model"
    assert load_model(local_model_path(manifest["final_model"], tmp_path / "reader")).num_parameters() > 0
    assert exists(f"{run}/report.md") and exists(f"{run}/report.png")


def _client(cls, address):
    try:
        return cls(address)
    except Exception:  # the dashboard's job server takes a few seconds after `ray start`
        return None
