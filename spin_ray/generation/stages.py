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
        # SPPO only (null otherwise): the oracle's score of each generated answer and its win rate
        ("oracle_scores", pa.list_(pa.float64())),
        ("win_rates", pa.list_(pa.float64())),
    ]
)
OPTIONAL_COLUMNS = ("oracle_scores", "win_rates")


def sample_seed(base_seed: int, prompt_id: str, sample_index: int) -> int:
    """Seed of one sample of one prompt: independent of batching, replicas and restarts."""
    digest = hashlib.sha256(f"{base_seed}:{prompt_id}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def sampling_description(max_new_tokens: int, temperature: float, top_p: float, num_samples: int, seed: int) -> str:
    """The `sampling` column: how every answer of a row was drawn, whichever engine drew it."""
    return json.dumps({"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
                       "num_samples": num_samples, "seed": seed}, sort_keys=True)


# Columns that travel with a batch between stages but are not part of a stored row: the shard a
# row belongs to, and the seconds each stage spent on that shard (kept as shard file metadata).
SHARD_COLUMN = "_shard"
TIMING_COLUMNS = ("_engine_seconds", "_reference_seconds")


def _set_threads(threads: int) -> None:
    import torch

    from spin_ray.priority import claim_normal_priority

    claim_normal_priority()
    if threads > 0:
        torch.set_num_threads(threads)


def _score_rows(model, rows: list[dict], pad_id: int, batch_size: int) -> None:
    """Set ref_logp_real and ref_logp_generated of each row: forward-only log-probs under `model`."""
    from spin_ray.training.step import reference_logps

    prompts, responses = [], []
    for row in rows:
        for response in [row["real_token_ids"], *row["generated_token_ids"]]:
            prompts.append(row["prompt_token_ids"])
            responses.append(response)
    # sort by length so forward batches carry little padding, then restore order
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    scores = reference_logps(model, [prompts[i] for i in order], [responses[i] for i in order], pad_id, batch_size)
    by_index = dict(zip(order, scores.tolist(), strict=True))
    cursor = 0
    for row in rows:
        k = len(row["generated_token_ids"])
        row["ref_logp_real"] = by_index[cursor]
        row["ref_logp_generated"] = [by_index[cursor + 1 + j] for j in range(k)]
        cursor += 1 + k


class GenerateStage:
    """Engine replica: loads the opponent once and answers each prompt K times.

    A call receives several shards, so the engine's slots refill across shard boundaries, and
    yields each shard as soon as all its answers are done, so shards commit while it works.
    With `score_reference` it also returns the reference log-probs: the opponent p_t IS the
    reference model, so a generated answer's log-prob is summed while decoding it, and the
    human answer is scored in the prompt's prefill pass. No second model copy, no second pass.
    """

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
        score_reference: bool = True,
        reference_batch_size: int = 8,
    ):
        from spin_ray.generation.hf_engine import HFEngine
        from spin_ray.models import load_model, load_tokenizer
        from spin_ray.tokenization import ChatFormat

        _set_threads(threads)
        tokenizer = load_tokenizer(model_path, trust_remote_code)
        self.model = load_model(model_path, dtype, trust_remote_code)
        self.engine = HFEngine(self.model, ChatFormat(tokenizer), max_new_tokens, temperature, top_p, batch_size)
        self.pad_id = tokenizer.pad_token_id
        self.num_samples = num_samples
        self.seed = seed
        self.model_path = model_path
        self.score_reference = score_reference
        self.reference_batch_size = reference_batch_size
        self.sampling = sampling_description(max_new_tokens, temperature, top_p, num_samples, seed)

    def __call__(self, batch: pa.Table):
        import time

        rows = batch.to_pylist()
        prompts, seeds, score, owner = [], [], [], []
        for position, row in enumerate(rows):
            for column in ("generated", "generated_token_ids", "finish_reasons", "ref_logp_generated"):
                row[column] = [None] * self.num_samples
            row["ref_logp_real"] = None
            for k in range(self.num_samples):
                prompts.append(row["prompt_token_ids"])
                seeds.append(sample_seed(self.seed, row["prompt_id"], k))
                # the human answer is scored once, in the prefill pass of the prompt's first sample
                score.append(row["real_token_ids"] if self.score_reference and k == 0 else None)
                owner.append((position, k))
        pending: dict[int, int] = {}
        for row in rows:
            pending[row[SHARD_COLUMN]] = pending.get(row[SHARD_COLUMN], 0) + self.num_samples
        clock = time.perf_counter()
        for index, completion in self.engine.stream(prompts, seeds, score):
            position, k = owner[index]
            row = rows[position]
            row["generated"][k] = completion.text
            row["generated_token_ids"][k] = completion.token_ids
            row["finish_reasons"][k] = completion.finish_reason
            row["ref_logp_generated"][k] = completion.logp
            if k == 0:
                row["ref_logp_real"] = completion.scored_logp
            pending[row[SHARD_COLUMN]] -= 1
            if pending[row[SHARD_COLUMN]] == 0:
                done = [r for r in rows if r[SHARD_COLUMN] == row[SHARD_COLUMN]]
                engine_seconds = time.perf_counter() - clock
                yield self._finish(done, engine_seconds)
                clock = time.perf_counter()

    def _finish(self, rows: list[dict], engine_seconds: float) -> pa.Table:
        import time

        for row in rows:
            row["generated_tokens"] = [len(t) for t in row["generated_token_ids"]]
            row["engine"] = "hf"
            row["model"] = self.model_path
            row["sampling"] = self.sampling
            row["_engine_seconds"] = engine_seconds
            row["_reference_seconds"] = 0.0
        if not self.score_reference:
            for row in rows:  # the separate reference pool fills these
                row["ref_logp_real"], row["ref_logp_generated"] = None, None
        elif any(row["ref_logp_real"] is None or None in row["ref_logp_generated"] for row in rows):
            # the engine's static fallback does not return log-probs: one forward pass scores them
            started = time.perf_counter()
            _score_rows(self.model, rows, self.pad_id, self.reference_batch_size)
            for row in rows:
                row["_reference_seconds"] = time.perf_counter() - started
        return pa.Table.from_pylist(rows)


