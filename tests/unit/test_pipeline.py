"""The generation pipeline's pure parts: how many prompts an engine call takes, actor options, memory failures."""

import ray

from spin_ray.config import load_config
from spin_ray.generation.pipeline import memory_failure, placement, rows_per_call


def test_engine_calls_take_whole_shards_and_spread_a_small_run_over_the_pool():
    gen = load_config(
        overrides=["generation.shard_rows=4", "generation.batch_size=2", "generation.replicas=[1,3]"]
    ).generation
    assert rows_per_call(gen, 72) == 8  # 4 x batch, in whole shards
    assert rows_per_call(gen, 10) == 4  # a small run spreads over the 3 replicas, a shard each at least
    big = load_config(overrides=["generation.shard_rows=32", "generation.batch_size=64"]).generation
    assert rows_per_call(big, 10_000) == 256


def test_actor_options_carry_bounded_restarts_labels_gpus_and_memory():
    cpu = placement(load_config().generation, gpus=1)
    assert cpu == {"num_cpus": 1.0, "max_restarts": 3, "max_task_retries": 3}  # never Ray Data's endless default
    gpu = placement(load_config(overrides=[
        "generation.engine=vllm", "generation.use_gpu=true", "generation.accelerator_type=L4",
        "generation.memory_per_replica_gb=12", "generation.max_restarts=1"]).generation, gpus=2)
    assert gpu == {"num_cpus": 1.0, "num_gpus": 2, "accelerator_type": "L4", "memory": 12 * 2**30,
                   "max_restarts": 1, "max_task_retries": 1}


def test_an_actor_killed_for_memory_becomes_one_line_naming_the_keys():
    gen = load_config(overrides=["generation.memory_per_replica_gb=3"]).generation
    oom = ray.exceptions.OutOfMemoryError(
        "Task was killed due to the node running low on memory.\nMemory on the node (IP: 10.0.0.1, ID: ab) where the "
        "task (actor ID: cd) was running was 22.86GB / 24.00GB (0.952), which exceeds the memory usage threshold")
    try:
        try:
            raise oom
        except ray.exceptions.OutOfMemoryError as inner:
            raise RuntimeError("dataset execution failed") from inner
    except RuntimeError as outer:
        failure = memory_failure(outer, gen)
    assert failure is not None and "\n" not in str(failure)
    for fragment in ("22.86GB / 24.00GB", "generation.max_restarts (3)", "3.0 GiB reserved", "generation.batch_size",
                     "generation.memory_per_replica_gb"):
        assert fragment in str(failure)
    assert memory_failure(RuntimeError("a bug"), gen) is None
