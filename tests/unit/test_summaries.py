"""Phase summaries as types: what the completion record and summary.json keep, read back as they were written."""

from spin_ray.generation.summary import Completion, GenerationSummary
from spin_ray.training.summary import TrainingSummary

GENERATION = dict(prompts=4, prompts_generated_this_run=4, responses=8, generated_tokens=96, seconds=2.0,
                  tokens_per_second=48.0, mean_response_tokens=12.0, max_response_tokens=16,
                  share_hit_max_new_tokens=0.25, max_new_tokens=16, engine_seconds=1.5, reference_seconds=0.0,
                  startup_seconds=0.4, engine_tokens_per_second=64.0, engine="hf", model="/m",
                  answers_per_prompt=2, overlong_dropped=0, overlong_truncated=1)

TRAINING = dict(export_dir="/run/iter_0/model", steps=4, resumed_from_step=2, pairs=16, pairs_left_out_per_epoch=0,
                last_step={"step": 4, "loss": 0.61, "rewards/margins": 0.3, "seconds": 0.2}, seconds=9.0,
                setup_seconds=1.0, training_seconds=7.0, checkpoint_seconds=0.5, export_seconds=1.0,
                training_tokens_per_second=300.0, compute_dtype="float32", lora_rank=0, trainable_parameters=1000,
                activation_checkpointing=False, sharded_accumulation=False, reference_source="generation")


def test_a_completion_record_reads_back_to_the_same_summary_and_ignores_keys_it_does_not_know():
    completion = Completion(["a.parquet", "b.parquet"], GenerationSummary(**GENERATION, engine_starts=2))
    record = completion.to_record()
    assert Completion.from_record(record) == completion
    record["summary"]["a_later_key"] = 1
    assert Completion.from_record(record) == completion
    line = completion.summary.line()
    assert "4 prompts (4 generated this run), 96 tokens in 2.0s = 48.0 tok/s" in line and "25.0% hit" in line


def test_training_metrics_are_the_last_step_then_the_summary_without_the_export_folder():
    summary = TrainingSummary(**TRAINING, epochs_run=2, best_epoch=1, validation_nll=1.2)
    metrics = summary.metrics()
    assert metrics["rewards/margins"] == 0.3 and metrics["loss"] == summary.loss == 0.61
    assert metrics["seconds"] == 9.0  # the phase's, not the last step's
    assert metrics["steps"] == 4 and metrics["best_epoch"] == 1 and "export_dir" not in metrics
    assert TrainingSummary.from_record(summary.to_record()) == summary


def test_a_flat_summary_json_of_an_earlier_version_reads_back_with_its_step_metrics_as_last_step():
    flat = {**{k: v for k, v in TRAINING.items() if k != "last_step"}, "step": 4, "loss": 0.61, "lr": 1e-6}
    summary = TrainingSummary.from_record(flat)
    assert summary.last_step == {"step": 4, "loss": 0.61, "lr": 1e-6} and summary.loss == 0.61
