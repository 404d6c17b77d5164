"""bench/gpu_check.py, the first GPU run's check, runs here on the CPU (a small shape in float32) as it would there."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_check_runs_on_a_cpu_without_ray_and_sets_every_setting_beside_the_plan(tmp_path):
    out = tmp_path / "gpu-check.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--steps", "2",
                             "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert not report["imported_ray"] and not report["imported_vllm"]  # a bare CUDA machine has neither
    assert [s["setting"] for s in report["settings"]] == ["checkpointing_off", "checkpointing_on", "no_prefix_sharing",
                                                          "lora_r16"]
    for setting in report["settings"]:
        assert setting["steps"] == 2 and setting["tokens_per_second"] > 0 and setting["compute_dtype"] == "float32"
        assert setting["measured_peak_gib"] > 0 and setting["planned_peak_gib"] > 0
        assert setting["reference_gap"] == 0.0  # the trainer's own pass, compared with itself at step 0
        assert any("scaled_dot_product" in op for op in setting["attention_ops"]), setting["attention_ops"]
    by_name = {s["setting"]: s for s in report["settings"]}
    assert by_name["checkpointing_on"]["activation_checkpointing"] and not by_name["checkpointing_off"][
        "activation_checkpointing"]
