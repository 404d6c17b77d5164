"""Benchmark: `spin-ray plan`'s per-iteration terms against CPU measurements of the same components, on SmolLM2; JSON.

The plan prices an iteration's work as bytes or FLOPs over a rate (spin_ray/plan.py). This measures, on this machine
and the demo job's settings (jobs/gsm8k_smollm2_cpu.yaml), the components each term stands for, and puts each
measurement beside the plan's prediction for exactly that work:

- engine start: our VLLMEngine built as a replica builds it (a fresh process; vllm imported before the clock starts);
- prefill: prompts answered with one token each (the plan counts their prompt tokens);
- scoring: the same prompts, each with its human answer scored after it (vLLM prompt log-probs), minus the prefill;
- decoding: the demo's answers (its max_new_tokens, greedy), minus their prefill;
- staging: the model folder downloaded through storage.download_folder from a file:// "bucket";
- loading: rank 0's read of the model (models.load_model);
- export: rank 0's write (training.checkpoint.export_hf) to a local folder.

Staging, loading and export run here on a local disk, so their measured rate says what this machine's disk does, not
what a cloud bucket does (the plan's staging_gbs and checkpoint_write_gbs are a bucket's); for them the check is the
bytes the plan counts against the bytes written, and the rate is reported. Engine terms are compute on the CPU the
plan prices, so the measured over planned ratio checks the CPU assumptions (cpu_prefill_vs_mm, cpu_decode_vs_mm,
cpu_engine_start_s). Rounds alternate nothing (one component at a time) but repeat: each figure is the median.

    python bench/plan_terms.py [--prompts 32] [--rounds 3] [--out bench/results/plan-terms-DATE.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
JOB = ROOT / "jobs" / "gsm8k_smollm2_cpu.yaml"


def demo_config(prompts: int, *overrides: str):
    from spin_ray.config import load_config

    return load_config(str(JOB), [f"data.limit={prompts}", "generation.engine=vllm", *overrides])


def child(prompts: int) -> None:
    """The engine terms in one fresh process (a replica's): prints one JSON line."""
    from spin_ray.data.prepare import tokenize_split
    from spin_ray.data.tokenization import ChatFormat
    from spin_ray.generation.engine import EngineSpec
    from spin_ray.models.resolution import load_tokenizer, local_model_path
    from spin_ray.workers import prepare_compute_process

    config = demo_config(prompts, f"generation.batch_size={prompts}")
    path = local_model_path(config.model.name)
    spec = EngineSpec.from_config(config, path, score_reference=True)
    prepare_compute_process(spec.threads)
    chat = ChatFormat(load_tokenizer(path))
    split = tokenize_split(config.data.train, config, chat)
    prompt_ids, human = [list(p) for p in split.prompt_ids], [list(r) for r in split.response_ids]
    import vllm  # noqa: F401  (imported before the timed build, as a replica's process has it imported)

    from spin_ray.generation.vllm_engine import VLLMEngine

    def build(max_new_tokens: int) -> tuple[VLLMEngine, float]:
        started = time.perf_counter()
        engine = VLLMEngine(path, chat, max_new_tokens, 0.0, 1.0, spec.batch_size, spec.dtype, spec.max_model_len,
                            with_logprobs=True)
        return engine, time.perf_counter() - started

    def timed(engine, **kwargs) -> tuple[list, float]:
        started = time.perf_counter()
        out = engine.generate(prompt_ids, **kwargs)
        return out, time.perf_counter() - started

    one, start_s = build(1)
    timed(one)  # the first batch pays one-off allocations
    _, prefill_s = timed(one)
    _, scored_s = timed(one, score=human)
    one.shutdown()
    full, _ = build(spec.max_new_tokens)
    answers, answered_s = timed(full)
    full.shutdown()
    print("RESULT " + json.dumps({
        "engine_start_s": start_s, "prefill_s": prefill_s, "prefill_tokens": sum(map(len, prompt_ids)),
        "scoring_s": scored_s - prefill_s, "scoring_tokens": sum(len(p) + len(h) for p, h in zip(prompt_ids, human)),
        "decoding_s": answered_s - prefill_s, "decoded_tokens": sum(len(a.token_ids) for a in answers)}), flush=True)


def engine_terms(prompts: int) -> dict:
    from bench.vllm_cpu import child_result

    command = [sys.executable, __file__, "--child", "--prompts", str(prompts)]
    return child_result(command, {**os.environ, "PYTHONPATH": str(ROOT)}, 900, "engine terms")[0]


def disk_terms(scratch: str) -> dict:
    """Staging, loading and export of the demo's model on this machine's disk."""
    from spin_ray.models.resolution import load_model, load_tokenizer, local_model_path
    from spin_ray.storage import download_folder
    from spin_ray.training.checkpoint import export_hf

    config = demo_config(1)
    path = local_model_path(config.model.name)
    staged = os.path.join(scratch, "staged")
    started = time.perf_counter()
    download_folder("file://" + path, staged)
    staging_s = time.perf_counter() - started
    started = time.perf_counter()
    model = load_model(staged, config.model.dtype)
    loading_s = time.perf_counter() - started
    exported = os.path.join(scratch, "export")
    started = time.perf_counter()
    export_hf(model, load_tokenizer(staged), exported, rank=0, dtype=config.model.dtype)
    export_s = time.perf_counter() - started
    weights = sum(f.stat().st_size for f in Path(exported).rglob("*.safetensors"))
    for folder in (staged, exported):
        shutil.rmtree(folder)
    return {"staging_s": staging_s, "loading_s": loading_s, "export_s": export_s, "export_weight_bytes": weights}


def planned(prompts: int, measured: dict) -> dict:
    """The plan's seconds for the measured work, term by term, and what it counts."""
    from spin_ray.plan import DTYPE_BYTES, Assumptions, make_plan

    config = demo_config(prompts)
    plan = make_plan(config)
    a, e, shape = Assumptions(), plan.engine, plan.shape
    weights = shape.parameters * DTYPE_BYTES[config.model.dtype]
    return {
        "engine_start_s": a.cpu_engine_start_s + e.weights / (a.disk_read_gbs * 1e9),
        "prefill_s": measured["prefill_tokens"] / e.prefill_tokens_per_second,
        "scoring_s": measured["scoring_tokens"] / e.scoring_tokens_per_second,
        "decoding_s": measured["decoded_tokens"] / e.tokens_per_second,
        "staging_s": plan.bytes["export"] / (a.staging_gbs * 1e9),
        "loading_s": weights / (a.disk_read_gbs * 1e9),
        "export_s": plan.bytes["export"] / (a.checkpoint_write_gbs * 1e9),
        "export_weight_bytes": plan.bytes["export"],
        "rates": {"prefill_tokens_per_second": e.prefill_tokens_per_second,
                  "scoring_tokens_per_second": e.scoring_tokens_per_second,
                  "decoding_tokens_per_second": e.tokens_per_second},
    }


NOTE = ("engine terms: compute on this CPU, the plan's CPU rates (cpu_prefill_vs_mm, cpu_decode_vs_mm) set from a "
        "first run of this bench and checked by the next; staging, loading and export: this machine's local disk "
        "(loading's median is page-cache hot, its first round cold), where the plan prices a bucket (staging_gbs, "
        "checkpoint_write_gbs) and a node's disk (disk_read_gbs): their check is the bytes counted")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / f"plan-terms-{datetime.date.today()}.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.prompts)
        return 0
    import vllm

    scratch = tempfile.mkdtemp(prefix="spin-ray-plan-terms-", dir=os.environ.get("RAY_TMPDIR"))
    trials = []
    try:
        for round_number in range(args.rounds):
            trials.append({**engine_terms(args.prompts), **disk_terms(scratch)})
            print(f"round {round_number + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in trials[-1].items()
                                                             if k.endswith("_s")), file=sys.stderr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    measured = {key: statistics.median(t[key] for t in trials) for key in trials[0]}
    plan = planned(args.prompts, measured)
    terms = {}
    for key in ("engine_start_s", "prefill_s", "scoring_s", "decoding_s", "staging_s", "loading_s", "export_s"):
        terms[key.removesuffix("_s")] = {"measured_s": round(measured[key], 3), "planned_s": round(plan[key], 3),
                                         "measured_over_planned": round(measured[key] / plan[key], 3)}
    rates = {"prefill_tokens_per_second": measured["prefill_tokens"] / measured["prefill_s"],
             "scoring_tokens_per_second": measured["scoring_tokens"] / measured["scoring_s"],
             "decoding_tokens_per_second": measured["decoded_tokens"] / measured["decoding_s"],
             "staging_gbs": plan["export_weight_bytes"] / measured["staging_s"] / 1e9,
             "loading_gbs": plan["export_weight_bytes"] / measured["loading_s"] / 1e9,
             "export_gbs": measured["export_weight_bytes"] / measured["export_s"] / 1e9}
    report = {
        "benchmark": "plan_terms", "date": str(datetime.date.today()), "machine": {"cpus": os.cpu_count()},
        "model": "SmolLM2-135M-Instruct", "job": str(JOB.relative_to(ROOT)), "prompts": args.prompts,
        "rounds": args.rounds, "versions": {"vllm": vllm.__version__}, "note": NOTE,
        "counted": {"prefill_tokens": measured["prefill_tokens"], "scoring_tokens": measured["scoring_tokens"],
                    "decoded_tokens": measured["decoded_tokens"],
                    "export_weight_bytes": {"planned": plan["export_weight_bytes"],
                                            "written": measured["export_weight_bytes"]}},
        "terms": terms,
        "measured_rates": {k: round(v, 3) for k, v in rates.items()},
        "planned_rates": {k: round(v, 1) for k, v in plan["rates"].items()},
        "trials": [{k: round(v, 3) if isinstance(v, float) else v for k, v in t.items()} for t in trials],
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("counted", "terms", "measured_rates", "planned_rates")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
