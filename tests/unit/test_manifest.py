"""Run state: the manifest's phase records, resume bookkeeping, and the refusal of a changed config."""

import json
import time

import pytest

from spin_ray.cli import main
from spin_ray.config import ConfigError, differing_keys, load_config
from spin_ray.run.layout import RunLayout
from spin_ray.run.manifest import Manifest, check_config, resume_config
from spin_ray.run.report import format_status, format_table, iteration_rows, write_report


def _config(tmp_path, *overrides):
    return load_config(None, [f"run.storage_path={tmp_path}", "run.name=r", *overrides])


def test_phase_lifecycle_is_written_through(tmp_path):
    config = _config(tmp_path)
    manifest = Manifest.open(config)
    manifest.start("generate", 0)
    on_disk = json.loads(open(RunLayout.of(config).manifest).read())
    assert on_disk["iterations"][0]["phases"]["generate"] == {
        "status": "running", "attempts": 1, "started": on_disk["iterations"][0]["phases"]["generate"]["started"]}
    manifest.fail("generate", 0, RuntimeError("node lost"))
    manifest.start("generate", 0)
    manifest.finish("generate", 0, 12.345, {"prompts": 4}, {"pairs": "x"})
    record = Manifest.read(RunLayout.of(config).root).data["iterations"][0]["phases"]["generate"]
    assert record["status"] == "done" and record["attempts"] == 2 and record["seconds"] == 12.35
    assert "error" not in record and record["metrics"] == {"prompts": 4}


def test_reopen_with_same_config_continues_and_counts_jobs(tmp_path):
    config = _config(tmp_path)
    Manifest.open(config).finish("baseline_eval", None, 1.0, {}, {})
    again = Manifest.open(_config(tmp_path))
    assert again.is_done("baseline_eval")
    assert len(again.data["jobs"]) == 2


def test_changed_config_is_refused_naming_the_keys(tmp_path):
    Manifest.open(_config(tmp_path))
    changed = _config(tmp_path, "training.beta=0.5", "data.limit=7")
    with pytest.raises(ConfigError) as error:
        check_config(changed)
    message = str(error.value)
    assert "training.beta: 0.1 -> 0.5" in message and "data.limit: None -> 7" in message and "--force" in message
    with pytest.raises(ConfigError):
        Manifest.open(changed)
    forced = Manifest.open(changed, force=True)
    assert forced.data["config_changes"][-1]["keys"] == ["data.limit", "training.beta"]


def test_operational_keys_may_change(tmp_path):
    Manifest.open(_config(tmp_path))
    check_config(_config(tmp_path, "iterations.count=5", "training.num_workers=[1,1]", "generation.replicas=[1,4]"))
    assert differing_keys({"a": {"b": 1}}, {"a": {"b": 2}, "c": 3}) == ["a.b", "c"]


def test_a_run_started_before_a_key_existed_continues_under_its_default(tmp_path):
    # as written by a version without `algorithm`, `sppo`, `tspin` and `training.pack_sequences`
    manifest = Manifest.open(_config(tmp_path))
    for key in ("algorithm", "sppo", "tspin"):
        del manifest.data["config"][key]
    del manifest.data["config"]["training"]["pack_sequences"]
    manifest.save()
    check_config(_config(tmp_path))  # the defaults are what that run did: no change
    with pytest.raises(ConfigError, match="algorithm: 'spin' -> 'tspin'"):
        check_config(_config(tmp_path, "algorithm=tspin"))


