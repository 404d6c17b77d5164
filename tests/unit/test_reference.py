"""The reference log-probs' source (training.reference): engines where their numerics are the trainer's, else the
training workers' own forward pass; in one process, on two gloo ranks, and across a restarted stage."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.training_runs import logged_losses, on_ranks, spin_rows, train_stopped_at

ROOT = Path(__file__).resolve().parents[2]


def _config(model_dir, *overrides):
    from spin_ray.config import load_config

    return load_config(None, [f"model.name={model_dir}", "training.learning_rate=1e-4", "training.warmup_ratio=0",
                              "training.global_batch_size=4", "training.micro_batch_size=2", "training.epochs=2",
                              *overrides])


def _first_step(train_dir) -> dict:
    return json.loads((Path(train_dir) / "metrics.jsonl").read_text().splitlines()[0])


def bf16_engine_rows(chat, model_dir: str, count: int = 6) -> list[dict]:
    """SPIN rows from the HF engine holding the model in bfloat16: its answers, their log-probs summed while decoding
    and the human answers scored in the same prefill, as a fused generation pass gives them."""
    from spin_ray.generation.hf_engine import HFEngine
    from spin_ray.models.resolution import load_model

    prompts = chat.batch_prompt_ids(
        [[{"role": "user", "content": f"What is {i} + {i}? Explain."}] for i in range(count)]
    )
    reals = chat.batch_response_ids([f"{i} + {i} = {2 * i}\n#### {2 * i}" for i in range(count)])
    engine = HFEngine(load_model(model_dir, "bfloat16"), chat, max_new_tokens=16)
    answers = engine.generate(prompts, score=reals)
    return [{"prompt_id": f"p{i}", "prompt_token_ids": prompts[i], "real_token_ids": reals[i],
             "generated_token_ids": [answers[i].token_ids], "ref_logp_real": answers[i].scored_logp,
             "ref_logp_generated": [answers[i].logp]} for i in range(count)]


def test_auto_takes_the_engines_reference_for_the_cpu_demo_and_the_trainers_pass_for_every_gpu_job():
    from spin_ray.config import load_config

    assert load_config(ROOT / "jobs" / "gsm8k_smollm2_cpu.yaml").reference_source == "engine"
    for job in ("spin_zephyr7b_ultrachat.yaml", "spin_zephyr7b_lora_1gpu.yaml", "gsm8k_smollm2_gpu.yaml"):
        config = load_config(ROOT / "jobs" / job)
        assert config.reference_source == "trainer", job
        assert not config.engine_scores_reference and config.reference_tolerance == 0.001, job
    # on CPU, a dtype below float32 on either side is a mismatch as well
    assert load_config(None, ["model.dtype=bfloat16"]).reference_source == "trainer"
    assert load_config(None, ["training.compute_dtype=bfloat16"]).reference_source == "trainer"
    assert (
        load_config(None, ["training.reference=engine", "training.compute_dtype=bfloat16"]).reference_source == "engine"
    )


def test_a_bf16_engines_reference_is_off_at_step_0_where_the_trainers_own_pass_is_exact(tiny_model_dir, chat, tmp_path):
    """The engine answers and scores in bfloat16, training computes in float32: the fused reference differs from the
    policy at step 0 by bf16's error (3.6e-4 nats per token on this model; 0.034 on SmolLM2), the trainer's pass by
    nothing. The generation columns are ignored with the trainer's reference, so the rows could carry none."""
    rows = bf16_engine_rows(chat, tiny_model_dir)
    gaps = {}
    for source in ("engine", "trainer"):
        config = _config(tiny_model_dir, "model.dtype=bfloat16", f"training.reference={source}",
                         "training.reference_check_tolerance=null")
        from spin_ray.training.loop import train

        summary = train(
            config, rows, tiny_model_dir, str(tmp_path / source / "train"), str(tmp_path / source / "model")
        )
        gaps[source] = _first_step(tmp_path / source / "train")["reference_gap"]
        assert summary.reference_source == source
    assert gaps["engine"] > 1e-4
    assert gaps["trainer"] < 1e-7
    assert summary.reference_pass == "scored" and summary.reference_pass_seconds > 0

    from spin_ray.objectives.algorithms import TrainingDataError
    from spin_ray.training.loop import train

    # the engine's reference at its auto tolerance (0.05) passes here; at the trainer's (0.001) it is refused
    strict = _config(tiny_model_dir, "model.dtype=bfloat16", "training.reference=engine",
                     "training.reference_check_tolerance=0.0001")
    with pytest.raises(TrainingDataError, match="set training.reference=trainer"):
        train(strict, rows, tiny_model_dir, str(tmp_path / "strict" / "train"), str(tmp_path / "strict" / "model"))
    # the trainer's pass needs none of the engine's columns
    bare = [{k: v for k, v in row.items() if not k.startswith("ref_")} for row in rows]
    config = _config(tiny_model_dir, "model.dtype=bfloat16")  # auto: the trainer's pass
    summary = train(config, bare, tiny_model_dir, str(tmp_path / "bare" / "train"), str(tmp_path / "bare" / "model"))
    assert summary.reference_source == "trainer" and _first_step(tmp_path / "bare" / "train")["reference_gap"] < 1e-7


