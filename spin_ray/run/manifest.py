"""Run state: `{storage_path}/{run}/manifest.json`, rewritten atomically after every phase.

It records each phase (SFT warm start, baseline evaluation, and per iteration: generate, train,
evaluate) with its status, attempts, timings, artifact paths and metrics, plus the config, its
hash and the code version. A re-submitted job reads it to skip finished phases; a changed config
under the same run name is refused with the differing keys named. Keys the resubmitted config does
not set take the run's stored values, so a run started under older defaults resumes under them.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from typing import Any

from spin_ray import __version__
from spin_ray.config import (
    Config,
    ConfigError,
    build_config,
    config_keys,
    deep_merge,
    differing_keys,
    explicit_keys,
    flatten,
)
from spin_ray.objectives.algorithms import RECOMMENDABLE
from spin_ray.run.layout import RunLayout
from spin_ray.storage import atomic_write_json, read_json

DONE, RUNNING, FAILED = "done", "running", "failed"

# Keys renamed since runs were first stored: old dotted name -> new dotted name (same meaning).
RENAMED_KEYS = {"tspin.alpha": "tspin.historical_weight"}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def code_version() -> str:
    """Package version, plus the git commit when run from a checkout (as `ray job submit --working-dir` ships it)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def stored_config(existing: dict) -> dict:
    """The config a run was started with, in today's key names, completed with today's defaults for keys added
    since (a run started before `algorithm` existed ran SPIN, the default); keys since removed are dropped."""
    known = set(config_keys())
    stored = {RENAMED_KEYS.get(k, k): v for k, v in flatten(existing["config"]).items()}
    stored = {k: v for k, v in stored.items() if k in known or k.rsplit(".", 1)[0] in known}  # dict-valued keys too
    defaults = Config().to_dict()
    for key, paper in RECOMMENDABLE.items():  # a run stored before a key existed ran the paper's value
        section, name = key.split(".")
        defaults[section][name] = paper
    return deep_merge(defaults, _unflatten(stored))


def resume_config(config: Config, existing: dict | None) -> Config:
    """`config` for resuming the run `existing` describes: keys it does not set explicitly take the run's stored
    values instead of today's defaults. A fresh run (None) keeps `config` as it is."""
    if existing is None:
        return config
    given = explicit_keys(config)
    current, stored = flatten(config.to_dict()), flatten(stored_config(existing))
    adopted = {k: stored[k] for k in stored if k not in given and current.get(k) != stored[k]
               and not any(k.startswith(f"{g}.") for g in given)}
    if not adopted:
        return config
    return build_config(deep_merge(config.to_dict(), _unflatten(adopted)), "the run's stored config")


def config_conflict(existing: dict, config: Config) -> str | None:
    """The refusal message when `config` differs from the config a run was started with, else None."""
    stored, current = stored_config(existing), config.to_dict()
    changed = differing_keys(stored, current)
    if not changed:
        return None
    old, new = flatten(stored), flatten(current)
    shown = "; ".join(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in changed)
    return (f"run {config.run.name!r} at {RunLayout.of(config).root} was started with a different config "
            f"({len(changed)} key(s) differ: {shown}); use a new run.name, or --force to continue anyway")


def check_config(config: Config, force: bool = False) -> None:
    """Raise ConfigError if the run exists under a different config (unless `force`)."""
    existing = read_json(RunLayout.of(config).manifest)
    if existing is not None and not force:
        message = config_conflict(existing, config)
        if message:
            raise ConfigError(message)


class Manifest:
    """The manifest as a dict with helpers; every change is written through at once."""

    def __init__(self, url: str, data: dict[str, Any]):
        self.url = url
        self.data = data

    @classmethod
    def read(cls, run: str) -> "Manifest | None":
        url = RunLayout(run).manifest
        data = read_json(url)
        return None if data is None else cls(url, data)

    @classmethod
    def open(cls, config: Config, force: bool = False) -> "Manifest":
        """Start a run's manifest, or continue an existing one if the config agrees (or `force`)."""
        layout = RunLayout.of(config)
        existing = read_json(layout.manifest)
        current = config.to_dict()
        if existing is None:
            manifest = cls(layout.manifest, {"run": config.run.name, "run_dir": layout.root, "created": _now(),
                                             "status": RUNNING, "config": current,
                                             "config_hash": config.result_fingerprint(), "phases": {},
                                             "iterations": [], "jobs": [], "config_changes": []})
        else:
            manifest = cls(layout.manifest, existing)
            changed = differing_keys(stored_config(existing), current)
            if changed and not force:
                raise ConfigError(config_conflict(existing, config))
            if changed:
                manifest.data["config_changes"].append({"at": _now(), "keys": changed, "forced": True})
            manifest.data["config"] = current
            manifest.data["config_hash"] = config.result_fingerprint()
        manifest.data["code_version"] = code_version()
        manifest.data["jobs"].append({"started": _now(), "ray_job_id": os.environ.get("RAY_JOB_ID"),
                                      "code_version": manifest.data["code_version"]})
        manifest.data["status"] = RUNNING
        manifest.save()
        return manifest

    def save(self) -> None:
        self.data["updated"] = _now()
        atomic_write_json(self.url, self.data)

    def iteration(self, t: int) -> dict[str, Any]:
        """The record of iteration t (created on first use)."""
        records = self.data["iterations"]
        while len(records) <= t:
            records.append({"iteration": len(records), "phases": {}})
        return records[t]

    def phase(self, name: str, iteration: int | None = None) -> dict[str, Any]:
        phases = self.data["phases"] if iteration is None else self.iteration(iteration)["phases"]
        return phases.setdefault(name, {"status": "pending", "attempts": 0})

    def start(self, name: str, iteration: int | None = None) -> dict[str, Any]:
        record = self.phase(name, iteration)
        record.update(status=RUNNING, started=_now(), attempts=record["attempts"] + 1)
        record.pop("error", None)
        self.save()
        return record

    def finish(self, name: str, iteration: int | None, seconds: float, metrics: dict, artifacts: dict) -> None:
        record = self.phase(name, iteration)
        record.update(status=DONE, finished=_now(), seconds=round(seconds, 2), metrics=metrics, artifacts=artifacts)
        self.save()

    def fail(self, name: str, iteration: int | None, error: BaseException) -> None:
        record = self.phase(name, iteration)
        record.update(status=FAILED, finished=_now(), error=f"{type(error).__name__}: {error}"[:2000])
        self.data["status"] = FAILED
        self.save()

    def is_done(self, name: str, iteration: int | None = None) -> bool:
        return self.phase(name, iteration)["status"] == DONE

    def set_status(self, status: str, **extra: Any) -> None:
        self.data["status"] = status
        self.data.update(extra)
        self.save()
