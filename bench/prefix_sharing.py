"""Benchmark: SPIN training throughput with prefix-shared pairs vs separate sequences; prints JSON.

The loop jobs run (`spin_ray.training.loop.train`, one process, 2 torch threads, SmolLM2 fp32, packed micro-batches,
chunked head), on synthetic SPIN rows whose prompts and answers have exactly the shape's lengths: GSM8K's (prompt ~100
tokens, answers ~130) and a long-prompt shape (prompt 512, answers 256). Tokens/s counts the pairs as separate
sequences in both layouts (the prompt once per answer), so the ratio is the speed-up of the same work. The two layouts
alternate over --rounds rounds; the JSON keeps every trial, the medians and their ratio, and each trial's final loss
(equal in both layouts up to float rounding).

    python bench/prefix_sharing.py [--rounds 2] [--out bench/results/prefix-sharing-DATE.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: (prompt tokens, answer tokens, micro-batch pairs, global batch, steps)
SHAPES = {"gsm8k": (100, 130, 2, 4, 3), "long_prompt": (512, 256, 2, 4, 2)}


def trial(model: str, shape: str, shared: bool, scratch: str) -> dict:
    from bench.memory import synthetic_rows
    from spin_ray.config import load_config
    from spin_ray.training.loop import train

    prompt, answer, micro, global_batch, steps = SHAPES[shape]
    config = load_config(None, [f"model.name={model}", "training.epochs=1", "training.warmup_ratio=0",
                                f"training.global_batch_size={global_batch}", f"training.micro_batch_size={micro}",
                                f"training.prefix_sharing={str(shared).lower()}", "training.learning_rate=1e-6",
                                "training.reference_check_tolerance=null", "training.checkpoint_every=1000"])
    rows = synthetic_rows("spin", global_batch * steps, prompt, answer)
    where = tempfile.mkdtemp(dir=scratch)
    summary = train(config, rows, model, os.path.join(where, "train"), os.path.join(where, "model"))
    with open(os.path.join(where, "train", "metrics.jsonl")) as handle:
        losses = [json.loads(line)["loss"] for line in handle]
    return {"tokens_per_second": summary.training_tokens_per_second, "seconds": summary.training_seconds,
            "steps": summary.steps, "losses": losses}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--out", default=str(ROOT / "bench" / "results" / f"prefix-sharing-{datetime.date.today()}.json")
    )
    args = parser.parse_args()
    import torch

    from spin_ray.models.resolution import resolve_model
    from spin_ray.workers import prepare_compute_process

    prepare_compute_process(2)
    model = resolve_model("smollm2-135m-instruct").path
    scratch = tempfile.mkdtemp(prefix="spin-ray-prefix-", dir=str(ROOT / ".tmp"))
    results = {}
    for shape in SHAPES:
        trials = {"separate": [], "shared": []}
        for number in range(args.rounds):
            order = (False, True) if number % 2 == 0 else (True, False)
            for shared in order:
                started = time.perf_counter()
                outcome = trial(model, shape, shared, scratch)
                outcome["wall_seconds"] = round(time.perf_counter() - started, 1)
                trials["shared" if shared else "separate"].append(outcome)
                print(json.dumps({"shape": shape, "shared": shared, **outcome}), flush=True)
        medians = {k: statistics.median(t["tokens_per_second"] for t in v) for k, v in trials.items()}
        prompt, answer = SHAPES[shape][:2]
        results[shape] = {"prompt_tokens": prompt, "answer_tokens": answer, "trials": trials,
                          "median_tokens_per_second": medians,
                          "speedup": round(medians["shared"] / medians["separate"], 3),
                          "forward_tokens_ratio": round((prompt + 2 * answer) / (2 * prompt + 2 * answer), 3),
                          "final_loss_difference": max(abs(a["losses"][-1] - b["losses"][-1])
                                                       for a, b in zip(trials["shared"], trials["separate"]))}
    report = {"benchmark": "prefix_sharing", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()},
              "model": "SmolLM2-135M-Instruct fp32", "results": results}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({shape: r["speedup"] for shape, r in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
