"""SPIN training on real Ray Train with FSDP2 (2 gloo workers) and the tiny model: a killed worker
resumes from its checkpoint to the same final weights, and every pair is seen once per epoch."""

import json
import os

import pytest
import torch

from spin_ray.config import load_config
from spin_ray.generation.pipeline import run_generation
from spin_ray.models.resolution import load_model
from spin_ray.run.layout import RunLayout
from spin_ray.training.checkpoint import committed_steps
from spin_ray.training.loop import read_metrics_log
from spin_ray.training.trainer import run_training

pytestmark = pytest.mark.ray


def fail_once_at(step: int):
    """A per-step callback: the last rank exits hard (as on a lost node) entering `step`, once per run folder."""

    def on_step(current: int, context, train_dir: str) -> None:
        marker = os.path.join(train_dir, f".failed_at_{step}")
        if current != step or context.rank != context.world_size - 1 or os.path.exists(marker):
            return
        open(marker, "w").close()
        os._exit(1)  # Ray Train restarts the worker group, when max_failures allows

    return on_step  # a closure: Ray pickles it by value into the workers


def _generate(config, model):
    return run_generation(config, model, RunLayout.of(config).generation(0)).dataset


def _train(config, pairs, model, on_step=None):
    layout = RunLayout.of(config)
    return run_training(config, pairs, model, layout.train(0), layout.model(0), on_step=on_step)


def _dir(config, kind):
    return getattr(RunLayout.of(config), kind)(0)


def _config(tmp_path, tiny_model_dir, run, **extra):
    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        data.write_text(
            "".join(
                json.dumps({"prompt": f"What is {i} times 3?", "response": f"{3 * i}.\n#### {3 * i}"}) + "\n"
                for i in range(8)
            )
        )
    overrides = [f"model.name={tiny_model_dir}", f"data.train={data}", "data.eval=null",
                 f"run.storage_path={tmp_path / 'runs'}", f"run.name={run}", "generation.max_new_tokens=6",
                 "generation.replicas=[1,1]", "training.global_batch_size=4", "training.micro_batch_size=1",
                 "training.epochs=2", "training.checkpoint_every=1", "training.learning_rate=1e-3",
                 "training.optimizer=adamw", "training.num_workers=[2,2]", "training.max_failures=2"]
    return load_config(overrides=overrides + [f"{k}={v}" for k, v in extra.items()])


def _weights(path):
    model = load_model(path)
    return torch.cat([p.detach().flatten() for _, p in sorted(model.named_parameters())])


def test_killed_worker_resumes_to_the_same_weights(ray_session, tmp_path, tiny_model_dir):
    clean = _config(tmp_path, tiny_model_dir, "clean")
    pairs = _generate(clean, tiny_model_dir)
    reference = _train(clean, pairs, tiny_model_dir)
    assert reference.steps == 4 and reference.resumed_from_step == 0

    faulty = _config(tmp_path, tiny_model_dir, "faulty")
    summary = _train(faulty, pairs, tiny_model_dir, on_step=fail_once_at(2))
    assert summary.resumed_from_step == 2  # the restarted group loaded the step-2 checkpoint
    log = read_metrics_log(_dir(faulty, "train"))
    assert [line["step"] for line in log] == [1, 2, 3, 4]
    for epoch in (0, 1):
        seen = [pid for line in log if line["epoch"] == epoch for pid in line["prompt_ids"]]
        assert sorted(seen) == sorted(r["prompt_id"] for r in pairs.take_all())  # each pair once per epoch
    assert torch.allclose(_weights(_dir(faulty, "model")), _weights(_dir(clean, "model")), atol=1e-5)
    assert committed_steps(_dir(faulty, "train")) == []  # the export superseded the checkpoint it resumed from
    # policy == reference at the start: the preference term is log 2, plus RPO's alpha x the human answers' NLL
    assert faulty.training.nll_weight == 0.2  # SPIN's recommended default
    assert log[0]["loss"] == pytest.approx(0.6931 + 0.2 * log[0]["nll/real"], abs=1e-3)
    # a finished iteration is not trained again
    assert _train(faulty, pairs, tiny_model_dir).steps == 4


