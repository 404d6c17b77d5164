"""The shard store of a generation folder: row schema, atomic shard commits, listing, reading, the completion marker.

A generation folder holds `shard-<hash>.parquet` files, each written whole (one PUT, or a rename on a
local disk) and named by the hash of its prompt_ids, so a retried task rewrites the same file
instead of adding one; and `_COMPLETE.json`, written last, once every prompt has exactly one row.
Stage timings travel as parquet file metadata, not columns, so stored rows stay clean.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq

from spin_ray.generation.summary import Completion
from spin_ray.storage import atomic_write_bytes, atomic_write_json, filesystem, find_files, join, list_dir, read_json

COMPLETE_MARKER = "_COMPLETE.json"

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
        # log-probs under the model that generated the row: the reference p_t in self-play, the evaluated
        # model in evaluation; null where nothing scored them (T-SPIN without a reference)
        ("ref_logp_real", pa.float64()),
        ("ref_logp_generated", pa.list_(pa.float64())),
        ("engine", pa.string()),
        ("model", pa.string()),
        ("sampling", pa.string()),
        # SPPO only (null otherwise): the oracle's score of each generated answer and its win rate
        ("oracle_scores", pa.list_(pa.float64())),
        ("win_rates", pa.list_(pa.float64())),
        # log-probs under this row's model of responses a pass was asked to score besides its own (null otherwise):
        # in evaluation the opponent's answers, in self-play what the next training set mixes in (spin_ray.run.trainset)
        ("also_scored_logps", pa.list_(pa.float64())),
    ]
)
OPTIONAL_COLUMNS = ("oracle_scores", "win_rates", "ref_logp_real", "ref_logp_generated", "also_scored_logps")
# A prompt row may bring responses to score under the engine's model in the same pass (an evaluation: the opponent's
# held-out answers, for the reward accuracy; a generation: the previous iteration's answers and y_0 for the training
# set that mixes them in): their token ids in (not stored), their summed log-probs out.
ALSO_SCORE_COLUMNS = ("also_score_token_ids", "also_scored_logps")

# Columns that travel with a batch between stages but are not part of a stored row: the shard a row
# belongs to, and the seconds each stage spent on that shard (kept as shard file metadata).
SHARD_COLUMN = "_shard"
TASK_COLUMN = "_task"  # in an engine pass over several prompt sets: which set (and folder) a row belongs to
TIMING_COLUMNS = ("_engine_seconds", "_reference_seconds", "_startup_seconds")


class GenerationError(RuntimeError):
    """The generation stage cannot run or its output is inconsistent."""


def shard_name(prompt_ids: list[str]) -> str:
    """A shard is named by its content, so a retried task rewrites the same file instead of adding one."""
    digest = hashlib.sha256("\n".join(sorted(prompt_ids)).encode()).hexdigest()[:16]
    return f"shard-{digest}.parquet"


def commit_shard(batch: pa.Table, output_dir: str | list[str]) -> pa.Table:
    """Ray Data stage: write each shard of a batch as one parquet file, atomically; readers see a whole shard or
    none of it. Returns the stored rows (timing and shard columns dropped). With several folders (an engine pass over
    several prompt sets) a row's TASK_COLUMN indexes its folder."""
    for name in OPTIONAL_COLUMNS:  # absent unless a stage filled them: stored as nulls
        if name not in batch.column_names:
            batch = batch.append_column(name, pa.nulls(batch.num_rows, PAIRS_SCHEMA.field(name).type))
    shards = batch.column(SHARD_COLUMN).to_pylist() if SHARD_COLUMN in batch.column_names else [0] * batch.num_rows
    for shard in sorted(set(shards)):
        part = batch.filter(pa.array([s == shard for s in shards]))
        folder = output_dir if isinstance(output_dir, str) else output_dir[part.column(TASK_COLUMN)[0].as_py()]
        timing = {
            c.lstrip("_"): round(float(part.column(c)[0].as_py()), 4) for c in TIMING_COLUMNS if c in part.column_names
        }
        table = part.select(PAIRS_SCHEMA.names).cast(PAIRS_SCHEMA)
        table = table.replace_schema_metadata({b"spin_ray": json.dumps(timing).encode()})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write_bytes(join(folder, shard_name(part.column("prompt_id").to_pylist())), sink.getvalue().to_pybytes())
    return batch.select(PAIRS_SCHEMA.names).cast(PAIRS_SCHEMA)


