"""Benchmark: choose SPIN's and T-SPIN's recommended settings on the validation split. Prints JSON.

From the quality benchmark's SFT-converged start (`quality-start`, made by bench/quality.py or here), every grid
point is a run of k self-play iterations on the same training prompts with `data.eval: null`: each model is
evaluated on the validation split only (carved from the training data), so the test split stays untouched until
the final table. Per point: each model's validation NLL per token, exact match, format rate and share of answers at
max_new_tokens, the collapse watch's signals, and the model the run selects. The winner is the point whose selected
model has the lowest validation NLL among the points with no collapse signal (ties: the higher exact match).
Continued SFT from the same start (`sft-lr2e-6`) is the yardstick on the same prompts, never a winner.
Each point is a resumable run.

    python bench/quality_grid.py [--config jobs/gsm8k_smollm2_quality.yaml] [--out bench/results/quality-grid.json]
                                 [--iterations 2] [key=value ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.quality import PAPER, START, run  # noqa: E402  (the same start, the same way of running a phase chain)
from spin_ray.objectives.algorithms import RECOMMENDABLE  # noqa: E402

# every point states the paper's loss first, so a point means the same whatever the algorithms' defaults are
SPIN_PAPER = ["algorithm=spin", *PAPER]
TSPIN_PAPER = ["algorithm=tspin", *(f"{key}={json.dumps(paper)}" for key, paper in RECOMMENDABLE.items())]

# learning rate x RPO's nll_weight, plus the length-robust options at the paper's loss and at one nll_weight
LEARNING_RATES = ("5e-7", "2e-6")
NLL_WEIGHTS = ("0", "0.2", "1.0")
LENGTH_ROBUST = (["training.length_normalize=true"], ["training.dpop_lambda=5"])


def grid() -> dict[str, list[str]]:
    points = {}
    for lr, alpha in itertools.product(LEARNING_RATES, NLL_WEIGHTS):
        points[f"spin-lr{lr}-nll{alpha}"] = [
            *SPIN_PAPER,
            f"training.learning_rate={lr}",
            f"training.nll_weight={alpha}",
        ]
    for extra in LENGTH_ROBUST:
        name = extra[0].split(".")[1].split("=")[0]
        points[f"spin-lr2e-6-{name}"] = [*SPIN_PAPER, "training.learning_rate=2e-6", *extra]
        points[f"spin-lr2e-6-{name}-nll0.2"] = [*SPIN_PAPER, "training.learning_rate=2e-6",
                                                "training.nll_weight=0.2", *extra]
    for alpha in NLL_WEIGHTS:
        points[f"tspin-lr2e-6-nll{alpha}"] = [
            *TSPIN_PAPER,
            "training.learning_rate=2e-6",
            f"training.nll_weight={alpha}",
        ]
    # T-SPIN's own per-token reward (tspin.length_normalize) with SPIN's best nll_weight: RPO alone let both run long
    points["tspin-lr2e-6-length_normalize-nll0.2"] = [*TSPIN_PAPER, "training.learning_rate=2e-6",
                                                      "training.nll_weight=0.2", "tspin.length_normalize=true"]
    # ...and with log-ratios against p_t as SPIN's (the paper's ablation): the reference-free per-token reward
    # ranked the model's own answers above the human ones (-0.47 vs -0.91 nats/token) and its answers ran long
    points["tspin-lr2e-6-length_normalize-nll0.2-reference"] = [
        *TSPIN_PAPER, "training.learning_rate=2e-6", "training.nll_weight=0.2", "tspin.length_normalize=true",
        "tspin.reference_free=false"]
    # ...and with alpha = SPIN's beta: alpha scales the reward's gradient as beta does, so alpha 1.0 (the paper's,
    # for summed log-probs of a 7B model) on per-token log-ratios pushes 10x harder than SPIN's calm point
    points["tspin-lr2e-6-alpha0.1-length_normalize-nll0.2-reference"] = [
        *TSPIN_PAPER, "training.learning_rate=2e-6", "training.nll_weight=0.2", "tspin.length_normalize=true",
        "tspin.reference_free=false", "tspin.reward_scale=0.1"]
    # the yardstick, not a candidate: continued SFT from the same start, on the same validation prompts
    points["sft-lr2e-6"] = ["training.objective=sft", "training.learning_rate=2e-6"]
    return points


def summary(manifest: dict) -> dict:
    models = [("p0", manifest["phases"]["baseline_eval"]["metrics"])]
    models += [(f"p{r['iteration'] + 1}", (r["phases"].get("evaluate") or {}).get("metrics") or {})
               for r in manifest["iterations"]]
    keys = ("validation_nll_per_token", "validation_accuracy", "validation_answer_format_rate",
            "validation_share_hit_max_new_tokens", "reward_accuracy")
    selected = manifest.get("selected_model") or {}
    return {"status": manifest["status"], "selected": selected.get("model"), "selected_value": selected.get("value"),
            "collapse_signals": [r.get("collapse_signals") or {} for r in manifest["iterations"]],
            "models": [{"model": label, **{k: m.get(k) for k in keys}} for label, m in models]}


def winner(points: dict[str, dict], algorithm: str) -> str | None:
    def score(item):
        name, info = item
        chosen = next(m for m in info["models"] if m["model"] == info["selected"])
        return (chosen["validation_nll_per_token"], -(chosen["validation_accuracy"] or 0.0))

    calm = [(n, i) for n, i in points.items() if n.startswith(algorithm + "-") and not any(i["collapse_signals"])]
    return min(calm, key=score)[0] if calm else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "jobs" / "gsm8k_smollm2_quality.yaml"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality-grid.json"))
    parser.add_argument("--iterations", type=int, default=2, help="self-play iterations per point (reduced size)")
    parser.add_argument("--only", default=None, help="comma-separated point names (default: the whole grid)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    import ray

    from spin_ray.config import load_config
    from spin_ray.run.layout import RunLayout

    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    started = time.perf_counter()
    start = load_config(args.config, [*args.overrides, *START])
    run(start)
    start_model = RunLayout.of(start).model(None)
    points = grid()
    if args.only:
        points = {name: points[name] for name in args.only.split(",")}
    # points measured by earlier invocations (another session: the runs are gone, their results are not) are kept
    earlier = json.loads(Path(args.out).read_text()).get("points", {}) if Path(args.out).is_file() else {}
    results = {"benchmark": "quality-grid", "command": "python bench/quality_grid.py " + " ".join(sys.argv[1:]),
               "start_model": start_model, "iterations": args.iterations, "split": "validation only (data.eval null)",
               "points": {name: info for name, info in earlier.items() if name not in points}}
    for name, overrides in points.items():
        config = load_config(args.config, [*args.overrides, f"run.name=grid-{name}", f"model.name={start_model}",
                                           "data.eval=null", f"iterations.count={args.iterations}", *overrides])
        results["points"][name] = {"overrides": overrides, **summary(run(config))}
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")  # a partial grid survives an interruption
    results["winners"] = {algorithm: winner(results["points"], algorithm) for algorithm in ("spin", "tspin")}
    results["seconds_this_invocation"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
