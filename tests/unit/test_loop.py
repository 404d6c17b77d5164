"""The training step without Ray: log 2 at the start, margins that move, micro-steps equal whichever way they run."""

import math

import pytest
import torch

from spin_ray.objectives.logprobs import answer_logps, score_responses
from spin_ray.objectives.losses import sft_loss, spin_loss


def test_spin_steps_start_at_log2_and_widen_the_margin(tiny_model, pairs, tokenizer):
    prompts, reals, generateds = pairs
    pad = tokenizer.pad_token_id
    ref_real = score_responses(tiny_model, prompts, reals, pad)
    ref_generated = score_responses(tiny_model, prompts, generateds, pad)
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    margins = []
    for step in range(4):
        policy = answer_logps(tiny_model, prompts, list(zip(reals, generateds, strict=True)), pad)
        losses, metrics = spin_loss(policy[:, 0], policy[:, 1], ref_real, ref_generated, beta=0.1)
        loss = losses.mean()
        if step == 0:
            assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
        margins.append(metrics["rewards/margins"].item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert margins[0] == pytest.approx(0.0, abs=1e-5)
    assert margins[-1] > margins[0] + 0.05
    assert metrics["rewards/accuracies"].item() == 1.0


def test_sft_step_lowers_the_nll(tiny_model, pairs, tokenizer):
    prompts, reals, _ = pairs
    tokens = torch.tensor([float(len(r)) for r in reals])
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=1e-3)
    nlls = []
    for _ in range(3):
        policy = answer_logps(tiny_model, prompts, [(r,) for r in reals], tokenizer.pad_token_id)
        per_answer, metrics = sft_loss(policy[:, 0], tokens)
        loss = per_answer.sum() / tokens.sum()  # what the trainer minimises: the token-averaged NLL
        assert metrics["nll"].item() == pytest.approx(loss.item(), rel=1e-6)
        nlls.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert nlls[-1] < nlls[0]


@pytest.mark.parametrize("overrides", [["algorithm=spin"], ["algorithm=tspin", "tspin.length_normalize=true",
                                        "tspin.reference_free=true"],
                                       ["algorithm=sppo", "generation.num_samples=2", "generation.temperature=1"],
                                       ["training.objective=sft"]])
def test_micro_step_is_the_same_packed_or_padded_chunked_or_not_prefix_shared_or_not(
    tiny_model, pairs, tokenizer, overrides
):
    from spin_ray.config import load_config
    from spin_ray.objectives.algorithms import Example, objective
    from spin_ray.training.loop import micro_step

    prompts, reals, generateds = pairs
    config = load_config(None, overrides)
    algorithm = objective(config)
    examples = []
    for i, (p, r, g) in enumerate(zip(prompts, reals, generateds, strict=True)):
        answers = {"sft": (r,), "spin": (r, g), "sppo": (r, g), "tspin": (r, g, r[:2])}[algorithm.name]
        refs = {"sft": (), "spin": (-5.0, -9.0), "sppo": (-5.0, -9.0), "tspin": ()}[algorithm.name]
        rates = (0.75, 0.25) if algorithm.name == "sppo" else ()
        examples.append(Example(f"p{i}", p, answers, refs, rates))
    results = {}
    for pack, chunk_rows, shared in ((False, 0, False), (True, 0, False), (False, 5, False), (True, 5, False),
                                     (True, 0, True), (True, 5, True)):
        tiny_model.zero_grad()
        variant = config.model_copy(update={"training": config.training.model_copy(
            update={"pack_sequences": pack, "logits_chunk_rows": chunk_rows, "prefix_sharing": shared})})
        sums = micro_step(tiny_model, examples, algorithm, variant, tokenizer.pad_token_id, 0.5, torch.device("cpu"))
        results[pack, chunk_rows, shared] = (sums, [p.grad.clone() for p in tiny_model.parameters()])
    baseline_sums, baseline_grads = results[False, 0, False]
    for variant, (sums, grads) in results.items():
        assert sums.keys() == baseline_sums.keys()
        for key, value in baseline_sums.items():
            assert sums[key] == pytest.approx(value, rel=1e-5, abs=1e-5), (variant, key)
        # fp32 rounding of another summation order scales with the summands, so it is measured against each
        # tensor's scale: SPPO's targets of 250 nats give gradients of ~1e3, whose near-zero entries move by ~1e-3
        assert all(_close_to_scale(a, b) for a, b in zip(grads, baseline_grads, strict=True)), variant


def _close_to_scale(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-4) -> bool:
    return float((a - b).abs().max()) <= atol + rtol * float(b.abs().max())


def test_progress_line_is_a_tqdm_meter_with_this_runs_eta():
    from spin_ray.training.loop import _progress_line

    metrics = {"step": 3, "loss": 0.69, "rewards/margins": 0.1, "rewards/accuracies": 0.5, "lr": 1e-6,
               "tokens_per_second": 90.1}
    line = _progress_line(metrics, 12, elapsed=45.0)
    assert "25%" in line and "3/12" in line and "00:45<02:15" in line and "margin 0.1000" in line
    # resumed at step 2: one step in 10 s this run, 9 to go
    assert "00:10<01:30" in _progress_line(metrics, 12, elapsed=10.0, first_step=2)


