"""Benchmark: does self-play beat continued SFT on the same data and compute? Prints JSON, draws a picture.

From one start (SmolLM2 after an SFT warm start on N GSM8K training prompts, the run `quality-start`), three
arms train on the same N prompts for k iterations each: SPIN, T-SPIN, and continued SFT on the human answers
(as many optimizer steps and passes over the human answers as SPIN with its t-1 mixing). Every model of every
arm is evaluated on the same held-out GSM8K test prompts (greedy). For each arm against continued SFT, the
paired difference of exact match and of NLL per token comes with a bootstrap 95% interval over prompts.
Each arm is a resumable run: an interrupted benchmark continues where it stopped when started again.

    python bench/quality.py [--config jobs/gsm8k_smollm2_quality.yaml] [--out bench/results/quality.json] [key=value ...]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = {"spin": ["algorithm=spin"], "tspin": ["algorithm=tspin"], "sft": ["training.objective=sft"]}
METRICS = ("accuracy", "accuracy_lm_eval_strict", "accuracy_lm_eval_flexible", "answer_format_rate", "nll_per_token",
           "reward_accuracy", "reward_margin", "mean_answer_tokens", "share_hit_max_new_tokens")


def run(config) -> dict:
    import ray

    from spin_ray.driver import start_driver

    started = time.perf_counter()
    manifest = ray.get(start_driver(config).run.remote())
    manifest["bench_seconds_this_invocation"] = round(time.perf_counter() - started, 1)
    return manifest


def models_of(manifest: dict) -> list[tuple[str, dict, str]]:
    """(label, metrics, eval folder) of every evaluated model of a run: p0, then p(t+1) per iteration."""
    rows = [("p0", manifest["phases"]["baseline_eval"]["metrics"], manifest["phases"]["baseline_eval"]["artifacts"]["eval"])]
    for record in manifest["iterations"]:
        evaluated = record["phases"].get("evaluate") or {}
        if evaluated.get("status") == "done":
            rows.append((f"p{record['iteration'] + 1}", evaluated["metrics"], evaluated["artifacts"]["eval"]))
    return rows


def scores(eval_dir: str):
    import pyarrow.parquet as pq

    from spin_ray.storage import filesystem

    fs, path = filesystem(f"{eval_dir.rstrip('/')}/scores.parquet")
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle).sort_by("prompt_id").to_pydict()


def phase_seconds(manifest: dict) -> dict:
    total = {}
    for record in [{"phases": manifest["phases"]}, *manifest["iterations"]]:
        for name, phase in record["phases"].items():
            total[name] = round(total.get(name, 0.0) + phase.get("seconds", 0.0), 1)
    return total


def plot(results: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("accuracy", "GSM8K exact match"), ("accuracy_lm_eval_flexible", "exact match, lm-eval flexible"),
              ("nll_per_token", "NLL/token, human answers"), ("reward_accuracy", "reward acc. vs previous model"),
              ("answer_format_rate", "answers ending '#### n'"), ("mean_answer_tokens", "mean answer tokens"))
    figure, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for axis, (key, title) in zip(axes.flat, panels, strict=True):
        for arm, info in results["arms"].items():
            points = [(i, m["metrics"].get(key)) for i, m in enumerate(info["models"]) if m["metrics"].get(key) is not None]
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=arm)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("model (p0 = SFT warm start)", fontsize=8)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(f"self-play vs continued SFT: SmolLM2-135M, {results['sizes']['train_prompts']} GSM8K prompts, "
                    f"{results['sizes']['held_out_prompts']} held out", fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "jobs" / "gsm8k_smollm2_quality.yaml"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality.json"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import ray

    from spin_ray.config import load_config
    from spin_ray.layout import RunLayout
    from spin_ray.stats import paired_bootstrap

    base = load_config(args.config, args.overrides)
    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    started = time.perf_counter()
    start = load_config(args.config, [*args.overrides, "run.name=quality-start", "iterations.sft_warm_start=true",
                                      "iterations.count=0"])
    start_manifest = run(start)
    start_model = RunLayout.of(start).model(None)
    results = {"benchmark": "quality", "command": "python bench/quality.py " + " ".join(sys.argv[1:]),
               "config": args.config, "overrides": args.overrides, "start_model": start_model,
               "sizes": {"train_prompts": start_manifest["phases"]["sft"]["metrics"]["pairs"],
                         "held_out_prompts": start_manifest["phases"]["baseline_eval"]["metrics"]["prompts"],
                         "iterations": base.iterations.count, "epochs_per_iteration": base.training.epochs},
               "start": {"seconds": phase_seconds(start_manifest), "metrics": models_of(start_manifest)[0][1]},
               "arms": {}, "versus_continued_sft": {}}
    per_prompt = {}
    for arm, overrides in ARMS.items():
        config = load_config(args.config, [*args.overrides, f"run.name=quality-{arm}", f"model.name={start_model}",
                                           *overrides])
        manifest = run(config)
        models = models_of(manifest)
        results["arms"][arm] = {
            "run": manifest["run_dir"], "status": manifest["status"], "seconds": phase_seconds(manifest),
            "train": [r["phases"]["train"]["metrics"] for r in manifest["iterations"]],
            "models": [{"model": label, "metrics": {k: m.get(k) for k in METRICS}} for label, m, _ in models]}
        per_prompt[arm] = {label: scores(folder) for label, _, folder in models}
    for arm in ("spin", "tspin"):
        comparisons = {}
        for label, table in per_prompt[arm].items():
            if label == "p0" or label not in per_prompt["sft"]:
                continue
            sft = per_prompt["sft"][label]
            assert table["prompt_id"] == sft["prompt_id"], "arms were evaluated on different prompts"
            comparisons[label] = {
                "accuracy (arm - sft)": paired_bootstrap(table["correct"], sft["correct"]).to_dict(),
                "accuracy_lm_eval_flexible (arm - sft)": paired_bootstrap(table["correct_flexible"],
                                                                          sft["correct_flexible"]).to_dict(),
                "nll_per_token (sft - arm, > 0: arm better)": paired_bootstrap(sft["nll_per_token"],
                                                                               table["nll_per_token"]).to_dict(),
            }
        results["versus_continued_sft"][arm] = comparisons
    results["seconds_this_invocation"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".png").write_bytes(plot(results))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
