"""Runs on object storage: a real S3-protocol server (moto's, on 127.0.0.1) reached through s3fs as AWS would be.

Storage primitives (fresh listings, whole-object logs, the lease with conditional writes, model staging), the
one-line refusals of bad storage, and a 2-iteration run on a multi-node Ray cluster whose nodes each have their
own cache and temp dir, with the driver's cache deleted after iteration 0.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli_output import own_lines
from tests.conftest import BUCKET
from tests.servers import MotoS3, free_port, wait_for


def test_a_listing_sees_what_another_process_just_wrote(s3):
    from spin_ray.storage import filesystem, list_dir

    folder = f"s3://{BUCKET}/listing"
    fs, path = filesystem(folder)
    fs.pipe_file(f"{path}/a", b"1")
    assert [f.rsplit("/", 1)[-1] for f in list_dir(folder)] == ["a"]
    fs.ls(path)  # the client now caches this folder's listing
    subprocess.run([sys.executable, "-c", f"import s3fs; s3fs.S3FileSystem().pipe_file('{path}/b', b'2')"], check=True,
                   env=os.environ.copy())
    assert "b" not in [p.rsplit("/", 1)[-1] for p in fs.ls(path)]  # s3fs's own cached listing is stale...
    assert [f.rsplit("/", 1)[-1] for f in list_dir(folder)] == ["a", "b"]  # ...ours asks the store
    assert list_dir(folder)[0] == f"s3://{BUCKET}/listing/a"  # full URLs come back


def test_json_lines_are_whole_objects_on_s3(s3):
    from spin_ray.storage import JsonLines, read_json_lines

    url = f"s3://{BUCKET}/logs/metrics.jsonl"
    log = JsonLines(url)
    for step in (1, 2, 3):
        log.append({"step": step})
    assert [r["step"] for r in read_json_lines(url)] == [1, 2, 3]
    resumed = JsonLines(url)  # a restarted worker cuts the log back to its checkpoint
    resumed.keep(lambda r: r["step"] <= 2)
    resumed.append({"step": 3, "again": True})
    assert read_json_lines(url) == [{"step": 1}, {"step": 2}, {"step": 3, "again": True}]


def test_the_lease_refuses_a_live_holder_and_passes_on_after_expiry(s3):
    from spin_ray.run.lease import LeaseHeld, LeaseLost, RunLease

    url = f"s3://{BUCKET}/leased/lease.json"
    first, second = RunLease(url, ttl_s=6, token="job-1"), RunLease(url, ttl_s=6, token="job-2")
    first.acquire()
    with pytest.raises(LeaseHeld, match="job-1"):
        second.acquire()
    first.renew()
    time.sleep(4.2)  # first stops renewing (its driver was killed): silent for 2/3 of the TTL
    started = time.monotonic()
    lines: list[str] = []
    second.acquire(lines.append)  # waits out the rest of first's lease, then takes it over
    assert 1.0 < time.monotonic() - started < 5 and "silent" in lines[0]
    with pytest.raises(LeaseLost, match="job-2"):
        first.renew()
    assert RunLease(url, ttl_s=6, token="job-2").token == second.token  # a restarted driver of job 2...
    RunLease(url, ttl_s=6, token="job-2").acquire()  # ...takes its lease back at once
    second.release()
    RunLease(url, ttl_s=6, token="job-3").acquire()  # released: free


def test_only_one_of_two_contenders_takes_an_expired_lease(s3):
    from spin_ray.run.lease import RunLease

    url = f"s3://{BUCKET}/contended/lease.json"
    stale = RunLease(url, ttl_s=6, token="old")
    stale.acquire()
    contenders = [RunLease(url, ttl_s=6, token=f"new-{i}") for i in range(2)]
    holder, etag = contenders[0]._read()
    # both read the same stale lease; the conditional PUT (If-Match on its ETag) lets exactly one replace it
    results = [contender._replace(etag, expected_token="old") for contender in contenders]
    assert sorted(results) == [False, True]


def test_a_model_folder_is_published_once_and_staged_once_per_node(s3, tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from spin_ray.models.resolution import local_model_path, publish_folder
    from spin_ray.storage import filesystem, read_json

    url = f"s3://{BUCKET}/models/tiny"
    digest = publish_folder(tiny_model_dir, url)
    assert read_json(f"{url}/spin_ray_export.json")["content_hash"] == digest
    fs, path = filesystem(url)
    before = fs.info(f"{path}/model.safetensors")["LastModified"]
    assert publish_folder(tiny_model_dir, url) == digest  # same content: nothing uploaded again
    assert fs.info(f"{path}/model.safetensors")["LastModified"] == before
    node_a, node_b = tmp_path / "node-a", tmp_path / "node-b"
    staged = local_model_path(url, node_a)
    assert (
        Path(staged).parent == node_a / "staged" and AutoModelForCausalLM.from_pretrained(staged).num_parameters() > 0
    )
    assert local_model_path(url, node_a) == staged  # staged once per content, per node
    assert Path(local_model_path(url, node_b)).is_relative_to(node_b)  # another node stages its own copy
    tokenizer_only = local_model_path(url, node_a, weights=False)
    assert not list(Path(tokenizer_only).glob("*.safetensors")) and (Path(tokenizer_only) / "tokenizer.json").is_file()


def test_a_lora_model_in_a_bucket_stages_its_base_once_and_then_only_its_adapters(s3, tmp_path, tiny_model_dir):
    """Two iterations' adapters of one base in a bucket, loaded on one node: the base is downloaded once (its staged
    copy is not rewritten by the second load), each adapter holds only its own weights, and each loads as the base
    plus that adapter."""
    import torch

    from spin_ray.config import load_config
    from spin_ray.models.adapters import inject, lora_config, write_adapter
    from spin_ray.models.resolution import load_model, load_tokenizer, publish_folder

    base_url = f"s3://{BUCKET}/lora-run/base_model"
    publish_folder(tiny_model_dir, base_url)
    lora = load_config(None, ["training.lora.rank=4"]).training.lora
    adapters, expected = [], []
    for number in range(2):
        torch.manual_seed(number)
        model = inject(load_model(tiny_model_dir), lora_config(lora, base_url))
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # a trained adapter's B is not zero
                torch.nn.init.normal_(parameter, std=0.05)
        folder = tmp_path / f"adapter-{number}"
        folder.mkdir()
        write_adapter(str(folder), model, {n: p for n, p in model.named_parameters() if p.requires_grad})
        load_tokenizer(tiny_model_dir).save_pretrained(folder)
        adapters.append(f"s3://{BUCKET}/lora-run/iter_{number}/model")
        publish_folder(str(folder), adapters[-1])
        with torch.no_grad():
            expected.append(model(torch.tensor([[1, 2, 3, 4]])).logits)
    node = tmp_path / "node"
    staged = node / "staged"
    with torch.no_grad():
        first = load_model(adapters[0], cache_dir=str(node))(torch.tensor([[1, 2, 3, 4]])).logits
        weights = {p: p.stat().st_mtime_ns for p in staged.rglob("model.safetensors")}
        second = load_model(adapters[1], cache_dir=str(node))(torch.tensor([[1, 2, 3, 4]])).logits
    assert len(weights) == 1  # the base's weights, staged by the first load
    assert {p: p.stat().st_mtime_ns for p in staged.rglob("model.safetensors")} == weights  # not staged again
    assert len(list(staged.rglob("adapter_model.safetensors"))) == 2
    assert torch.allclose(first, expected[0], atol=1e-5) and torch.allclose(second, expected[1], atol=1e-5)
    assert not torch.allclose(first, second, atol=1e-3)


def _cli(args: list[str], env: dict, preamble: str = "") -> subprocess.CompletedProcess:
    code = f"import sys\n{preamble}\nfrom spin_ray.cli import main\nsys.exit(main({args!r}))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def _refused(result: subprocess.CompletedProcess, *fragments: str) -> None:
    lines = own_lines(result.stderr)
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_storage_is_one_line_before_any_work(s3, tmp_path):
    run = ["run", "--address", "127.0.0.1:1"]  # no Ray there: the storage check must come first
    good = {**os.environ}
    missing_package = _cli([*run, f"run.storage_path=s3://{BUCKET}/runs"], good, "sys.modules['s3fs'] = None")
    _refused(missing_package, "s3fs", "pip install 'spin_ray[s3]'")
    unreachable = {**good, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    _refused(_cli([*run, f"run.storage_path=s3://{BUCKET}/runs"], unreachable), "cannot reach the storage endpoint")
    _refused(_cli([*run, "run.storage_path=s3://no-such-bucket/runs"], good), "'no-such-bucket'", "does not exist")
    anonymous = {k: v for k, v in good.items() if not k.startswith("AWS_") or k == "AWS_ENDPOINT_URL"}
    anonymous.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
                     AWS_EC2_METADATA_DISABLED="true", AWS_DEFAULT_REGION="us-east-1")
    _refused(_cli([*run, f"run.storage_path=s3://{BUCKET}/runs"], anonymous), "no credentials found")


def test_a_read_only_bucket_is_refused(tmp_path):
    """moto enforces IAM once its first unauthenticated actions are used up: a reader may list but not write."""
    import boto3

    server = MotoS3(tmp_path / "moto-iam.log", env={"INITIAL_NO_AUTH_ACTION_COUNT": "4"})
    try:
        admin = {"endpoint_url": server.endpoint, "region_name": "us-east-1", "aws_access_key_id": "testing",
                 "aws_secret_access_key": "testing"}
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="reader")
        iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
                                                     "Resource": "*"}]}))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        boto3.client("s3", **admin).create_bucket(Bucket="read-only")
        env = {**os.environ, **server.client_env(key["AccessKeyId"], key["SecretAccessKey"])}
        result = _cli(["run", "--address", "127.0.0.1:1", "run.storage_path=s3://read-only/runs"], env)
        _refused(result, "'read-only'", "not writable")
    finally:
        server.stop()


@pytest.mark.ray
def test_two_iterations_on_s3_with_nodes_that_share_no_disk(s3, tmp_path, tiny_model_dir):
    import ray
    from ray.cluster_utils import Cluster
    from transformers import AutoModelForCausalLM

    from spin_ray.config import load_config
    from spin_ray.models.resolution import local_model_path
    from spin_ray.run.driver import driver_alive, start_driver
    from spin_ray.storage import exists

    if ray.is_initialized():
        ray.shutdown()  # the shared session; the next test that needs it starts it again
    caches = {name: tmp_path / name / "cache" for name in ("head", "node-1", "node-2")}

    def node(name: str) -> dict:
        (tmp_path / name / "tmp").mkdir(parents=True)
        return {"env_vars": {"SPIN_RAY_CACHE": str(caches[name]), "TMPDIR": str(tmp_path / name / "tmp")}}

    # the driver (0 CPUs) lives on the CPU-less head; engines, scorers and trainers on the two worker nodes
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, **node("head")})
    for name in ("node-1", "node-2"):
        cluster.add_node(num_cpus=2, **node(name))
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    run = f"s3://{BUCKET}/runs/two-nodes"
    config = load_config(
        None,
        [
            f"model.name={tiny_model_dir}",
            f"run.storage_path=s3://{BUCKET}/runs",
            "run.name=two-nodes",
            "data.limit=8",
            "generation.max_new_tokens=6",
            "generation.batch_size=8",
            "generation.replicas=[1,1]",
            "generation.shard_rows=4",
            "training.global_batch_size=4",
            "training.epochs=1",
            "training.num_workers=[2,2]",
            "training.checkpoint_every=1",
            "training.learning_rate=1e-3",
            "iterations.count=2",
            "evaluation.prompts=4",
            "generation.engine=hf",
        ],
    )  # storage is the point: the HF engine stages its model from the bucket the same way
    try:
        # iteration 0 in a first driver; then the driver's node loses its cache (as a replaced head node does), and
        # a second driver continues the run from what the bucket holds
        first = start_driver(
            config.model_copy(update={"iterations": config.iterations.model_copy(update={"count": 1})})
        )
        assert ray.get(first.run.remote(), timeout=900)["status"] == "done"
        ray.kill(first)
        wait_for(lambda: not driver_alive(config), 60, "the first driver actor to be gone")
        staged_before = list((caches["head"] / "staged").iterdir())
        shutil.rmtree(caches["head"])
        manifest = ray.get(start_driver(config).run.remote(), timeout=900)
        staged_again = list((caches["head"] / "staged").iterdir())
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert staged_before and staged_again, "the driver staged nothing from the bucket: the test proved nothing"
    assert manifest["status"] == "done" and manifest["base_model"] == f"{run}/base_model"
    assert manifest["final_model"] == f"{run}/iter_1/model"
    assert [record["opponent"] for record in manifest["iterations"]] == [f"{run}/base_model", f"{run}/iter_0/model"]
    for name in ("report.md", "report.json", "report.png", "iter_1/train/metrics.jsonl", "iter_1/eval/metrics.json"):
        assert exists(f"{run}/{name}"), name
    # every worker node staged the models it loaded from the bucket into its own cache
    for name in ("node-1", "node-2"):
        assert list((caches[name] / "staged").iterdir()), f"{name} staged nothing"
    assert manifest["iterations"][1]["phases"]["train"]["metrics"]["steps"] == 2
    for model in (manifest["final_model"], f"{run}/iter_0/model"):
        local = local_model_path(model, tmp_path / "reader")
        assert AutoModelForCausalLM.from_pretrained(local).num_parameters() > 0