def _sft_rows(chat, answers: list[str], prefix: str) -> list[dict]:
    prompts = chat.batch_prompt_ids(
        [[{"role": "user", "content": f"Say something ({i})."}] for i in range(len(answers))]
    )
    return [{"prompt_id": f"{prefix}{i}", "prompt_token_ids": p, "real_token_ids": r}
            for i, (p, r) in enumerate(zip(prompts, chat.batch_response_ids(answers), strict=True))]


@pytest.mark.parametrize("validation_like_training", [False, True])
def test_early_stop_keeps_the_best_epoch_and_stops_when_validation_nll_rises(tiny_model_dir, chat, tmp_path,
                                                                             validation_like_training):
    from safetensors.torch import load_file

    from spin_ray.config import load_config
    from spin_ray.training.loop import EarlyStop, read_metrics_log, train

    config = load_config(
        None,
        [
            f"model.name={tiny_model_dir}",
            "training.objective=sft",
            "training.epochs=4",
            "training.global_batch_size=4",
            "training.micro_batch_size=2",
            "training.optimizer=adamw",
            "training.learning_rate=5e-2",
            "training.warmup_ratio=0",
            "training.checkpoint_every=100",
        ],
    )
    rows = _sft_rows(chat, ["blue blue blue blue"] * 4, "t")
    # validation answers the training data pushes away from (NLL rises every epoch), or the training answers themselves
    validation = _sft_rows(
        chat, ["blue blue blue blue"] * 3 if validation_like_training else ["seven 7 seven 7"] * 3, "v"
    )
    summary = train(config, rows, tiny_model_dir, str(tmp_path / "train"), str(tmp_path / "model"),
                    early_stop=EarlyStop(validation, patience=1))
    history = summary.validation_nll_by_epoch
    logged = [r["validation_nll"] for r in read_metrics_log(str(tmp_path / "train")) if "validation_nll" in r]
    assert logged == pytest.approx(history)
    exported = load_file(str(tmp_path / "model" / "model.safetensors"))
    best = load_file(str(tmp_path / "train" / "best_model" / "model.safetensors"))
    assert all(torch.equal(exported[k], best[k]) for k in exported)  # the export is the best epoch's weights
    if validation_like_training:  # improves every epoch: all 4 run, the last is the best
        assert summary.epochs_run == 4 and summary.best_epoch == 4 and history == sorted(history, reverse=True)
        assert summary.steps == 4
    else:  # worse after every epoch: epoch 1 is the best, epoch 2 is the one without a new best, then it stops
        assert summary.epochs_run == 2 and summary.best_epoch == 1 and history[1] > history[0]
        assert summary.steps == 2 and summary.validation_nll == pytest.approx(history[0], abs=1e-6)


def test_checkpoints_are_taken_while_training_and_dropped_once_the_model_is_exported(tiny_model_dir, chat, tmp_path):
    from spin_ray.config import load_config
    from spin_ray.training.checkpoint import committed_steps, export_complete
    from spin_ray.training.loop import WorkerContext, train

    config = load_config(None, [f"model.name={tiny_model_dir}", "training.objective=sft", "training.epochs=3",
                                "training.global_batch_size=2", "training.micro_batch_size=2",
                                "training.checkpoint_every=1", "training.keep_checkpoints=1"])
    train_dir = str(tmp_path / "train")
    seen = []
    context = WorkerContext(on_step=lambda step, _, where: seen.append(committed_steps(where)))
    summary = train(config, _sft_rows(chat, ["one", "two"], "t"), tiny_model_dir, train_dir, str(tmp_path / "model"),
                    context)
    assert summary.steps == 3 and summary.setup_seconds > 0  # the load before step 1, reported apart
    assert seen == [[], [1], [2]]  # one per step before the last, only the newest kept
    assert export_complete(str(tmp_path / "model"))
    assert committed_steps(train_dir) == [] and not (tmp_path / "train" / "checkpoints").exists()


