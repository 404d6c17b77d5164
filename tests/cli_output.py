"""What a `spin-ray` command itself printed, told apart from the lines Ray forwards from its own processes.

A driver connected to a cluster also prints Ray's forwarded log lines, each prefixed by its source: `(raylet)`,
`(autoscaler +3s)`, `(pid=123)`, `(TrainWorker pid=123, ip=10.0.0.2)`. A raylet on a nearly full disk warns
that way on every connection (seen in CI), which is the machine's news, not the command's output.
"""

from __future__ import annotations

import re

RAY_FORWARDED = re.compile(r"^\((raylet|autoscaler|gcs_server|dashboard)\b[^)]*\) |^\([^)]*\bpid=\d+[^)]*\) ")


def own_lines(stderr: str) -> list[str]:
    """The non-empty lines of `stderr` that the command wrote, in order."""
    return [line for line in stderr.strip().splitlines() if line.strip() and not RAY_FORWARDED.match(line)]
