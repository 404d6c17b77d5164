"""Elastic training on a real multi-node Ray cluster (ray.cluster_utils): a node is lost mid-iteration and
the worker group (num_workers [1, 2]) continues with the one worker left, from the last checkpoint."""

import threading
import time

import pytest

from spin_ray.config import load_config
from spin_ray.run.layout import RunLayout
from spin_ray.training.loop import read_metrics_log
from spin_ray.training.trainer import run_training

pytestmark = pytest.mark.ray


@pytest.fixture
def two_node_cluster():
    """A head node with no CPUs and two 1-CPU worker nodes, so each training worker sits on its own node."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()  # the shared session; the next test that needs it starts it again
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


def test_losing_a_node_shrinks_the_worker_group_and_the_run_finishes(two_node_cluster, tmp_path, tiny_model_dir):
    import ray

    cluster, nodes = two_node_cluster
    rows = [{"prompt_id": f"p{i:02d}", "prompt_token_ids": [1, 2, 3, 4 + i], "real_token_ids": [5, 6, 7 + i],
             "generated_token_ids": [[8, 9 + i]], "ref_logp_real": -10.0, "ref_logp_generated": [-9.0]}
            for i in range(8)]
    config = load_config(None, [
        f"model.name={tiny_model_dir}", f"run.storage_path={tmp_path}", "run.name=elastic",
        "training.global_batch_size=2", "training.micro_batch_size=1", "training.epochs=2",
        "training.checkpoint_every=1", "training.num_workers=[1,2]", "training.max_failures=3",
        "training.learning_rate=1e-3", "training.optimizer=adamw",
        "training.reference_check_tolerance=null"])  # the rows' reference log-probs are made up, not the model's
    layout = RunLayout.of(config)
    train_dir = layout.train(0)
    removed = {}

    def lose_a_node():  # as a cloud node is reclaimed: once step 3 is logged, one worker's node goes away
        deadline = time.time() + 300
        while time.time() < deadline:
            if len(read_metrics_log(train_dir)) >= 3:
                removed["after_step"] = len(read_metrics_log(train_dir))
                cluster.remove_node(nodes[1])
                return
            time.sleep(0.2)

    threading.Thread(target=lose_a_node, daemon=True).start()
    summary = run_training(config, ray.data.from_items(rows).materialize(), tiny_model_dir, train_dir, layout.model(0))
    assert removed["after_step"] >= 3 and summary.steps == 8
    assert summary.resumed_from_step >= 2  # restarted from a committed checkpoint, not from scratch
    log = read_metrics_log(train_dir)
    assert [line["step"] for line in log] == list(range(1, 9))
    sizes = [line["world_size"] for line in log]
    assert sizes[0] == 2 and sizes[-1] == 1  # started on both nodes, finished on the one left
    for epoch in (0, 1):  # the data position survived the resize: every prompt once per epoch
        seen = sorted(pid for line in log if line["epoch"] == epoch for pid in line["prompt_ids"])
        assert seen == [row["prompt_id"] for row in rows]
