"""Benchmark: SPIN, SPPO and T-SPIN on SmolLM2 through the same driver, same prompts; prints JSON.

Each algorithm runs its own local job config (jobs/gsm8k_smollm2{,_sppo,_tspin}_cpu.yaml) on the
same GSM8K prompts for the same number of iterations, one after the other on one local Ray
instance. Reported per algorithm: seconds of each phase per iteration, what generation and
training processed, held-out accuracy and NLL, and the cost of an iteration (generate + train)
relative to SPIN's in this same process.

    python bench/algorithms.py [--prompts 16] [--iterations 2] [--output FILE] [key=value overrides]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {"spin": "gsm8k_smollm2_cpu.yaml", "sppo": "gsm8k_smollm2_sppo_cpu.yaml",
           "tspin": "gsm8k_smollm2_tspin_cpu.yaml"}


def summarise(manifest: dict) -> dict:
    iterations = []
    for record in manifest["iterations"]:
        phases = record["phases"]
        gen, train = phases["generate"], phases["train"]
        ev = (phases.get("evaluate") or {}).get("metrics", {})
        iterations.append({
            "generate_seconds": gen["seconds"], "train_seconds": train["seconds"],
            "evaluate_seconds": (phases.get("evaluate") or {}).get("seconds"),
            "answers_per_prompt": gen["metrics"].get("answers_per_prompt"),
            "generated_tokens": gen["metrics"]["generated_tokens"],
            "reference_seconds": gen["metrics"].get("reference_seconds"),
            "oracle_mean_score": gen["metrics"].get("oracle_mean_score"),
            "oracle_all_tied_share": gen["metrics"].get("oracle_all_tied_share"),
            "training_tokens_per_second": train["metrics"].get("training_tokens_per_second"),
            "train_loss": train["metrics"].get("loss"), "train_margin": train["metrics"].get("rewards/margins"),
            "accuracy": ev.get("accuracy"), "nll_per_token": ev.get("nll_per_token"),
            "reward_accuracy": ev.get("reward_accuracy"),
        })
    baseline = manifest["phases"].get("baseline_eval", {}).get("metrics", {})
    per_iteration = sum(i["generate_seconds"] + i["train_seconds"] for i in iterations) / len(iterations)
    return {"status": manifest["status"], "baseline_accuracy": baseline.get("accuracy"),
            "baseline_nll_per_token": baseline.get("nll_per_token"), "iterations": iterations,
            "generate_plus_train_seconds_per_iteration": round(per_iteration, 1), "run_dir": manifest["run_dir"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--algorithms", default="spin,sppo,tspin")
    parser.add_argument("--output", help="also write the JSON here")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every algorithm's config")
    args = parser.parse_args()

    import ray

    from spin_ray.config import load_config
    from spin_ray.run.driver import run_iterations

    storage = tempfile.mkdtemp(prefix="bench-algorithms-", dir=os.environ.get("RAY_TMPDIR"))
    ray.init(ignore_reinit_error=True, log_to_driver=False)
    results = {}
    for algorithm in args.algorithms.split(","):
        config = load_config(ROOT / "jobs" / CONFIGS[algorithm], [
            f"data.limit={args.prompts}", f"iterations.count={args.iterations}", f"run.storage_path={storage}",
            f"run.name=bench-{algorithm}", *args.overrides])
        started = time.perf_counter()
        manifest = run_iterations(config, echo=lambda line: print(line, file=sys.stderr, flush=True))
        results[algorithm] = {**summarise(manifest), "wall_seconds": round(time.perf_counter() - started, 1)}
    if "spin" in results:
        base = results["spin"]["generate_plus_train_seconds_per_iteration"]
        for result in results.values():
            result["iteration_cost_vs_spin"] = round(result["generate_plus_train_seconds_per_iteration"] / base, 2)
    report = {"benchmark": "algorithms", "prompts": args.prompts, "iterations": args.iterations,
              "overrides": args.overrides, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "results": results}
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")


if __name__ == "__main__":
    main()
