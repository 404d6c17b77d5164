"""Benchmark: what a bucket costs a run: one iteration of a tiny model on a local folder and on S3; prints JSON.

S3 is moto's standalone server on 127.0.0.1, reached through s3fs exactly as AWS would be (real HTTP, no
network latency: this measures the storage layer's own work: listings, whole-object writes, staging models
per node, DCP through fsspec). The two storages alternate over `--rounds` rounds in one process on one Ray
instance; the ratio compares medians of this run.

    python bench/storage.py [--rounds 2] [--out bench/results/storage.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tiny_model(folder: str) -> str:
    """A random 2-layer Llama with the SmolLM2 tokenizer (the tests' tiny model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from spin_ray.models.resolution import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model("smollm2-135m-instruct").path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import ray
    import s3fs

    from spin_ray.config import load_config
    from spin_ray.run.driver import run_iterations
    from tests.servers import MotoS3

    work = Path(tempfile.mkdtemp(prefix="bench-storage-", dir=os.environ.get("RAY_TMPDIR")))
    model = tiny_model(str(work / "tiny"))
    server = MotoS3(work / "moto.log")
    os.environ.update(server.client_env())
    s3fs.S3FileSystem().mkdir("bench")
    ray.init(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    common = [f"model.name={model}", "data.limit=16", "generation.max_new_tokens=16", "generation.batch_size=16",
              "generation.replicas=[1,1]", "generation.shard_rows=4", "training.global_batch_size=4",
              "training.epochs=2", "training.checkpoint_every=2", "training.num_workers=[1,1]",
              "training.cpus_per_worker=2", "iterations.count=1", "evaluation.prompts=8", "tracking.backends=[]",
              # the HF engine starts in a second; three vLLM starts (~25 s each) would drown the storage's cost
              "generation.engine=hf"]
    seconds: dict[str, list[float]] = {"local": [], "s3": []}
    try:
        for round_number in range(args.rounds):
            for storage in ("local", "s3") if round_number % 2 == 0 else ("s3", "local"):
                path = str(work / "runs") if storage == "local" else "s3://bench/runs"
                config = load_config(None, [*common, f"run.storage_path={path}", f"run.name={storage}-{round_number}"])
                started = time.perf_counter()
                manifest = run_iterations(config, echo=lambda line: None)
                seconds[storage].append(round(time.perf_counter() - started, 2))
                assert manifest["status"] == "done"
    finally:
        ray.shutdown()
        server.stop()
    medians = {k: statistics.median(v) for k, v in seconds.items()}
    report = json.dumps(
        {
            "benchmark": "storage",
            "command": "python bench/storage.py " + " ".join(sys.argv[1:]),
            "what": "one iteration (baseline eval, generate, train, evaluate, report) of a 2-layer random Llama, "
                    "16 prompts",
            "seconds": seconds,
            "median_seconds": medians,
            "ratio_s3_vs_local": round(medians["s3"] / medians["local"], 3),
        },
        indent=2,
    )
    if args.out:
        Path(args.out).write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
