"""Distributed checkpoints (torch.distributed.checkpoint) committed by a marker, and the final HF export.

A checkpoint is `{train_dir}/checkpoints/step_{N}/`: every rank writes its shards of the model and
optimizer through DCP (reshardable: a 2-worker checkpoint loads into 1 worker), then, after a
barrier, rank 0 writes `_COMMITTED.json` (step, scheduler, RNG) last. A folder without the marker
is an interrupted write and is ignored, on local disks and object stores alike.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import fsspec
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fsspec.implementations.local import LocalFileSystem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from spin_ray.storage import atomic_write_json, read_json

COMMITTED = "_COMMITTED.json"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _is_local(url: str) -> bool:
    return isinstance(fsspec.core.url_to_fs(url)[0], LocalFileSystem)


def checkpoint_dir(train_dir: str, step: int) -> str:
    return f"{train_dir.rstrip('/')}/checkpoints/step_{step:08d}"


def committed_steps(train_dir: str) -> list[int]:
    fs, path = fsspec.core.url_to_fs(f"{train_dir.rstrip('/')}/checkpoints")
    if not fs.exists(path):
        return []
    steps = []
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("step_") and fs.exists(f"{entry.rstrip('/')}/{COMMITTED}"):
            steps.append(int(name[5:]))
    return sorted(steps)


def save_checkpoint(train_dir: str, step: int, model, optimizer, state: dict, rank: int, keep: int) -> str:
    """Collective: every rank writes its shards; rank 0 commits and prunes to the last `keep`."""
    target = checkpoint_dir(train_dir, step)
    model_state, optim_state = get_state_dict(model, optimizer)
    writer = dcp.FileSystemWriter(target) if _is_local(target) else _fsspec_writer(target)
    dcp.save({"model": model_state, "optim": optim_state}, storage_writer=writer)
    _barrier()
    if rank == 0:
        atomic_write_json(f"{target}/{COMMITTED}", {**state, "step": step})
        for old in committed_steps(train_dir)[:-keep]:
            fs, path = fsspec.core.url_to_fs(checkpoint_dir(train_dir, old))
            fs.rm(path, recursive=True)
    _barrier()
    return target


def load_checkpoint(train_dir: str, step: int, model, optimizer) -> dict:
    """Collective: load the sharded model and optimizer (any world size) and return the trainer state."""
    target = checkpoint_dir(train_dir, step)
    model_state, optim_state = get_state_dict(model, optimizer)
    reader = dcp.FileSystemReader(target) if _is_local(target) else _fsspec_reader(target)
    payload = {"model": model_state, "optim": optim_state}
    dcp.load(payload, storage_reader=reader)
    set_state_dict(model, optimizer, model_state_dict=payload["model"], optim_state_dict=payload["optim"])
    return read_json(f"{target}/{COMMITTED}")


def _fsspec_writer(url: str):
    from torch.distributed.checkpoint import FsspecWriter

    return FsspecWriter(url)


def _fsspec_reader(url: str):
    from torch.distributed.checkpoint import FsspecReader

    return FsspecReader(url)


def export_hf(model, tokenizer, target_url: str, rank: int) -> str | None:
    """Collective: gather the full weights; rank 0 writes a Hugging Face folder (safetensors, tokenizer,
    chat template) that appears atomically, complete, at `target_url`. It is the next opponent."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        _barrier()
        return None
    fs, path = fsspec.core.url_to_fs(target_url)
    # Local: stage beside the target, so the final move is a rename and no reader sees half a folder.
    parent = os.path.dirname(path) if _is_local(target_url) else None
    if parent:
        os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        model.save_pretrained(staging, state_dict=full, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        marker = json.dumps({"complete": True}).encode()
        if _is_local(target_url):
            with open(os.path.join(staging, "spin_ray_export.json"), "wb") as handle:
                handle.write(marker)
            if os.path.exists(path):
                shutil.rmtree(path)
            os.rename(staging, path)
        else:
            if fs.exists(path):
                fs.rm(path, recursive=True)
            fs.put(staging.rstrip("/") + "/", path, recursive=True)
            fs.pipe_file(f"{path}/spin_ray_export.json", marker)  # the marker goes up last
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)
    _barrier()
    return target_url


def export_complete(target_url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(target_url)
    return fs.exists(f"{path.rstrip('/')}/spin_ray_export.json")

