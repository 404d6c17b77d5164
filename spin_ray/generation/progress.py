"""A generation pass's tally: answers as the engine replicas finish them (the job log's progress lines), and the
replicas that started and shut down (so a pass ends only once its engines have let go of their memory)."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager

from spin_ray.generation.shards import committed_shards

log = logging.getLogger(__name__)

# How often a replica sends its counts: one small actor call per second per replica costs nothing next to
# decoding, and a line every `tracking.interval_s` (20 s by default) never shows counts older than that.
SEND_INTERVAL_S = 1.0
# A replica waits this long for the tally at the end of a shard, so that a finished phase's last line is exact.
FLUSH_TIMEOUT_S = 10.0


class AnswerTally:
    """A Ray actor, one per generation pass: answers and their tokens, added by every engine replica; and each
    replica's start and shutdown (its process and node), and the shards answered, so the replica that answers the
    pass's last one knows to free its engine."""

    def __init__(self, shards: int = 0):
        self.answers, self.tokens, self.shards, self.expected_shards = 0, 0, 0, shards
        self.started: dict[str, str] = {}  # replica (node:pid) -> where, as the job log names it
        self.shut_down: dict[str, float] = {}  # replica -> seconds its shutdown took

    def add(self, answers: int, tokens: int, shards: int = 0) -> None:
        self.answers += answers
        self.tokens += tokens
        self.shards += shards

    def pass_answered(self) -> bool:
        # a shard answered again (its first replica died before it committed) counts twice: the pass may look
        # answered early, and a replica that shut its engine down starts it again if it gets another call
        return self.expected_shards > 0 and self.shards >= self.expected_shards

    def read(self) -> tuple[int, int]:
        return self.answers, self.tokens

    def engine_started(self, replica: str, where: str) -> None:
        self.started[replica] = where

    def engine_shut_down(self, replica: str, seconds: float) -> None:
        self.shut_down[replica] = seconds

    def engines(self) -> tuple[dict[str, str], dict[str, float]]:
        return self.started, self.shut_down


class TallySender:
    """In an engine replica: counts each finished answer and sends the counts to the phase's tally at most once per
    second, and at each shard's end; says when the replica started and shut down. Progress never fails generation: a
    tally that is gone is ignored."""

    def __init__(self, tally):
        import os
        import socket

        self.tally = tally
        self.answers, self.tokens, self.sent_at = 0, 0, time.monotonic()
        self.replica = f"{socket.gethostname()}:{os.getpid()}"

    def started(self) -> None:
        self._call(
            "engine_started", self.replica, f"pid {self.replica.rsplit(':', 1)[1]} on {self.replica.rsplit(':', 1)[0]}"
        )

    def pass_answered(self) -> bool:
        """Whether every shard of the pass has been answered (by any replica); False when the tally is gone."""
        if self.tally is None:
            return False
        import ray

        try:
            return bool(ray.get(self.tally.pass_answered.remote(), timeout=FLUSH_TIMEOUT_S))
        except Exception as error:  # the driver ended the phase, or the tally's node is gone
            log.debug("pass tally unreachable: %s", error)
            return False

    def shut_down(self, seconds: float) -> None:
        self._call("engine_shut_down", self.replica, round(seconds, 2))

    def _call(self, method: str, *args) -> None:
        if self.tally is None:
            return
        import ray

        try:
            ray.get(getattr(self.tally, method).remote(*args), timeout=FLUSH_TIMEOUT_S)
        except Exception as error:  # the pass is over, or the tally's node is gone
            log.debug("pass tally unreachable: %s", error)

    def count(self, tokens: int) -> None:
        self.answers += 1
        self.tokens += tokens
        if time.monotonic() - self.sent_at >= SEND_INTERVAL_S:
            self.send()

    def send(self, wait: bool = False, shards: int = 0) -> None:
        if self.tally is None or (self.answers == 0 and shards == 0):
            return
        import ray

        answers, tokens, self.answers, self.tokens, self.sent_at = self.answers, self.tokens, 0, 0, time.monotonic()
        try:
            sent = self.tally.add.remote(answers, tokens, shards)
            if wait:
                ray.get(sent, timeout=FLUSH_TIMEOUT_S)
        except Exception as error:  # the driver ended the phase, or the tally's node is gone
            log.debug("progress tally unreachable: %s", error)

    def shard_answered(self) -> None:
        """At a shard's end: its counts, and the shard, reach the tally before the shard is handed on."""
        self.send(wait=True, shards=1)