@pytest.mark.parametrize("algorithm", ["spin", "tspin", "sppo"])
def test_prefix_shared_pairs_give_smollm2_the_losses_and_gradients_of_separate_sequences(smollm2_path, chat, algorithm):
    """The real model (9 heads over 3 KV heads, tied head): each prompt computed once for its 2 or 3 answers, answers
    blind to each other, equals the answers as separate packed sequences (fp32, 1e-5)."""
    from spin_ray.config import load_config
    from spin_ray.models.resolution import load_model
    from spin_ray.objectives.algorithms import Example, objective
    from spin_ray.objectives.logprobs import answer_logps
    from spin_ray.training.loop import micro_step

    overrides = {"spin": ["algorithm=spin"], "tspin": ["algorithm=tspin"],
                 "sppo": ["algorithm=sppo", "generation.num_samples=2", "generation.temperature=1"]}[algorithm]
    config = load_config(None, overrides)
    model = load_model(smollm2_path)
    prompts = chat.batch_prompt_ids([[{"role": "user", "content": q}] for q in
                                     ("Tom has 3 apples and buys 4 more. How many?", "What is 12 x 11?")])
    texts = ["He has 3 + 4 = 7 apples.\n#### 7", "It is 12, I think.", "Seven.", "12 x 11 = 132\n#### 132",
             "About a hundred.", "132"]
    tokens = chat.batch_response_ids(texts)
    examples = []
    for i, prompt in enumerate(prompts):
        answers = tuple(tokens[3 * i:3 * i + 3]) if algorithm == "tspin" else tuple(tokens[3 * i:3 * i + 2])
        refs = tuple(-1.0 * len(a) for a in answers)
        examples.append(Example(f"p{i}", prompt, answers, refs, (0.75, 0.25) if algorithm == "sppo" else ()))
    separate = answer_logps(model, prompts, [e.answers for e in examples], 0, pack=True)
    shared = answer_logps(model, prompts, [e.answers for e in examples], 0, pack=True, share_prefix=True)
    assert torch.allclose(shared, separate, rtol=1e-5, atol=1e-4)
    results = {}
    for flag in (False, True):
        model.zero_grad()
        variant = config.model_copy(update={"training": config.training.model_copy(update={"prefix_sharing": flag})})
        sums = micro_step(model, examples, objective(config), variant, chat.tokenizer.pad_token_id, 0.5,
                          torch.device("cpu"))
        results[flag] = (sums, [p.grad.clone() for p in model.parameters()])
    for key, value in results[False][0].items():
        assert results[True][0][key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    # SPPO's loss is ~1e5 here (targets of 250 nats, squared): fp32 rounds its gradients at 1.1e-5 of their scale
    rtol = 2e-5 if algorithm == "sppo" else 1e-5
    assert all(_close_to_scale(a, b, rtol=rtol, atol=0) for a, b in zip(results[True][1], results[False][1],
                                                                        strict=True))


def test_auto_checkpoints_come_by_time_at_twenty_times_the_last_saves_cost():
    from spin_ray.plan import AUTO_CHECKPOINT_MIN_S
    from spin_ray.training.loop import CheckpointCadence

    now = [0.0]
    cadence = CheckpointCadence("auto", clock=lambda: now[0])
    now[0] = AUTO_CHECKPOINT_MIN_S - 1
    assert not cadence.due(7)
    now[0] = AUTO_CHECKPOINT_MIN_S
    assert cadence.due(8)
    cadence.saved(60.0)  # a 60 s save: the next one after 20 x 60 s of training, not after 10 minutes
    now[0] += 1199
    assert not cadence.due(9)
    now[0] += 1
    assert cadence.due(10)
    steps = CheckpointCadence(3)
    assert [n for n in range(1, 10) if steps.due(n)] == [3, 6, 9]


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_stage_stopped_mid_way_resumes_to_the_uninterrupted_weights_with_background_saves_or_not(
        tiny_model_dir, chat, tmp_path, asynchronous):
    """With training.async_checkpoint the shards are written in the background and a checkpoint counts once they are:
    a stage stopped before its fourth step resumes from its last committed checkpoint (step 2 or 3, whichever
    background save had finished) and ends at the weights an uninterrupted stage of blocking saves ends at."""
    from safetensors.torch import load_file

    from spin_ray.config import load_config
    from spin_ray.training.checkpoint import committed_steps
    from spin_ray.training.loop import train
    from tests.training_runs import spin_rows, train_stopped_at

    rows = spin_rows(chat, tiny_model_dir, count=8)
    overrides = [f"model.name={tiny_model_dir}", "training.global_batch_size=2", "training.micro_batch_size=1",
                 "training.epochs=1", "training.checkpoint_every=1", "training.learning_rate=1e-3",
                 "training.optimizer=adamw"]
    whole = load_config(None, [*overrides, "training.async_checkpoint=false"])
    train(whole, rows, tiny_model_dir, str(tmp_path / "whole" / "train"), str(tmp_path / "whole" / "model"))
    config = load_config(None, [*overrides, f"training.async_checkpoint={str(asynchronous).lower()}"])
    train_dir = str(tmp_path / "cut" / "train")
    train_stopped_at(3, config, rows, tiny_model_dir, train_dir, str(tmp_path / "cut" / "model"))
    committed = committed_steps(train_dir)
    assert committed and committed[-1] in ((2,) if asynchronous else (3,)) + ((3,) if asynchronous else ())
    resumed = train(config, rows, tiny_model_dir, train_dir, str(tmp_path / "cut" / "model"))
    assert resumed.resumed_from_step == committed[-1] and resumed.steps == 4
    expected = load_file(str(tmp_path / "whole" / "model" / "model.safetensors"))
    got = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    for key, value in expected.items():
        assert torch.allclose(got[key], value, atol=1e-7, rtol=0), key
