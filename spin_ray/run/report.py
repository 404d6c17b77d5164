"""Run report from the manifest: a per-iteration table (metrics, timing split) as report.md, report.json and a PNG."""

from __future__ import annotations

import io
import json
import time

from spin_ray.objectives.algorithms import ALGORITHMS, SFT
from spin_ray.run.layout import RunLayout
from spin_ray.run.manifest import Manifest
from spin_ray.storage import atomic_write_bytes

# (column, header, format) of the printed table
COLUMNS = (
    ("model", "model", "{}"),
    ("accuracy", "GSM8K acc", "{:.3f}"),
    ("nll_per_token", "NLL/tok", "{:.4f}"),
    ("validation_nll_per_token", "val NLL/tok", "{:.4f}"),
    ("reward_accuracy", "reward acc", "{:.3f}"),
    ("reward_margin", "reward margin", "{:.4f}"),
    ("train_loss", "train loss", "{:.4f}"),
    ("train_margin", "train margin", "{:.4f}"),
    ("generation_s", "gen s", "{:.0f}"),
    ("generation_tok_s", "gen tok/s", "{:.1f}"),
    ("training_s", "train s", "{:.0f}"),
    ("training_tok_s", "train tok/s", "{:.1f}"),
    ("export_s", "export s", "{:.1f}"),
    ("evaluation_s", "eval s", "{:.0f}"),
    ("collapse", "collapse watch", "{}"),
    ("selected", "selected", "{}"),
)


def _metrics(record: dict | None) -> dict:
    return (record or {}).get("metrics") or {}


def iteration_rows(manifest: dict) -> list[dict]:
    """One row per model: p_0 (baseline evaluation), then p_{t+1} for each iteration t."""
    rows = []
    baseline = manifest["phases"].get("baseline_eval")
    sft = manifest["phases"].get("sft")
    if baseline or sft:
        ev = _metrics(baseline)
        rows.append({"model": "p0 (sft)" if sft else "p0", "iteration": None, "status": (baseline or sft)["status"],
                     "accuracy": ev.get("accuracy"), "nll_per_token": ev.get("nll_per_token"),
                     "validation_nll_per_token": ev.get("validation_nll_per_token"),
                     "validation_accuracy": ev.get("validation_accuracy"),
                     "evaluation_s": (baseline or {}).get("seconds"),
                     "train_loss": _metrics(sft).get("loss"), "training_s": _metrics(sft).get("training_seconds")})
    for record in manifest["iterations"]:
        phases = record["phases"]
        gen, train, ev = (
            _metrics(phases.get("generate")),
            _metrics(phases.get("train")),
            _metrics(phases.get("evaluate")),
        )
        statuses = {name: phase["status"] for name, phase in phases.items()}
        rows.append({
            "model": f"p{record['iteration'] + 1}",
            "iteration": record["iteration"],
            "status": statuses,
            "accuracy": ev.get("accuracy"),
            "nll_per_token": ev.get("nll_per_token"),
            "validation_nll_per_token": ev.get("validation_nll_per_token"),
            "validation_accuracy": ev.get("validation_accuracy"),
            "reward_accuracy": ev.get("reward_accuracy"),
            "reward_margin": ev.get("reward_margin"),
            "train_loss": train.get("loss"),
            "train_margin": train.get("rewards/margins"),
            "train_reward_accuracy": train.get("rewards/accuracies"),
            "generation_s": gen.get("seconds"),
            "generation_tok_s": gen.get("tokens_per_second"),
            "reference_s": gen.get("reference_seconds"),
            "training_s": train.get("training_seconds"),
            "training_tok_s": train.get("training_tokens_per_second"),
            "export_s": train.get("export_seconds"),
            "evaluation_s": (phases.get("evaluate") or {}).get("seconds"),
            "resumed_from_step": train.get("resumed_from_step"),
            "train_attempts": (phases.get("train") or {}).get("attempts"),
            "collapse": _collapse_cell(record),
        })
    chosen = manifest.get("selected_model") or {}
    if chosen.get("value") is not None:  # chosen on a validation split
        for row in rows:
            row["selected"] = "best" if row["iteration"] == chosen["iteration"] else None
    return rows


