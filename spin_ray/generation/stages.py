"""Ray Data stages of opponent generation, as callable classes: engine, reference scoring, shard commit."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq

PAIRS_SCHEMA = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("real", pa.string()),
        ("generated", pa.list_(pa.string())),
        ("prompt_token_ids", pa.list_(pa.int32())),
        ("real_token_ids", pa.list_(pa.int32())),
        ("generated_token_ids", pa.list_(pa.list_(pa.int32()))),
        ("prompt_tokens", pa.int32()),
        ("real_tokens", pa.int32()),
        ("generated_tokens", pa.list_(pa.int32())),
        ("finish_reasons", pa.list_(pa.string())),
        ("ref_logp_real", pa.float64()),
        ("ref_logp_generated", pa.list_(pa.float64())),
        ("engine", pa.string()),
        ("model", pa.string()),
        ("sampling", pa.string()),
    ]
)


def sample_seed(base_seed: int, prompt_id: str, sample_index: int) -> int:
    """Seed of one sample of one prompt: independent of batching, replicas and restarts."""
    digest = hashlib.sha256(f"{base_seed}:{prompt_id}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def _set_threads(threads: int) -> None:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


class GenerateStage:
    """Engine replica: loads the opponent once, answers each batch of prompts K times."""

    def __init__(
        self,
        model_path: str,
        dtype: str,
        trust_remote_code: bool,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        batch_size: int,
        num_samples: int,
        seed: int,
        threads: int,
    ):
        from spin_ray.generation.hf_engine import HFEngine
        from spin_ray.models import load_model, load_tokenizer
        from spin_ray.tokenization import ChatFormat

        _set_threads(threads)
        tokenizer = load_tokenizer(model_path, trust_remote_code)
        model = load_model(model_path, dtype, trust_remote_code)
        self.engine = HFEngine(model, ChatFormat(tokenizer), max_new_tokens, temperature, top_p, batch_size)
        self.num_samples = num_samples
        self.seed = seed
        self.model_path = model_path
        self.sampling = json.dumps(
            {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
             "num_samples": num_samples, "seed": seed},
            sort_keys=True,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        prompts, seeds = [], []
        for row in rows:
            for k in range(self.num_samples):
                prompts.append(row["prompt_token_ids"])
                seeds.append(sample_seed(self.seed, row["prompt_id"], k))
        completions = self.engine.generate(prompts, seeds)
        for index, row in enumerate(rows):
            mine = completions[index * self.num_samples : (index + 1) * self.num_samples]
            row["generated"] = [c.text for c in mine]
            row["generated_token_ids"] = [c.token_ids for c in mine]
            row["generated_tokens"] = [len(c.token_ids) for c in mine]
            row["finish_reasons"] = [c.finish_reason for c in mine]
            row["engine"] = "hf"
            row["model"] = self.model_path
            row["sampling"] = self.sampling
        return pa.Table.from_pylist(rows)


class ReferenceStage:
    """Forward-only scoring under the opponent p_t: log-probs of the human and every generated answer.

    Computed once here, so training workers never hold a reference model.
    """

    def __init__(self, model_path: str, dtype: str, trust_remote_code: bool, pad_id: int, batch_size: int, threads: int):
        from spin_ray.models import load_model

        _set_threads(threads)
        self.model = load_model(model_path, dtype, trust_remote_code).eval()
        self.pad_id = pad_id
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        from spin_ray.training.step import reference_logps

        rows = batch.to_pylist()
        prompts, responses = [], []
        for row in rows:
            prompts.append(row["prompt_token_ids"])
            responses.append(row["real_token_ids"])
            for generated in row["generated_token_ids"]:
                prompts.append(row["prompt_token_ids"])
                responses.append(generated)
        # sort by length so forward batches carry little padding, then restore order
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
        scores = reference_logps(
            self.model, [prompts[i] for i in order], [responses[i] for i in order], self.pad_id, self.batch_size
        ).tolist()
        by_index = dict(zip(order, scores, strict=True))
        cursor = 0
        for row in rows:
            row["ref_logp_real"] = by_index[cursor]
            k = len(row["generated_token_ids"])
            row["ref_logp_generated"] = [by_index[cursor + 1 + j] for j in range(k)]
            cursor += 1 + k
        return pa.Table.from_pylist(rows, schema=PAIRS_SCHEMA)


def shard_name(prompt_ids: list[str]) -> str:
    """A shard is named by its content, so a retried task rewrites the same file instead of adding one."""
    digest = hashlib.sha256("\n".join(sorted(prompt_ids)).encode()).hexdigest()[:16]
    return f"shard-{digest}.parquet"


def commit_shard(batch: pa.Table, output_dir: str) -> pa.Table:
    """Write one batch as a parquet shard, atomically: readers see the whole shard or none of it."""
    from spin_ray.storage import atomic_write_bytes

    sink = pa.BufferOutputStream()
    pq.write_table(batch.cast(PAIRS_SCHEMA), sink)
    name = shard_name(batch.column("prompt_id").to_pylist())
    atomic_write_bytes(f"{output_dir.rstrip('/')}/{name}", sink.getvalue().to_pybytes())
    return batch
