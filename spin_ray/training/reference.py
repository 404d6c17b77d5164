"""The reference log-probs from the training workers' own forward: p_t scored by the model an iteration starts from.

An engine (vLLM's kernels, CUDA graphs, bf16 logits) scores p_t with other numerics than the FSDP2 forward the policy
runs, so at step 0 policy minus reference is not 0 but the engines' error, and every step's log-ratio carries it.
TRL (precompute_ref_log_probs), OpenRLHF and verl score the reference with the training model itself; so does this
pass (`training.reference`), once per iteration, before the first optimizer step: forward only, in eval mode, in the
compute dtype and layout training uses. It cuts the examples as epoch 0 does, so the micro-batches of step 0 are
scored exactly as step 0 computes them, and the step-0 check compares like with like. Each rank scores its share;
one all-reduce gives every rank every example's reference. Rank 0 stores them under the stage's train folder before
any checkpoint exists, so a restarted stage (whose model is then a checkpoint, no longer p_t) reads them back.
"""

from __future__ import annotations

import dataclasses
import io
import math
import time

import numpy as np
import torch
import torch.distributed as dist

from spin_ray.objectives.algorithms import Example
from spin_ray.objectives.logprobs import answer_logps
from spin_ray.storage import atomic_write_bytes, join, read_bytes
from spin_ray.training.data import Schedule

REFERENCE_FILE = "reference_logps.parquet"


def reference_micro_batches(schedule: Schedule, rank: int, world: int) -> list[np.ndarray | None]:
    """This rank's micro-batches covering every example once: epoch 0's global batches cut as training cuts them (so
    step 0's come first, identical), then the examples epoch 0 leaves out, spread over the ranks. Every rank gets as
    many micro-batches (None: a forward whose result is discarded), as FSDP's collectives need."""
    order = schedule.epoch_order(0)
    batches = [micro for step in range(schedule.steps_per_epoch)
               for micro in schedule.micro_batches(step, rank, world)]
    rest = order[schedule.steps_per_epoch * schedule.global_batch_size:]
    mine = rest[rank::world]
    size = schedule.micro_batch_size
    count = math.ceil(math.ceil(len(rest) / world) / size)
    batches += [mine[i * size:(i + 1) * size] if i * size < len(mine) else None for i in range(count)]
    return batches


def score_reference(model, examples: list[Example], schedule: Schedule, config, pad_id: int, rank: int, world: int,
                    device: torch.device, precision) -> torch.Tensor:
    """Summed log-probs [examples, answers] of every example's answers under `model` (float64, on every rank).
    `precision` makes the forward's dtype context, as for a training micro-batch."""
    training = config.training
    answers = len(examples[0].answers)
    scores = torch.zeros(len(examples), answers, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for micro in reference_micro_batches(schedule, rank, world):
            batch = [examples[i] for i in micro] if micro is not None and len(micro) else examples[:1]
            with precision():
                logps = answer_logps(model, [e.prompt for e in batch], [e.answers for e in batch], pad_id,
                                     pack=training.pack_sequences, logits_chunk_rows=training.logits_chunk_rows,
                                     share_prefix=training.prefix_sharing, device=device)
            if micro is not None and len(micro):
                scores[torch.as_tensor(micro, device=device)] = logps.to(torch.float64)
    model.train(was_training)
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(scores)  # each example was scored by exactly one rank: the sum is every rank's scores
    return scores


def with_reference(examples: list[Example], scores) -> list[Example]:
    """The examples with their reference log-probs set (`scores` [examples, answers])."""
    rows = scores.tolist() if hasattr(scores, "tolist") else scores
    return [dataclasses.replace(example, ref_logps=tuple(row)) for example, row in zip(examples, rows, strict=True)]


def _fingerprint(examples: list[Example]) -> list[list[int]]:
    """What stored scores must match: each example's answer lengths (with the prompt_ids, in order)."""
    return [[len(answer) for answer in e.answers] for e in examples]


def save_reference(train_dir: str, examples: list[Example], scores: torch.Tensor, rank: int) -> None:
    """Rank 0 stores the scores (with what they are of) under the stage's train folder."""
    if rank != 0:
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"prompt_id": [e.prompt_id for e in examples],
                      "answer_tokens": pa.array(_fingerprint(examples), pa.list_(pa.int32())),
                      "ref_logps": pa.array(scores.cpu().tolist(), pa.list_(pa.float64()))})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    atomic_write_bytes(join(train_dir, REFERENCE_FILE), buffer.getvalue())


def load_reference(train_dir: str, examples: list[Example]) -> list[list[float]] | None:
    """The stored scores of exactly these examples, or None (none stored, or of other examples: the data changed)."""
    import pyarrow.parquet as pq

    data = read_bytes(join(train_dir, REFERENCE_FILE))
    if data is None:
        return None
    table = pq.read_table(io.BytesIO(data))
    if (table.column("prompt_id").to_pylist() != [e.prompt_id for e in examples]
            or table.column("answer_tokens").to_pylist() != _fingerprint(examples)):
        return None
    return table.column("ref_logps").to_pylist()


def trainer_reference(model, examples: list[Example], schedule: Schedule, config, pad_id: int, train_dir: str,
                      rank: int, world: int, device: torch.device, precision) -> tuple[list[Example], dict]:
    """The examples with reference log-probs under `model` (p_t: call it before a checkpoint is loaded): read back from
    the stage's train folder when an earlier attempt stored them, else scored now and stored. Every rank reads or
    scores alike (the choice is the same on every rank, and scoring is collective). Returns them and what it did."""
    started = time.perf_counter()
    stored = load_reference(train_dir, examples)
    if world > 1 and dist.is_available() and dist.is_initialized():  # read back only where every rank can
        found = torch.tensor([0.0 if stored is None else 1.0], device=device)
        dist.all_reduce(found, op=dist.ReduceOp.MIN)
        stored = stored if found.item() else None
    if stored is not None:
        return with_reference(examples, stored), {"reference_pass_seconds": 0.0, "reference_pass": "stored"}
    scores = score_reference(model, examples, schedule, config, pad_id, rank, world, device, precision)
    save_reference(train_dir, examples, scores, rank)
    return with_reference(examples, scores), {"reference_pass_seconds": round(time.perf_counter() - started, 2),
                                              "reference_pass": "scored"}
