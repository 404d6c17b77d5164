"""Benchmark: does self-play beat continued SFT from an SFT-converged start? Prints JSON, draws a picture.

v2 (the default). From one start (SmolLM2 after an SFT warm start on N GSM8K training prompts that stops when the
NLL on a validation split carved from the training data stops improving: the run `quality-start`), four arms
train on the same N prompts for k iterations each: continued SFT on the human answers (as many optimizer steps as
SPIN with its t-1 mixing), SPIN as in the paper (no stabiliser), SPIN and T-SPIN with the recommended defaults
(the defaults of `algorithm: spin` and `tspin`, chosen on the validation split by bench/quality_grid.py). Every
model is evaluated on the same held-out GSM8K test prompts (greedy); p0 is evaluated once and shared (the start
evaluation is cached by the model's content). Each arm names its best model on the validation split; for the
selected and the last model of each arm against continued SFT's, the paired difference of exact match (strict,
flexible) and of NLL per token comes with a bootstrap 95% interval over prompts (positive: the arm is better).
Each arm is a resumable run: an interrupted benchmark continues where it stopped when started again.

    python bench/quality.py [--config jobs/gsm8k_smollm2_quality.yaml] [--out bench/results/quality-v2.json]
                            [--arms sft,spin_recommended,...] [key=value ...]
    python bench/quality.py --table bench/results/quality-v2.json   # the markdown tables of docs/performance.md
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

from spin_ray.objectives.algorithms import STABILISERS  # noqa: E402

# the paper's loss: every stabiliser off, whatever the defaults are
PAPER = [f"training.{name}={json.dumps(off)}" for name, off in STABILISERS.items()]
ARMS = {"sft": ["training.objective=sft"], "spin_paper": ["algorithm=spin", *PAPER],
        "spin_recommended": ["algorithm=spin"], "tspin_recommended": ["algorithm=tspin"]}
# The warm start trains no self-play: its loss settings are pinned so that its stored config holds whatever the
# defaults. It stops on the validation split and never sees the test split; p0's test evaluation is each arm's
# first, made once and shared through the start-evaluation cache (keyed by the model's content).
START = ["run.name=quality-start", "iterations.sft_warm_start=true", "iterations.sft_epochs=auto", "iterations.count=0",
         "data.eval=null", *PAPER]
METRICS = ("accuracy", "accuracy_lm_eval_strict", "accuracy_lm_eval_flexible", "answer_format_rate", "nll_per_token",
           "share_hit_max_new_tokens", "mean_answer_tokens", "reward_accuracy", "reward_margin",
           "validation_nll_per_token", "validation_accuracy", "validation_share_hit_max_new_tokens")
# per-prompt score column -> (metric name, sign): sign +1 when higher is better
COMPARED = {"correct_strict": ("accuracy_lm_eval_strict", 1), "correct_flexible": ("accuracy_lm_eval_flexible", 1),
            "correct": ("accuracy", 1), "nll_per_token": ("nll_per_token", -1)}


def run(config) -> dict:
    import ray

    from spin_ray.run.driver import driver_alive, start_driver

    started = time.perf_counter()
    driver = start_driver(config)
    manifest = ray.get(driver.run.remote())
    ray.kill(driver)  # the next arm starts its own named driver
    deadline = time.monotonic() + 60
    while driver_alive(config) and time.monotonic() < deadline:
        time.sleep(0.5)
    manifest["bench_seconds_this_invocation"] = round(time.perf_counter() - started, 1)
    return manifest


def models_of(manifest: dict) -> list[tuple[str, dict, str]]:
    """(label, metrics, eval folder) of every evaluated model of a run: p0, then p(t+1) per iteration."""
    rows = [
        ("p0", manifest["phases"]["baseline_eval"]["metrics"], manifest["phases"]["baseline_eval"]["artifacts"]["eval"])
    ]
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


def versus(arm_scores: dict, sft_scores: dict) -> dict:
    """Paired differences, arm minus continued SFT, each signed so that positive means the arm is better."""
    from bench.stats import paired_bootstrap

    if arm_scores["prompt_id"] != sft_scores["prompt_id"]:
        raise RuntimeError("the arms were evaluated on different prompts")
    out = {}
    for column, (metric, sign) in COMPARED.items():
        a, b = arm_scores[column], sft_scores[column]
        out[metric] = paired_bootstrap(a, b).to_dict() if sign > 0 else paired_bootstrap(b, a).to_dict()
    return out


def collapse_checks(results: dict) -> dict:
    """The quality issue's "no collapse" bars per arm, on the test split against p0: every model's share of answers
    at max_new_tokens at most p0's + 5 points, every model's format rate at least p0's, the selected model's NLL
    per token at most p0's."""
    start = results["start"]["metrics"]
    checks = {}
    for arm, info in results["arms"].items():
        later = [m for m in info["models"] if m["model"] != "p0"]
        selected = next(m for m in info["models"] if m["model"] == info["selected"])["metrics"]
        checks[arm] = {
            "at_limit_within_p0_plus_5_points": all(
                m["metrics"]["share_hit_max_new_tokens"] <= start["share_hit_max_new_tokens"] + 0.05 for m in later),
            "format_rate_at_least_p0": all(m["metrics"]["answer_format_rate"] >= start["answer_format_rate"]
                                           for m in later),
            "selected_nll_at_most_p0": selected["nll_per_token"] <= start["nll_per_token"]}
    return checks


