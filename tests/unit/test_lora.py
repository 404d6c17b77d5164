"""LoRA training without Ray: only the adapters train, the export is PEFT's adapter layout, an iteration trains on from
the last one's adapter, two FSDP2 ranks (rank-0 loading) train as one process does, a resumed stage ends where an
uninterrupted one does, and a target module the model lacks is refused in one line."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.training_runs import logged_losses, on_ranks, spin_rows

LR = 1e-3  # LoRA's B starts at zero: at the paper's 5e-7 the adapter would barely move in two steps
LORA = ["training.lora.rank=4", "training.lora.alpha=8"]


def _config(model_dir, *overrides):
    from spin_ray.config import load_config

    return load_config(None, [f"model.name={model_dir}", f"training.learning_rate={LR}", "training.warmup_ratio=0",
                              "training.global_batch_size=4", "training.micro_batch_size=1", "training.epochs=2",
                              "training.optimizer=adamw", *LORA, *overrides])


def _logits(model, ids=(1, 2, 3, 4, 5, 6)) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits


def test_lora_trains_the_adapter_alone_exports_it_for_peft_and_trains_on_from_it(tiny_model_dir, chat, tmp_path):
    """Two layers x 7 projections of rank 4 on the tiny Llama (hidden 64, MLP 128): 2 x (4 x (64+64) + 4 x (64+32) x 2
    + 4 x (64+64) + 4 x (64+128) x 3) = 8,192 trainable parameters. The export holds the adapter (no model weights),
    PEFT's PeftModel on the untouched base answers as the trained model and as the merged export; the base is not
    changed; the next iteration loads the adapter (its step-0 reference check passes on references the adapted model
    scored) and its adapter's base is still the original one."""
    from peft import PeftModel

    from spin_ray.models.adapters import adapter_base
    from spin_ray.models.resolution import load_model, load_tokenizer, merged_model_path
    from spin_ray.training.loop import train

    config = _config(tiny_model_dir, "training.lora.export_merged=true")
    rows = spin_rows(chat, tiny_model_dir)
    summary = train(config, rows, tiny_model_dir, str(tmp_path / "train"), str(tmp_path / "model"),
                    merged_dir=str(tmp_path / "merged"))
    assert summary.lora_rank == 4 and summary.trainable_parameters == 8192 and summary.steps == 2
    exported = sorted(os.listdir(tmp_path / "model"))
    assert "adapter_model.safetensors" in exported and "adapter_config.json" in exported
    assert not any(name.startswith("model") for name in exported)  # no whole-model weights
    assert "tokenizer.json" in exported  # every stage reads the tokenizer from the model it is given
    weights = load_file(str(tmp_path / "model" / "adapter_model.safetensors"))
    assert len(weights) == 28 and all(k.startswith("base_model.model.model.layers.") for k in weights)
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert any(float(v.abs().max()) > 0 for k, v in weights.items() if "lora_B" in k)  # B left zero: it trained
    assert adapter_base(str(tmp_path / "model")) == tiny_model_dir

    base = load_model(tiny_model_dir)
    through_peft = PeftModel.from_pretrained(load_model(tiny_model_dir), str(tmp_path / "model"))
    ours, merged = load_model(str(tmp_path / "model")), load_model(str(tmp_path / "merged"))
    assert torch.allclose(_logits(through_peft), _logits(ours), atol=1e-5)
    assert torch.allclose(_logits(merged), _logits(ours), atol=1e-5)
    assert (_logits(ours) - _logits(base)).abs().max() > 1e-3  # the adapter changes the answers
    assert json.load(open(tmp_path / "merged" / "config.json"))["dtype"] == "float32"

    # iteration 1: p_1 (base + adapter) scores its own references; training goes on from the adapter
    rows_1 = spin_rows(chat, str(tmp_path / "model"))
    next_summary = train(config, rows_1, str(tmp_path / "model"), str(tmp_path / "train_1"), str(tmp_path / "model_1"))
    assert next_summary.steps == 2
    first = json.loads((tmp_path / "train_1" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["reference_gap"] < 1e-5 and abs(first["rewards/margins"]) < 1e-5  # p_1 is its own reference
    assert adapter_base(str(tmp_path / "model_1")) == tiny_model_dir
    moved = load_file(str(tmp_path / "model_1" / "adapter_model.safetensors"))
    assert any(not torch.equal(moved[k], weights[k]) for k in weights)

    # engines serving it merged (generation.lora_serving): one whole-model folder per adapter content and dtype
    cache = tmp_path / "node_cache"
    served = merged_model_path(str(tmp_path / "model"), "float32", cache_dir=cache)
    assert not os.path.exists(os.path.join(served, "adapter_config.json"))
    assert torch.allclose(_logits(load_model(served)), _logits(ours), atol=1e-5)
    assert load_tokenizer(served).chat_template == load_tokenizer(str(tmp_path / "model")).chat_template
    marker = os.path.join(served, "spin_ray_converted.json")
    written = os.stat(marker).st_ino  # a merge again would rename a new folder into place
    assert merged_model_path(str(tmp_path / "model"), "float32", cache_dir=cache) == served  # merged once
    assert os.stat(marker).st_ino == written
    served_1 = merged_model_path(str(tmp_path / "model_1"), "float32", cache_dir=cache)  # new weights, new merge
    assert served_1 != served
    assert {n for n in os.listdir(cache / "merged") if not n.startswith(".")} == {os.path.basename(served),
                                                                                 os.path.basename(served_1)}


def lora_on_ranks(rank, world, model_dir, rows, train_dir, export_dir, overrides):
    from spin_ray.training.loop import WorkerContext, train

    summary = train(_config(model_dir, *overrides), rows, model_dir, train_dir, export_dir, WorkerContext(rank, world))
    return {key: getattr(summary, key) for key in ("steps", "trainable_parameters")}


def test_lora_on_two_fsdp2_ranks_loaded_by_rank0_trains_as_one_process(tiny_model_dir, chat, tmp_path):
    """Rank 0 reads the base and draws the fresh adapter's A; the other rank builds both on the meta device and
    receives its shards. With sharded accumulation and activation checkpointing, the losses and the exported adapter
    equal one process's."""
    from spin_ray.training.loop import train

    rows = spin_rows(chat, tiny_model_dir)
    one = train(_config(tiny_model_dir), rows, tiny_model_dir, str(tmp_path / "one" / "train"),
                str(tmp_path / "one" / "model"))
    summaries = on_ranks("tests.unit.test_lora.lora_on_ranks", model_dir=tiny_model_dir, rows=rows,
                         train_dir=str(tmp_path / "two" / "train"), export_dir=str(tmp_path / "two" / "model"),
                          overrides=["training.load_on_rank0=true", "training.gradient_accumulation=sharded",
                                     "training.activation_checkpointing=true"])
    assert summaries[0]["steps"] == one.steps == 2
    assert summaries[0]["trainable_parameters"] == one.trainable_parameters == 8192  # global, not per shard
    assert logged_losses(tmp_path / "two" / "train") == pytest.approx(logged_losses(tmp_path / "one" / "train"),
                                                                      abs=1e-5)
    alone = load_file(str(tmp_path / "one" / "model" / "adapter_model.safetensors"))
    sharded = load_file(str(tmp_path / "two" / "model" / "adapter_model.safetensors"))
    assert set(alone) == set(sharded)
    for key, value in alone.items():
        assert torch.allclose(sharded[key], value, atol=1e-6, rtol=1e-4), key


class _Interrupted(RuntimeError):
    pass


def test_a_lora_stage_interrupted_mid_iteration_resumes_to_the_uninterrupted_adapter(tiny_model_dir, chat, tmp_path):
    """Checkpoints hold the adapters and their optimizer state only (the base is the stage's start model): a stage
    stopped before its third step resumes from step 2 and exports the adapter an uninterrupted stage exports."""
    from spin_ray.training.checkpoint import checkpoint_dir, committed_steps
    from spin_ray.training.loop import WorkerContext, train

    rows = spin_rows(chat, tiny_model_dir, count=8)
    config = _config(tiny_model_dir, "training.checkpoint_every=1")
    train(config, rows, tiny_model_dir, str(tmp_path / "whole" / "train"), str(tmp_path / "whole" / "model"))

    train_dir = str(tmp_path / "resumed" / "train")
    sizes = {}

    def stop_at_third(step, _, where):
        if step == 2:
            sizes["checkpoint"] = sum(f.stat().st_size for f in (tmp_path / "resumed" / "train").rglob("*.distcp"))
            raise _Interrupted

    with pytest.raises(_Interrupted):
        train(config, rows, tiny_model_dir, train_dir, str(tmp_path / "resumed" / "model"),
              WorkerContext(on_step=stop_at_third))
    assert committed_steps(train_dir) == [1, 2] and os.path.isdir(checkpoint_dir(train_dir, 2))
    base_bytes = os.path.getsize(os.path.join(tiny_model_dir, "model.safetensors"))
    assert sizes["checkpoint"] < 0.1 * base_bytes  # adapters + AdamW moments of 8,192 parameters, twice kept
    summary = train(config, rows, tiny_model_dir, train_dir, str(tmp_path / "resumed" / "model"))
    assert summary.resumed_from_step == 2 and summary.steps == 4
    assert logged_losses(tmp_path / "resumed" / "train") == pytest.approx(logged_losses(tmp_path / "whole" / "train"),
                                                                          abs=1e-6)
    whole = load_file(str(tmp_path / "whole" / "model" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "model" / "adapter_model.safetensors"))
    for key, value in whole.items():
        assert torch.allclose(resumed[key], value, atol=1e-7, rtol=0), key


def test_a_target_module_the_model_lacks_is_refused_in_one_line_before_ray(tiny_model_dir, tmp_path, capsys):
    from spin_ray.cli import main

    code = main(["run", f"model.name={tiny_model_dir}", f"run.storage_path={tmp_path}", "data.limit=8",
                 "training.lora.rank=8", "training.lora.target_modules=[qq_proj, v_proj]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "training.lora.target_modules" in err and "qq_proj" in err and "q_proj" in err and "Traceback" not in err
    assert not list(tmp_path.rglob("manifest.json"))  # refused before the run started


def test_export_of_a_lora_run_writes_the_adapter_or_merges_it_and_the_card_says_which(tiny_model_dir, chat, tmp_path,
                                                                                        capsys):
    from spin_ray.cli import main
    from spin_ray.models.resolution import load_model
    from spin_ray.run.layout import RunLayout
    from spin_ray.run.manifest import Manifest
    from spin_ray.training.loop import train

    config = _config(tiny_model_dir, f"run.storage_path={tmp_path}", "run.name=lora")
    layout = RunLayout.of(config)
    manifest = Manifest.open(config)
    train(config, spin_rows(chat, tiny_model_dir), tiny_model_dir, layout.train(0), layout.model(0))
    manifest.finish("train", 0, 1.0, {"steps": 2, "lora_rank": 4}, {"model": layout.model(0)})
    manifest.save()

    assert main(["export", layout.root, str(tmp_path / "adapter")]) == 0
    assert "a LoRA adapter (rank 4) of " in capsys.readouterr().out
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        tiny_model_dir  # as the run's config names it
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert "library_name: peft" in card and "A LoRA adapter (rank 4" in card and "lora" in card

    assert main(["export", layout.root, str(tmp_path / "whole"), "--merged"]) == 0
    assert "merged into its base" in capsys.readouterr().out
    assert (tmp_path / "whole" / "model.safetensors").is_file()
    assert torch.allclose(_logits(load_model(str(tmp_path / "whole"))), _logits(load_model(layout.model(0))), atol=1e-5)
    card = (tmp_path / "whole" / "README.md").read_text()
    assert "library_name: peft" not in card and "merged into its weights" in card


def held_dtypes(rank, world, model_dir, overrides):
    from spin_ray.training.parallel import DTYPES, load_for_training

    t = _config(model_dir, *overrides).training
    model = load_for_training(model_dir, False, torch.device("cpu"), rank, t.load_on_rank0, DTYPES[t.compute_dtype],
                              False, False, t.lora)
    return {name: str(parameter.dtype) for name, parameter in model.named_parameters()}


@pytest.mark.parametrize("world", [1, 2])
def test_with_bf16_compute_the_frozen_base_is_held_in_bf16_and_trains_like_fp32(tiny_model_dir, chat, tmp_path, world):
    """The frozen base takes no step, so LoRA holds it in the compute dtype (half its memory, no autocast copies) and
    the adapters in float32; in one process (autocast) and on two FSDP2 ranks loaded by rank 0 (bf16 shards filled
    from rank 0's float32 weights) the losses stay within bf16's precision of the float32 run."""
    from spin_ray.training.loop import WorkerContext, train

    bf16 = ["training.compute_dtype=bfloat16", "training.load_on_rank0=true"]
    if world == 1:
        held = held_dtypes(0, 1, tiny_model_dir, bf16)
    else:
        held = on_ranks("tests.unit.test_lora.held_dtypes", model_dir=tiny_model_dir, overrides=bf16)[0]
    assert {d for n, d in held.items() if "lora_" in n} == {"torch.float32"}
    assert {d for n, d in held.items() if "lora_" not in n} == {"torch.bfloat16"}
    rows = spin_rows(chat, tiny_model_dir)
    train(_config(tiny_model_dir), rows, tiny_model_dir, str(tmp_path / "fp32" / "train"), str(tmp_path / "fp32" / "m"))
    if world == 1:
        train(_config(tiny_model_dir, *bf16), rows, tiny_model_dir, str(tmp_path / "bf16" / "train"),
              str(tmp_path / "bf16" / "m"), WorkerContext())
    else:
        on_ranks("tests.unit.test_lora.lora_on_ranks", model_dir=tiny_model_dir, rows=rows,
                 train_dir=str(tmp_path / "bf16" / "train"), export_dir=str(tmp_path / "bf16" / "m"), overrides=bf16)
    assert logged_losses(tmp_path / "bf16" / "train") == pytest.approx(logged_losses(tmp_path / "fp32" / "train"),
                                                                       abs=5e-3)
    adapter = load_file(str(tmp_path / "bf16" / "m" / "adapter_model.safetensors"))
    assert {v.dtype for v in adapter.values()} == {torch.float32}


@pytest.mark.parametrize("overrides", [["algorithm=spin"], ["algorithm=tspin", "tspin.reference_free=true"],
                                       ["algorithm=sppo", "generation.num_samples=2", "generation.temperature=1"],
                                       ["training.objective=sft"]])
def test_every_objective_sends_its_gradient_to_the_adapters_alone(tiny_model_dir, chat, overrides):
    """SPIN, T-SPIN, SPPO and SFT on a LoRA model, one micro-step with prefix-shared packed rows: every B gets a
    gradient (A's is zero while B is: the update starts in B), no base weight has one."""
    from spin_ray.objectives.algorithms import Example, objective
    from spin_ray.training.loop import micro_step
    from spin_ray.training.parallel import load_for_training

    config = _config(tiny_model_dir, *overrides)
    algorithm = objective(config)
    model = load_for_training(tiny_model_dir, False, torch.device("cpu"), 0, False, torch.float32, False, False,
                              config.training.lora)
    prompts = chat.batch_prompt_ids([[{"role": "user", "content": q}] for q in ("What is 3+4?", "Name a fruit.")])
    reals = chat.batch_response_ids(["3+4 = 7\n#### 7", "An apple."])
    generated = chat.batch_response_ids(["It is 12.", "Potato, I think."])
    examples = []
    for i, (p, r, g) in enumerate(zip(prompts, reals, generated, strict=True)):
        answers = {"sft": (r,), "spin": (r, g), "sppo": (r, g), "tspin": (r, g, r[:2])}[algorithm.name]
        refs = {"sft": (), "spin": (-5.0, -9.0), "sppo": (-5.0, -9.0), "tspin": ()}[algorithm.name]
        examples.append(Example(f"p{i}", p, answers, refs, (0.75, 0.25) if algorithm.name == "sppo" else ()))
    sums = micro_step(model, examples, algorithm, config, chat.tokenizer.pad_token_id, 0.5, torch.device("cpu"))
    assert math.isfinite(sums["loss_sum"])
    grads = {name: parameter.grad for name, parameter in model.named_parameters()}
    assert all(g is None for n, g in grads.items() if "lora_" not in n)
    assert all(g is not None and float(g.abs().max()) > 0 for n, g in grads.items() if "lora_B" in n)