class ReferenceStage:
    """Forward-only scoring under the opponent p_t, as its own actor pool (used with the vLLM engine).

    Computed once here, so training workers never hold a reference model.
    """

    def __init__(self, model_path: str, dtype: str, trust_remote_code: bool, pad_id: int, batch_size: int, threads: int):
        import torch

        from spin_ray.models import load_model

        _set_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"  # GPU beside the vLLM engines
        self.model = load_model(model_path, dtype, trust_remote_code).eval().to(device)
        self.pad_id = pad_id
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        import time

        started = time.perf_counter()
        rows = batch.to_pylist()
        _score_rows(self.model, rows, self.pad_id, self.batch_size)
        for row in rows:
            row["_reference_seconds"] = time.perf_counter() - started
        return pa.Table.from_pylist(rows)


def shard_name(prompt_ids: list[str]) -> str:
    """A shard is named by its content, so a retried task rewrites the same file instead of adding one."""
    digest = hashlib.sha256("\n".join(sorted(prompt_ids)).encode()).hexdigest()[:16]
    return f"shard-{digest}.parquet"


def commit_shard(batch: pa.Table, output_dir: str) -> pa.Table:
    """Write each shard of a batch as one parquet file, atomically: readers see a whole shard or none of it.

    Stage timings become file metadata rather than columns, so stored rows stay clean.
    """
    from spin_ray.storage import atomic_write_bytes

    for name in OPTIONAL_COLUMNS:  # absent unless an oracle stage ran: stored as nulls
        if name not in batch.column_names:
            batch = batch.append_column(name, pa.nulls(batch.num_rows, PAIRS_SCHEMA.field(name).type))
    shards = batch.column(SHARD_COLUMN).to_pylist() if SHARD_COLUMN in batch.column_names else [0] * batch.num_rows
    for shard in sorted(set(shards)):
        part = batch.filter(pa.array([s == shard for s in shards]))
        timing = {c.lstrip("_"): round(float(part.column(c)[0].as_py()), 4) for c in TIMING_COLUMNS if c in part.column_names}
        table = part.select([f.name for f in PAIRS_SCHEMA]).cast(PAIRS_SCHEMA)
        table = table.replace_schema_metadata({b"spin_ray": json.dumps(timing).encode()})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        name = shard_name(part.column("prompt_id").to_pylist())
        atomic_write_bytes(f"{output_dir.rstrip('/')}/{name}", sink.getvalue().to_pybytes())
    return batch.select([f.name for f in PAIRS_SCHEMA]).cast(PAIRS_SCHEMA)