def markdown(results: dict) -> str:
    """The tables docs/performance.md shows, from a results JSON: every model, the paired differences, the checks."""
    def share(value):
        return "" if value is None else f"{100 * value:.1f}%"

    def number(value, digits=4):
        return "" if value is None else f"{value:.{digits}f}"

    lines = [
        "| arm | model | strict EM | flexible EM | format '#### n' | NLL/tok | at limit | mean tokens | val NLL/tok |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, info in results["arms"].items():
        for m in info["models"]:
            x = m["metrics"]
            mark = " (selected)" if m["model"] == info["selected"] else ""
            lines.append(f"| {arm} | {m['model']}{mark} | {share(x['accuracy_lm_eval_strict'])} | "
                         f"{share(x['accuracy_lm_eval_flexible'])} | {share(x['answer_format_rate'])} | "
                         f"{number(x['nll_per_token'])} | {share(x['share_hit_max_new_tokens'])} | "
                         f"{number(x['mean_answer_tokens'], 0)} | {number(x.get('validation_nll_per_token'))} |")
    def interval(d: dict, points: bool) -> str:  # exact match in points, NLL in nats/token; * when 0 is outside
        scale, digits, unit = (100, 1, " pts") if points else (1, 4, "")
        low, high = (scale * bound for bound in d["ci95"])
        return f"{scale * d['mean']:+.{digits}f}{unit} [{low:+.{digits}f}, {high:+.{digits}f}]" + (
            " *" if d["excludes_zero"] else "")

    lines += [
        "",
        "| arm, model | strict EM (arm - SFT) | flexible EM (arm - SFT) | NLL/tok (SFT - arm; > 0: arm better) |",
        "|---|---|---|---|",
    ]
    for arm, roles in results["versus_continued_sft"].items():
        for role, m in roles.items():
            cells = [interval(m["accuracy_lm_eval_strict"], True), interval(m["accuracy_lm_eval_flexible"], True),
                     interval(m["nll_per_token"], False)]
            models = f"{results['arms'][arm][role]} vs SFT's {results['arms']['sft'][role]}"
            lines.append(f"| {arm} {role} ({models}) | " + " | ".join(cells) + " |")
    lines += ["", "| arm | at limit <= p0 + 5 pts | format >= p0 | selected NLL <= p0 |", "|---|---|---|---|"]
    for arm, check in collapse_checks(results).items():
        lines.append(f"| {arm} | " + " | ".join("yes" if v else "**no**" for v in check.values()) + " |")
    return "\n".join(lines)


def plot(results: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = (
        ("accuracy_lm_eval_strict", "GSM8K exact match (strict)"),
        ("answer_format_rate", "answers ending '#### n'"),
        ("nll_per_token", "NLL/token, human answers"),
        ("validation_nll_per_token", "validation NLL/token"),
        ("share_hit_max_new_tokens", "answers at max_new_tokens"),
        ("mean_answer_tokens", "mean answer tokens"),
    )
    figure, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for axis, (key, title) in zip(axes.flat, panels, strict=True):
        for arm, info in results["arms"].items():
            points = [
                (i, m["metrics"].get(key)) for i, m in enumerate(info["models"]) if m["metrics"].get(key) is not None
            ]
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=arm)
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("model (p0 = SFT-converged start)", fontsize=8)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    sizes = results["sizes"]
    figure.suptitle(f"self-play vs continued SFT: SmolLM2-135M, {sizes['train_prompts']} GSM8K prompts, "
                    f"{sizes['held_out_prompts']} held out, start after {sizes['start_sft_epochs']} SFT epochs",
                    fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "jobs" / "gsm8k_smollm2_quality.yaml"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "quality-v2.json"))
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    parser.add_argument("--table", metavar="JSON", help="print the markdown tables of a results file and exit")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.table).read_text())))
        return

    import ray

    from spin_ray.config import load_config
    from spin_ray.run.layout import RunLayout

    arms = {name: ARMS[name] for name in args.arms.split(",")}
    if "sft" not in arms:
        raise SystemExit("bench/quality.py: the sft arm is the baseline every other arm is compared with")
    base = load_config(args.config, args.overrides)
    ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    started = time.perf_counter()
    start = load_config(args.config, [*args.overrides, *START])
    start_manifest = run(start)
    start_model = RunLayout.of(start).model(None)
    sft_phase = start_manifest["phases"]["sft"]["metrics"]
    results = {"benchmark": "quality-v2", "command": "python bench/quality.py " + " ".join(sys.argv[1:]),
               "config": args.config, "overrides": args.overrides, "start_model": start_model,
               "sizes": {"train_prompts": sft_phase["pairs"],
                         "validation_prompts": start_manifest["phases"]["baseline_eval"]["metrics"].get(
                             "validation_prompts"),
                         "start_sft_epochs": sft_phase.get("best_epoch"),
                         "start_validation_nll_by_epoch": sft_phase.get("validation_nll_by_epoch"),
                         "iterations": base.iterations.count, "epochs_per_iteration": base.training.epochs},
               "start": {"seconds": phase_seconds(start_manifest)}, "arms": {}, "versus_continued_sft": {}}
    per_prompt, roles = {}, {}
    for arm, overrides in arms.items():
        config = load_config(args.config, [*args.overrides, f"run.name=quality-{arm}", f"model.name={start_model}",
                                           *overrides])
        manifest = run(config)
        models = models_of(manifest)
        selected = (manifest.get("selected_model") or {}).get("model", models[-1][0])
        roles[arm] = {"selected": selected, "last": models[-1][0]}
        results["arms"][arm] = {
            "run": manifest["run_dir"], "status": manifest["status"], "seconds": phase_seconds(manifest),
            "selected": selected, "last": models[-1][0], "overrides": overrides,
            "collapse_signals": [r.get("collapse_signals") for r in manifest["iterations"]],
            "train": [r["phases"]["train"]["metrics"] for r in manifest["iterations"]],
            "models": [{"model": label, "metrics": {k: m.get(k) for k in METRICS}} for label, m, _ in models]}
        per_prompt[arm] = {label: scores(folder) for label, _, folder in models}
        if arm == "sft":  # p0 on the test split: the first arm's evaluation, which the others reuse from the cache
            results["start"]["metrics"] = models[0][1]
            results["sizes"]["held_out_prompts"] = manifest["phases"]["baseline_eval"]["metrics"]["prompts"]
    for arm in arms:
        if arm == "sft":
            continue
        results["versus_continued_sft"][arm] = {
            role: versus(per_prompt[arm][roles[arm][role]], per_prompt["sft"][roles["sft"][role]])
            for role in ("selected", "last")}
    results["collapse_checks"] = collapse_checks(results)
    results["seconds_this_invocation"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".png").write_bytes(plot(results))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
