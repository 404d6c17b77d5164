"""Model selection on the validation split: the best model is kept as models are evaluated, and export follows it."""

import json

import pytest

from spin_ray.cli import main
from spin_ray.config import load_config
from spin_ray.data.records import in_validation, load_records
from spin_ray.models.resolution import FOLDER_MARKER
from spin_ray.run.layout import RunLayout
from spin_ray.run.manifest import Manifest
from spin_ray.run.report import format_table
from spin_ray.run.selection import better_model


def _pick(history, select_by="nll_per_token"):
    chosen = None
    for t, metrics in enumerate(history):
        chosen = better_model(chosen, {"model": f"p{t}", "iteration": t - 1 if t else None, "path": f"m{t}"}, metrics,
                              select_by)
    return chosen


def test_the_best_validation_model_is_kept_whichever_comes_last():
    nll = [{"validation_nll_per_token": v} for v in (1.20, 1.08, 1.11)]  # p2 collapsed a little
    chosen = _pick(nll)
    assert chosen["model"] == "p1" and chosen["iteration"] == 0 and chosen["value"] == 1.08
    assert chosen["by"] == "validation nll_per_token"
    accuracy = [{"validation_accuracy": v} for v in (0.02, 0.05, 0.05)]  # a tie keeps the earlier model
    assert _pick(accuracy, "accuracy")["model"] == "p1"
    assert _pick([{"validation_nll_per_token": v} for v in (1.0, 1.1, 1.2)])["model"] == "p0"  # nothing improved
    unvalidated = _pick([{}, {}, {}])
    assert unvalidated["model"] == "p2" and unvalidated["value"] is None and "no validation split" in unvalidated["by"]


def test_the_validation_carve_is_disjoint_stable_and_about_its_fraction():
    config = load_config(None, ["data.validation_fraction=0.1"])
    train, _ = load_records("gsm8k", config.data, part="train")
    validation, _ = load_records("gsm8k", config.data, part="validation")
    train_ids, validation_ids = (
        set(train.column("prompt_id").to_pylist()),
        set(validation.column("prompt_id").to_pylist()),
    )
    assert not train_ids & validation_ids and len(train_ids) + len(validation_ids) == 7473
    assert 0.08 < len(validation_ids) / 7473 < 0.12
    assert all(in_validation(pid, 0.1) for pid in validation_ids)
    assert all(in_validation(pid, 0.2) for pid in validation_ids)  # a larger fraction holds the smaller one's


@pytest.fixture
def trained_run(tmp_path):
    """A run whose manifest says p0, p1, p2 were evaluated on validation (p1 best), with complete model folders."""
    config = load_config(None, [f"run.storage_path={tmp_path}", "run.name=sel", "data.validation_fraction=0.05"])
    layout = RunLayout.of(config)
    manifest = Manifest.open(config)
    manifest.finish("baseline_eval", None, 1.0, {"validation_prompts": 64, "validation_nll_per_token": 1.2}, {})
    chosen = better_model(None, {"model": "p0", "iteration": None, "path": "base"}, {"validation_nll_per_token": 1.2},
                          "nll_per_token")
    for t, value in enumerate((1.08, 1.11)):
        folder = tmp_path / "sel" / f"iter_{t}" / "model"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"iteration": t}))
        (folder / FOLDER_MARKER).write_text("{}")
        manifest.finish("train", t, 1.0, {"steps": 1}, {"model": str(folder)})
        metrics = {"validation_prompts": 64, "validation_nll_per_token": value}
        manifest.finish("evaluate", t, 1.0, metrics, {})
        chosen = better_model(
            chosen, {"model": f"p{t + 1}", "iteration": t, "path": str(folder)}, metrics, "nll_per_token"
        )
    manifest.data["selected_model"] = chosen
    manifest.save()
    return layout, manifest


def test_export_report_and_card_follow_the_selection_and_last_is_a_flag_away(trained_run, tmp_path, capsys):
    layout, manifest = trained_run
    assert main(["export", layout.root, str(tmp_path / "best")]) == 0
    assert (
        "exported the best model on the validation split, p1 (validation nll_per_token 1.0800)"
        in capsys.readouterr().out
    )
    assert json.loads((tmp_path / "best" / "config.json").read_text()) == {"iteration": 0}
    card = (tmp_path / "best" / "README.md").read_text()
    assert "This is the run's selected model" in card and "selected: true" in card
    assert main(["export", layout.root, str(tmp_path / "last"), "--last"]) == 0
    assert "exported the last model, p2" in capsys.readouterr().out
    assert json.loads((tmp_path / "last" / "config.json").read_text()) == {"iteration": 1}
    assert "This is the run's selected model" not in (tmp_path / "last" / "README.md").read_text()
    rows = format_table(manifest.data).splitlines()
    assert "selected" in rows[0] and "best" in rows[2] and "best" not in rows[1] + rows[3]
