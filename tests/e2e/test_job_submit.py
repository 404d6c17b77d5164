"""The job as users run it: `ray start --head`, `ray job submit`, `ray job stop` mid-training, submit again.

Tiny model, 2 iterations. The first job is stopped during iteration 1's training once a checkpoint
is committed; the second job (same config, same run name) must finish the run. The manifest then
shows iteration 0 ran once, iteration 1's training ran twice and resumed from its checkpoint.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.e2e]

RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _manifest(run: Path) -> dict:
    try:
        return json.loads((run / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # the atomic write means never a partial file
        return {}


# 2 CPUs, and actors that take both, as `make demo` has on the 2-core box: a stage that waits for a
# CPU an actor pool holds would hang here.
@pytest.fixture
def head_node(tmp_path):
    import ray

    if ray.is_initialized():  # the shared in-process instance would compete for the 2 cores
        ray.shutdown()
    port, dashboard = _free_port(), _free_port()
    # Ray 2.60 turns on token authentication for new clusters; this one listens on loopback only,
    # inside the test, so the test's client goes without a token.
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {**os.environ, "RAY_TMPDIR": os.environ["RAY_TMPDIR"]}
    subprocess.run([RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                    f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                    "--num-cpus=2", "--disable-usage-stats"], check=True, env=env, capture_output=True)
    try:
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True)
        os.environ.pop("RAY_AUTH_MODE", None)


def test_stopped_job_resumes_on_resubmit(head_node, tmp_path, tiny_model_dir):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from spin_ray.models import load_model

    config = tmp_path / "tiny.yaml"
    config.write_text(f"""
model: {{name: {tiny_model_dir}}}
data: {{train: gsm8k, eval: gsm8k:test, limit: 16}}
generation: {{max_new_tokens: 8, batch_size: 16, replicas: [1, 1], shard_rows: 8, cpus_per_replica: 2}}
training: {{global_batch_size: 4, micro_batch_size: 2, epochs: 8, checkpoint_every: 2, learning_rate: 1.0e-4}}
run: {{name: submitted, storage_path: {tmp_path / 'runs'}}}
iterations: {{count: 2}}
evaluation: {{prompts: 4}}
""")
    run = tmp_path / "runs" / "submitted"
    client = _wait(lambda: _client(JobSubmissionClient, head_node), 60, "the job server")
    entrypoint = f"{sys.executable} -m spin_ray.cli run {config}"
    env = {"env_vars": {"MALLOC_ARENA_MAX": "2", "SPIN_RAY_CACHE": os.environ["SPIN_RAY_CACHE"]}}

    first = client.submit_job(entrypoint=entrypoint, runtime_env=env)
    checkpoints = run / "iter_1" / "train" / "checkpoints"
    _wait(lambda: list(checkpoints.glob("step_*/_COMMITTED.json"))
          or client.get_job_status(first) in (JobStatus.FAILED, JobStatus.SUCCEEDED), 600,
          "a committed checkpoint in iteration 1's training")
    assert client.get_job_status(first) == JobStatus.RUNNING, client.get_job_logs(first)[-3000:]
    client.stop_job(first)
    _wait(lambda: client.get_job_status(first) == JobStatus.STOPPED, 120, "the first job to stop")
    stopped = _manifest(run)
    assert stopped["iterations"][1]["phases"]["train"]["status"] != "done"

    second = client.submit_job(entrypoint=entrypoint, runtime_env=env)
    _wait(lambda: client.get_job_status(second) in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED),
          600, "the second job to finish", interval=2)
    logs = client.get_job_logs(second)
    assert client.get_job_status(second) == JobStatus.SUCCEEDED, logs[-3000:]
    assert "iteration 0: train: done in an earlier job, skipped" in logs
    assert "report:" in logs and "reward acc" in logs  # the final table and the report path

    manifest = _manifest(run)
    assert manifest["status"] == "done" and len(manifest["jobs"]) == 2
    assert manifest["phases"]["baseline_eval"]["attempts"] == 1
    for phase in manifest["iterations"][0]["phases"].values():
        assert phase["status"] == "done" and phase["attempts"] == 1
    train = manifest["iterations"][1]["phases"]["train"]
    assert train["status"] == "done" and train["attempts"] == 2
    assert train["metrics"]["resumed_from_step"] >= 2
    assert train["metrics"]["steps"] == 8 * (16 // 4)
    final = Path(manifest["final_model"])
    assert final == run / "iter_1" / "model"
    assert load_model(str(final)).num_parameters() > 0
    assert (run / "report.md").is_file() and (run / "report.png").stat().st_size > 0


def _client(cls, address):
    try:
        return cls(address)
    except Exception:  # the dashboard's job server takes a few seconds after `ray start`
        return None