def test_checkpoint_of_2_workers_resumes_with_1(ray_session, tmp_path, tiny_model_dir):
    two = _config(tmp_path, tiny_model_dir, "reshard", **{"training.max_failures": 0})
    pairs = _generate(two, tiny_model_dir)
    with pytest.raises(Exception):
        _train(two, pairs, tiny_model_dir, on_step=fail_once_at(2))  # no restarts allowed: the run fails after step 2
    train_dir = _dir(two, "train")
    assert [line["step"] for line in read_metrics_log(train_dir)] == [1, 2]  # died entering step 3
    one = _config(tmp_path, tiny_model_dir, "reshard", **{"training.num_workers": "[1,1]"})
    summary = _train(one, pairs, tiny_model_dir)
    assert summary.resumed_from_step == 2 and summary.steps == 4
    log = read_metrics_log(train_dir)
    assert [line["step"] for line in log] == [1, 2, 3, 4]  # the loss continues from step 3, nothing redone twice
    clean = _config(tmp_path, tiny_model_dir, "reshard-clean")
    _train(clean, pairs, tiny_model_dir)
    # the same global batches and the same gradients, summed in another order
    assert torch.allclose(_weights(_dir(one, "model")), _weights(_dir(clean, "model")), atol=1e-4)


def test_bad_pairs_are_refused_before_workers_start(ray_session, tmp_path, tiny_model_dir):
    import math

    import ray

    from spin_ray.objectives.algorithms import TrainingDataError

    config = _config(tmp_path, tiny_model_dir, "bad")
    rows = _generate(config, tiny_model_dir).take_all()
    broken = [dict(r) for r in rows]
    broken[3]["ref_logp_real"] = math.nan
    with pytest.raises(TrainingDataError, match="field 'ref_logp_real': not finite"):
        _train(config, ray.data.from_items(broken), tiny_model_dir)
    with pytest.raises(TrainingDataError, match="no column"):
        _train(config, ray.data.from_items([{"prompt_id": r["prompt_id"]} for r in rows]), tiny_model_dir)
    with pytest.raises(TrainingDataError, match="larger than the data"):
        _train(config, ray.data.from_items(rows[:3]), tiny_model_dir)
    with pytest.raises(TrainingDataError, match="empty"):
        _train(config, ray.data.from_items(rows).filter(lambda r: False), tiny_model_dir)


def test_one_step_single_process_equals_two_fsdp_workers(ray_session, tmp_path, tiny_model_dir):
    from spin_ray.training.loop import train

    # one optimizer step over all 8 pairs: global batch 8, one epoch
    config = _config(tmp_path, tiny_model_dir, "equal", **{"training.global_batch_size": 8, "training.epochs": 1,
                                                           "training.micro_batch_size": 2})
    pairs = _generate(config, tiny_model_dir)
    single_dir = tmp_path / "single"
    alone = train(config, pairs.take_all(), tiny_model_dir, str(single_dir / "train"), str(single_dir / "model"))
    fsdp = _train(config, pairs, tiny_model_dir)  # 2 gloo workers, FSDP2
    assert alone.steps == fsdp.steps == 1
    assert fsdp.loss == pytest.approx(alone.loss, abs=1e-5)
    assert fsdp.last_step["rewards/margins"] == pytest.approx(alone.last_step["rewards/margins"], abs=1e-5)
    assert fsdp.last_step["grad_norm"] == pytest.approx(alone.last_step["grad_norm"], rel=1e-4)
    before = _weights(tiny_model_dir)
    single, sharded = _weights(single_dir / "model"), _weights(_dir(config, "model"))
    assert not torch.allclose(single, before)  # the step did move the weights
    assert torch.allclose(sharded, single, atol=1e-5)

