"""`spin-ray plan`: the arithmetic for known models, the activation formula against what autograd keeps, the paper's
recipe as a job, and the refusal `spin-ray run` gives before anything starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from spin_ray.config import load_config
from spin_ray.plan import (
    GB,
    Assumptions,
    ModelShape,
    format_plan,
    make_plan,
    micro_batch_flops,
    read_model_config,
    training_shape,
)

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "jobs" / "spin_zephyr7b_ultrachat.yaml"
LORA_RECIPE = ROOT / "jobs" / "spin_zephyr7b_lora_1gpu.yaml"
ZEPHYR = "alignment-handbook/zephyr-7b-sft-full"


def test_parameter_counts_are_exact(smollm2_path, tiny_model_dir):
    from spin_ray.models.resolution import load_model

    for folder in (smollm2_path, tiny_model_dir):
        model = load_model(folder)
        shape = ModelShape.from_config(json.loads((Path(folder) / "config.json").read_text()))
        assert shape.parameters == sum(p.numel() for p in model.parameters())  # tied head counted once
    assert ModelShape.from_config(read_model_config(ZEPHYR)).parameters == 7_241_732_096  # Mistral-7B's count


def test_the_recipe_workers_states_are_sixteen_bytes_a_parameter_over_eight_ranks_and_its_activations_per_formula():
    config = load_config(RECIPE)
    plan = make_plan(config)
    n = 7_241_732_096
    shard = -(-n // 8)
    memory = plan.memory.device
    assert (
        memory["master weights (fp32)"] == memory["gradients (fp32)"] == memory["optimizer state (fp32)"] == 4 * shard
    )
    shape = plan.shape
    layer = 218_112_000  # q, k, v, o, gate, up, down and two norms of a Mistral layer
    assert shape.layer_parameters == layer
    assert memory["gathered parameters"] == 2 * (2 * layer + 2 * 32000 * 4096 + 4096)  # bf16: 2 layers and the root
    assert memory["communication buffers"] == (2 + 4) * layer
    # micro-batch 8 pairs, prompt 512 and answers 512: the prompt computed once for both answers (prefix sharing)
    tokens = 8 * (512 + 2 * 512)
    per_token_layer = 2 * (4 + 4) * 4096 + 2 * (3 * 4096 + 2 * 1024 + 4 * 14336) + 4 * 32  # no checkpointing
    outside = (4 + 2) * 4096 + 8 * 128
    expected = tokens * (32 * 2 * 4096 + outside) + 8 * 2 * 512 * 2 * 4096 + tokens * per_token_layer
    assert memory["activations"] == expected and plan.memory_layout.activation_checkpointing
    without = plan.memory_without_checkpointing.device["activations"]
    # without checkpointing the second answer's attention also saves its own copy of the prompt's keys and values
    second_answer_keys_values = 8 * (512 + 512) * 2 * 1024 * 2 * 32
    assert without == tokens * (32 * per_token_layer + outside) + 8 * 2 * 512 * 2 * 4096 + second_answer_keys_values
    unshared = make_plan(load_config(RECIPE, ["training.prefix_sharing=false"]))
    assert unshared.memory.device["activations"] == (8 * 2 * 1024 * (32 * 2 * 4096 + outside + per_token_layer)
                                                     + 8 * 2 * 512 * 2 * 4096)
    assert unshared.seconds["training"] > 1.2 * plan.seconds["training"]  # the prompt's share of the FLOPs
    assert plan.fits and plan.memory.device_total < 0.9 * 80 * GB


def test_the_lora_recipe_on_one_gpu_counts_adapters_and_holds_the_frozen_base_in_bf16():
    """jobs/spin_zephyr7b_lora_1gpu.yaml: rank 16 on all seven projections of 32 Mistral layers is 32 x 16 x ((4096 +
    4096) x 2 + (4096 + 1024) x 2 + (4096 + 14336) x 3) = 41,943,040 parameters; they alone have float32 weights,
    gradients and optimizer state, the base is held in bf16 and needs no autocast copies, a frozen weight's backward
    skips its weight gradient, and an iteration exports and checkpoints the adapters only. It fits one A100 40 GB."""
    config = load_config(ROOT / "jobs" / "spin_zephyr7b_lora_1gpu.yaml")
    plan = make_plan(config)
    adapters, n = 41_943_040, 7_241_732_096
    assert plan.shape.lora_parameters(16, ("all-linear",)) == adapters
    memory = plan.memory.device
    assert memory["frozen base weights"] == 2 * n and memory["adapter weights (fp32)"] == 4 * adapters
    assert memory["gradients (fp32)"] == memory["optimizer state (fp32)"] == 4 * adapters  # RMSprop: one state
    assert memory["autocast weight copies"] == 2 * adapters
    assert plan.bytes["export"] == 4 * adapters and plan.bytes["checkpoints (while training)"] == 4 * adapters * 2
    full = make_plan(load_config(ROOT / "jobs" / "spin_zephyr7b_lora_1gpu.yaml", ["training.lora.rank=0"]))
    assert full.memory.device_total > 2 * plan.memory.device_total and not full.fits  # 47 GiB of states alone
    # the backward computes no base weight gradients: 2 (+1 recompute) passes of the base instead of 3 (+1), and of
    # the frozen head 3 instead of 4 (chunked); attention has no weights, its backward is whole either way; the
    # adapters train in every pass
    run = training_shape(config, 1, True)
    tokens, answer_tokens = run.tokens, run.answer_token_count
    saved = (2 * 32 * 218_112_000 * tokens + 2 * 4096 * 32000 * answer_tokens - 2 * adapters * tokens * 4)
    assert micro_batch_flops(plan.shape, replace(run, lora_rank=0)) - micro_batch_flops(plan.shape, run) == saved
    assert 0.74 < plan.seconds["training"] / full.seconds["training"] < 0.78
    forty = make_plan(load_config(ROOT / "jobs" / "spin_zephyr7b_lora_1gpu.yaml",
                                  ["training.accelerator_type=A100", "generation.accelerator_type=A100"]))
    assert plan.fits and forty.fits and forty.memory.device_total < 0.9 * 40 * GB


def test_the_recipe_plan_on_80_and_40_gb_cards():
    """On 8 x 80 GB it fits (about 19 GiB a GPU: no reference model is held, the states are sharded, layers are
    recomputed); without checkpointing it is refused even there (~92 GiB). On 40 GB cards the same plan fits with
    checkpointing; offload moves the 10 GiB of float32 states to the host."""
    recipe = load_config(RECIPE)
    plan = make_plan(recipe)
    assert plan.fits and plan.seconds["training"] > plan.seconds["generation: decoding"] > 0
    assert plan.bytes["export"] == 7_241_732_096 * 2
    no_checkpointing = make_plan(load_config(RECIPE, ["training.activation_checkpointing=false"]))
    assert not no_checkpointing.fits and "training.activation_checkpointing=true" in no_checkpointing.problems[0]
    forty = make_plan(load_config(RECIPE, ["training.accelerator_type=A100"]))
    assert forty.fits and forty.training_gpu == "A100 40 GB"
    offload = make_plan(load_config(RECIPE, ["training.accelerator_type=A100", "training.cpu_offload=true"]))
    assert offload.memory.host_total == 3 * 4 * -(-7_241_732_096 // 8)
    assert offload.memory.device_total < forty.memory.device_total - 9 * GB


def test_the_trainers_reference_pass_is_one_forward_over_every_example_in_the_iterations_time():
    """A GPU job's reference comes from the training workers (training.reference auto): one forward over all 100,000
    examples of an iteration (its 50,000 pairs and the previous iteration's) at the training rate, against training's
    2 epochs of forward, backward and recompute (4 passes): an eighth of training, give or take the LM head."""
    plan = make_plan(load_config(RECIPE))
    reference, training = plan.seconds["reference pass (training workers)"], plan.seconds["training"]
    assert 0.11 < reference / training < 0.14
    assert plan.seconds["total"] == pytest.approx(sum(v for k, v in plan.seconds.items() if k != "total"))
    engine = make_plan(load_config(RECIPE, ["training.reference=engine"]))
    assert "reference pass (training workers)" not in engine.seconds


def test_generation_counts_prefill_scoring_kv_reads_and_the_handoff_of_each_model():
    """The recipe on L4s (121 TFLOP/s, 300 GB/s; 8 replicas; 50,000 prompts of 256+256 tokens at the mean, answers
    of 128). Decoding reads the 14.48 GB of weights and 50 sequences' KV cache at the mean context (256 + 64 tokens x
    131,072 bytes = 2.10 GB) a step: 50 / 55.3 ms = 905 tokens/s, not the weights-only 1,036. Prefill runs the decoder
    layers (2 x 32 x 218.1M FLOPs a token at half the peak: 4,334 tokens/s); with the trainer's reference that is all
    (6,250 prompts a replica x 256 tokens: 369 s); with training.reference=engine each prompt is prefilled again with
    its human answer and with the previous iteration's answer it mixes in (896 tokens, the LM head on each:
    4,254 tokens/s): 1,686 s. Staging moves the 14.5 GB export at 0.5 GB/s to each node; a LoRA run moves its adapter
    only, and a CPU fleet that serves it merged reads and writes the whole model once more on each node."""
    plan = make_plan(load_config(RECIPE))
    assert plan.engine.tokens_per_second == pytest.approx(50 / ((14_483_464_192 + 50 * 131_072 * 320) / 300e9))
    assert plan.engine.prefill_tokens_per_second == pytest.approx(121e12 * 0.5 / (2 * 32 * 218_112_000))
    assert plan.seconds["generation: prefill and scoring"] == pytest.approx(6250 * 256 / 4334.07, rel=1e-4)
    engine = make_plan(load_config(RECIPE, ["training.reference=engine"]))
    scoring = engine.engine.scoring_tokens_per_second
    assert scoring == pytest.approx(121e12 * 0.5 / (2 * 32 * 218_112_000 + 2 * 4096 * 32_000))
    assert engine.seconds["generation: prefill and scoring"] == pytest.approx(6250 * (256 / 4334.07 + 896 / scoring),
                                                                              rel=1e-4)
    unmixed = make_plan(load_config(RECIPE, ["training.reference=engine", "iterations.mix_previous=false"]))
    assert unmixed.seconds["generation: prefill and scoring"] == pytest.approx(6250 * (256 / 4334.07 + 512 / scoring),
                                                                               rel=1e-4)
    assert plan.seconds["staging (p_t on each node)"] == pytest.approx(14_483_464_192 / 0.5e9)
    assert plan.seconds["engine start (one per pass)"] == pytest.approx(90 + 14_483_464_192 / 1e9)
    assert plan.seconds["export (rank 0 writes p_t+1)"] == pytest.approx(7 / 8 * 7_241_732_096 * 4 / 150e9
                                                                         + 14_483_464_192 / 0.15e9)
    lora = make_plan(load_config(LORA_RECIPE))
    adapters = lora.bytes["export"]
    assert adapters < 0.02 * plan.bytes["export"]
    assert lora.seconds["staging (p_t on each node)"] == pytest.approx(adapters / 0.5e9)
    on_cpu = make_plan(load_config(LORA_RECIPE, ["generation.use_gpu=false", "generation.accelerator_type=null"]),
                       Assumptions(cpu_engine_gflops=100.0))
    assert on_cpu.seconds["staging (p_t on each node)"] == pytest.approx(adapters / 0.5e9 + 2 * 14_483_464_192 / 1e9)
    table = format_plan(plan, load_config(RECIPE))
    for line in ("staging (p_t on each node)", "engine start (one per pass)", "generation: prefill and scoring",
                 "generation: decoding", "loading (rank 0 reads, broadcasts)", "export (rank 0 writes p_t+1)",
                 "checkpoints (training held up)"):
        assert line in table


def test_checkpoints_by_time_in_the_background_hold_the_recipe_up_seconds_where_every_50_steps_blocking_took_50_min():
    """A save writes each of 8 ranks' share of 7.24e9 float32 weights and RMSprop's state (7.24 GB) at 0.15 GB/s: 48 s.
    Every 50 steps of the recipe's ~1,560 that is 31 saves, ~50 min of training stopped. By time (20 x 48 s) and in the
    background (the copy to host memory, ~0.7 s a save) it is seconds."""
    old = make_plan(load_config(RECIPE, ["training.checkpoint_every=50", "training.async_checkpoint=false"]))
    new = make_plan(load_config(RECIPE))
    assert 2400 < old.seconds["checkpoints (training held up)"] < 3600
    assert new.seconds["checkpoints (training held up)"] < 30
    assert load_config(RECIPE).training.checkpoint_every == "auto"


def test_a_phases_planned_step_counts_each_example_once_however_it_is_split_into_micro_batches(smollm2_path):
    """The step time a training phase is checked against: a rank's 8 examples as 4 micro-batches of 2 or 1 of 8 are
    the same FLOPs (one worker: no collectives), and 16 examples twice those. (It once counted a rank's whole share
    in every micro-batch: 4x here, 2x in the SmolLM2 end-to-end run, which then read -54% against its plan.)"""
    from spin_ray.plan import phase_prediction

    shape = ModelShape.from_config(read_model_config(smollm2_path))

    def step(batch: int, micro: int) -> float:
        config = load_config(None, [f"model.name={smollm2_path}", "training.num_workers=[1,1]",
                                    f"training.global_batch_size={batch}", f"training.micro_batch_size={micro}"])
        return phase_prediction(config, shape, 1, False, False, (200, 100), (120, 60), 0, 1e11, 1e9)["step_seconds"]

    assert step(8, 2) == pytest.approx(step(8, 8), rel=1e-9)
    assert step(16, 2) == pytest.approx(2 * step(8, 2), rel=1e-9)


def test_prompt_scoring_is_planned_outside_vllms_profile():
    """vLLM's prompt log-probs build a request's logits and their float32 log-softmax beside its memory profile: the
    recipe's 1,024-token requests take 1024 x 32,000 x (2 + 4) bytes, room that generation.gpu_memory_utilization must
    leave on each L4 (22.5 GiB usable); at 0.99 it does not, and the plan names the key."""
    plan = make_plan(load_config(RECIPE))
    assert plan.engine.scoring_bytes == 1024 * 32_000 * 6
    assert plan.engine.scoring_room == pytest.approx(22.5 * GB * 0.1, abs=1)
    greedy = make_plan(load_config(RECIPE, ["generation.gpu_memory_utilization=0.99"]))
    assert not greedy.fits and "lower generation.gpu_memory_utilization" in greedy.problems[0]
    chunked = make_plan(load_config(RECIPE, ["generation.vllm_engine_kwargs={max_num_batched_tokens: 512}"]))
    assert chunked.engine.scoring_bytes == 512 * 32_000 * 6


def test_auto_checkpointing_turns_on_where_the_step_does_not_fit():
    from spin_ray.plan import choose_layout

    recipe = load_config(RECIPE, ["training.activation_checkpointing=auto"])
    shape = ModelShape.from_config(read_model_config(ZEPHYR))
    assert choose_layout(recipe, shape, 8, 80 * 1024**3).activation_checkpointing
    assert not choose_layout(recipe, shape, 8, None).activation_checkpointing  # CPU: off
    small = load_config(RECIPE, ["training.activation_checkpointing=auto", "training.micro_batch_size=1",
                                 "data.max_prompt_tokens=64", "data.max_response_tokens=64",
                                 "generation.max_new_tokens=32"])
    assert not choose_layout(small, shape, 8, 80 * 1024**3).activation_checkpointing
    assert choose_layout(recipe, shape, 8, 80 * 1024**3).sharded_accumulation  # 40 GiB full copy > a quarter


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_activation_formula_is_what_autograd_keeps(smollm2_path, checkpointing):
    """Bytes of the tensors autograd saves for backward (storages counted once) on SmolLM2 in fp32, per token: the
    plan's per-layer formula times the layers plus what it counts outside them, within 2%."""
    from spin_ray.models.resolution import load_model
    from spin_ray.objectives.logprobs import answer_logps
    from spin_ray.training.parallel import enable_activation_checkpointing

    model = load_model(smollm2_path)
    model.config.use_cache = False
    model.train()
    if checkpointing:
        enable_activation_checkpointing(model)
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes(length: int) -> int:
        seen = {}

        def pack(tensor):
            pointer = tensor.untyped_storage().data_ptr()
            if pointer not in parameters:
                seen[pointer] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            answer_logps(model, [[1] * 64], [[[2] * (length - 64)]], 0, pack=True, logits_chunk_rows=128)
        return sum(seen.values())

    per_token = (saved_bytes(512) - saved_bytes(256)) / 256
    shape = ModelShape.from_config(json.loads((Path(smollm2_path) / "config.json").read_text()))
    # saved across the whole model per token: the layers, the final norm's input and scaled copy, rotary tables,
    # the head's input row (every token here is an answer token but the prompt's)
    planned = (shape.layers * shape.activation_bytes_per_token(4, checkpointing) + (4 + 4) * shape.hidden
               + 8 * shape.head_dim + 4 * shape.hidden)
    assert per_token == pytest.approx(planned, rel=0.02)


