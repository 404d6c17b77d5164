"""Resolve a config's model and data into tokenized pairs and a printable summary (what `validate` shows)."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from spin_ray.config import Config
from spin_ray.data.records import LoadReport, check_records, load_records
from spin_ray.data.tokenization import ChatFormat, LengthReport, apply_length_policy
from spin_ray.models.adapters import AdapterError, adapter_base, inject, lora_config
from spin_ray.models.resolution import ResolvedModel, check_model, load_tokenizer, local_model_path, resolve_model


@dataclass
class TokenizedSplit:
    records: pa.Table  # the kept records (RECORD_SCHEMA)
    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    load: LoadReport
    lengths: LengthReport
    responses_tokenized_alone: int = 0  # where the prompt's ids were not a prefix of prompt + response's


def carved_part(config: Config, source: str) -> str | None:
    """"train" when `source` is data.train and the run carves its validation split out of it (the validation records
    then never reach generation or training), else None."""
    carving = config.data.validation is None and config.data.validation_fraction > 0
    return "train" if carving and source == config.data.train else None


def tokenize_split(source: str, config: Config, chat: ChatFormat, part: str | None = None) -> TokenizedSplit:
    """Load and validate `source` (its training part when the run carves a validation split out of it, or the given
    `part`), render prompts with the chat template, apply the length policy."""
    records, load_report = load_records(source, config.data, part or carved_part(config, source))
    # human answers get the ids an engine's answer has: the text's, as it follows the templated prompt
    prompt_ids, response_ids, alone = chat.in_context_response_ids(records.column("prompt").to_pylist(),
                                                                   records.column("response").to_pylist())
    kept, prompt_ids, response_ids, lengths = apply_length_policy(
        prompt_ids,
        response_ids,
        config.data.max_prompt_tokens,
        config.data.max_response_tokens,
        config.data.overlong,
    )
    if len(kept) != records.num_rows:
        records = records.take(pa.array(kept, pa.int64()))
    return TokenizedSplit(records, prompt_ids, response_ids, load_report, lengths, alone)


def check_inputs(config: Config, model: str | None = None, train: bool = True, evaluation: bool | None = None) -> str:
    """Refuse a run's missing or bad inputs before Ray starts: the model spec, then every row a run will read of
    data.train (up to data.limit) and of data.eval (up to evaluation.prompts), with the loader's own file/row/field
    errors. Returns one line saying what was checked."""
    checked = [f"model {check_model(model or config.model.name, config.model.cache_dir)}"]
    if train and config.training.lora.rank > 0:
        checked.append(check_lora(config, model or config.model.name))
    if train:
        checked.append(check_records(config.data.train, config.data, carved_part(config, config.data.train)).summary())
        validation = config.data.model_copy(update={"limit": config.evaluation.validation_prompts})
        if config.data.validation is not None:
            checked.append(check_records(config.data.validation, validation).summary())
        elif carved_part(config, config.data.train):
            checked.append(check_records(config.data.train, validation, "validation").summary())
    if config.data.eval is not None and (config.evaluation.enabled if evaluation is None else evaluation):
        held_out = config.data.model_copy(update={"limit": config.evaluation.prompts})
        checked.append(check_records(config.data.eval, held_out).summary())
    return "; ".join(checked)


def check_lora(config: Config, model: str) -> str:
    """Refuse training.lora settings the model cannot take (a target module it lacks), from its config.json alone:
    the adapters are injected into a weightless (meta-device) copy of the model. Returns what would train."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    path = local_model_path(model, config.model.cache_dir, weights=False)
    if adapter_base(path):  # a LoRA model already: its own adapter trains on
        return f"LoRA: trains on the adapter at {model}"
    trust = config.model.trust_remote_code
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, trust_remote_code=trust),
                                                    trust_remote_code=trust)
    adapted = inject(skeleton, lora_config(config.training.lora, model))
    if config.generation.engine == "vllm" and "lm_head" in adapted.peft_config["default"].target_modules:
        raise AdapterError("training.lora.target_modules: lm_head cannot be served by the vLLM engine (its prompt "
                           "log-probs leave the head's adapter out, vllm-project/vllm#51594); leave it out")
    trainable = sum(parameter.numel() for parameter in adapted.parameters() if parameter.requires_grad)
    total = sum(parameter.numel() for parameter in adapted.parameters())
    return f"LoRA rank {config.training.lora.rank}: {trainable:,} trainable parameters ({trainable / total:.2%})"


