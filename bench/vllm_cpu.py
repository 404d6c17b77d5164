"""Benchmark: vLLM on CPU with and without the preloaded allocator and OpenMP runtime its docs recommend, and with
and without its compiled model (`enforce_eager`); prints JSON.

vLLM's CPU install guide asks for `LD_PRELOAD` of tcmalloc and, on x86, Intel OpenMP (libiomp5). Our
engine runs in the replica's own process (vllm_engine.CPU_ENVIRONMENT), so a preload has to be in that
process's environment when it starts. Each variant here is a fresh Python process with its own
LD_PRELOAD that builds our VLLMEngine the way a GenerateStage replica does (same EngineSpec, same
threads) and answers the same GSM8K prompts greedily, human answers scored. Variants alternate,
`--rounds` times. Reported per run: the engine's start-up (import, build) split by vLLM's own
timings (weights, compile, KV cache and warm-up), decode seconds and tokens/s; ratios against
`default` of the same round.

On CPU vLLM traces the model with Dynamo and warms up Inductor code at every engine start. Our engine
runs it eager there (vllm_engine.py); a variant ending in `+compiled` sets `enforce_eager: false`
(vLLM's own default), one ending in `+eager` sets it true: a shorter start against a slower decode.

    python bench/vllm_cpu.py [--prompts 64] [--rounds 2] [--variants tcmalloc+compiled,tcmalloc+eager,...]
        [--out bench/results/vllm-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# vLLM's INFO lines that time the parts of an engine start
STARTUP_PARTS = {
    "weights_s": r"Loading weights took ([\d.]+) seconds",
    "model_load_s": r"Model loading took [\d.]+ \w+ (?:memory )?and ([\d.]+) seconds",
    "dynamo_s": r"Dynamo bytecode transform time: ([\d.]+) s",
    "compile_s": r"torch\.compile took? ([\d.]+) s",
    "engine_init_s": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) seconds",
}


def child(prompts: int, config_path: str, engine_kwargs: dict) -> None:
    """One variant's run, in the process whose LD_PRELOAD it measures: prints one JSON line."""
    started = time.perf_counter()
    preloaded = os.environ.get("LD_PRELOAD", "")  # vLLM appends its own choice to the variable later
    from spin_ray.config import load_config
    from spin_ray.data.prepare import tokenize_split
    from spin_ray.data.tokenization import ChatFormat
    from spin_ray.generation.engine import EngineSpec
    from spin_ray.models.resolution import load_tokenizer, resolve_model
    from spin_ray.workers import prepare_compute_process

    config = load_config(config_path, [f"data.limit={prompts}", "generation.engine=vllm"])
    spec = EngineSpec.from_config(config, resolve_model(config.model.name, config.model.cache_dir).path,
                                  score_reference=True)
    prepare_compute_process(spec.threads)
    chat = ChatFormat(load_tokenizer(spec.model))
    split = tokenize_split(config.data.train, config, chat)
    imported = time.perf_counter()
    import vllm  # noqa: F401  (timed apart from the engine build)

    from spin_ray.generation.vllm_engine import VLLMEngine

    vllm_imported = time.perf_counter()
    engine = VLLMEngine(spec.model, chat, spec.max_new_tokens, spec.temperature, spec.top_p, spec.batch_size,
                        spec.dtype, spec.max_model_len, spec.trust_remote_code, engine_kwargs=engine_kwargs,
                        with_logprobs=True)
    built = time.perf_counter()
    answers = engine.generate(split.prompt_ids, score=split.response_ids)
    done = time.perf_counter()
    tokens = sum(len(a.token_ids) for a in answers)
    print("RESULT " + json.dumps({
        "setup_s": round(imported - started, 2), "import_vllm_s": round(vllm_imported - imported, 2),
        "engine_build_s": round(built - vllm_imported, 2), "startup_s": round(built - imported, 2),
        "decode_s": round(done - built, 2), "generated_tokens": tokens,
        "tokens_per_second": round(tokens / (done - built), 1),
        "answers": [a.token_ids for a in answers], "preloaded": preloaded,
    }), flush=True)


def find_libraries() -> dict[str, str | None]:
    """tcmalloc (Debian's libtcmalloc-minimal4, or any on the loader path) and Intel OpenMP (the intel-openmp wheel)."""
    import ctypes.util

    tcmalloc = None
    for folder in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"):
        candidate = Path(folder) / "libtcmalloc_minimal.so.4"
        if candidate.exists():
            tcmalloc = str(candidate)
            break
    if tcmalloc is None and ctypes.util.find_library("tcmalloc_minimal"):
        tcmalloc = ctypes.util.find_library("tcmalloc_minimal")
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    return {"tcmalloc": tcmalloc, "iomp": str(iomp) if iomp.exists() else None}