def committed_shards(output_dir: str) -> list[str]:
    """The committed shard files of a generation folder, listed from the store itself."""
    return [f for f in list_dir(output_dir) if f.rsplit("/", 1)[-1].startswith("shard-") and f.endswith(".parquet")]


def parquet_files(path: str) -> list[str]:
    """The committed shards of a generation folder, else every .parquet file under `path` (or `path` itself)."""
    shards = committed_shards(path)
    if shards:
        return shards
    fs, local = filesystem(path)
    if fs.isfile(local):
        return [path]
    return find_files(path, ".parquet")


def read_shard(file: str, columns: list[str] | None = None) -> pa.Table:
    fs, path = filesystem(file)
    with fs.open(path, "rb") as handle:
        return pq.read_table(handle, columns=columns)


def read_shards(files: list[str], columns: list[str]) -> pa.Table:
    """Some columns of many shards as one table, in the stored schema."""
    schema = pa.schema([PAIRS_SCHEMA.field(c) for c in columns])
    tables = [read_shard(file, columns).cast(schema) for file in files]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def committed_prompt_ids(output_dir: str) -> set[str]:
    """Every prompt_id already committed in a shard."""
    return set(read_shards(committed_shards(output_dir), ["prompt_id"]).column("prompt_id").to_pylist())


def shard_timing(file: str) -> dict:
    """The seconds each stage recorded in one shard's metadata (engine, reference, start-up)."""
    fs, path = filesystem(file)
    with fs.open(path, "rb") as handle:
        meta = pq.read_schema(handle).metadata or {}
    return json.loads(meta.get(b"spin_ray", b"{}"))


def engine_startups(files: list[str]) -> tuple[int, float]:
    """How many engine replicas started to write these shards, and their summed start-up seconds: each reports its
    start-up with its first shard (one metadata read per shard)."""
    seconds = [float(shard_timing(file).get("startup_seconds", 0.0)) for file in files]
    return sum(s > 0 for s in seconds), round(sum(seconds), 2)


def shard_timings(files: list[str]) -> dict:
    """Sums of the per-shard seconds each stage recorded in its shard's metadata (engine, reference, start-up)."""
    totals = {"engine_seconds": 0.0, "reference_seconds": 0.0, "startup_seconds": 0.0}
    for file in files:
        timing = shard_timing(file)
        for key in totals:
            totals[key] += float(timing.get(key, 0.0))
    return {key: round(value, 2) for key, value in totals.items()}


def shards_dataset(files: list[str]):
    """A Ray Dataset of parquet files, read by zero-CPU tasks straight into the object store.

    Not `ray.data.read_parquet`: its file-listing task needs a whole CPU, and on a small node whose
    CPUs an actor pool (a scorer, or training workers ingesting the dataset) already holds, that
    task would wait forever. The rows never pass through the caller's memory, only references.
    """
    import ray

    if not files:
        raise GenerationError("no parquet files to read")
    read = ray.remote(num_cpus=0)(read_shard)
    return ray.data.from_arrow_refs([read.remote(file) for file in files])


def read_completion(output_dir: str) -> Completion | None:
    """The completion record of a finished generation folder, else None."""
    record = read_json(join(output_dir, COMPLETE_MARKER))
    return None if record is None else Completion.from_record(record)


def write_completion(output_dir: str, completion: Completion) -> None:
    atomic_write_json(join(output_dir, COMPLETE_MARKER), completion.to_record())