def validate(config: Config) -> dict:
    """Resolve the model, load every split and tokenize it; return a summary dict (raises on bad input)."""
    from transformers import AutoConfig

    resolved: ResolvedModel = resolve_model(config.model.name, config.model.cache_dir)
    model_config = AutoConfig.from_pretrained(resolved.path, trust_remote_code=config.model.trust_remote_code)
    tokenizer = load_tokenizer(resolved.path, config.model.trust_remote_code)
    chat = ChatFormat(tokenizer)
    summary = {
        "config_fingerprint": config.fingerprint(),
        "model": {
            "spec": resolved.spec,
            "path": resolved.path,
            "source": resolved.source,
            "architecture": (model_config.architectures or [model_config.model_type])[0],
            "layers": getattr(model_config, "num_hidden_layers", None),
            "hidden_size": getattr(model_config, "hidden_size", None),
            "vocab_size": getattr(model_config, "vocab_size", None),
            "end_of_turn": tokenizer.decode(chat.end_of_turn_ids),
        },
        "data": {},
        "run": {"name": config.run.name, "storage_path": config.run.storage_path},
    }
    splits = {"train": config.data.train}
    if config.data.eval:
        splits["eval"] = config.data.eval
    for split, source in splits.items():
        tokenized = tokenize_split(source, config, chat)
        summary["data"][split] = {
            "source": source,
            "rows_read": tokenized.load.rows_read,
            "records": tokenized.load.records,
            "skipped_invalid": tokenized.load.skipped,
            "skip_examples": tokenized.load.skip_examples[:3],
            "duplicates": tokenized.load.duplicates,
            "pairs": tokenized.lengths.kept,
            "overlong_policy": config.data.overlong,
            "overlong_dropped": tokenized.lengths.dropped,
            "overlong_truncated": tokenized.lengths.truncated,
            "responses_tokenized_alone": tokenized.responses_tokenized_alone,
            "prompt_tokens": tokenized.lengths.prompt_tokens,
            "response_tokens": tokenized.lengths.response_tokens,
        }
    return summary


def format_summary(summary: dict) -> str:
    model = summary["model"]
    lines = [
        f"config fingerprint: {summary['config_fingerprint']}",
        f"model: {model['spec']} -> {model['path']} ({model['source']})",
        f"  {model['architecture']}, {model['layers']} layers, hidden {model['hidden_size']}, "
        f"vocab {model['vocab_size']}, end of turn {model['end_of_turn']!r}",
    ]
    for split, info in summary["data"].items():
        lines.append(
            f"{split} data: {info['source']}: {info['records']:,} rows valid of {info['rows_read']:,} read"
            f" ({info['skipped_invalid']} invalid skipped, {info['duplicates']} duplicates dropped)"
        )
        for kind in ("prompt_tokens", "response_tokens"):
            stats = info[kind]
            lines.append(
                f"  {kind.replace('_', ' ')}: mean {stats['mean']}, p50 {stats['p50']}, p95 {stats['p95']}, "
                f"max {stats['max']}, total {stats['total']:,}"
            )
        lines.append(
            f"  over-length policy {info['overlong_policy']!r}: {info['overlong_dropped']} dropped, "
            f"{info['overlong_truncated']} truncated; {info['pairs']:,} pairs ready"
        )
        if info["responses_tokenized_alone"]:
            lines.append(f"  {info['responses_tokenized_alone']:,} responses tokenized alone (their first token merges "
                         "with the prompt's last)")
        for example in info["skip_examples"]:
            lines.append(f"  skipped: {example}")
    lines.append(f"run: {summary['run']['storage_path'].rstrip('/')}/{summary['run']['name']}")
    return "\n".join(lines)
