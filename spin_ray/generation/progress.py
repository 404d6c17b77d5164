"""Progress of a generation phase in a non-terminal job log: answers as the engine replicas finish them."""

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
    """A Ray actor, one per generation phase: answers and their tokens, added by every engine replica."""

    def __init__(self):
        self.answers, self.tokens = 0, 0

    def add(self, answers: int, tokens: int) -> None:
        self.answers += answers
        self.tokens += tokens

    def read(self) -> tuple[int, int]:
        return self.answers, self.tokens


class TallySender:
    """In an engine replica: counts each finished answer and sends the counts to the phase's tally at most once per
    second, and at each shard's end. Progress never fails generation: a tally that is gone is ignored."""

    def __init__(self, tally):
        self.tally = tally
        self.answers, self.tokens, self.sent_at = 0, 0, time.monotonic()

    def count(self, tokens: int) -> None:
        self.answers += 1
        self.tokens += tokens
        if time.monotonic() - self.sent_at >= SEND_INTERVAL_S:
            self.send()

    def send(self, wait: bool = False) -> None:
        if self.tally is None or self.answers == 0:
            return
        import ray

        answers, tokens, self.answers, self.tokens, self.sent_at = self.answers, self.tokens, 0, 0, time.monotonic()
        try:
            sent = self.tally.add.remote(answers, tokens)
            if wait:
                ray.get(sent, timeout=FLUSH_TIMEOUT_S)
        except Exception as error:  # the driver ended the phase, or the tally's node is gone
            log.debug("progress tally unreachable: %s", error)


@contextmanager
def progress_lines(output_dir: str | list[str], prompts: int, samples: int, shards: int, interval_s: float):
    """Where a job log is no terminal (Ray Data's bars off), print one progress line every `interval_s` seconds while
    the body runs, and a last one ("done" or "stopped") when it ends: answers finished of `prompts` x `samples`,
    tokens, tokens/s and the ETA from the replicas' tally, and shards committed of the `shards` to write. Yields the
    tally for the engine replicas (None on a terminal, where Ray Data draws its own bars). An engine pass over several
    prompt sets gives their folders, and its answers as `prompts` with `samples` 1."""
    import ray

    if ray.data.DataContext.get_current().enable_progress_bars:
        yield None
        return
    from tqdm import tqdm

    tally = ray.remote(num_cpus=0)(AnswerTally).remote()
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
        try:
            ray.kill(tally)
        except Exception as error:  # Ray already shut down: the tally went with it
            log.debug("progress tally not killed: %s", error)