def test_a_run_stored_before_the_recommended_stabilisers_resumes_on_its_own_loss(tmp_path):
    # stored by a version whose defaults were the paper's loss, or before the stabilisers existed
    manifest = Manifest.open(_config(tmp_path, "training.nll_weight=0", "training.length_normalize=false"))
    assert manifest.data["config"]["training"]["nll_weight"] == 0.0
    resumed = resume_config(_config(tmp_path), manifest.data)  # resubmitted with today's defaults (null)
    assert (resumed.training.nll_weight, resumed.training.length_normalize) == (0.0, False)
    check_config(resumed)
    for key in ("nll_weight", "length_normalize", "dpop_lambda"):
        del manifest.data["config"]["training"][key]
    manifest.save()
    assert resume_config(_config(tmp_path), manifest.data).training.nll_weight == 0.0
    with pytest.raises(ConfigError, match="training.nll_weight: 0.0 -> 0.2"):
        check_config(_config(tmp_path))  # without resume_config, today's recommended value is a change


def test_cli_run_refuses_a_changed_config_before_starting_ray(tmp_path, capsys):
    config = _config(tmp_path)
    Manifest.open(config)
    path = tmp_path / "c.yaml"
    path.write_text(f"run:\n  storage_path: {tmp_path}\n  name: r\ntraining:\n  beta: 0.3\n")
    code = main(["run", str(path)])
    assert code == 2
    assert "training.beta: 0.1 -> 0.3" in capsys.readouterr().err


def _synthetic_run(tmp_path):
    config = _config(tmp_path, "iterations.count=2")
    manifest = Manifest.open(config)
    manifest.finish("baseline_eval", None, 30.0, {"accuracy": 0.25, "nll_per_token": 1.5}, {"answers": "a0"})
    for t, (acc, margin) in enumerate([(0.75, 0.4), (0.5, 0.1)]):
        manifest.finish("generate", t, 100.0, {"seconds": 99.0, "tokens_per_second": 80.0}, {})
        manifest.finish("train", t, 200.0, {"loss": 0.6, "rewards/margins": 0.2, "training_seconds": 190.0,
                                            "training_tokens_per_second": 120.0, "export_seconds": 2.0}, {})
        manifest.finish("evaluate", t, 40.0, {"accuracy": 0.3 + t / 10, "nll_per_token": 1.4, "reward_accuracy": acc,
                                              "reward_margin": margin}, {"answers": f"a{t + 1}"})
    manifest.set_status("done", final_model="m2")
    return config