def _collapse_cell(record: dict) -> str | None:
    """The collapse watch's verdict on this iteration's model: None before it ran, 'ok', or its signals by name."""
    signals = record.get("collapse_signals")
    if signals is None:
        return None
    return ", ".join(signals) or "ok"


def _cell(value, fmt: str) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def format_table(manifest: dict, markdown: bool = False) -> str:
    rows = iteration_rows(manifest)
    headers = [header for _, header, _ in COLUMNS]
    cells = [[_cell(row.get(key), fmt) for key, _, fmt in COLUMNS] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        lines += ["| " + " | ".join(line) + " |" for line in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(line[i]) for line in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
    return "\n".join(lines)


def _plot(rows: list[dict], run: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    labels = [row["model"] for row in rows]
    panels = (("GSM8K exact match", ["accuracy"]), ("NLL per token (human answers)", ["nll_per_token"]),
              ("held-out reward accuracy vs opponent", ["reward_accuracy", "train_reward_accuracy"]),
              ("margins and loss", ["reward_margin", "train_margin", "train_loss"]))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for axis, (title, keys) in zip(axes, panels, strict=True):
        for key in keys:
            points = [(i, row[key]) for i, row in enumerate(rows) if row.get(key) is not None]
            if points:
                axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=key)
        axis.set_xticks(range(len(labels)), labels)
        axis.set_title(title, fontsize=9)
        axis.grid(alpha=0.3)
        if len(keys) > 1:
            axis.legend(fontsize=7)
    figure.suptitle(f"spin-ray run {run}", fontsize=10)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def write_report(layout: RunLayout) -> dict:
    """Write report.json, report.md and report.png under the run folder; return their paths."""
    manifest = Manifest.read(layout.root)
    if manifest is None:
        raise FileNotFoundError(f"no manifest.json under {layout.root}: not a spin-ray run folder")
    data = manifest.data
    rows = iteration_rows(data)
    paths = {kind: layout.report(kind) for kind in ("json", "markdown", "plot")}
    stored = data["config"]
    algorithm = (
        SFT if stored.get("training", {}).get("objective") == "sft" else ALGORITHMS[stored.get("algorithm", "spin")]
    )
    payload = {"run": data["run"], "algorithm": algorithm.name, "status": data["status"],
               "config_hash": data["config_hash"], "code_version": data.get("code_version"),
               "final_model": data.get("final_model"), "rows": rows}
    atomic_write_bytes(paths["json"], json.dumps(payload, indent=2).encode())
    markdown = [
        f"# spin-ray run `{data['run']}`", "",
        f"algorithm **{algorithm.name}**, status **{data['status']}**, config hash `{data['config_hash']}`, "
        f"code {data.get('code_version')}, {len(data.get('jobs', []))} job(s)", "",
        "p0 is the initial model; p(t+1) is trained in iteration t against opponent p(t). Reward accuracy is "
        "measured on held-out prompts: p(t+1)'s SPIN reward of the human answer vs p(t)'s own answer. "
        f"Train margin: {algorithm.margin_caption}.", "",
        format_table(data, markdown=True), "",
        "Times are seconds of wall clock per phase (generation includes reference scoring; training excludes "
        "export). Tokens/s: generated tokens for generation, policy tokens (prompt+answer, both answers) for training.",
        "", f"![metrics per iteration]({paths['plot'].rsplit('/', 1)[-1]})", "",
    ]
    atomic_write_bytes(paths["markdown"], "\n".join(markdown).encode())
    atomic_write_bytes(paths["plot"], _plot(rows, data["run"]))
    return paths


PHASE_ORDER = ("sft", "baseline_eval", "generate", "train", "evaluate")


# Ray's job states in which the job's driver no longer runs.
ENDED_JOB_STATES = ("STOPPED", "FAILED", "SUCCEEDED")


def holder_process_alive(holder: dict) -> bool | None:
    """Whether the lease holder's process still runs, when it ran on this host (a local run, or status asked on the
    head node); None when it ran elsewhere."""
    import socket

    import psutil

    if holder.get("host") != socket.gethostname() or not holder.get("pid"):
        return None
    return psutil.pid_exists(int(holder["pid"]))


def run_state(manifest: dict, holder: dict | None, holder_job: str | None = None) -> str:
    """running (a live driver holds the run's lease), interrupted (the manifest says running but nobody holds the
    lease, or the holder's job or process has ended: stopped, failed, its node lost), leased (a fresh lease, but
    neither Ray nor this host could say whether its job still runs), or the manifest's final status.
    `holder_job`: Ray's status of the lease holder's job, when the cluster could be asked."""
    if manifest["status"] != "running":
        return manifest["status"]
    if holder is None or holder_job in ENDED_JOB_STATES:
        return "interrupted"
    if holder_job is not None:
        return "running"
    alive = holder_process_alive(holder)
    if alive is None:
        return "leased"
    return "running" if alive else "interrupted"


def next_step(manifest: dict) -> str | None:
    """What a resubmission of the run does first: the earliest phase that is not done."""
    for name in PHASE_ORDER[:2]:
        phase = manifest["phases"].get(name)
        if phase and phase["status"] != "done":
            return f"{name} ({phase['status']}, attempt {phase['attempts'] + 1})"
    for record in manifest["iterations"]:
        for name in PHASE_ORDER[2:]:
            phase = record["phases"].get(name)
            if phase is None or phase["status"] != "done":
                state = "not started" if phase is None else f"{phase['status']}, attempt {phase['attempts'] + 1}"
                return f"iteration {record['iteration']} {name} ({state})"
    return None


def format_plan_check(checked: dict | None) -> str | None:
    """A training phase's measured peak memory and step time beside `spin-ray plan`'s, as one line."""
    if not checked:
        return None
    shown = {"peak_memory": lambda v: f"{v / 2**30:.2f} GiB", "step_seconds": lambda v: f"{v:.2f}s"}
    parts = [
        f"{key.replace('_', ' ')} {shown[key](entry['measured'])} (plan {shown[key](entry['planned'])}, "
        f"{entry['error']:+.0%}{', OFF' if entry['off'] else ''})"
        for key, entry in checked.items()
        if key in shown
    ]
    return "measured vs plan: " + "; ".join(parts)


def format_status(manifest: dict, holder: dict | None = None, holder_job: str | None = None) -> str:
    """Where a run stands: running or interrupted, then every phase with its status, attempts and seconds."""
    state = run_state(manifest, holder, holder_job)
    lines = [f"run {manifest['run']} ({manifest['run_dir']}): {state}, {len(manifest.get('jobs', []))} job(s), "
             f"config {manifest['config_hash']}, updated {manifest.get('updated')}"]
    if state == "running":
        lines.append(f"  driven by {holder.get('owner')}")
    elif state == "leased":
        left = max(0, round(holder.get("expires_at", 0) - time.time()))
        lines.append(f"  leased to {holder.get('owner')} on host {holder.get('host')}; whether its job still runs is "
                     f"unknown here: ask Ray with --address http://<head>:8265 (or set RAY_ADDRESS). If it has ended, "
                     f"the lease expires in {left}s and the run reads as interrupted")
    elif state == "interrupted":
        step = next_step(manifest)
        why = ("no live driver holds the run (stopped job or lost node)" if holder is None
               else f"its driver's Ray job is {holder_job}" if holder_job is not None
               else f"its driver's process ({holder.get('pid')} on this host) has ended")
        lines.append(f"  {why}; submitting the same config again continues it" + (f" with {step}" if step else ""))

    def describe(label: str, phase: dict) -> str:
        shown = "stopped" if state == "interrupted" and phase["status"] == "running" else phase["status"]
        extra = f", {phase['seconds']}s" if "seconds" in phase else ""
        error = f"\n      error: {phase['error']}" if phase.get("error") else ""
        checked = format_plan_check((phase.get("metrics") or {}).get("plan_check"))
        return f"  {label:<28} {shown:<8} attempts {phase['attempts']}{extra}{error}" + (
            f"\n      {checked}" if checked else "")

    order = {name: i for i, name in enumerate(PHASE_ORDER)}

    def ordered(phases: dict) -> list:
        return sorted(phases.items(), key=lambda item: order.get(item[0], len(order)))

    for name, phase in ordered(manifest["phases"]):
        lines.append(describe(name, phase))
    count = manifest["config"]["iterations"]["count"]
    for record in manifest["iterations"]:
        for name, phase in ordered(record["phases"]):
            lines.append(describe(f"iteration {record['iteration']}/{count} {name}", phase))
    if manifest.get("final_model"):
        lines.append(f"final model: {manifest['final_model']}")
    return "\n".join(lines)
