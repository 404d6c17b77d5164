"""Benchmark: vLLM's CPU build serving SmolLM2 plus a PEFT LoRA adapter against the merged model served whole; JSON.

What LoRA changes in our handoff (measured before LoRA training existed here): an iteration ships an adapter instead
of a model, and the engines apply it to the base they already hold. The parent builds a PEFT adapter
on SmolLM2-135M-Instruct (rank --rank on every projection of every layer; its B matrices drawn at random, seeded, so
the answers change) and the merged model (PEFT's merge_and_unload). Each variant is then a fresh process that builds
our VLLMEngine the way a replica does (vllm_engine.py: in-process core, eager, whole-prompt prefill), with vLLM's
`enable_lora` for the adapter variant, and answers the same GSM8K prompts greedily, all in one batch:

- `base`: the model without the adapter (the answers must differ from the merged model's, or the adapter is inert);
- `merged`: the merged model served whole (today's handoff: a full export per iteration);
- `adapter`: the base plus the adapter through vLLM's LoRARequest.

Reported per variant: the engine's start (build) and the batch's decode seconds and tokens/s; how many greedy answers
of the adapter variant equal the merged model's; the bytes each handoff writes. Variants alternate over --rounds.

    python bench/lora_serving.py [--prompts 16] [--rank 8] [--rounds 2] [--out bench/results/lora-serving-DATE.json]
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

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAX_NEW_TOKENS = 64


def folder_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.suffix == ".safetensors")


def make_adapter(base: str, rank: int, scratch: str) -> dict:
    """A seeded random adapter on `base` and the merged model, saved under `scratch`."""
    import torch
    from peft import LoraConfig, get_peft_model

    from spin_ray.models.resolution import load_model, load_tokenizer

    torch.manual_seed(0)
    model = get_peft_model(load_model(base, "float32", False),
                           LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS,
                                      task_type="CAUSAL_LM"))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero (an adapter that changes nothing); a trained one does not
            torch.nn.init.normal_(parameter, std=0.02)
    adapter, merged = os.path.join(scratch, "adapter"), os.path.join(scratch, "merged")
    model.save_pretrained(adapter)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.merge_and_unload().save_pretrained(merged, safe_serialization=True)
    load_tokenizer(base).save_pretrained(merged)
    return {"adapter": adapter, "merged": merged, "trainable_parameters": trainable,
            "adapter_bytes": folder_bytes(adapter), "merged_model_bytes": folder_bytes(merged)}


def child(model: str, adapter: str | None, rank: int, prompts: int) -> None:
    """One variant in its own process: prints one JSON line."""
    from spin_ray.config import load_config
    from spin_ray.data.prepare import tokenize_split
    from spin_ray.data.tokenization import ChatFormat
    from spin_ray.generation.engine import EngineSpec
    from spin_ray.models.resolution import load_tokenizer
    from spin_ray.workers import prepare_compute_process

    config = load_config(str(ROOT / "jobs" / "gsm8k_smollm2_cpu.yaml"),
                         [f"data.limit={prompts}", "generation.engine=vllm", f"generation.batch_size={prompts}",
                          f"generation.max_new_tokens={MAX_NEW_TOKENS}"])
    spec = EngineSpec.from_config(config, model, score_reference=False)
    prepare_compute_process(spec.threads)
    chat = ChatFormat(load_tokenizer(model))
    split = tokenize_split("gsm8k:test", config, chat)
    import vllm  # noqa: F401  (imported before the timed build)
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from spin_ray.generation.vllm_engine import VLLMEngine

    lora = {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1} if adapter else {}
    started = time.perf_counter()
    engine = VLLMEngine(model, chat, spec.max_new_tokens, 0.0, 1.0, spec.batch_size, spec.dtype, spec.max_model_len,
                        False, engine_kwargs=lora)
    built = time.perf_counter()
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS, stop_token_ids=list(chat.stop_token_ids))
    request = LoRARequest("iteration", 1, adapter) if adapter else None
    outputs = engine.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in split.prompt_ids], params,
                                  lora_request=request, use_tqdm=False)
    done = time.perf_counter()
    answers = [list(o.outputs[0].token_ids) for o in outputs]
    tokens = sum(map(len, answers))
    print("RESULT " + json.dumps({"startup_s": round(built - started, 2), "decode_s": round(done - built, 2),
                                  "generated_tokens": tokens, "tokens_per_second": round(tokens / (done - built), 1),
                                  "answers": answers}), flush=True)


def run_variant(model: str, adapter: str | None, rank: int, prompts: int) -> dict:
    from bench.vllm_cpu import child_result

    command = [sys.executable, __file__, "--child", model, "--rank", str(rank), "--prompts", str(prompts)]
    if adapter:
        command += ["--adapter", adapter]
    return child_result(command, {**os.environ, "PYTHONPATH": str(ROOT)}, 900, f"variant {model} {adapter or ''}")[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / f"lora-serving-{datetime.date.today()}.json"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--adapter", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.adapter, args.rank, args.prompts)
        return 0
    import peft
    import vllm

    from spin_ray.models.resolution import resolve_model

    base = resolve_model("smollm2-135m-instruct").path
    scratch = tempfile.mkdtemp(prefix="spin-ray-lora-", dir=os.environ.get("RAY_TMPDIR"))
    made = make_adapter(base, args.rank, scratch)
    variants = {"base": (base, None), "merged": (made["merged"], None), "adapter": (base, made["adapter"])}
    trials: dict[str, list[dict]] = {name: [] for name in variants}
    for round_number in range(args.rounds):
        order = list(variants) if round_number % 2 == 0 else list(reversed(variants))
        for name in order:
            trials[name].append(run_variant(*variants[name], args.rank, args.prompts))
            print(f"round {round_number + 1} {name}: start {trials[name][-1]['startup_s']} s, "
                  f"{trials[name][-1]['tokens_per_second']} tok/s", file=sys.stderr)
    median = {name: {key: round(statistics.median(t[key] for t in runs), 2)
                     for key in ("startup_s", "decode_s", "tokens_per_second")} for name, runs in trials.items()}
    adapter_answers, merged_answers = trials["adapter"][0]["answers"], trials["merged"][0]["answers"]
    report = {
        "benchmark": "lora_serving", "date": str(datetime.date.today()), "model": "SmolLM2-135M-Instruct",
        "versions": {"vllm": vllm.__version__, "peft": peft.__version__}, "prompts": args.prompts,
        "max_new_tokens": MAX_NEW_TOKENS, "rank": args.rank, "targets": TARGETS, "rounds": args.rounds,
        "trainable_parameters": made["trainable_parameters"],
        "handoff_bytes": {"adapter": made["adapter_bytes"], "merged_model": made["merged_model_bytes"],
                          "ratio": round(made["adapter_bytes"] / made["merged_model_bytes"], 4)},
        "greedy_answers_equal": {
            "adapter_vs_merged": sum(a == b for a, b in zip(adapter_answers, merged_answers)),
            "base_vs_merged": sum(a == b for a, b in zip(trials["base"][0]["answers"], merged_answers)),
            "of": len(merged_answers),
            "same_across_rounds": all(t["answers"] == runs[0]["answers"] for runs in trials.values() for t in runs)},
        "median": median,
        "ratios_vs_merged": {name: {"startup": round(m["startup_s"] / median["merged"]["startup_s"], 3),
                                    "tokens_per_second": round(m["tokens_per_second"]
                                                               / median["merged"]["tokens_per_second"], 3)}
                             for name, m in median.items()},
        "trials": {name: [{k: v for k, v in t.items() if k != "answers"} for t in runs]
                   for name, runs in trials.items()},
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("handoff_bytes", "greedy_answers_equal", "median", "ratios_vs_merged")},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