def test_the_recipe_job_loads_its_keys():
    config = load_config(RECIPE)
    t = config.training
    assert (t.compute_dtype, t.activation_checkpointing, config.model.dtype) == ("bfloat16", True, "bfloat16")
    assert (t.learning_rate, t.global_batch_size, t.epochs, t.optimizer, t.beta) == (5e-7, 64, 2, "rmsprop", 0.1)
    assert config.iterations.mix_previous and config.iterations.learning_rates == [5e-7, 1e-7]
    assert (config.data.max_prompt_tokens, config.data.limit, config.generation.max_new_tokens) == (512, 50000, 256)


def test_iterations_take_their_learning_rate():
    from spin_ray.run.driver import iteration_config

    config = load_config(RECIPE)
    assert [iteration_config(config, t).training.learning_rate for t in range(4)] == [5e-7, 1e-7, 1e-7, 1e-7]
    plain = load_config(None, ["training.learning_rate=3e-6"])
    assert iteration_config(plain, 2).training.learning_rate == 3e-6


def test_run_refuses_a_config_that_cannot_fit_in_one_line_before_ray(tmp_path):
    """The recipe without checkpointing on 40 GB cards: exit 2, one line naming the keys, no Ray started, in
    seconds. The model is a folder holding only zephyr's config.json, the data a small multi-turn file."""
    model = tmp_path / "zephyr-config-only"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(read_model_config(ZEPHYR)))
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                             {"role": "assistant", "content": "Hello!"}]}) + "\n")
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": ""}
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "spin_ray.cli", "run", str(RECIPE), f"model.name={model}", f"data.train={data}",
         "data.eval=null", f"run.storage_path={tmp_path / 'runs'}", "training.accelerator_type=A100",
         "training.activation_checkpointing=false"], capture_output=True, text=True, env=env, timeout=120)
    assert time.monotonic() - started < 30
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("spin-ray run: error: training: a worker needs 91.6 GiB of its A100 40 GB GPU")
    assert "training.activation_checkpointing=true" in lines[0] and "training.micro_batch_size" in lines[0]
    assert not list(ray_tmp.iterdir())  # no Ray session was started
    assert "Traceback" not in result.stderr


