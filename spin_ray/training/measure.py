"""What a training phase costs as it runs, beside what `spin-ray plan` predicts for it: each step's peak memory, and the
plan's prediction for the phase's actual lengths. No Ray here.

Peak memory is CUDA's caching allocator's (what it reserved from the GPU at most during the step) on a GPU, and the
process's resident high-water mark on a CPU (Linux's VmHWM, reset before each step through /proc/self/clear_refs).
"""

from __future__ import annotations

import statistics

import torch

from spin_ray.plan import ACCELERATORS, Assumptions, ModelShape, PlanError, cpu_training_flops, phase_prediction


class PeakMemory:
    """One device's peak memory over a span of work (a step): `reset()` before it, `peak()` after."""

    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # resets VmHWM to the current resident size
        except OSError:  # not Linux, or not allowed: the high-water mark then spans the process's life
            pass

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_reserved(self.device))
        return resident_high_water()


def resident_high_water() -> int | None:
    """This process's peak resident memory in bytes (VmHWM), or None where /proc is not there."""
    return _status("VmHWM")


def resident_now() -> int | None:
    """This process's resident memory in bytes (VmRSS), or None where /proc is not there."""
    return _status("VmRSS")


def _status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def predict_phase(config, model: torch.nn.Module, examples, memory_layout, world: int, device: torch.device,
                  runtime_bytes: int) -> dict | None:
    """The plan's peak memory per worker at this phase's longest micro-batch and its step time at the mean lengths,
    for the model as loaded (None for a model the plan does not describe, or a GPU it has no rate for).
    `runtime_bytes` is what the process held before the model (its interpreter, libraries and rows on a CPU); on a
    GPU the allocator's peak is compared with the planned tensors alone (the CUDA context is not the allocator's)."""
    try:
        shape = ModelShape.from_config(model.config.to_dict())
    except (PlanError, KeyError, AttributeError):
        return None
    prompts = [len(e.prompt) for e in examples]
    answers = [len(answer) for e in examples for answer in e.answers]
    assumptions, training = Assumptions(), config.training
    if device.type == "cuda":
        gpu = ACCELERATORS.get(training.accelerator_type or "")
        if gpu is None:
            return None
        rate, link, runtime = gpu.peak_tflops * 1e12 * assumptions.training_mfu, assumptions.gpu_link_gbs * 1e9, 0
    else:
        rate = cpu_training_flops(training.cpus_per_worker, world, assumptions)
        link, runtime = assumptions.cpu_link_gbs * 1e9, runtime_bytes
    return phase_prediction(
        config,
        shape,
        world,
        memory_layout.activation_checkpointing,
        memory_layout.sharded_accumulation,
        (max(prompts), max(answers)),
        (round(statistics.mean(prompts)), round(statistics.mean(answers))),
        runtime,
        rate,
        link,
    )


def settle_cpu_rate(prediction: dict | None, device: torch.device, cpus: float, workers: int) -> dict | None:
    """The prediction at the faster of two measurements of this CPU's matmul rate: the phase's start (taken while the
    previous phase's engine processes may still hold the cores: the demo's step read 31% under its plan that way)
    and now, at its end. Compute time scales with the rate; communication does not."""
    if not prediction or device.type == "cuda":
        return prediction

    now = cpu_training_flops(cpus, workers, Assumptions())
    if now <= prediction["flops_per_second"]:
        return prediction
    compute = prediction["step_compute_seconds"] * prediction["flops_per_second"] / now
    return {**prediction, "step_seconds": prediction["step_seconds"] - prediction["step_compute_seconds"] + compute,
            "step_compute_seconds": compute, "flops_per_second": now}
