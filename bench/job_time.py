"""Benchmark: wall time of one `spin-ray run` job at two commits, alternating, each run in a fresh storage folder.

Each commit is checked out once into a git worktree under .tmp/ and imported from there (PYTHONPATH, which Ray's
worker processes inherit; the run's working directory is the tree too); both use this checkout's virtual
environment, whose editable install of spin_ray answers an import only where no path entry holds it. Each run
checks first that spin_ray imports from its tree (`imported_from`). Rounds alternate old, new, old, new... so
a drift of the machine hits both sides. Prints JSON with every run's wall and phase seconds (and the phases' engine
start-up, training speed and held-out metrics, and each iteration's export bytes), the medians and new/old; `--out`
also writes it. `--old HEAD --new HEAD` with `--new-set` compares two settings of one commit.

Each commit reads JOB from its own tree, so a job file that changed between them keeps each side's settings;
`--old-set` / `--new-set` add overrides for one side only (a key the other commit does not know). `--seed-cache DIR`
copies DIR/_cache (the start-model evaluations, keyed by content) into each fresh storage folder, so a run that
starts from a model the benchmark arms share reuses its evaluation, as those arms do.

    python bench/job_time.py --old 8b5cee8 --new HEAD [--rounds 2] [--out bench/results/x.json]
        [--old-set key=value ...] [--new-set key=value ...] [--seed-cache runs] JOB [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def checkout(commit: str) -> Path:
    """A worktree of `commit` under .tmp/ (reused when it is there)."""
    sha = subprocess.run(["git", "rev-parse", "--short", commit], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.strip()
    tree = ROOT / ".tmp" / f"bench-tree-{sha}"
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), sha], cwd=ROOT, check=True,
                       capture_output=True)
    return tree


# What a run's phases report beside their seconds: engine start-up per pass, training speed and size, held-out quality.
PHASE_METRICS = ("pass_startup_seconds", "engine_starts", "training_tokens_per_second", "trainable_parameters",
                 "export_seconds", "accuracy", "nll_per_token", "reward_accuracy")


def tree_environment(tree: Path) -> dict:
    """The environment of a run of `tree`'s code (the tree first on PYTHONPATH); refused if spin_ray still imports from
    elsewhere."""
    # a local Ray instance of its own: no RAY_ADDRESS (older commits refuse an empty one)
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(tree)}
    found = subprocess.run([sys.executable, "-c", "import spin_ray; print(spin_ray.__file__)"], env=env, cwd=tree,
                           check=True, capture_output=True, text=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"bench/job_time.py: spin_ray imports from {found}, not from the worktree {tree}")
    return env


def run_once(tree: Path, job: str, overrides: list[str], log: Path, seed_cache: str | None = None,
             timeout_s: float = 3600) -> dict:
    """One job from a fresh storage folder; its wall seconds and the manifest's phase seconds."""
    storage = Path(tempfile.mkdtemp(prefix="job-time-", dir=ROOT / ".tmp"))
    if seed_cache:
        shutil.copytree(Path(seed_cache) / "_cache", storage / "_cache")
    env = tree_environment(tree)
    command = [sys.executable, "-m", "spin_ray.cli", "run", str(tree / job), f"run.storage_path={storage}",
               *overrides]
    started = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.run(
            command, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s
        ).returncode
    wall = round(time.perf_counter() - started, 1)
    manifests = list(storage.glob("*/manifest.json"))
    phases, metrics, exported = {}, {}, {}
    if manifests:
        manifest = json.loads(manifests[0].read_text())
        records = dict(manifest.get("phases", {}))
        for t, iteration in enumerate(manifest.get("iterations", [])):
            records.update({f"iter_{t}/{name}": record for name, record in iteration["phases"].items()})
            model = manifests[0].parent / f"iter_{t}" / "model"
            exported[f"iter_{t}"] = sum(f.stat().st_size for f in model.rglob("*") if f.is_file())
        phases = {name: record.get("seconds") for name, record in records.items()}
        metrics = {name: {key: (record.get("metrics") or {}).get(key) for key in PHASE_METRICS
                          if (record.get("metrics") or {}).get(key) is not None} for name, record in records.items()}
        for marker in manifests[0].parent.rglob("_COMPLETE.json"):  # each engine pass's start-up, by its folder
            summary = json.loads(marker.read_text()).get("summary") or {}
            if summary.get("pass_startup_seconds") is not None:
                folder = str(marker.parent.relative_to(manifests[0].parent))
                metrics.setdefault("engine_passes", {})[folder] = {
                    key: summary.get(key) for key in ("pass_startup_seconds", "engine_starts", "engine_seconds")}
    shutil.rmtree(storage, ignore_errors=True)  # checkpoints and exports: hundreds of MB a run
    return {"rc": rc, "wall_s": wall, "phase_seconds": phases, "phase_metrics": metrics, "export_bytes": exported,
            "log": str(log), "imported_from": str(tree)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True)
    parser.add_argument("--new", default="HEAD")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out")
    parser.add_argument("--old-set", action="append", default=[], metavar="KEY=VALUE", help="an override for old only")
    parser.add_argument("--new-set", action="append", default=[], metavar="KEY=VALUE", help="an override for new only")
    parser.add_argument("--seed-cache", metavar="DIR", help="copy DIR/_cache into every run's storage folder")
    parser.add_argument("--timeout-s", type=float, default=3600, help="one run's limit")
    parser.add_argument("job", help="a job YAML, relative to the repository root")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    trees = {"old": checkout(args.old), "new": checkout(args.new)}
    own = {"old": args.old_set, "new": args.new_set}
    runs = []
    for round_number in range(1, args.rounds + 1):
        for variant, tree in trees.items():
            log = ROOT / ".tmp" / f"job-time-{variant}-{round_number}.log"
            result = run_once(tree, args.job, [*args.overrides, *own[variant]], log, args.seed_cache, args.timeout_s)
            runs.append({"variant": variant, "round": round_number, **result})
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
            if result["rc"] != 0:
                raise SystemExit(f"bench/job_time.py: the {variant} run failed (rc {result['rc']}); see {log}")
    medians = {v: statistics.median(r["wall_s"] for r in runs if r["variant"] == v) for v in trees}
    results = {"benchmark": "spin-ray run wall time, two commits alternating", "date": str(date.today()),
               "machine": {"cpus": os.cpu_count()},
               "commits": {v: tree.name.removeprefix("bench-tree-") for v, tree in trees.items()},
               "command": f"spin-ray run {args.job} {' '.join(args.overrides)} run.storage_path=<fresh folder>",
               "overrides_of": own, "seeded_cache_from": args.seed_cache,
               "runs": runs, "median_wall_s": medians, "ratio_new_vs_old": round(medians["new"] / medians["old"], 3)}
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
