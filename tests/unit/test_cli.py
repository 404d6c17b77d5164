"""The `spin-ray` command line: summaries on good input, one clear line and exit 2 on bad input."""

import json
import subprocess
import sys

import pytest

from spin_ray.cli import main
from tests.cli_output import own_lines


@pytest.fixture
def small_config(tmp_path, tiny_model_dir):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}?", "response": f"a{i}."}) + "\n" for i in range(5)))
    config = tmp_path / "run.yaml"
    config.write_text(f"model:\n  name: {tiny_model_dir}\ndata:\n  train: {data}\n  eval: null\n")
    return config, data


def test_validate_prints_model_rows_and_lengths(small_config, capsys, tiny_model_dir):
    config, _ = small_config
    assert main(["validate", str(config), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["model"]["path"] == tiny_model_dir
    assert summary["model"]["end_of_turn"] == "<|im_end|>"
    train = summary["data"]["train"]
    assert train["records"] == 5 and train["pairs"] == 5
    assert train["response_tokens"]["count"] == 5 and train["prompt_tokens"]["max"] > 0


def test_validate_bad_row_exits_2_naming_the_culprit(small_config, capsys):
    config, data = small_config
    with data.open("a") as handle:
        handle.write('{"prompt": "q", "response": 7}\n')
    assert main(["validate", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{data}, row 6, field 'response': expected a string, got int" in err


def test_validate_skip_invalid_override_reports_instead(small_config, capsys):
    config, data = small_config
    with data.open("a") as handle:
        handle.write("{oops\n")
    assert main(["validate", str(config), "data.skip_invalid=true", "--json"]) == 0
    train = json.loads(capsys.readouterr().out)["data"]["train"]
    assert train["skipped_invalid"] == 1 and "row 6" in train["skip_examples"][0]


def test_bad_config_key_exits_2(small_config, capsys):
    config, _ = small_config
    assert main(["validate", str(config), "generation.temprature=0.7"]) == 2
    assert "did you mean 'generation.temperature'" in capsys.readouterr().err


def test_module_entrypoint_and_help():
    result = subprocess.run([sys.executable, "-m", "spin_ray.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("validate", "prepare-model", "generate", "train", "run", "eval", "report", "status"):
        assert command in result.stdout


@pytest.mark.parametrize("case", ["missing", "unreadable", "bad row", "missing model"])
def test_run_refuses_bad_inputs_in_seconds_before_ray_starts(case, tmp_path, tiny_model_dir):
    import gzip
    import os
    import time

    data, expected = tmp_path / "train.jsonl", None
    model = tiny_model_dir
    if case == "missing":
        expected = f"{data}: no such file or folder"
    elif case == "unreadable":  # a truncated download: the gzip stream ends half-way through the second row
        data = tmp_path / "train.jsonl.gz"
        whole = gzip.compress(b'{"prompt": "q1", "response": "a1"}\n{"prompt": "q2", "response": "a2"}\n')
        data.write_bytes(whole[: len(whole) - 12])
        expected = f"{data}: unreadable after line 1 (EOFError"
    elif case == "bad row":
        data.write_text('{"prompt": "q1", "response": "a1"}\n{"prompt": 3, "response": "a2"}\n')
        expected = f"{data}, row 2, field 'prompt': expected a string, got int"
    else:
        data.write_text('{"prompt": "q1", "response": "a1"}\n')
        model = str(tmp_path / "no-such-model")
        expected = f"model path '{model}' is not a checkpoint folder"
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "spin_ray.cli", "run", f"model.name={model}", f"data.train={data}", "data.eval=null",
         f"run.storage_path={tmp_path / 'runs'}"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": ""})
    seconds = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("spin-ray run: error: ")
    assert expected in result.stderr
    assert seconds < 30, f"the refusal took {seconds:.0f}s"
    assert not list(ray_tmp.iterdir()), "Ray started before the inputs were checked"


def test_ray_s_forwarded_lines_are_not_taken_for_the_command_s_output():
    stderr = ("(raylet) [2026-11-29 13:40:07,711 E 31770 31781] (raylet) file_system_monitor.cc:116: /tmp/ray is over"
              " 95% full, available space: 1.70103 GB\n"
              "spin-ray run: error: no node type can hold a generation engine replica (pid=12 stays in the line)\n"
              "(autoscaler +3s) Adding 1 node(s) of type gen.\n"
              "(TrainWorker pid=4711, ip=10.0.0.2) step 1\n"
              "(pid=99) warming up\n")
    assert own_lines(stderr) == ["spin-ray run: error: no node type can hold a generation engine replica "
                                 "(pid=12 stays in the line)"]
