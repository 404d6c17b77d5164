"""The run lease: one object in the run's storage naming the driver that owns the run, kept alive by a heartbeat.

A second driver on the same run, from this cluster or any other, finds the lease and is refused with
the holder named, until the holder stops renewing and the lease expires; then it may take over.

What each store guarantees:
- S3 (and S3-compatible stores with conditional writes): taking the lease is a create-only PUT
  (If-None-Match: *), renewing and taking over an expired one a PUT conditional on the ETag read
  (If-Match): two drivers can never both hold it.
- GCS: taking it is create-only (ifGenerationMatch=0); renewal and takeover rewrite it after a read,
  so two contenders for an *expired* lease could overlap for one heartbeat (the loser sees it at its
  next renewal and stops).
- Local disk: create-only via O_EXCL; renewal and takeover under a file lock.
- Other fsspec stores: read, compare, write: a best effort with the same overlap as GCS.
Expiry compares the holder's `expires_at` with the reader's clock: keep clocks in sync (NTP) and the
TTL well above any skew.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from spin_ray.storage import atomic_write_bytes, filesystem, is_local, protocol, read_bytes, read_json, remove


class LeaseHeld(RuntimeError):
    """Another live driver holds the run."""


class LeaseLost(RuntimeError):
    """The lease was taken by another driver while this one ran (it had expired, e.g. after a long stall)."""


def describe(holder: dict) -> str:
    left = holder.get("expires_at", 0) - time.time()
    return (
        f"{holder.get('owner')} (host {holder.get('host')}, pid {holder.get('pid')}, "
        f"ray job {holder.get('ray_job_id')}, "
        f"since {holder.get('acquired')}, lease expires in {max(0, round(left))}s)"
    )


def live_holder(url: str) -> dict | None:
    """The holder of the lease at `url` if it is alive (renewed within 2/3 of its TTL), else None."""
    try:
        holder = read_json(url)
    except ValueError:  # torn or foreign: nobody alive wrote it
        return None
    if not holder or holder.get("expires_at", 0) <= time.time():
        return None
    ttl = holder["expires_at"] - holder.get("renewed_at", 0)
    return holder if time.time() - holder.get("renewed_at", 0) < 2 * ttl / 3 else None


class RunLease:
    """Take, renew and release the lease object at `url` for this process."""

    def __init__(self, url: str, ttl_s: float, token: str | None = None, owner: str | None = None,
                 ray_session: str | None = None):
        self.url = url
        self.ttl_s = ttl_s
        self.ray_session = ray_session  # the holder's Ray cluster: a later job there can tell it ended
        # The holder's identity: a driver restarted by Ray passes the same token (its job's) and takes the
        # lease back at once; anyone else waits for it to expire. `owner` is how refusals name the holder.
        self.token = token or uuid.uuid4().hex
        self.owner = f"spin-ray driver of {owner or self.token}"
        self.acquired_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._etag: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost: LeaseLost | None = None

    # ---- public --------------------------------------------------------------------------------
    def acquire(self, echo: Callable[[str], None] | None = None, ended: str | None = None) -> None:
        """Take the lease, or raise LeaseHeld naming the live holder. A holder that stopped renewing (a driver killed
        by `ray job stop`, a lost node), or whose token is `ended` (its job is known to have ended), is waited out
        until its lease expires."""
        if self._create():
            return
        holder, etag = self._read()
        if holder is None:  # released between our create and our read: try once more
            if self._create():
                return
            holder, etag = self._read()
        if holder and holder.get("token") == self.token:
            self.renew()
            return
        if holder and holder.get("expires_at", 0) > time.time():
            # a live holder renews every ttl/3: silent for 2/3 of the TTL means it is gone
            silent = time.time() - holder.get("renewed_at", 0)
            gone = ended is not None and holder.get("token") == ended
            if silent < 2 * self.ttl_s / 3 and not gone:
                raise LeaseHeld(f"run storage {self.url} is leased to {describe(holder)}")
            wait = holder["expires_at"] - time.time()
            if echo:
                why = "whose job has ended" if gone else f"silent for {silent:.0f}s"
                echo(f"[spin-ray] the run's lease is held by {holder.get('owner')}, {why}: "
                     f"taking it over when it expires in {max(0, wait):.0f}s")
            time.sleep(max(0.0, wait) + 0.5)
            holder, etag = self._read()
            if holder and holder.get("token") != self.token and holder.get("expires_at", 0) > time.time():
                raise LeaseHeld(f"run storage {self.url} is leased to {describe(holder)}")
        if not self._replace(etag, expected_token=holder.get("token") if holder else None):
            current, _ = self._read()
            raise LeaseHeld(f"run storage {self.url} was just taken over by {describe(current or {})}")

    def renew(self) -> None:
        """Extend the lease; raise LeaseLost if another driver holds it now."""
        holder, etag = self._read()
        if holder is None or holder.get("token") != self.token:
            raise LeaseLost(f"lost the run lease {self.url} to {describe(holder or {})}")
        if not self._replace(etag, expected_token=self.token):
            current, _ = self._read()
            raise LeaseLost(f"lost the run lease {self.url} to {describe(current or {})}")

    def release(self) -> None:
        self.stop_heartbeat()
        holder, _ = self._read()
        if holder is not None and holder.get("token") == self.token:
            remove(self.url)

    def start_heartbeat(self, on_lost: Callable[[LeaseLost], None] | None = None) -> None:
        """Renew every ttl/3 seconds in a daemon thread; on loss, record it and call `on_lost`."""
        interval = max(1.0, self.ttl_s / 3)

        def beat():
            while not self._stop.wait(interval):
                try:
                    self.renew()
                except LeaseLost as error:
                    self.lost = error
                    if on_lost:
                        on_lost(error)
                    return
                except Exception:  # a flaky store: try again at the next beat, the TTL has slack
                    continue

        self._stop.clear()
        self._thread = threading.Thread(target=beat, name="spin-ray-lease", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    # ---- one backend per store -------------------------------------------------------------------
    def _payload(self) -> bytes:
        return json.dumps({"owner": self.owner, "token": self.token, "host": socket.gethostname(), "pid": os.getpid(),
                           "ray_job_id": os.environ.get("RAY_JOB_ID"), "ray_session": self.ray_session,
                           "acquired": self.acquired_at, "renewed_at": time.time(),
                           "expires_at": time.time() + self.ttl_s}).encode()

    def _read(self) -> tuple[dict | None, str | None]:
        fs, path = filesystem(self.url)
        etag = None
        if protocol(self.url) in ("s3", "s3a"):
            fs.invalidate_cache(path)
            try:
                etag = fs.info(path).get("ETag")
            except FileNotFoundError:
                return None, None
        data = read_bytes(self.url)
        if data is None:
            return None, None
        try:
            return json.loads(data), etag
        except json.JSONDecodeError:  # not ours, or torn by a store without atomic writes: treat as expired
            return {}, etag

    def _create(self) -> bool:
        """Create the lease object only if there is none; True if this call created it."""
        fs, path = filesystem(self.url)
        if is_local(self.url):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            staging = f"{path}.{uuid.uuid4().hex}.new"  # the token may hold '/' (a driver's name has the run's path)
            with open(staging, "wb") as out:
                out.write(self._payload())
            try:
                os.link(staging, path)  # link() never replaces an existing file: a create-only write of a whole file
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(staging)
        try:
            fs.pipe_file(path, self._payload(), mode="create")
            fs.invalidate_cache(path)
            return True
        except FileExistsError:
            return False

    def _replace(self, etag: str | None, expected_token: str | None) -> bool:
        """Overwrite the lease if it is still the one read (same ETag, or same token); True on success."""
        fs, path = filesystem(self.url)
        if protocol(self.url) in ("s3", "s3a") and etag:
            try:
                fs.pipe_file(path, self._payload(), IfMatch=etag)
                fs.invalidate_cache(path)
                return True
            except (FileExistsError, OSError):  # 412 Precondition Failed: someone wrote it after our read
                return False
        if is_local(self.url):
            from filelock import FileLock

            with FileLock(path + ".lock", timeout=30):
                return self._compare_and_write(expected_token)
        return self._compare_and_write(expected_token)

    def _compare_and_write(self, expected_token: str | None) -> bool:
        holder, _ = self._read()
        if (holder or {}).get("token") != expected_token:
            return False
        atomic_write_bytes(self.url, self._payload())
        return True
