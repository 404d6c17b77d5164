"""Training layouts without Ray: mixed precision over float32 master weights, activation checkpointing, sharded
accumulation and rank-0 loading, in one process and on two gloo ranks (torch.multiprocessing, as torchrun would)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.training_runs import logged_losses, on_ranks, spin_rows

LR = 5e-7  # the paper's learning rate: a weight of 0.02 has a bf16 spacing of 1.2e-4, far above one step


def _config(model_dir, *overrides):
    from spin_ray.config import load_config

    return load_config(None, [f"model.name={model_dir}", f"training.learning_rate={LR}", "training.warmup_ratio=0",
                              "training.global_batch_size=4", "training.micro_batch_size=1", "training.epochs=1",
                              "training.optimizer=rmsprop", *overrides])


def _moved(before: dict, after: dict) -> float:
    changed = sum(int((after[k].float() != before[k].float()).sum()) for k in before)
    return changed / sum(v.numel() for v in before.values())


# ---- one process ---------------------------------------------------------------------------------------------------


def test_bf16_compute_steps_float32_master_weights_where_bf16_weights_round_every_step_away(tiny_model_dir, chat,
                                                                                            tmp_path):
    """3 RMSprop steps at lr 5e-7: with bf16 (or fp16) compute on float32 master weights nearly every weight moves,
    and the first step's loss is fp32's to 1e-4; the same steps on a model HELD in bf16 (what training did before) move
    almost none. The export is float32 here (model.dtype), so it shows the master weights as they are."""
    from spin_ray.models.resolution import load_model
    from spin_ray.training.loop import train

    rows = spin_rows(chat, tiny_model_dir)
    before = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    losses = {}
    for dtype in ("float32", "bfloat16", "float16"):
        out = tmp_path / dtype
        config = _config(tiny_model_dir, f"training.compute_dtype={dtype}", "training.global_batch_size=1",
                         "training.epochs=3")
        summary = train(config, rows[:1], tiny_model_dir, str(out / "train"), str(out / "model"))
        assert summary.steps == 3 and summary.compute_dtype == dtype
        after = load_file(str(out / "model" / "model.safetensors"))
        assert all(v.dtype == torch.float32 for v in after.values())
        assert _moved(before, after) >= 0.99, dtype
        losses[dtype] = logged_losses(out / "train")
    assert losses["bfloat16"][0] == pytest.approx(losses["float32"][0], abs=1e-4)
    assert losses["float16"][0] == pytest.approx(losses["float32"][0], abs=1e-4)  # with its dynamic loss scale

    held = load_model(tiny_model_dir, "bfloat16")  # the old path: parameters and optimizer state in bf16
    start = {k: v.clone() for k, v in held.state_dict().items()}
    optimizer = torch.optim.RMSprop(held.parameters(), lr=LR)
    for _ in range(3):
        held(torch.tensor([rows[0]["prompt_token_ids"] + rows[0]["real_token_ids"]]), labels=torch.tensor(
            [rows[0]["prompt_token_ids"] + rows[0]["real_token_ids"]])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert _moved(start, held.state_dict()) < 0.10  # SmolLM2 (larger weights): 0.97%


def test_the_export_is_stored_in_model_dtype(tiny_model_dir, chat, tmp_path):
    from spin_ray.training.loop import train

    config = _config(tiny_model_dir, "model.dtype=bfloat16", "training.compute_dtype=bfloat16",
                     "training.global_batch_size=1")
    train(config, spin_rows(chat, tiny_model_dir)[:1], tiny_model_dir, str(tmp_path / "train"), str(tmp_path / "model"))
    exported = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert {v.dtype for v in exported.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "model" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("pack, chunk_rows", [(True, 5), (False, 0)])
def test_activation_checkpointing_gives_the_same_fp32_gradients(tiny_model_dir, chat, pack, chunk_rows):
    """Packed rows switch the attention kernel for one forward only; the recompute in backward must run the same
    kernel, or the gradients would be those of attention across sequences."""
    from spin_ray.models.resolution import load_model
    from spin_ray.objectives.algorithms import objective
    from spin_ray.training.data import examples_from_rows
    from spin_ray.training.loop import micro_step
    from spin_ray.training.parallel import enable_activation_checkpointing

    config = _config(tiny_model_dir, f"training.pack_sequences={pack}", f"training.logits_chunk_rows={chunk_rows}")
    examples = examples_from_rows(spin_rows(chat, tiny_model_dir), "test", config)
    grads = {}
    for checkpointing in (False, True):
        model = load_model(tiny_model_dir)
        model.train()
        if checkpointing:
            enable_activation_checkpointing(model)
        sums = micro_step(model, examples, objective(config), config, chat.tokenizer.pad_token_id, 0.25,
                          torch.device("cpu"))
        grads[checkpointing] = (sums["loss_sum"], {n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[True][0] == pytest.approx(grads[False][0], abs=1e-6)
    for name, grad in grads[False][1].items():
        assert torch.allclose(grads[True][1][name], grad, atol=1e-6, rtol=0), name


def test_the_reference_check_is_silent_on_a_true_reference_and_refuses_a_perturbed_one(tiny_model_dir, chat,
                                                                                       tmp_path):
    from spin_ray.objectives.algorithms import TrainingDataError
    from spin_ray.training.loop import REFUSAL, train

    rows = spin_rows(chat, tiny_model_dir)
    config = _config(tiny_model_dir)
    summary = train(config, rows, tiny_model_dir, str(tmp_path / "ok" / "train"), str(tmp_path / "ok" / "model"))
    first = json.loads((tmp_path / "ok" / "train" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 <= first["reference_gap"] < 1e-4 and summary.steps == 1  # padded fp32 scoring vs packed training

    bad = [dict(row) for row in rows]
    answer_tokens = len(bad[2]["generated_token_ids"][0])
    bad[2]["ref_logp_generated"] = [bad[2]["ref_logp_generated"][0] - 0.5 * answer_tokens]  # 0.5 nats per token off
    train_dir = tmp_path / "bad" / "train"
    with pytest.raises(TrainingDataError, match=r"generated answer of prompt_id p2 differs .* by 0\.500 nats per "
                                                r"token \(training.reference_check_tolerance 0.05\)"):
        train(config, bad, tiny_model_dir, str(train_dir), str(tmp_path / "bad" / "model"))
    assert (train_dir / REFUSAL).is_file() and not (tmp_path / "bad" / "model").exists()
    # a restarted worker refuses at once, before loading anything
    with pytest.raises(TrainingDataError, match="reference check failed"):
        train(config, rows, "/nonexistent/model", str(train_dir), str(tmp_path / "bad" / "model"))
    # off: trains
    off = config.model_copy(update={"training": config.training.model_copy(update={"reference_check_tolerance": None})})
    assert (
        train(off, bad, tiny_model_dir, str(tmp_path / "off" / "train"), str(tmp_path / "off" / "model")).steps == 1
    )


def test_the_dtype_is_named_as_the_likely_cause_when_it_differs(tiny_model_dir, chat, tmp_path):
    from spin_ray.objectives.algorithms import TrainingDataError
    from spin_ray.training.loop import train

    rows = spin_rows(chat, tiny_model_dir)
    rows[0]["ref_logp_real"] -= 10.0
    config = _config(tiny_model_dir, "training.compute_dtype=bfloat16", "training.reference=engine")
    with pytest.raises(TrainingDataError, match="scored in model.dtype float32 and training computes in "
                                                "training.compute_dtype bfloat16"):
        train(config, rows, tiny_model_dir, str(tmp_path / "train"), str(tmp_path / "model"))


# ---- two ranks ------------------------------------------------------------------------------------------------------


def loaded_weights(rank, world, model_dir, on_rank0_only):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from spin_ray.training.parallel import load_for_training

    model = load_for_training(model_dir, False, torch.device("cpu"), rank, on_rank0_only, torch.float32, False, False)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    buffers = {name: value.clone() for name, value in model.named_buffers()}
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    return {"weights": {k: v.clone() for k, v in full.items()}, "buffers": buffers,
            "tied": head is embed, "shard_rows": embed.to_local().shape[0]}


def test_rank0_loading_gives_every_rank_the_checkpoints_weights_and_only_its_shards(tiny_model_dir):
    from spin_ray.models.resolution import load_model

    reference = load_model(tiny_model_dir)
    expected = reference.state_dict()
    for result in on_ranks("tests.unit.test_parallel.loaded_weights", model_dir=tiny_model_dir, on_rank0_only=True):
        assert set(result["weights"]) == set(expected)
        for name, value in expected.items():
            assert torch.equal(result["weights"][name], value), name
        for name, value in reference.named_buffers():  # rotary tables, computed at construction
            assert torch.equal(result["buffers"][name], value), name
        assert result["tied"]  # the tied head stays the embedding's parameter
        assert result["shard_rows"] == expected["model.embed_tokens.weight"].shape[0] // 2


def train_on_ranks(rank, world, model_dir, rows, train_dir, export_dir, overrides):
    from spin_ray.config import load_config
    from spin_ray.training.loop import WorkerContext, train

    config = load_config(None, [f"model.name={model_dir}", f"training.learning_rate={LR}", "training.warmup_ratio=0",
                                "training.global_batch_size=4", "training.micro_batch_size=1", "training.epochs=2",
                                *overrides])
    summary = train(config, rows, model_dir, train_dir, export_dir, WorkerContext(rank, world))
    shown = ("steps", "sharded_accumulation", "activation_checkpointing", "compute_dtype")
    return {key: getattr(summary, key) for key in shown}


def test_sharded_accumulation_checkpointing_and_bf16_on_two_ranks_train_like_the_default(tiny_model_dir, chat,
                                                                                           tmp_path):
    """Two micro-batches per rank and step: sharded accumulation and activation checkpointing (under FSDP2), and CPU
    offload (FSDP2's CPUOffloadPolicy; on this CPU-only machine it exercises the path, not the copies) give the
    default layout's losses and weights; bf16 compute (FSDP2's MixedPrecisionPolicy, float32 reduction) the same
    losses to bf16's precision and float32 master weights that moved."""
    rows = spin_rows(chat, tiny_model_dir)
    variants = {"default": ["training.load_on_rank0=false"],
                "sharded": ["training.gradient_accumulation=sharded", "training.activation_checkpointing=true"],
                "offload": ["training.cpu_offload=true"],
                "bf16": ["training.compute_dtype=bfloat16"]}
    losses, weights = {}, {}
    for name, overrides in variants.items():
        out = tmp_path / name
        summaries = on_ranks("tests.unit.test_parallel.train_on_ranks", model_dir=tiny_model_dir, rows=rows,
                             train_dir=str(out / "train"),
                             export_dir=str(out / "model"), overrides=overrides)
        assert summaries[0]["steps"] == 2
        losses[name] = logged_losses(out / "train")
        weights[name] = load_file(str(out / "model" / "model.safetensors"))
    assert summaries[0]["compute_dtype"] == "bfloat16"
    for same in ("sharded", "offload"):
        assert losses[same] == pytest.approx(losses["default"], abs=1e-6), same
        for key, value in weights["default"].items():
            assert torch.allclose(weights[same][key], value, atol=1e-7, rtol=0), (same, key)
    assert losses["bf16"] == pytest.approx(losses["default"], abs=2e-3)
    before = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert _moved(before, weights["bf16"]) >= 0.99


