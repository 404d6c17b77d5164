"""The actors a driver attempt starts, named for its run and attempt, so that a later attempt can find and end them.

A driver attempt is one run of the driver actor's loop: a job's first, each one Ray starts after the driver crashed,
and each resubmitted job's. What an attempt starts is owned by its driver and dies with it, but Ray ends owned actors
asynchronously, and a placement group outlives a creator that died while its job lives on: a restarted driver that
asks for the training node at once can find it still held by its dead predecessor's Ray Train controller (restarting
its workers when the driver died). So the actor that runs each training phase (`TrainingRun`, the controller's
owner) and each engine pass's tally carry a name
`spin-ray-attempt:<run>@<key>:<attempt>:<role>` in the `spin_ray` namespace; a new attempt lists the named actors
(public `ray.util.list_named_actors`), ends those of its run's earlier attempts, and waits, with a limit, until they
are gone. Names of other runs differ in `<key>` (a hash of the storage path and the run name): nothing of another run
is touched.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass, field

from spin_ray.run.cluster import ResourceError

NAMESPACE = "spin_ray"
PREFIX = "spin-ray-attempt"


def new_attempt() -> str:
    """A fresh attempt id (8 hex digits)."""
    return uuid.uuid4().hex[:8]


def run_prefix(storage_path: str, run_name: str) -> str:
    """The start of every attempt actor's name of one run."""
    key = hashlib.sha256(f"{storage_path}\n{run_name}".encode()).hexdigest()[:12]
    return f"{PREFIX}:{run_name}@{key}:"


@dataclass(frozen=True)
class Attempt:
    """One driver attempt of one run: what its actors are named after."""

    storage_path: str
    run_name: str
    id: str = field(default_factory=new_attempt)

    @classmethod
    def of(cls, config, attempt_id: str | None = None) -> "Attempt":
        return cls(config.run.storage_path, config.run.name, attempt_id or new_attempt())

    def name(self, role: str) -> str:
        """The name of this attempt's actor for `role` (e.g. "train:iter_0", "pass:iter_0/eval")."""
        return f"{run_prefix(self.storage_path, self.run_name)}{self.id}:{role}"

    def options(self, role: str) -> dict:
        """Ray actor options that name an actor for `role` in this attempt."""
        return {"name": self.name(role), "namespace": NAMESPACE}


def earlier_actors(attempt: Attempt) -> list[str]:
    """Names of the live named actors of this run's earlier attempts."""
    import ray

    prefix = run_prefix(attempt.storage_path, attempt.run_name)
    mine = f"{prefix}{attempt.id}:"
    return sorted(entry["name"] for entry in ray.util.list_named_actors(all_namespaces=True)
                  if entry.get("namespace") == NAMESPACE and entry["name"].startswith(prefix)
                  and not entry["name"].startswith(mine))


def _alive(name: str) -> bool:
    import ray

    try:
        ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    return True


def end_earlier_attempts(attempt: Attempt, limit_s: float, echo=print) -> dict | None:
    """End every live actor of this run's earlier attempts (and with a TrainingRun the Ray Train controller it owns,
    and its workers) and wait at most `limit_s` until each is gone. Returns what was ended and how long it took, or
    None when
    nothing of an earlier attempt was alive. Raises ResourceError naming what outlived the limit."""
    import ray

    names = earlier_actors(attempt)
    if not names:
        return None
    started = time.monotonic()
    for name in names:
        try:
            handle = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:  # gone since the listing
            continue
        ray.kill(handle, no_restart=True)
    left = list(names)
    while left and time.monotonic() - started < limit_s:
        left = [name for name in left if _alive(name)]
        if left:
            time.sleep(0.5)
    if left:

        raise ResourceError(f"actors of an earlier attempt of run {attempt.run_name!r} outlived {limit_s:.0f}s "
                           f"(run.resource_wait_s) after being ended: {', '.join(left)}")
    seconds = round(time.monotonic() - started, 2)
    prefix = run_prefix(attempt.storage_path, attempt.run_name)
    roles = [name[len(prefix):].split(":", 1)[1] for name in names]
    echo(f"[spin-ray] ended {len(names)} actor(s) an earlier attempt of this run left ({', '.join(roles)}) in "
         f"{seconds:.1f}s")
    return {"actors": names, "seconds": seconds}
