"""SPPO's preference oracle: per prompt, a score for each of its K answers and so P(answer i beats answer j).

Two oracles, one interface (`scores`): `rule:gsm8k` (a correct final answer beats a wrong one, ties
are 1/2; the CPU default) and `reward_model` (any Hugging Face sequence-classification model scores
each answer, P = sigmoid(s_i - s_j), the paper's use of PairRM's scores). `preference_stage` gives
the generation pipeline the oracle as a Ray Data stage (the rule as a zero-CPU task, the reward
model as an actor pool); both add `oracle_scores` and `win_rates` to each row before its shard commits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from spin_ray.data.gsm8k import final_answer

# The reward model's actors import this module at Ray's niceness 15: what brings torch is imported inside their
# methods, after `prepare_compute_process` claims normal priority (workers.py: measured).


def win_rates(matrix: np.ndarray) -> np.ndarray:
    """P_hat(y_i) = mean_j P(y_i beats y_j) over all K answers, the self-pair counted as 1/2."""
    matrix = np.array(matrix, dtype=np.float64)
    np.fill_diagonal(matrix, 0.5)
    return matrix.mean(axis=1)


def matrix_from_scores(scores: Sequence[float], kind: str) -> np.ndarray:
    """K x K preferences from per-answer scores: `rule` compares (1, 0 or 1/2 on ties); `bradley_terry`
    is sigmoid(s_i - s_j)."""
    s = np.asarray(scores, dtype=np.float64)
    diff = s[:, None] - s[None, :]
    if kind == "rule":
        return 0.5 * (1.0 + np.sign(diff))
    if kind == "bradley_terry":
        return 1.0 / (1.0 + np.exp(-diff))
    raise ValueError(f"unknown score comparison {kind!r}")


class GSM8KRuleOracle:
    """A correct final answer (equal to the human answer's, after normalisation) beats a wrong one."""

    comparison = "rule"

    def scores(
        self, prompts: Sequence, answers: Sequence[Sequence[str]], references: Sequence[str]
    ) -> list[list[float]]:
        out = []
        for reference, group in zip(references, answers, strict=True):
            truth = final_answer(reference)
            out.append([float(truth is not None and final_answer(answer) == truth) for answer in group])
        return out


class RewardModelOracle:
    """Scores each (prompt, answer) with a sequence-classification reward model: P = sigmoid(s_i - s_j)."""

    comparison = "bradley_terry"

    def __init__(self, model_path: str, batch_size: int = 8, device: str = "cpu", trust_remote_code: bool = False,
                 max_length: int = 2048):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from spin_ray.models.resolution import local_model_path

        model_path = local_model_path(model_path)  # a reward model in a bucket is staged on this node
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_path, trust_remote_code=trust_remote_code, torch_dtype=torch.float32).eval().to(device)
        if self.model.config.num_labels != 1:
            raise ValueError(f"{model_path}: a reward model has one output (num_labels 1), "
                             f"this one has {self.model.config.num_labels}")
        # sequence-classification heads read the last non-pad token: they must know the pad id
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size, self.device = batch_size, device
        self.max_length = min(max_length, self.tokenizer.model_max_length or max_length)

    def _text(self, prompt: list[dict], answer: str) -> str:
        messages = [*prompt, {"role": "assistant", "content": answer}]
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return "\n\n".join(m["content"] for m in messages)

    def scores(self, prompts: Sequence, answers: Sequence[Sequence[str]], references=None) -> list[list[float]]:
        import torch

        texts = [self._text(prompt, answer) for prompt, group in zip(prompts, answers, strict=True) for answer in group]
        flat: list[float] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                       truncation=True, max_length=self.max_length).to(self.device)
                flat.extend(self.model(**batch).logits[:, 0].float().cpu().tolist())
        out, cursor = [], 0
        for group in answers:
            out.append(flat[cursor : cursor + len(group)])
            cursor += len(group)
        return out


def _with_preferences(batch: pa.Table, oracle) -> pa.Table:
    """Append oracle_scores and win_rates (one value per generated answer) to a batch of generation rows."""
    prompts = batch.column("prompt").to_pylist()
    answers = batch.column("generated").to_pylist()
    references = batch.column("real").to_pylist()
    scores = oracle.scores(prompts, answers, references)
    rates = [win_rates(matrix_from_scores(s, oracle.comparison)).tolist() for s in scores]
    batch = batch.append_column("oracle_scores", pa.array(scores, pa.list_(pa.float64())))
    return batch.append_column("win_rates", pa.array(rates, pa.list_(pa.float64())))


def gsm8k_rule_preferences(batch: pa.Table) -> pa.Table:
    """Ray Data task: the GSM8K rule on a batch (pure Python, so it reserves no CPU)."""
    return _with_preferences(batch, GSM8KRuleOracle())


class RewardModelStage:
    """Ray Data actor: a reward-model replica that loads once and scores every answer of each batch."""

    def __init__(self, model_path: str, batch_size: int, threads: int, use_gpu: bool = False,
                 trust_remote_code: bool = False):
        from spin_ray.workers import prepare_compute_process

        prepare_compute_process(threads)
        self.oracle = RewardModelOracle(model_path, batch_size, "cuda" if use_gpu else "cpu", trust_remote_code)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _with_preferences(batch, self.oracle)


def preference_stage(config):
    """The configured oracle as a generation-pipeline stage (Ray Dataset in, Ray Dataset out)."""
    import ray

    sppo = config.sppo
    if sppo.oracle == "rule:gsm8k":
        return lambda dataset: dataset.map_batches(gsm8k_rule_preferences, batch_format="pyarrow", batch_size=None,
                                                   num_cpus=0)
    threads = max(1, int(sppo.reward_cpus_per_replica))
    return lambda dataset: dataset.map_batches(
        RewardModelStage,
        fn_constructor_kwargs={"model_path": sppo.reward_model, "batch_size": sppo.reward_batch_size,
                               "threads": threads, "use_gpu": sppo.reward_use_gpu,
                               "trust_remote_code": config.model.trust_remote_code},
        batch_format="pyarrow",
        batch_size=None,  # a block is one committed shard: score it whole
        compute=ray.data.ActorPoolStrategy(min_size=sppo.reward_replicas[0], max_size=sppo.reward_replicas[1]),
        num_cpus=sppo.reward_cpus_per_replica,
        num_gpus=1 if sppo.reward_use_gpu else 0,
        max_restarts=config.generation.max_restarts,
        max_task_retries=config.generation.max_restarts,
    )