def test_the_reference_pass_covers_every_example_once_with_step_0s_micro_batches_first():
    """Epoch 0's global batches cut as training cuts them, then what epoch 0 leaves out, spread over the ranks; every
    rank runs as many forwards."""
    from spin_ray.training.data import Schedule
    from spin_ray.training.reference import reference_micro_batches

    schedule = Schedule(num_pairs=11, global_batch_size=4, micro_batch_size=1, epochs=2, seed=3)
    per_rank = {rank: reference_micro_batches(schedule, rank, 2) for rank in range(2)}
    assert len(per_rank[0]) == len(per_rank[1])
    scored = [int(i) for batches in per_rank.values() for micro in batches if micro is not None for i in micro]
    assert sorted(scored) == list(range(11))
    for rank in range(2):
        step0 = schedule.micro_batches(0, rank, 2)
        assert [list(m) for m in per_rank[rank][:len(step0)]] == [list(m) for m in step0]


def train_with_trainer_reference(rank, world, model_dir, rows, train_dir, export_dir, overrides):
    from spin_ray.config import load_config
    from spin_ray.training.loop import WorkerContext, train

    config = load_config(None, [f"model.name={model_dir}", "training.learning_rate=1e-4", "training.warmup_ratio=0",
                                "training.global_batch_size=4", "training.micro_batch_size=1", "training.epochs=2",
                                "training.reference=trainer", *overrides])
    summary = train(config, rows, model_dir, train_dir, export_dir, WorkerContext(rank, world))
    return {key: getattr(summary, key) for key in ("steps", "reference_pass", "reference_source")}


def test_two_fsdp2_ranks_score_the_same_reference_as_one_process_and_bf16_meets_its_own(tiny_model_dir, chat, tmp_path):
    """Each rank scores its share and one all-reduce gives every rank all of them: two float32 ranks store the
    reference one process stores, and train to its losses; in bf16 under FSDP2's MixedPrecisionPolicy step 0's gap
    to its own reference is 0, far inside the trainer's tolerance."""
    import pyarrow.parquet as pq

    from spin_ray.training.loop import train
    from spin_ray.training.reference import REFERENCE_FILE

    rows = spin_rows(chat, tiny_model_dir, count=6)
    for row in rows:
        row["ref_logp_real"], row["ref_logp_generated"] = None, [None]  # nobody scored them: the trainer does
    config = _config(tiny_model_dir, "training.reference=trainer", "training.micro_batch_size=1")
    train(config, rows, tiny_model_dir, str(tmp_path / "one" / "train"), str(tmp_path / "one" / "model"))
    for name, overrides in {"two": [], "two-bf16": ["training.compute_dtype=bfloat16"]}.items():
        out = tmp_path / name
        summaries = on_ranks("tests.unit.test_reference.train_with_trainer_reference", model_dir=tiny_model_dir,
                             rows=rows, train_dir=str(out / "train"), export_dir=str(out / "model"),
                             overrides=overrides)
        assert [s["reference_pass"] for s in summaries] == ["scored", "scored"]
    one = pq.read_table(tmp_path / "one" / "train" / REFERENCE_FILE).to_pydict()
    two = pq.read_table(tmp_path / "two" / "train" / REFERENCE_FILE).to_pydict()
    assert one["prompt_id"] == two["prompt_id"] == sorted(f"p{i}" for i in range(6))
    assert torch.allclose(torch.tensor(two["ref_logps"]), torch.tensor(one["ref_logps"]), atol=1e-4, rtol=0)
    assert logged_losses(tmp_path / "two" / "train") == pytest.approx(logged_losses(tmp_path / "one" / "train"),
                                                                      abs=1e-5)
    assert _first_step(tmp_path / "two-bf16" / "train")["reference_gap"] < 1e-3


def test_a_restarted_stage_reads_its_reference_back_and_ends_where_an_uninterrupted_one_does(tiny_model_dir, chat,
                                                                                           tmp_path):
    """The reference is p_t's, scored before the first step and stored; a stage restarted after a checkpoint (its
    model now that checkpoint) reads it back instead of scoring the checkpoint, and exports the uninterrupted
    weights."""
    from spin_ray.training.loop import train

    rows = spin_rows(chat, tiny_model_dir, count=4)
    config = _config(tiny_model_dir, "training.reference=trainer", "training.checkpoint_every=1",
                     "training.global_batch_size=2", "training.micro_batch_size=1")
    whole = train(config, rows, tiny_model_dir, str(tmp_path / "whole" / "train"), str(tmp_path / "whole" / "model"))
    assert whole.steps == 4 and whole.reference_pass == "scored"
    train_dir = str(tmp_path / "cut" / "train")
    train_stopped_at(2, config, rows, tiny_model_dir, train_dir, str(tmp_path / "cut" / "model"))
    resumed = train(config, rows, tiny_model_dir, train_dir, str(tmp_path / "cut" / "model"))
    assert resumed.resumed_from_step == 2 and resumed.reference_pass == "stored"
    assert logged_losses(train_dir) == pytest.approx(logged_losses(tmp_path / "whole" / "train"), abs=1e-6)
    expected = load_file(os.path.join(tmp_path / "whole" / "model", "model.safetensors"))
    got = load_file(os.path.join(tmp_path / "cut" / "model", "model.safetensors"))
    for key, value in expected.items():
        assert torch.allclose(got[key], value, atol=1e-7, rtol=0), key


