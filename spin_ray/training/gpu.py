"""A training worker's GPU before it loads the model: is the memory the plan needs free, and who holds the rest.

Ray counts a GPU as free once the actor that reserved it is gone, but memory is freed by processes: an engine's child
that outlived its replica (ray-project/ray#54364), or any other process on the card, can keep what training needs,
and the load then fails deep in CUDA with an out-of-memory error naming nobody. This check waits a bounded time for
such memory to come back, then refuses in one line naming the processes and what each holds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

GB = 1024**3
# How long a worker waits for memory another process holds: an engine shutting down frees it within seconds.
GPU_RELEASE_WAIT_S = 120.0


class GPUBusyError(RuntimeError):
    """The GPU a training worker was given has less free memory than training needs; the message names who holds it."""


@dataclass(frozen=True)
class Holder:
    pid: int
    name: str
    bytes: int


def gpu_holders(index: int) -> list[Holder]:
    """The processes other than this one that hold memory on GPU `index` (NVML, through pynvml; [] without it)."""
    try:
        import pynvml
    except ImportError:
        return []
    import psutil

    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except pynvml.NVMLError:
        return []
    holders = []
    for process in processes:
        if process.pid == os.getpid():
            continue
        try:
            name = " ".join(psutil.Process(process.pid).cmdline())[:80] or "?"
        except psutil.Error:  # in another container's pid namespace, or gone
            name = "a process this container cannot see"
        holders.append(Holder(process.pid, name, int(process.usedGpuMemory or 0)))
    return holders


def busy_message(index: int, free: int, total: int, needed: int, holders: list[Holder], waited_s: float) -> str:
    """The one-line refusal: the GPU, what is free of what training needs, and who holds the rest."""
    held = "; ".join(f"pid {h.pid} ({h.name}) {h.bytes / GB:.1f} GiB" for h in sorted(holders, key=lambda h: -h.bytes))
    who = f"held by {held}" if held else "held by processes NVML does not list (another container's)"
    return (
        f"training: GPU {index} has {free / GB:.1f} GiB free of {total / GB:.1f} GiB after waiting {waited_s:.0f}s, "
        f"and a worker needs {needed / GB:.1f} GiB (spin-ray plan); the rest is {who}. An engine of the last "
        "generation pass that did not exit would show here: end that process, or give training a GPU of its own "
        "(training.accelerator_type)"
    )


def wait_for_free_gpu(index: int, needed: int, limit_s: float = GPU_RELEASE_WAIT_S,
                      memory: Callable[[], tuple[int, int]] | None = None,
                      holders: Callable[[], list[Holder]] | None = None,
                      sleep: Callable[[float], None] = time.sleep) -> float:
    """Wait (at most `limit_s`) until GPU `index` has `needed` bytes free; return the seconds waited, or raise
    GPUBusyError naming who holds the memory. `memory` reads (free, total) (CUDA's mem_get_info), `holders` the
    processes on the GPU (NVML)."""
    if memory is None:
        import torch

        def memory() -> tuple[int, int]:
            return torch.cuda.mem_get_info(index)
    holders = holders or (lambda: gpu_holders(index))
    started = time.monotonic()
    while True:
        free, total = memory()
        waited = time.monotonic() - started
        if free >= needed:
            return waited
        if waited >= limit_s:
            raise GPUBusyError(busy_message(index, free, total, needed, holders(), waited))
        sleep(min(2.0, max(0.1, limit_s - waited)))
