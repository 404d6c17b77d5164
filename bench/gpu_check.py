"""The first GPU run's check: spin_ray's training step on one device, each setting's measured peak memory, speed, MFU,
attention kernel and step-0 reference gap beside `spin-ray plan`'s figures, as one JSON.

Made for a bare CUDA machine: it needs torch, transformers and peft (and pydantic, fsspec, pyyaml, safetensors, which
`make gpu-check-wheels` downloads as wheels for machines without them), no Ray, no vLLM, no network and no downloaded
model. The model is random, with zephyr-7b's layer shapes (Mistral: hidden 4096, MLP 14336, 32 heads over 8 KV heads,
vocabulary 32000) and fewer layers; the tokenizer is a word-level one built here. One process joins a one-rank process
group (NCCL on a GPU, gloo on a CPU) and runs `spin_ray.training.loop.train`, the loop jobs run, per setting: bf16
compute over float32 master weights with activation checkpointing off and on, without prefix sharing, LoRA (rank 16,
checkpointing on), and on a GPU the FlashAttention-2 varlen kernel (training.attention flash_varlen). The
reference comes from the trainer's own pass (training.reference trainer), so step 0's gap to it should be 0.

    python bench/gpu_check.py [--device cuda|cpu] [--layers 2] [--steps 3] [--out gpu-check.json]

`--device cpu` runs a small shape (hidden 128, 2 layers) in float32, so the test suite runs it; its figures say the
script works, not how a GPU does (no MFU: the plan has no CPU peak to divide by). On a GPU each field should read:
`memory_error` within +-20% (the plan's tolerance), `mfu` 0.3-0.6 for bf16 on an H100 at these lengths,
`attention_ops` naming flash or memory-efficient SDPA kernels (not `math`; `_flash_attention_forward` for
flash_varlen, whose step should be no slower than checkpointing_off's), `reference_gap` below 0.001, and `seconds`
(the whole check) under 10 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ZEPHYR_LAYER = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
                "vocab_size": 32000}
CPU_LAYER = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
             "vocab_size": 2048}
# lengths per device: prompt and answer tokens of every example (the plan's worst case is the case measured)
LENGTHS = {"cuda": (512, 256), "cpu": (48, 24)}
SETTINGS = {
    "checkpointing_off": ["training.activation_checkpointing=false"],
    "checkpointing_on": ["training.activation_checkpointing=true"],
    "no_prefix_sharing": ["training.activation_checkpointing=false", "training.prefix_sharing=false"],
    "lora_r16": ["training.activation_checkpointing=true", "training.lora.rank=16"],
    # GPUs only: one FlashAttention-2 varlen call per layer over the packed row (sm80+)
    "flash_varlen": ["training.activation_checkpointing=false", "training.attention=flash_varlen"],
}
GPU_ONLY_SETTINGS = ("flash_varlen",)
# bf16 compute over float32 master weights on a GPU; a CPU without bf16 matmul units runs bf16 at ~1/40 of float32
# (docs/performance.md), so the CPU check computes in float32.
COMPUTE_DTYPE = {"cuda": "bfloat16", "cpu": "float32"}
ACCELERATOR_NAMES = (("H200", "H200"), ("H100", "H100"), ("A100", "A100"), ("L40S", "L40S"), ("L4", "L4"),
                     ("A10G", "A10G"), ("B200", "B200"))


def accelerator_type(device: str) -> str | None:
    """The plan's name of this GPU (A100-80G for an 80 GB A100), or None on a CPU or an unknown card."""
    if device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name(0)
    for marker, label in ACCELERATOR_NAMES:
        if marker in name:
            if label == "A100" and torch.cuda.get_device_properties(0).total_memory > 50 * 2**30:
                return "A100-80G"
            return label
    return None