def test_a_gpu_another_process_holds_is_waited_for_then_refused_in_one_line_naming_it():
    """Before a training worker loads: memory an engine is still freeing is waited for; memory a process keeps is
    refused in one line naming it and what it holds. The readings are given here (no GPU on this machine): on a GPU
    they are CUDA's free memory and NVML's process list."""
    from spin_ray.training.gpu import GB, GPUBusyError, Holder, wait_for_free_gpu

    readings = iter([(2 * GB, 80 * GB), (2 * GB, 80 * GB), (70 * GB, 80 * GB)])  # an engine exiting
    assert wait_for_free_gpu(0, 30 * GB, limit_s=5, memory=lambda: next(readings), holders=lambda: [],
                             sleep=lambda s: None) >= 0
    leftover = [Holder(4242, "ray::MapWorker(MapBatches(GenerateStage))", int(71.5 * GB)), Holder(17, "python", GB)]
    with pytest.raises(GPUBusyError) as refused:
        wait_for_free_gpu(3, 30 * GB, limit_s=0.2, memory=lambda: (int(7.5 * GB), 80 * GB), holders=lambda: leftover)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(
        "training: GPU 3 has 7.5 GiB free of 80.0 GiB after waiting 0s, and a worker needs 30.0 GiB"
    )
    assert "pid 4242 (ray::MapWorker(MapBatches(GenerateStage))) 71.5 GiB; pid 17 (python) 1.0 GiB" in message


def test_a_training_phase_sets_its_peak_memory_and_step_time_beside_the_plans(tiny_model_dir, chat, tmp_path, capsys):
    """Every step logs its peak memory (resident high-water mark here; CUDA's allocator on a GPU); the phase's summary
    holds the largest and the median step time beside the plan's figures for the same lengths, and a warning line
    names what is past the plan's tolerance."""
    from spin_ray.plan import PLAN_TOLERANCE, describe_check, plan_check
    from spin_ray.run.report import format_plan_check
    from spin_ray.training.loop import train

    rows = spin_rows(chat, tiny_model_dir, count=4)
    config = _config(tiny_model_dir, "training.micro_batch_size=1")
    summary = train(config, rows, tiny_model_dir, str(tmp_path / "train"), str(tmp_path / "model"))
    steps = [json.loads(line) for line in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    assert all(step["peak_memory_bytes"] > 100 * 2**20 for step in steps)  # the interpreter and torch are in it
    checked = summary.plan_check
    assert set(checked) == {"peak_memory", "step_seconds"}
    assert checked["peak_memory"]["measured"] == max(step["peak_memory_bytes"] for step in steps)
    assert checked["peak_memory"]["tolerance"] == PLAN_TOLERANCE["peak_memory"]
    assert abs(checked["peak_memory"]["error"]) < 0.5  # a tiny model: the runtime it measured before the load dominates
    assert "measured vs plan: peak memory" in format_plan_check(checked)
    off = plan_check(
        {"peak_memory": 3.0 * 2**30, "step_seconds": 1.0}, {"peak_memory": 2.0 * 2**30, "step_seconds": 1.1}
    )
    assert off["peak_memory"]["off"] and not off["step_seconds"]["off"]
    assert describe_check(off).startswith(
        "plan check: peak memory 3.22e+09 against 2.15e+09 planned (+50%, beyond 20%)"
    )


def test_a_cpu_phases_step_time_is_planned_at_the_faster_of_its_start_and_end_rates():
    """A rate measured while other processes held the cores (the start of a phase, its engine pass going away) reads
    low and plans the step too slow; the end's measurement replaces it when faster, scaling the compute part only."""
    from spin_ray.training.measure import settle_cpu_rate

    slow = {"peak_memory_bytes": 1, "step_seconds": 12.0, "step_compute_seconds": 10.0, "flops_per_second": 1e6}
    settled = settle_cpu_rate(slow, torch.device("cpu"), 2, 1)
    rate = settled["flops_per_second"]
    assert rate > 1e9  # any CPU this runs on beats 1 MFLOP/s
    assert settled["step_compute_seconds"] == pytest.approx(10.0 * 1e6 / rate)
    assert settled["step_seconds"] == pytest.approx(2.0 + settled["step_compute_seconds"])  # communication kept
    fast = {**slow, "flops_per_second": 1e18}
    assert settle_cpu_rate(fast, torch.device("cpu"), 2, 1) == fast
    assert settle_cpu_rate(slow, torch.device("cuda"), 2, 1) == slow
    assert settle_cpu_rate(None, torch.device("cpu"), 2, 1) is None