def engine_shutdowns(tally) -> dict:
    """After a pass: how many of its engine replicas started, and how many shut their engine down explicitly (the one
    that answered the last shard, and HF replicas Ray Data released idle; the rest free it as their process exits)."""
    import ray

    try:
        started, shut_down = ray.get(tally.engines.remote(), timeout=FLUSH_TIMEOUT_S)
    except Exception as error:  # the tally is gone
        log.debug("pass tally unreachable: %s", error)
        return {}
    return {"engines_started": len(started), "engines_shut_down": len(set(started) & set(shut_down))}


@contextmanager
def progress_lines(output_dir: str | list[str], prompts: int, samples: int, shards: int, interval_s: float,
                   tally_options: dict | None = None):
    """Yields the pass's tally (an AnswerTally actor) for the engine replicas. Where a job log is no terminal (Ray
    Data's bars off), prints one progress line every `interval_s` seconds while the body runs, and a last one ("done"
    or "stopped") when it ends: answers finished of `prompts` x `samples`, tokens, tokens/s and the ETA from the
    replicas' tally, and shards committed of the `shards` to write; on a terminal Ray Data draws its own bars. An
    engine pass over several prompt sets gives their folders, and its answers as `prompts` with `samples` 1.
    `tally_options` name the tally (a driver attempt's, `spin_ray.run.attempts`)."""
    import ray

    tally = ray.remote(num_cpus=0)(AnswerTally).options(**(tally_options or {})).remote(shards)
    if ray.data.DataContext.get_current().enable_progress_bars:
        try:
            yield tally
        finally:
            _end(tally)
        return
    from tqdm import tqdm

    folders = [output_dir] if isinstance(output_dir, str) else list(output_dir)

    def committed_now() -> set[str]:
        return {shard for folder in folders for shard in committed_shards(folder)}

    already = committed_now()
    stop, started = threading.Event(), time.perf_counter()
    # three levels name the phase within its run: story/iter_0/generation, iter_0/eval/answers, baseline/eval/answers
    # an engine pass over several prompt sets names them all: story/baseline/eval/answers + iter_0/generation
    label = " + ".join(["/".join(folders[0].rstrip("/").split("/")[-3:]),
                        *("/".join(folder.rstrip("/").split("/")[-2:]) for folder in folders[1:])])
    answers_to_do = prompts * samples

    def line(ended: str = "") -> None:
        try:
            answers, tokens = ray.get(tally.read.remote(), timeout=max(interval_s, FLUSH_TIMEOUT_S))
            committed = len(committed_now() - already)
        except Exception:  # a tally or listing that fails now is retried at the next line
            return
        elapsed = time.perf_counter() - started
        # a replica killed mid-shard has its shard answered again, so the count may pass the total
        postfix = f"{committed}/{shards} shards committed, {tokens:,} tokens, {tokens / elapsed:.1f} tok/s{ended}"
        print(tqdm.format_meter(min(answers, answers_to_do), answers_to_do, elapsed,  # no ncols: never cut the counts
                                prefix=f"[spin-ray] {label}", unit="answer", postfix=postfix), flush=True)

    def report() -> None:
        while not stop.wait(interval_s):
            line()

    thread = threading.Thread(target=report, name="spin-ray-progress", daemon=True)
    thread.start()
    ended = ", stopped"
    try:
        yield tally
        ended = ", done"
    finally:
        stop.set()
        thread.join(timeout=interval_s + FLUSH_TIMEOUT_S)
        line(ended)
        _end(tally)


def _end(tally) -> None:
    import ray

    try:
        ray.kill(tally)
    except Exception as error:  # Ray already shut down: the tally went with it
        log.debug("progress tally not killed: %s", error)
