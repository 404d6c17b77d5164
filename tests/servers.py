"""Servers the tests start as their own child processes and end themselves: a Ray head node, moto's S3 server.

Tests never stop Ray machine-wide (`ray stop` ends every Ray instance on the machine, a user's included). A head
started here is `ray start --head --block`, whose SIGTERM handler stops exactly the processes it started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    """Poll `predicate` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


HEAD_MARKER = "SPIN_RAY_TEST_HEAD"


class RayHead:
    """`ray start --head --block` on loopback as a child process, with a temp dir of its own; `stop()` ends it and
    every process it started (nodes an autoscaler launched and their workers included), and nothing else."""

    def __init__(self, log: Path, num_cpus: int = 2, env: dict | None = None, extra: list[str] | None = None,
                 port: int | None = None):
        import tempfile

        self.port, self.dashboard_port = port or free_port(), free_port()
        # short: Ray's unix sockets live under it, and their paths may not exceed 107 characters
        self.temp_dir = tempfile.mkdtemp(prefix="h", dir=os.environ.get("RAY_TMPDIR"))
        self.env = {**os.environ, **(env or {}), HEAD_MARKER: self.temp_dir}  # inherited by every node and worker
        self.log = open(log, "w")
        command = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={self.port}",
                   f"--dashboard-port={self.dashboard_port}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                   f"--num-cpus={num_cpus}", "--disable-usage-stats", f"--temp-dir={self.temp_dir}", *(extra or [])]
        self.process = subprocess.Popen(command, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: _port_open(self.dashboard_port) or self.process.poll() is not None, 120,
                 f"the Ray head's dashboard on port {self.dashboard_port}")
        if self.process.poll() is not None:
            raise RuntimeError(f"ray start --head exited with {self.process.returncode}; see {log}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _signal_head(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM to the head and, at the same time, to every process it started (`_started_by`), then SIGKILL to
        what is left: nodes an autoscaler started do not die with the head, and ending the head's own processes one
        after another took 30-50 s."""
        end_processes(lambda info: _started_by(info, self.temp_dir), before=self._signal_head)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
        self.log.close()


def end_processes(belongs, before=None, grace_s: float = 5.0) -> list[int]:
    """SIGTERM to every process whose {cmdline, environ} `belongs` (never this process), then SIGKILL to what is left
    after `grace_s`; returns their pids. A process that has exited but is not reaped yet counts as gone. The head's
    gcs_server, raylet and monitor were all still up 24 s after SIGTERM here, so the grace is short: what `belongs`
    selects is the caller's own."""
    import psutil

    mine = [p for p in psutil.process_iter(["cmdline", "environ"]) if p.pid != os.getpid() and belongs(p.info)]
    if before is not None:
        before()
    for process in mine:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + grace_s
    while any(map(_running, mine)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for process in filter(_running, mine):
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    return [p.pid for p in mine]


# Set in the test session's own environment before anything starts: every process the session starts (the shared Ray
# instance's GCS, raylet and workers, test heads, `spin-ray` subprocesses) inherits it, so the session's end can find
# what it left, and only that.
SESSION_MARKER = "SPIN_RAY_TEST_SESSION"


def marked(info: dict, value: str) -> bool:
    return (info["environ"] or {}).get(SESSION_MARKER) == value


def naming(info: dict, folder: str) -> bool:
    """Whether a process's command line or environment names `folder` (a Ray temp folder)."""
    return (any(folder in arg for arg in info["cmdline"] or [])
            or any(folder in value for value in (info["environ"] or {}).values()))


def _running(process) -> bool:
    """Whether a process still runs: exited and not yet reaped counts as gone."""
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _started_by(info: dict, temp_dir: str) -> bool:
    """Whether a process belongs to the head with this temp dir: named in its command line (the head, its nodes'
    raylets), or carrying the head's marker in its environment (a worker renames itself "ray::MapWorker(...)", and
    one on a node the autoscaler removed outlived its raylet by hours as a child of init)."""
    return (any(temp_dir in arg for arg in info["cmdline"] or [])
            or (info["environ"] or {}).get(HEAD_MARKER) == temp_dir)


class MotoS3:
    """moto's standalone S3 server on 127.0.0.1: real HTTP speaking the S3 API, in a child process."""

    def __init__(self, log: Path, env: dict | None = None):
        self.port = free_port()
        self.log = open(log, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        wait_for(
            lambda: _port_open(self.port) or self.process.poll() is not None, 60, f"moto's S3 server on {self.port}"
        )
        if self.process.poll() is not None:
            raise RuntimeError(f"moto.server exited with {self.process.returncode}; see {log}")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client_env(self, access_key: str = "testing", secret_key: str = "testing") -> dict:
        """What a client (this process, Ray workers, a job) needs to use this server exactly as it would use AWS."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key,
                "AWS_DEFAULT_REGION": "us-east-1"}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self.log.close()