def build_model(folder: Path, device: str, layers: int) -> None:
    """A random Mistral of zephyr-7b's layer shapes (a small one on a CPU) and a word-level tokenizer, saved as a
    checkpoint folder."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

    shape = ZEPHYR_LAYER if device == "cuda" else CPU_LAYER
    words = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(shape["vocab_size"] - 3))]
    tokenizer = Tokenizer(WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    # spin_ray formats every prompt with the model's chat template: Zephyr's (its token ids do not matter here)
    fast.chat_template = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    torch.manual_seed(0)
    config = MistralConfig(num_hidden_layers=layers, max_position_embeddings=4096, tie_word_embeddings=False,
                           bos_token_id=1, eos_token_id=2, pad_token_id=2, **shape)
    MistralForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)


def rows(count: int, prompt: int, answer: int, vocab: int) -> list[dict]:
    """SPIN rows whose every sequence has exactly `prompt` + `answer` tokens (random ids; no reference: the trainer
    scores it)."""
    import random

    rng = random.Random(0)
    draw = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    return [{"prompt_id": f"p{i:03d}", "prompt_token_ids": draw(prompt), "real_token_ids": draw(answer),
             "generated_token_ids": [draw(answer)]} for i in range(count)]


def attention_ops(model_dir: Path, device: str, overrides: list[str], prompt: int, answer: int) -> list[str]:
    """The scaled-dot-product attention ops one training forward of a micro-batch calls (flash, memory-efficient,
    math ...), from torch's profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from spin_ray.config import load_config
    from spin_ray.models.resolution import load_model
    from spin_ray.objectives.logprobs import answer_logps
    from spin_ray.objectives.packed_attention import use_packed_kernel
    from spin_ray.training.parallel import DTYPES, compute_context

    config = load_config(None, [f"model.name={model_dir}", f"training.use_gpu={device == 'cuda'}", *overrides])
    t = config.training
    model = use_packed_kernel(load_model(str(model_dir), "float32").to(device), t.attention)
    batch = rows(2, prompt, answer, model.config.vocab_size)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as profiler, compute_context(model, DTYPES[t.compute_dtype],
                                                                      torch.device(device)):
        answer_logps(model, [r["prompt_token_ids"] for r in batch],
                     [(r["real_token_ids"], r["generated_token_ids"][0]) for r in batch], 2, pack=t.pack_sequences,
                     logits_chunk_rows=t.logits_chunk_rows, share_prefix=t.prefix_sharing,
                     device=torch.device(device)).sum().backward()
    names = {event.key for event in profiler.key_averages()}
    return sorted(
        name
        for name in names
        if "attention" in name.lower()
        and ("sdp" in name.lower() or "flash" in name.lower() or "efficient" in name.lower())
    )