def test_offload_reduces_its_host_gradients_through_the_cpu_backend_of_a_device_mapped_group(tiny_model_dir, chat,
                                                                                            tmp_path):
    """With CPU offload FSDP2 keeps each shard's gradient in host memory, so clipping's norm is all-reduced over CPU
    tensors: on GPUs the workers' group maps cpu to gloo and cuda to NCCL (NCCL carries no CPU tensor). Here the CPU
    half: a group given as "cpu:gloo" carries offload's collectives and trains to the plain group's losses and
    weights. What only a GPU shows: the cuda half on NCCL, and the forward's inputs on the GPU while the shards stay
    on the CPU (the loop passes its device to the log-prob code rather than reading a parameter's)."""
    from spin_ray.training.parallel import process_group_backend

    assert process_group_backend(use_gpu=True, cpu_offload=True) == "cpu:gloo,cuda:nccl"
    assert process_group_backend(use_gpu=True, cpu_offload=False) == "nccl"
    assert process_group_backend(use_gpu=False, cpu_offload=True) == "gloo"
    rows = spin_rows(chat, tiny_model_dir)
    losses, weights = {}, {}
    for backend, overrides in (("gloo", []), ("cpu:gloo", ["training.cpu_offload=true"])):
        out = tmp_path / backend.replace(":", "-")
        on_ranks("tests.unit.test_parallel.train_on_ranks", backend=backend, model_dir=tiny_model_dir, rows=rows,
                 train_dir=str(out / "train"), export_dir=str(out / "model"), overrides=overrides)
        losses[backend] = logged_losses(out / "train")
        weights[backend] = load_file(str(out / "model" / "model.safetensors"))
    assert losses["cpu:gloo"] == pytest.approx(losses["gloo"], abs=1e-6)
    for key, value in weights["gloo"].items():
        assert torch.allclose(weights["cpu:gloo"][key], value, atol=1e-7, rtol=0), key