def test_plan_prints_the_table_and_says_whether_it_fits():
    result = subprocess.run([sys.executable, "-m", "spin_ray.cli", "plan", str(RECIPE)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for line in (
        "7,241,732,096 parameters",
        "master weights (fp32)",
        "activations",
        "KV cache per GPU",
        "sequences of 512+256 tokens at once",
        "time per iteration (50,000 prompts, from data.limit",
        "checkpoints (while training)",
        "reference pass (training workers)",
        "prompt scoring (outside the profile)",
        "verdict: fits (A100-80G for training, L4 22.5 GB for generation)",
    ):
        assert line in out, line
    refused = subprocess.run([sys.executable, "-m", "spin_ray.cli", "plan", str(RECIPE),
                              "training.activation_checkpointing=false"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "verdict: does NOT fit" in refused.stdout
    bad = subprocess.run([sys.executable, "-m", "spin_ray.cli", "plan", str(RECIPE), "--assume", "speed=3"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--assume 'speed=3': expected name=value" in bad.stderr


def test_every_node_type_the_docs_name_has_its_datasheet_figures():
    """The accelerator types a user can name (the cluster files' and the docs'), each with its memory, dense bf16
    peak and bandwidth; L40S and A10G were once lost to a comment that swallowed them."""
    from spin_ray.plan import ACCELERATORS, accelerator

    for name in ("A100", "A100-80G", "H100", "H200", "B200", "L4", "L40S", "A10G", "V100", "T4"):
        label, gpu = accelerator(name, None)
        assert gpu is ACCELERATORS[name] and gpu.memory_gb > 0 and gpu.peak_tflops > 0 and gpu.bandwidth_gbs > 0
    assert accelerator("L40S", None) == ("L40S 48 GB", ACCELERATORS["L40S"])