def check_setting(name: str, overrides: list[str], model_dir: Path, device: str, steps: int, folder: Path,
                  accelerator: str | None) -> dict:
    import torch

    from spin_ray.config import load_config
    from spin_ray.plan import ACCELERATORS, ModelShape, micro_batch_flops, training_shape
    from spin_ray.training.loop import WorkerContext, read_metrics_log, train

    prompt, answer = LENGTHS[device]
    global_batch, micro_batch = (8, 4) if device == "cuda" else (4, 2)
    config = load_config(None, [
        f"model.name={model_dir}", f"data.max_prompt_tokens={prompt}", f"data.max_response_tokens={answer}",
        f"generation.max_new_tokens={answer - 1}", f"training.global_batch_size={global_batch}",
        f"training.micro_batch_size={micro_batch}", "training.epochs=1", "training.learning_rate=1e-6",
        "training.reference=trainer", "training.warmup_ratio=0", f"training.use_gpu={device == 'cuda'}",
        f"training.cpus_per_worker={os.cpu_count() if device == 'cpu' else 8}",
        "training.nll_weight=0", "training.length_normalize=false", "training.checkpoint_every=1000",
        *([f"training.accelerator_type={accelerator}"] if accelerator else []),
        *(["model.dtype=bfloat16"] if device == "cuda" else []),  # the export: half the bytes to write
        f"training.compute_dtype={COMPUTE_DTYPE[device]}", *overrides])
    data = rows(global_batch * steps, prompt, answer, ModelShape.from_config(
        json.loads((model_dir / "config.json").read_text())).vocab)
    if device == "cuda":
        torch.cuda.empty_cache()
    started = time.perf_counter()
    summary = train(config, data, str(model_dir), str(folder / name / "train"), str(folder / name / "model"),
                    WorkerContext(0, 1, torch.device(device)))
    log = read_metrics_log(str(folder / name / "train"))
    shape = ModelShape.from_config(json.loads((model_dir / "config.json").read_text()))
    run = training_shape(config, 1, summary.activation_checkpointing, summary.sharded_accumulation)
    step_flops = micro_batch_flops(shape, run) * (global_batch // micro_batch)
    seconds = statistics.median(line["seconds"] for line in log[1:] or log)  # step 1 warms the kernels up
    peak = ACCELERATORS[accelerator].peak_tflops * 1e12 if accelerator in ACCELERATORS else None
    checked = summary.plan_check
    memory = checked.get("peak_memory", {})
    return {
        "setting": name, "overrides": overrides, "compute_dtype": COMPUTE_DTYPE[device],
        "steps": summary.steps, "tokens_per_second": round(summary.training_tokens_per_second or 0, 1),
        "step_seconds": round(seconds, 4), "planned_step_seconds": checked.get("step_seconds", {}).get("planned"),
        "mfu": round(step_flops / seconds / peak, 3) if peak else None,
        "measured_peak_gib": round(memory["measured"] / 2**30, 3) if memory else None,
        "planned_peak_gib": round(memory["planned"] / 2**30, 3) if memory else None,
        "memory_error": memory.get("error"),
        "reference_gap": log[0].get("reference_gap"),
        "activation_checkpointing": summary.activation_checkpointing,
        "attention_ops": attention_ops(model_dir, device, config_overrides(config), prompt, answer),
        "seconds": round(time.perf_counter() - started, 1),
    }


def config_overrides(config) -> list[str]:
    """The training settings that shape a forward, as overrides (for the attention profile's own forward)."""
    t = config.training
    return [f"training.compute_dtype={t.compute_dtype}", f"training.prefix_sharing={t.prefix_sharing}",
            f"training.pack_sequences={t.pack_sequences}", f"training.logits_chunk_rows={t.logits_chunk_rows}",
            f"training.attention={t.attention}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when there is one")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--only", help="comma-separated setting names (default: all)")
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args()
    started = time.perf_counter()
    import torch
    import torch.distributed as dist

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        torch.cuda.set_device(0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    accelerator = accelerator_type(device)
    chosen = (args.only.split(",") if args.only
              else [name for name in SETTINGS if device == "cuda" or name not in GPU_ONLY_SETTINGS])
    settings = {name: SETTINGS[name] for name in chosen}
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as folder:
        model_dir = Path(folder) / "model"
        build_model(model_dir, device, args.layers)
        for name, overrides in settings.items():
            results.append(check_setting(name, overrides, model_dir, device, args.steps, Path(folder), accelerator))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    dist.destroy_process_group()
    report = {
        "benchmark": "gpu_check: spin_ray's training step on one device, measured beside spin-ray plan",
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"cpu ({platform.processor() or 'unknown'})",
        "accelerator_type": accelerator, "layers": args.layers,
        "model": "random Mistral, zephyr-7b's layer shapes" if device == "cuda" else "random Mistral, small shape",
        "lengths": dict(zip(("prompt", "answer"), LENGTHS[device], strict=True)),
        "torch": torch.__version__, "imported_ray": "ray" in sys.modules, "imported_vllm": "vllm" in sys.modules,
        "settings": results, "seconds": round(time.perf_counter() - started, 1),
    }
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
