"""What the training tests share: SPIN rows a model scored itself, a stage's logged losses, and a function run on
gloo ranks (torch.multiprocessing, as torchrun would start them)."""

from __future__ import annotations

import importlib
import json
import os
import socket

import torch
import torch.multiprocessing as mp


def spin_rows(chat, model_dir: str, count: int = 4) -> list[dict]:
    """SPIN rows whose reference log-probs are the model's own (fp32, padded), as an engine pass gives them."""
    from spin_ray.models.resolution import load_model
    from spin_ray.objectives.logprobs import score_responses

    prompts = chat.batch_prompt_ids([[{"role": "user", "content": f"What is {i} + {i}?"}] for i in range(count)])
    reals = chat.batch_response_ids([f"{i} + {i} = {2 * i}\n#### {2 * i}" for i in range(count)])
    generated = chat.batch_response_ids([f"It is {i * 7}, I think." for i in range(count)])
    model = load_model(model_dir)
    ref_real = score_responses(model, prompts, reals, chat.tokenizer.pad_token_id)
    ref_generated = score_responses(model, prompts, generated, chat.tokenizer.pad_token_id)
    return [{"prompt_id": f"p{i}", "prompt_token_ids": prompts[i], "real_token_ids": reals[i],
             "generated_token_ids": [generated[i]], "ref_logp_real": float(ref_real[i]),
             "ref_logp_generated": [float(ref_generated[i])]} for i in range(count)]


class StoppedOnPurpose(Exception):
    """Raised by train_stopped_at's step hook: the stage ends there as a crashed worker's would."""


def train_stopped_at(step: int, config, rows, model_dir: str, train_dir: str, export_dir: str) -> None:
    """Run a training stage that dies as step `step` (0-based) begins, keeping what it had committed."""
    from spin_ray.training.loop import WorkerContext, train

    def stop(at, context, folder):
        if at == step:
            raise StoppedOnPurpose

    try:
        train(config, rows, model_dir, train_dir, export_dir, WorkerContext(on_step=stop))
    except StoppedOnPurpose:
        return
    raise AssertionError(f"training into {train_dir} ended before step {step}")


def logged_losses(train_dir) -> list[float]:
    with open(os.path.join(train_dir, "metrics.jsonl")) as handle:
        return [json.loads(line)["loss"] for line in handle]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, task: str, kwargs: dict, results, backend: str = "gloo") -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world)
    module, _, name = task.rpartition(".")
    try:
        results[rank] = getattr(importlib.import_module(module), name)(rank, world, **kwargs)
    finally:
        dist.destroy_process_group()


def on_ranks(task: str, world: int = 2, backend: str = "gloo", **kwargs) -> list:
    """Run `task(rank, world, **kwargs)` ("module.function") on `world` ranks of a `backend` process group (gloo; or a
    device map such as "cpu:gloo"); their return values, by rank."""
    context = mp.get_context("spawn")
    with context.Manager() as manager:
        results = manager.dict()
        port = _free_port()
        processes = [context.Process(target=_rank_main, args=(r, world, port, task, kwargs, results, backend))
                     for r in range(world)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=300)
        codes = [p.exitcode for p in processes]
        assert codes == [0] * world, f"ranks exited with {codes}"
        return [results[r] for r in range(world)]
