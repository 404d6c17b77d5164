"""Compute-process setup: a worker's model loads and saves print no library progress bars into the job log."""

from __future__ import annotations

import os
import subprocess
import sys

PREPARE = "from spin_ray.workers import prepare_compute_process; prepare_compute_process(1)\n"
LOAD_AND_SAVE = (
    "from spin_ray.models.resolution import load_model\nload_model({source!r}).save_pretrained({target!r})\n"
)


def stderr_of(code: str) -> str:
    environment = {k: v for k, v in os.environ.items() if "PROGRESS_BAR" not in k and not k.startswith("TQDM")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=environment)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stderr


def test_a_prepared_compute_process_loads_and_saves_a_model_without_progress_bars(tiny_model_dir, tmp_path):
    bars = ("Loading weights", "Writing model shards")
    plain = stderr_of(LOAD_AND_SAVE.format(source=tiny_model_dir, target=str(tmp_path / "plain")))
    assert all(bar in plain for bar in bars), "the check cannot see the bars it looks for"
    prepared = stderr_of(PREPARE + LOAD_AND_SAVE.format(source=tiny_model_dir, target=str(tmp_path / "prepared")))
    assert not [bar for bar in bars if bar in prepared], prepared[-2000:]
