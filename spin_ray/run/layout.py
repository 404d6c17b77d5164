"""Where everything of a run lives under `{run.storage_path}/{run.name}`: the one place that builds its paths.

    manifest.json  lease.json  report.{json,md,png}
    validation.jsonl            the validation records carved out of data.train (data.validation_fraction)
    base_model/                 the initial model, uploaded once when the storage is a bucket
    sft/{train,model}/          the SFT warm start (train/: checkpoints, metrics.jsonl, summary.json)
    baseline/eval/              evaluation of p_0
    iter_{t}/generation/        opponent p_t's answers: committed parquet shards + _COMPLETE.json
    iter_{t}/{train,model}/     training of p_{t+1}; model/ is its Hugging Face export (a LoRA adapter with LoRA)
    iter_{t}/model_merged/      with training.lora.export_merged: base + adapter as a whole model
    iter_{t}/eval/              evaluation of p_{t+1}
"""

from __future__ import annotations

from dataclasses import dataclass

from spin_ray.storage import join


@dataclass(frozen=True)
class RunLayout:
    root: str  # fsspec URL or local path of the run folder

    @classmethod
    def of(cls, config) -> "RunLayout":
        return cls(join(config.run.storage_path, config.run.name))

    @property
    def manifest(self) -> str:
        return join(self.root, "manifest.json")

    @property
    def lease(self) -> str:
        return join(self.root, "lease.json")

    def report(self, kind: str) -> str:
        """report.json, report.md or report.png."""
        return join(self.root, f"report.{ {'json': 'json', 'markdown': 'md', 'plot': 'png'}[kind] }")

    @property
    def validation_data(self) -> str:
        return join(self.root, "validation.jsonl")

    @property
    def base_model(self) -> str:
        return join(self.root, "base_model")

    def iteration(self, t: int) -> str:
        return join(self.root, f"iter_{t}")

    def generation(self, t: int) -> str:
        return join(self.iteration(t), "generation")

    def stage(self, t: int | None) -> str:
        """The folder of one training stage: iteration t, or the SFT warm start when t is None."""
        return join(self.root, "sft") if t is None else self.iteration(t)

    def train(self, t: int | None) -> str:
        return join(self.stage(t), "train")

    def model(self, t: int | None) -> str:
        return join(self.stage(t), "model")

    def merged_model(self, t: int | None) -> str:
        """The merged model (base + adapter) of a LoRA stage, with training.lora.export_merged."""
        return join(self.stage(t), "model_merged")

    def evaluation(self, t: int | None) -> str:
        """Evaluation of the model trained in iteration t, or of p_0 (the baseline) when t is None."""
        return join(self.root, "baseline", "eval") if t is None else join(self.iteration(t), "eval")