def test_report_rows_table_and_files(tmp_path):
    config = _synthetic_run(tmp_path)
    data = Manifest.read(RunLayout.of(config).root).data
    rows = iteration_rows(data)
    assert [r["model"] for r in rows] == ["p0", "p1", "p2"]
    assert rows[2]["reward_accuracy"] == 0.5 and rows[1]["training_tok_s"] == 120.0 and rows[0]["accuracy"] == 0.25
    table = format_table(data)
    assert "reward acc" in table and "0.750" in table
    paths = write_report(RunLayout.of(config))
    assert open(paths["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| p2 |" in open(paths["markdown"]).read()
    assert json.loads(open(paths["json"]).read())["rows"][1]["reward_margin"] == 0.4
    status = format_status(data)
    assert status.index("iteration 0/2 generate") < status.index("iteration 0/2 train") < status.index(
        "iteration 0/2 evaluate")


def test_status_tells_a_live_run_from_an_interrupted_one(tmp_path, capsys):
    from spin_ray.run.lease import RunLease

    config = _config(tmp_path, "iterations.count=2")
    manifest = Manifest.open(config)
    manifest.finish("baseline_eval", None, 3.0, {}, {})
    manifest.finish("generate", 0, 5.0, {}, {})
    manifest.start("train", 0)  # then the job was stopped: the manifest still says running
    layout = RunLayout.of(config)
    assert main(["status", layout.root]) == 0
    out = capsys.readouterr().out
    assert ": interrupted," in out and "continues it with iteration 0 train (running, attempt 2)" in out
    assert "iteration 0/2 train" in out and "stopped" in out
    # a driver's token is its job id and actor name, which holds the run's path
    lease = RunLease(
        layout.lease, ttl_s=60, token=f"07000000:spin-ray-driver:{layout.root}", owner="ray job raysubmit_7"
    )
    lease.acquire()
    assert main(["status", layout.root]) == 0
    out = capsys.readouterr().out
    assert ": running," in out and "driven by spin-ray driver of ray job raysubmit_7" in out
    # Ray's word on the holder's job outranks the lease's freshness: a stopped job's run is interrupted at once
    holder = json.loads(open(layout.lease).read())
    assert format_status(manifest.data, holder, "RUNNING").startswith(
        f"run {config.run.name} ({layout.root}): running,"
    )
    stopped = format_status(manifest.data, holder, "STOPPED")
    assert ": interrupted," in stopped and "its driver's Ray job is STOPPED; submitting the same config" in stopped
    assert main(["status", layout.root, "--address", "http://127.0.0.1:1"]) == 0  # nobody answers: this host's pid does
    assert ": running," in capsys.readouterr().out
    # a holder on another host, and no answer from Ray: the lease alone does not say running
    elsewhere = {**holder, "host": "gpu-head-7"}
    leased = format_status(manifest.data, elsewhere)
    assert ": leased," in leased and "whether its job still runs is unknown here: ask Ray with --address" in leased
    assert "If it has ended, the lease expires in" in leased
    # on this host, a holder whose process has ended (a stopped job's driver) is interrupted without asking Ray
    gone = {**holder, "pid": _dead_pid()}
    assert "its driver's process" in format_status(manifest.data, gone) and ": interrupted," in format_status(
        manifest.data, gone)
    lease.release()


def _dead_pid() -> int:
    import subprocess

    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_lease_whose_job_has_ended_is_waited_out_not_refused(tmp_path):
    from spin_ray.run.lease import LeaseHeld, RunLease

    url = str(tmp_path / "run" / "lease.json")
    stopped = RunLease(url, ttl_s=3, token="01000000:spin-ray-driver:/runs:demo", ray_session="session_a")
    stopped.acquire()  # renewed just now, then its job was stopped: no heartbeat, no release
    with pytest.raises(LeaseHeld, match="is leased to"):
        RunLease(url, ttl_s=3, token="02000000:x").acquire()  # nothing says it ended: it looks alive
    lines: list[str] = []
    started = time.monotonic()
    RunLease(url, ttl_s=3, token="03000000:y").acquire(lines.append, ended=stopped.token)
    assert time.monotonic() - started >= 2  # waited for the expiry, then took it
    assert "whose job has ended: taking it over" in lines[0]
    assert json.loads(open(url).read())["token"] == "03000000:y"


def test_a_phases_artifacts_keep_their_manifest_record_and_come_back_typed():
    """What the driver reads back from an earlier job's manifest is what the phase produced: the records keep the
    keys reports, status and earlier manifests use (model, train, merged_model, a training set's extra folders;
    eval, answers; pairs)."""
    from spin_ray.run.driver import PHASE_ARTIFACTS, Evaluation, GeneratedPairs, TrainedModel

    trained = TrainedModel("runs/r/iter_0/model", "runs/r/iter_0/train", None, {"proto": "runs/r/iter_0/generation"})
    assert trained.to_record() == {"model": "runs/r/iter_0/model", "train": "runs/r/iter_0/train",
                                   "proto": "runs/r/iter_0/generation"}
    merged = TrainedModel("m", "t", "m_merged")
    for artifacts in (trained, merged, Evaluation("runs/r/eval_1", "runs/r/eval_1/answers"),
                      GeneratedPairs("runs/r/iter_1/generation")):
        assert type(artifacts).from_record(json.loads(json.dumps(artifacts.to_record()))) == artifacts
    assert merged.to_record()["merged_model"] == "m_merged"
    assert {name: kind.__name__ for name, kind in PHASE_ARTIFACTS.items()} == {
        "sft": "TrainedModel", "baseline_eval": "Evaluation", "generate": "GeneratedPairs", "train": "TrainedModel",
        "evaluate": "Evaluation"}
