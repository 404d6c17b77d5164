"""Distributed checkpoints (torch.distributed.checkpoint) committed by a marker, and the final HF export.

A checkpoint is `{train_dir}/checkpoints/step_{N}/`: every rank writes its shards of the model and
optimizer through DCP (reshardable: a 2-worker checkpoint loads into 1 worker), then, after a
barrier, rank 0 writes `_COMMITTED.json` (step, scheduler, RNG) last. A folder without the marker
is an interrupted write and is ignored, on local disks and object stores alike. DCP picks its storage
from the checkpoint id: files on a local path, fsspec for a bucket URL, so each rank writes its own
shards straight to the bucket.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from spin_ray.models.adapters import is_adapted, write_adapter
from spin_ray.models.resolution import (
    FOLDER_MARKER,
    folder_complete,
    folder_digest,
    load_model,
    load_tokenizer,
    publish_folder,
)
from spin_ray.storage import (
    atomic_write_json,
    download_folder,
    exists,
    filesystem,
    is_local,
    join,
    list_dir,
    read_json,
    remove,
)

COMMITTED = "_COMMITTED.json"


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def checkpoint_dir(train_dir: str, step: int) -> str:
    return join(train_dir, "checkpoints", f"step_{step:08d}")


def committed_steps(train_dir: str) -> list[int]:
    """Steps with a committed checkpoint, read from the store (never from a cached listing)."""
    steps = []
    for entry in list_dir(join(train_dir, "checkpoints")):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("step_") and exists(join(entry, COMMITTED)):
            steps.append(int(name[5:]))
    return sorted(steps)


def _states(model, optimizer) -> tuple[dict, dict, StateDictOptions]:
    """The model's and optimizer's DCP states and the options to set them back. With LoRA only the adapters are
    saved and loaded: the frozen base comes from the model the stage started from, and a checkpoint of a 7B base
    would be 28 GB per save for a few MB of change. torch 2.13's ignore_frozen_params still returns a tied head
    (lm_head.weight, a frozen alias of the embedding: 12.6 MB of a 13 MB tiny model), so the state keeps only the
    trainable parameters' names."""
    adapted = is_adapted(model)
    options = StateDictOptions(ignore_frozen_params=adapted, strict=not adapted)
    model_state, optim_state = get_state_dict(model, optimizer, options=options)
    if adapted:
        trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
        model_state = {name: value for name, value in model_state.items() if name in trainable}
    return model_state, optim_state, options


def save_checkpoint(train_dir: str, step: int, model, optimizer, state: dict, rank: int, keep: int) -> str:
    """Collective: every rank writes its shards; rank 0 commits and prunes to the last `keep`."""
    target = checkpoint_dir(train_dir, step)
    model_state, optim_state, _ = _states(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=target)
    _commit(train_dir, step, state, rank, keep)
    return target


def _commit(train_dir: str, step: int, state: dict, rank: int, keep: int) -> None:
    """Collective, once every rank's shards are written: rank 0 writes the marker and prunes to the last `keep`."""
    _barrier()
    if rank == 0:
        atomic_write_json(join(checkpoint_dir(train_dir, step), COMMITTED), {**state, "step": step})
        for old in committed_steps(train_dir)[:-keep]:
            remove(checkpoint_dir(train_dir, old))
    _barrier()


