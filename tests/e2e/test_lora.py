"""LoRA end to end on SmolLM2 with the vLLM engine: the demo job trains an adapter, exports it, and the next engine pass
answers with the base plus that adapter merged on the node (generation.lora_serving auto, on CPU) as vLLM's LoRA
requests on the base do."""

import json
from pathlib import Path

import pytest

from spin_ray.config import load_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.ray]


def _greedy_answers(answers_dir: str) -> dict[str, list[int]]:
    from spin_ray.generation.shards import read_completion, read_shards

    table = read_shards(read_completion(answers_dir).shards, ["prompt_id", "generated_token_ids"])
    return {pid: answers[0] for pid, answers in zip(table.column("prompt_id").to_pylist(),
                                                    table.column("generated_token_ids").to_pylist(), strict=True)}


def test_a_lora_demo_run_serves_base_plus_adapter_merged_as_vllm_lora_requests_do(ray_session, smollm2_path, tmp_path):
    """Two iterations of the demo job on 4 prompts with a rank-8 adapter (lr 1e-3, so one step changes answers). After
    iteration 0 every engine pass is the base plus the latest adapter, served as the node's merged copy (the CPU
    default): p_1 answers iteration 1's prompts and scores their reference log-probs, which the step-0 check compares
    with the training forward of base + adapter. p_2's held-out answers must equal those vLLM gives through a LoRA
    request on the base (generation.lora_serving=adapter) on at least 7 of the 8 prompts, and the base's own answers
    must differ on some, or the adapter proved nothing."""
    from spin_ray.generation.pipeline import run_generation
    from spin_ray.models.resolution import default_cache_dir, merged_model_key
    from spin_ray.run.driver import start_driver
    from spin_ray.run.evaluation import eval_config

    config = load_config(ROOT / "jobs" / "gsm8k_smollm2_cpu.yaml", [
        f"run.storage_path={tmp_path}", "data.limit=4", "generation.max_new_tokens=32", "evaluation.prompts=8",
        "iterations.count=2", "training.global_batch_size=4", "training.epochs=1", "training.optimizer=adamw",
        "training.learning_rate=1e-3", "training.lora.rank=8", "training.lora.export_merged=true"])
    assert config.generation.lora_serving == "auto" and not config.generation.use_gpu
    manifest = ray_session.get(start_driver(config).run.remote())
    assert manifest["status"] == "done"
    phases = manifest["iterations"][1]["phases"]
    train = phases["train"]["metrics"]
    assert train["steps"] == 1 and train["lora_rank"] == 8
    assert 0 < train["trainable_parameters"] < 0.05 * 134_515_008  # SmolLM2-135M's parameters
    adapter = Path(manifest["final_model"])
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "model.safetensors").exists()
    merged = Path(phases["train"]["artifacts"]["merged_model"])
    adapter_bytes = (adapter / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < 0.05 * (merged / "model.safetensors").stat().st_size
    assert "| p2 |" in Path(manifest["report"]["markdown"]).read_text()
    first_step = json.loads(Path(manifest["iterations"][1]["phases"]["train"]["artifacts"]["train"], "metrics.jsonl")
                            .read_text().splitlines()[0])
    assert first_step["reference_gap"] < 0.01  # the merged p_1 scored what training computes (tolerance 0.05)
    # p_2's engines served the node's merged copy of the final adapter
    served = default_cache_dir() / "merged" / merged_model_key(str(adapter), config.model.dtype)
    assert (served / "model.safetensors").is_file()

    merged_answers = _greedy_answers(phases["evaluate"]["artifacts"]["answers"])
    base = _greedy_answers(manifest["phases"]["baseline_eval"]["artifacts"]["answers"])
    as_adapter = eval_config(config.model_copy(update={
        "generation": config.generation.model_copy(update={"lora_serving": "adapter"})}))
    requested = run_generation(as_adapter, str(adapter), str(tmp_path / "adapter_answers"), source=config.data.eval,
                               score_reference=False)
    assert requested.summary.prompts == 8
    through_lora = _greedy_answers(str(tmp_path / "adapter_answers"))
    assert len(merged_answers) == len(through_lora) == 8
    same = sum(merged_answers[pid] == through_lora[pid] for pid in through_lora)
    assert same >= 7, f"the merged model answered as base + adapter requests on {same} of 8 prompts"
    assert sum(merged_answers[pid] != base[pid] for pid in base) >= 1, "the adapter changed no greedy answer"
