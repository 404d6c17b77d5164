"""The `spin-ray` command line: summaries on good input, one clear line and exit 2 on bad input."""

import json
import subprocess
import sys

import pytest

from spin_ray.cli import main


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