class PendingCheckpoint:
    """A checkpoint whose shards are being written in the background (DCP's async_save: the state is first copied to
    host memory, so training goes on changing the model). It counts only once committed: `commit()` waits for every
    rank's writes, then writes the marker, as a blocking save does. A stage that dies first resumes from the
    checkpoint before it."""

    def __init__(self, future, train_dir: str, step: int, state: dict, rank: int, keep: int, started: float):
        self.future, self.train_dir, self.step, self.state = future, train_dir, step, state
        self.rank, self.keep, self.started = rank, keep, started

    def written_everywhere(self, device) -> bool:
        """Collective: whether every rank's background writes are done (no rank waits for them)."""
        import torch

        done = torch.tensor([1.0 if self.future.done() else 0.0], device=device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(done, op=dist.ReduceOp.MIN)
        return bool(done.item())

    def commit(self) -> float:
        """Collective: wait for this rank's writes, commit; returns the seconds since the save began."""
        import time

        self.future.result()
        _commit(self.train_dir, self.step, self.state, self.rank, self.keep)
        return time.monotonic() - self.started


_ASYNC_GROUP = {}


def save_checkpoint_async(train_dir: str, step: int, model, optimizer, state: dict, rank: int,
                          keep: int) -> PendingCheckpoint:
    """Collective: stage every rank's shards in host memory and write them in a background thread
    (torch.distributed.checkpoint.async_save); commit with the returned PendingCheckpoint. DCP coordinates an
    asynchronous save over a CPU (gloo) group: on NCCL one is made once, beside the training group."""
    import time

    started = time.monotonic()
    target = checkpoint_dir(train_dir, step)
    model_state, optim_state, _ = _states(model, optimizer)
    group = None
    if dist.is_available() and dist.is_initialized() and "gloo" not in str(dist.get_backend()):
        if "group" not in _ASYNC_GROUP:
            _ASYNC_GROUP["group"] = dist.new_group(backend="gloo")
        group = _ASYNC_GROUP["group"]
    future = dcp.async_save({"model": model_state, "optim": optim_state}, checkpoint_id=target, process_group=group)
    return PendingCheckpoint(future, train_dir, step, state, rank, keep, started)


def drop_checkpoints(train_dir: str, rank: int) -> None:
    """Rank 0 removes every checkpoint of a stage whose export is complete. The export supersedes them: the next
    iteration starts a fresh optimizer from the exported weights, and a finished stage is never resumed. A
    checkpoint holds the weights plus the optimizer's state (2x the export with RMSprop, 3x with AdamW), which a
    bucket would otherwise keep for every iteration."""
    if rank == 0:
        remove(join(train_dir, "checkpoints"))


def load_checkpoint(train_dir: str, step: int, model, optimizer) -> dict:
    """Collective: load the sharded model and optimizer (any world size) and return the trainer state."""
    target = checkpoint_dir(train_dir, step)
    model_state, optim_state, options = _states(model, optimizer)
    payload = {"model": model_state, "optim": optim_state}
    dcp.load(payload, checkpoint_id=target)
    set_state_dict(model, optimizer, model_state_dict=payload["model"], optim_state_dict=payload["optim"],
                   options=options)
    return read_json(join(target, COMMITTED))


def export_hf(model, tokenizer, target_url: str, rank: int, dtype: str = "float32") -> str | None:
    """Collective: gather the full weights; rank 0 writes a Hugging Face folder (safetensors, tokenizer,
    chat template) in `dtype` (model.dtype: what engines serve; training's master weights are float32) that appears
    complete at `target_url`, with its content hash in the marker. It is the next opponent, which every node stages
    from there. A model with LoRA layers exports its adapter only (PEFT's layout, float32: adapters.write_adapter)."""
    import torch

    adapted = is_adapted(model)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=adapted))
    if rank != 0:
        _barrier()
        return None
    served = getattr(torch, dtype)

    def write(staging: str) -> None:
        if adapted:
            write_adapter(staging, model, full)
        else:
            weights = {name: value.to(served) if value.is_floating_point() else value for name, value in full.items()}
            model.save_pretrained(staging, state_dict=weights, safe_serialization=True)
            _name_dtype(staging, dtype)
        tokenizer.save_pretrained(staging)

    _publish(target_url, write)
    _barrier()
    return target_url


def export_merged(adapter_url: str, target_url: str, dtype: str, trust_remote_code: bool, rank: int) -> str | None:
    """Collective: rank 0 writes the merged model of the adapter exported at `adapter_url` (its base staged and
    loaded on the CPU in float32, the adapter merged by PEFT, saved in `dtype`) as a whole model at `target_url`."""
    if rank != 0:
        _barrier()
        return None

    model = load_model(adapter_url, dtype, trust_remote_code)
    tokenizer = load_tokenizer(adapter_url, trust_remote_code)

    def write(staging: str) -> None:
        model.save_pretrained(staging, safe_serialization=True)
        _name_dtype(staging, dtype)
        tokenizer.save_pretrained(staging)

    _publish(target_url, write)
    _barrier()
    return target_url


def _publish(target_url: str, write) -> None:
    """Rank 0: `write(folder)` into a staging folder, then make it appear complete at `target_url`."""
    local = is_local(target_url)
    path = filesystem(target_url)[1]
    # Local: stage beside the target, so the final move is a rename and no reader sees half a folder.
    parent = os.path.dirname(path) if local else None
    if parent:
        os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        write(staging)
        if local:
            import json

            with open(os.path.join(staging, FOLDER_MARKER), "w") as handle:
                json.dump(folder_digest(staging), handle)
            if os.path.exists(path):
                shutil.rmtree(path)
            os.rename(staging, path)
        else:
            publish_folder(staging, target_url)  # the marker goes up last
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging, ignore_errors=True)


def _name_dtype(folder: str, dtype: str) -> None:
    """config.json names the dtype of the weights beside it (save_pretrained writes the training model's, float32)."""
    import json

    path = os.path.join(folder, "config.json")
    with open(path) as handle:
        config = json.load(handle)
    config["dtype"] = dtype
    with open(path, "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)


def copy_export(source_url: str, target_url: str, rank: int) -> str | None:
    """Collective: rank 0 publishes a copy of the complete export at `source_url` as the export at `target_url`
    (staged and renamed on a local disk, marker last on a bucket); the other ranks wait for it."""
    if rank != 0:
        _barrier()
        return None
    with tempfile.TemporaryDirectory(prefix="spin-ray-export-") as scratch:
        folder = filesystem(source_url)[1]
        if not is_local(source_url):
            folder = os.path.join(scratch, "model")
            download_folder(source_url, folder, skip=(FOLDER_MARKER,))  # publish_folder writes it last
        if is_local(target_url):
            path = filesystem(target_url)[1]
            staging = tempfile.mkdtemp(prefix=".export-", dir=os.path.dirname(path) or None)
            os.rmdir(staging)
            shutil.copytree(folder, staging)
            if os.path.exists(path):
                shutil.rmtree(path)
            os.rename(staging, path)
        else:
            publish_folder(folder, target_url)
    _barrier()
    return target_url


def export_complete(target_url: str) -> bool:
    return folder_complete(target_url)
