"""Compute processes under Ray: normal CPU priority, a torch thread pool of their size, no library bars in job logs."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def claim_normal_priority() -> bool:
    """Set every thread of this process to niceness 0; True if it worked.

    Ray starts worker processes at niceness 15 so the raylet stays responsive. For the CPU-bound
    engine and training workers that is costly: on the 2-core box a TorchTrainer worker's fp32
    matmul ran at 88 GFLOP/s at niceness 15 and 199 GFLOP/s after this (239 outside Ray).
    Niceness is per thread on Linux, and threads created later inherit it from their creator.
    Lowering niceness needs CAP_SYS_NICE (root in most containers); without it nothing changes.
    """
    if not hasattr(os, "setpriority") or not os.path.isdir("/proc/self/task"):
        return False
    try:
        for thread in os.listdir("/proc/self/task"):
            os.setpriority(os.PRIO_PROCESS, int(thread), 0)
    except (OSError, ValueError) as error:
        log.info("cannot raise worker CPU priority (%s); running at Ray's default niceness", error)
        return False
    return True


def prepare_compute_process(threads: int) -> None:
    """What every compute actor and training worker does first: normal CPU priority, `threads` torch threads (Ray
    does not pass its CPU reservation on to torch), no library progress bars. Processes it starts later (vLLM's)
    inherit the first two. Call it before any heavy import: on the 2-core box an HF replica that started beside a
    busy one took 41-77 s to construct when it imported torch and transformers at Ray's niceness 15, 28-36 s when
    it claimed its priority first (4 s with the box idle)."""
    claim_normal_priority()
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    quiet_library_progress_bars()


def quiet_library_progress_bars() -> None:
    """No transformers or huggingface_hub progress bars in this process. Ray forwards a worker's stderr into the job
    log, where each model load's "Loading weights" bar arrives as a run of carriage-return lines from every actor;
    the job prints its own progress lines."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
