"""What iteration t mixes in gets its log-probs under p_t from p_t's engine pass, or from a scoring pool when the
pass did not score all of it (no Ray: shards written as the pass commits them)."""

import pyarrow as pa
import pytest

from spin_ray.config import load_config
from spin_ray.generation.shards import PAIRS_SCHEMA, SHARD_COLUMN, commit_shard, committed_shards, read_shards
from spin_ray.run.layout import RunLayout
from spin_ray.run.trainset import pass_scores, rescore_requests, take_pass_scores

PROMPTS = ["a", "b", "c"]


def _commit(folder: str, answers: dict[str, list[list[int]]], real: dict | None = None, also: dict | None = None):
    """One shard of rows as a generation pass commits them: each prompt's answers, and what the pass scored."""
    rows = [{"prompt_id": pid, "prompt_token_ids": [1, 2], "real_token_ids": [3, 4], "generated_token_ids": given,
             "generated_tokens": [len(a) for a in given], "ref_logp_real": (real or {}).get(pid),
             "ref_logp_generated": [-1.0] * len(given), "also_scored_logps": (also or {}).get(pid), SHARD_COLUMN: 0}
            for pid, given in answers.items()]
    table = pa.Table.from_pylist(rows, schema=pa.schema([*PAIRS_SCHEMA, pa.field(SHARD_COLUMN, pa.int64())]))
    commit_shard(table, folder)


def _config(tmp_path, *extra):
    return load_config(None, [f"run.storage_path={tmp_path}", "run.name=mix", "iterations.mix_previous=true",
                              "generation.num_samples=2", *extra])


def _iteration_0(layout):
    answers = {pid: [[10 + i, 11], [20 + i]] for i, pid in enumerate(PROMPTS)}  # K = 2 answers each
    _commit(layout.generation(0), answers)
    return answers


def test_spin_asks_its_pass_for_the_previous_answers_and_takes_the_scores_it_committed(tmp_path):
    config = _config(tmp_path)
    layout = RunLayout.of(config)
    previous = _iteration_0(layout)
    assert rescore_requests(config, layout, 0) is None and pass_scores(config, layout, 0) is None  # nothing mixed yet
    assert rescore_requests(config, layout, 1) == previous  # in the order the answers are stored

    real = {pid: -5.0 - i for i, pid in enumerate(PROMPTS)}
    also = {pid: [-7.0 - i, -8.0 - i] for i, pid in enumerate(PROMPTS)}
    _commit(layout.generation(1), {pid: [[1], [2]] for pid in PROMPTS}, real, also)
    scores = pass_scores(config, layout, 1)
    assert scores is not None
    stored = read_shards(committed_shards(layout.generation(0)), ["prompt_id", "generated_token_ids",
                                                                  "ref_logp_real", "ref_logp_generated"])
    mixed = take_pass_scores(stored, scores).to_pylist()
    for row in mixed:  # each previous pair now carries p_1's log-probs: its prompt's reference, its answers' scores
        assert row["ref_logp_real"] == real[row["prompt_id"]] and row["ref_logp_generated"] == also[row["prompt_id"]]


def test_a_pass_that_did_not_score_everything_leaves_the_rescoring_to_a_pool(tmp_path):
    config = _config(tmp_path)
    layout = RunLayout.of(config)
    _iteration_0(layout)
    real = {pid: -5.0 for pid in PROMPTS}
    also = {"a": [-7.0, -8.0], "b": [-7.0, -8.0]}  # "c" committed without its scores (an older pass, say)
    _commit(layout.generation(1), {pid: [[1], [2]] for pid in PROMPTS}, real, also)
    assert pass_scores(config, layout, 1) is None
    short = _config(tmp_path, "run.name=short")
    _iteration_0(RunLayout.of(short))
    _commit(RunLayout.of(short).generation(1), {pid: [[1]] for pid in PROMPTS}, real, {pid: [-7.0] for pid in PROMPTS})
    assert pass_scores(short, RunLayout.of(short), 1) is None  # one score for two answers


def test_tspin_asks_for_y0_last_and_each_row_takes_it(tmp_path):
    config = _config(tmp_path, "algorithm=tspin", "tspin.reference_free=false")
    layout = RunLayout.of(config)
    previous = _iteration_0(layout)
    assert rescore_requests(config, layout, 1) == {pid: [*answers, answers[0]] for pid, answers in previous.items()}
    also = {pid: [-7.0, -8.0, -9.0 - i] for i, pid in enumerate(PROMPTS)}  # the previous answers', then y_0's
    _commit(layout.generation(1), {pid: [[1], [2]] for pid in PROMPTS}, {pid: -5.0 for pid in PROMPTS}, also)
    scores = pass_scores(config, layout, 1)
    proto_rows = read_shards(committed_shards(layout.generation(0)), ["prompt_id", "generated_token_ids",
                                                                      "ref_logp_real", "ref_logp_generated"])
    taken = take_pass_scores(proto_rows, scores, proto=True).to_pylist()
    assert {row["prompt_id"]: row["ref_logp_generated"] for row in taken} == {pid: [also[pid][-1]] for pid in PROMPTS}


@pytest.mark.parametrize("extra", [["generation.fuse_reference=false"],  # the reference pool scores these too
                                   ["algorithm=tspin", "tspin.reference_free=true", "iterations.mix_previous=false"],
                                   ["iterations.mix_previous=false"]])
def test_nothing_is_asked_where_nothing_needs_scores_under_p_t(tmp_path, extra):
    config = _config(tmp_path, *extra)
    layout = RunLayout.of(config)
    _iteration_0(layout)
    assert rescore_requests(config, layout, 1) is None and pass_scores(config, layout, 1) is None
