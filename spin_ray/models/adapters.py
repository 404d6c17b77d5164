"""LoRA adapters through PEFT: injecting them for training, adapter folders on disk, applying and merging them.

An adapter folder is PEFT's own layout (adapter_config.json + adapter_model.safetensors, keys prefixed
`base_model.model.`), so PEFT, vLLM's LoRA requests and the hub read it as they are; it also carries the tokenizer,
so every stage that reads a model's tokenizer reads it from the adapter. `base_model_name_or_path` holds the base as
the run names it (an alias, a storage URL, a folder): each node resolves and stages the base once and then only the
adapters. No Ray here.
"""

from __future__ import annotations

import copy
import json
import os

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PeftModel's state-dict prefix: the model it wraps is `base_model.model`.
PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """A LoRA setting or adapter folder that cannot be used; the message names the key or file."""


def adapter_base(folder: str) -> str | None:
    """The base model an adapter folder applies to (as the run named it), or None for a folder holding a whole model."""
    path = os.path.join(folder, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        base = json.load(handle).get("base_model_name_or_path")
    if not base:
        raise AdapterError(f"{path}: no base_model_name_or_path; spin_ray cannot tell which model it adapts")
    return base


def adapter_rank(folder: str) -> int:
    """The rank r of the adapter saved in `folder`."""
    with open(os.path.join(folder, ADAPTER_CONFIG)) as handle:
        return int(json.load(handle)["r"])


def adapter_modules(folder: str) -> list[str]:
    """Names of the modules an adapter folder's weights adapt (q_proj, ...), read from its safetensors header."""
    from safetensors import safe_open

    with safe_open(os.path.join(folder, ADAPTER_WEIGHTS), framework="pt") as weights:
        return sorted({key.split(".lora_")[0].rsplit(".", 1)[-1] for key in weights.keys() if ".lora_" in key})


def is_adapted(model: torch.nn.Module) -> bool:
    """Whether LoRA layers were injected into `model` (`inject`, `load_adapter`)."""
    return bool(getattr(model, "peft_config", None))


def lora_config(lora, base: str):
    """PEFT's LoraConfig of a `training.lora` section, for the base model named `base`."""
    from peft import LoraConfig

    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    return LoraConfig(r=lora.rank, lora_alpha=lora.alpha if lora.alpha is not None else lora.rank,
                      lora_dropout=lora.dropout, target_modules=targets, task_type="CAUSAL_LM",
                      base_model_name_or_path=base)


def inject(model: torch.nn.Module, config) -> torch.nn.Module:
    """Add fresh LoRA layers to `model` in place (A random, B zero: the model's outputs do not change) and freeze
    everything else. The model stays a plain transformers model, so sharding, checkpointing and the log-prob code
    see the same modules with LoRA inside them. Works on the meta device too. Every named target module must exist:
    PEFT refuses a list only when none of it matches, and a misspelt name would silently train fewer layers."""
    from peft import inject_adapter_in_model
    from peft.utils.error import NoMatchingPeftModuleError

    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    names = {name.rsplit(".", 1)[-1] for name in linear}
    targets = config.target_modules  # leaf names, or full module paths (PEFT saves all-linear resolved to paths)
    missing = sorted(set(targets) - names - set(linear)) if not isinstance(targets, str) else []
    refusal = (f"training.lora.target_modules: {missing or targets} not in {type(model).__name__}; its linear "
               f"layers are {sorted(names)} (or use all-linear)")
    if missing:
        raise AdapterError(refusal)
    try:
        return inject_adapter_in_model(config, model)
    except NoMatchingPeftModuleError:
        raise AdapterError(refusal) from None


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's saved keys from a LoRA-injected model's own (trainable) state dict: the adapter name dropped, the
    PeftModel prefix added (model.layers.0.q_proj.lora_A.default.weight -> base_model.model.model.layers.0.q_proj.
    lora_A.weight)."""
    return {PEFT_PREFIX + name.replace(".default.", ".").replace(".default", ""): value
            for name, value in state.items() if "lora_" in name}


def saved_config(folder: str):
    """The LoraConfig saved in an adapter folder, made trainable."""
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(folder)
    config.inference_mode = False
    return config


def load_adapter(model: torch.nn.Module, folder: str) -> torch.nn.Module:
    """Inject the adapter saved in `folder` into `model` (in place) with its trained weights; trainable."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    model = inject(model, saved_config(folder))
    weights = load_file(os.path.join(folder, ADAPTER_WEIGHTS))
    result = set_peft_model_state_dict(model, {name.removeprefix(PEFT_PREFIX): v for name, v in weights.items()})
    if result.unexpected_keys:
        raise AdapterError(f"{folder}: {len(result.unexpected_keys)} adapter weights fit no module of the base model "
                           f"(e.g. {result.unexpected_keys[0]}); is it an adapter of another model?")
    return model


def write_adapter(folder: str, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Write PEFT's adapter layout into `folder`: `state` is the injected model's full trainable state (rank 0's
    gather). Kept in float32 whatever model.dtype is: the next iteration trains on from these weights, and a bf16
    copy would round away steps of the paper's learning rate (parallel.py)."""
    from safetensors.torch import save_file

    weights = {name: value.detach().to(torch.float32).contiguous() for name, value in adapter_state(state).items()}
    if not weights:
        raise AdapterError("the model holds no LoRA weights to export")
    save_file(weights, os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = copy.deepcopy(model.peft_config["default"])
    config.inference_mode = True  # as PEFT saves it: the folder serves; load_adapter makes it trainable again
    config.save_pretrained(folder)


def merged_model(base_model: torch.nn.Module, folder: str) -> torch.nn.Module:
    """`base_model` with the adapter in `folder` merged into its weights (PEFT's merge_and_unload): a whole model that
    answers as base + adapter does."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, folder).merge_and_unload()