def child_result(command: list[str], env: dict, timeout: int, what: str) -> tuple[dict, list[str]]:
    """Run a benchmark's child process; return the JSON of its `RESULT ` line and all its output lines."""
    out = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    lines = (out.stdout + out.stderr).splitlines()
    result = next((json.loads(line[len("RESULT "):]) for line in lines if line.startswith("RESULT ")), None)
    if out.returncode != 0 or result is None:
        tail = "\n".join(lines[-30:])
        raise RuntimeError(f"{what} failed (exit {out.returncode}):\n{tail}")
    return result, lines


def run_variant(preload: list[str], engine_kwargs: dict, prompts: int, config_path: str, timeout: int = 900) -> dict:
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "INFO", "PYTHONPATH": str(ROOT)}
    env.pop("LD_PRELOAD", None)
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    started = time.perf_counter()
    result, lines = child_result([sys.executable, __file__, "--child", "--prompts", str(prompts), "--config",
                                  config_path, "--engine-kwargs", json.dumps(engine_kwargs)],
                                 env, timeout, f"variant {preload or 'default'} {engine_kwargs or ''}")
    wall = time.perf_counter() - started
    text = "\n".join(lines)
    result["vllm_startup_parts"] = {name: float(m.group(1)) for name, pattern in STARTUP_PARTS.items()
                                    if (m := re.search(pattern, text))}
    result["vllm_timing_lines"] = [line.split("] ", 1)[-1][:160] for line in lines
                                   if re.search(r"took|time:|warming up", line) and "RESULT" not in line][:12]
    result["process_wall_s"] = round(wall, 2)
    result["vllm_preload_warnings"] = sum("is not found in LD_PRELOAD" in line for line in lines)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--config", default=str(ROOT / "jobs" / "gsm8k_smollm2_cpu.yaml"))
    parser.add_argument("--variants", default=None, help="comma-separated subset (default: every one this machine has)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--engine-kwargs", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.prompts, args.config, json.loads(args.engine_kwargs))
        return

    libs = find_libraries()
    variants = {"default": []}
    if libs["tcmalloc"]:
        variants["tcmalloc"] = [libs["tcmalloc"]]
    if libs["iomp"]:
        variants["iomp"] = [libs["iomp"]]
    if libs["tcmalloc"] and libs["iomp"]:
        variants["tcmalloc+iomp"] = [libs["tcmalloc"], libs["iomp"]]
    variants["compiled"] = []
    if libs["tcmalloc"]:
        variants["tcmalloc+compiled"] = [libs["tcmalloc"]]
        variants["tcmalloc+eager"] = [libs["tcmalloc"]]
    if args.variants:
        variants = {name: variants[name] for name in args.variants.split(",")}
    runs = []
    for round_number in range(1, args.rounds + 1):
        for name, preload in variants.items():
            engine_kwargs = {"enforce_eager": name.endswith("+eager")} if name.endswith(("+eager", "compiled")) else {}
            result = run_variant(preload, engine_kwargs, args.prompts, args.config)
            runs.append({"variant": name, "round": round_number, **result})
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "answers"}), file=sys.stderr, flush=True)

    baseline = next(iter(variants))  # default, unless --variants names another first
    reference = next(r["answers"] for r in runs if r["variant"] == baseline)
    ratios = {}
    for name in variants:
        if name == baseline:
            continue
        pairs = [(r, next(d for d in runs if d["variant"] == baseline and d["round"] == r["round"]))
                 for r in runs if r["variant"] == name]
        ratios[name] = {
            f"decode_tokens_per_second_vs_{baseline}": [
                round(r["tokens_per_second"] / d["tokens_per_second"], 3) for r, d in pairs
            ],
            f"startup_s_vs_{baseline}": [round(r["startup_s"] / d["startup_s"], 3) for r, d in pairs],
        }
    for run in runs:
        run[f"answers_identical_to_{baseline}"] = (
            f"{sum(a == b for a, b in zip(run.pop('answers'), reference))}/{len(reference)}"
        )
    report = json.dumps({
        "benchmark": "vllm_cpu_preload", "prompts": args.prompts, "rounds": args.rounds, "libraries": libs,
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()},
        "date": time.strftime("%Y-%m-%d"), "runs": runs, "ratios": ratios,
    }, indent=1)
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")


if __name__ == "__main__":
    main()
