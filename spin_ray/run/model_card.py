"""Model cards: a Hugging Face README.md for every exported model, with what made it and how it scored held out."""

from __future__ import annotations

from spin_ray.models.resolution import MODEL_CARD
from spin_ray.run.layout import RunLayout
from spin_ray.storage import atomic_write_bytes, join

# Hub ids of the built-in aliases and datasets, for the card's base_model and datasets fields.
HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}
DATASET_IDS = {"gsm8k": "openai/gsm8k", "gsm8k:train": "openai/gsm8k", "gsm8k:test": "openai/gsm8k"}
METRICS = (
    ("accuracy", "GSM8K exact match (spin_ray's rule)"),
    ("accuracy_lm_eval_strict", "exact match, lm-eval strict"),
    ("accuracy_lm_eval_flexible", "exact match, lm-eval flexible"),
    ("nll_per_token", "NLL per token of human answers"),
    ("reward_accuracy", "reward accuracy vs its opponent"),
    ("answer_format_rate", "answers ending in #### <number>"),
)


def model_card(manifest: dict, iteration: int | None, merged: bool = False):
    """The card of the model trained in `iteration` (None: the SFT warm start), from the run's manifest; `merged`: a
    LoRA adapter written merged into its base."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    config = manifest["config"]
    if iteration is None:
        algorithm = "sft" if manifest["phases"].get("sft") else "none (the start model)"
    else:
        algorithm = config.get("algorithm", "spin")
    phases = manifest["phases"] if iteration is None else manifest["iterations"][iteration]["phases"]
    evaluation = (phases.get("evaluate" if iteration is not None else "baseline_eval") or {}).get("metrics") or {}
    train_metrics = (phases.get("sft" if iteration is None else "train") or {}).get("metrics") or {}
    name = f"{manifest['run']}-{'sft' if iteration is None else f'iter{iteration}'}"
    chosen = manifest.get("selected_model") or {}
    selected_here = chosen.get("value") is not None and chosen.get("iteration") == iteration
    held_out = config["data"].get("eval")
    results = [EvalResult(task_type="text-generation", dataset_type=DATASET_IDS.get(held_out, held_out or "held-out"),
                          dataset_name=held_out or "held-out", metric_type=key, metric_name=label,
                          metric_value=evaluation[key]) for key, label in METRICS if evaluation.get(key) is not None]
    data = ModelCardData(
        model_name=name, base_model=HUB_IDS.get(config["model"]["name"], config["model"]["name"]),
        datasets=[DATASET_IDS.get(config["data"]["train"], config["data"]["train"])], library_name="transformers",
        pipeline_tag="text-generation", tags=["spin_ray", "self-play", algorithm, "ray"],
        eval_results=results or None,
        spin_ray={"algorithm": algorithm, "iteration": iteration, "config_hash": manifest["config_hash"],
                  "selected": selected_here,
                  "code_version": manifest.get("code_version"), "run": manifest["run_dir"]},
    )
    trained = phases.get("sft" if iteration is None else "train")
    lora = (config["training"].get("lora") or {}).get("rank", 0) if trained else 0
    if lora and not merged:  # the folder is PEFT's adapter of the base model, not a whole model
        data.library_name = "peft"
        data.tags = [*data.tags, "lora"]
    opponent = manifest["base_model"] if iteration is None else manifest["iterations"][iteration].get("opponent")
    lines = [
        f"# {name}",
        "",
        f"Trained by spin_ray (Ray-native self-play fine-tuning) with **{algorithm}**"
        + ("" if iteration is None else f", self-play iteration {iteration}, against opponent `{opponent}`")
        + f", on `{config['data']['train']}`.",
        "",
        f"Run `{manifest['run']}`, config hash `{manifest['config_hash']}`, code {manifest.get('code_version')}.",
        "",
    ]
    if lora and merged:
        lines += [f"Base `{data.base_model}` with the run's LoRA adapter (rank {lora}) merged into its weights.", ""]
    elif lora:
        lines += [f"A LoRA adapter (rank {lora}, PEFT's layout) of `{data.base_model}`: load it with "
                  f"`PeftModel.from_pretrained(base, folder)`, or serve it with vLLM's LoRA requests; "
                  f"`spin-ray export --merged` writes base + adapter as one model.", ""]
    if train_metrics:
        shown = ", ".join(f"{k} {train_metrics[k]:.4g}" for k in ("steps", "loss", "rewards/margins",
                                                                  "rewards/accuracies")
                          if isinstance(train_metrics.get(k), (int, float)))
        lines += [f"Training: {shown}.", ""]
    if results:
        lines += [
            f"Held out (`{held_out}`, {evaluation.get('prompts')} prompts):",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        lines += [f"| {r.metric_name} | {r.metric_value:.4g} |" for r in results] + [""]
    if evaluation.get("validation_prompts"):
        shown = ", ".join(f"{key} {evaluation[f'validation_{key}']:.4g}" for key in ("nll_per_token", "accuracy")
                          if evaluation.get(f"validation_{key}") is not None)
        lines += [f"Validation split ({evaluation['validation_prompts']} prompts): {shown}.", ""]
    if selected_here:
        lines += [f"This is the run's selected model: the best on its validation split ({chosen['by']}).", ""]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))


def write_model_card(layout: RunLayout, manifest: dict, iteration: int | None) -> str:
    """Write README.md into the model folder of `iteration`; returns its URL."""
    url = join(layout.model(iteration), MODEL_CARD)
    atomic_write_bytes(url, str(model_card(manifest, iteration)).encode())
    return url
