"""Ray Data stages of generation as callable classes: the engine replica (HF or vLLM) and the forward-only scorer."""

from __future__ import annotations

import time

import pyarrow as pa

from spin_ray.generation.engine import EngineSpec, release_device_memory, sample_seed, sampling_description
from spin_ray.generation.progress import TallySender
from spin_ray.generation.shards import ALSO_SCORE_COLUMNS, SHARD_COLUMN, TASK_COLUMN

REFERENCE_COLUMNS = ("ref_logp_real", "ref_logp_generated")

# The actors built from these classes import this module at Ray's niceness 15; what brings torch, transformers or vLLM
# is imported inside the methods, after `prepare_compute_process` claims normal priority (workers.py: measured).


def score_rows(
    model, rows: list[dict], pad_id: int, batch_size: int, columns: tuple[str, str] = REFERENCE_COLUMNS
) -> None:
    """Set `columns` (the human answer's, then each generated answer's) of each row: forward-only log-probs under
    `model`."""
    from spin_ray.objectives.logprobs import score_responses

    prompts, responses = [], []
    for row in rows:
        for response in [row["real_token_ids"], *row["generated_token_ids"]]:
            prompts.append(row["prompt_token_ids"])
            responses.append(response)
    # sort by length so forward batches carry little padding, then restore order
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    scores = score_responses(model, [prompts[i] for i in order], [responses[i] for i in order], pad_id, batch_size)
    by_index = dict(zip(order, scores.tolist(), strict=True))
    real_column, generated_column = columns
    cursor = 0
    for row in rows:
        k = len(row["generated_token_ids"])
        row[real_column] = by_index[cursor]
        row[generated_column] = [by_index[cursor + 1 + j] for j in range(k)]
        cursor += 1 + k


class GenerateStage:
    """Engine replica (HF or vLLM, by `spec.engine`): loads the opponent once and answers each prompt K times.

    A call receives several shards, so the engine's slots refill across shard boundaries, and yields
    each shard as soon as all its answers are done, so shards commit while it works. With
    `spec.score_reference` it also returns the reference log-probs: the opponent p_t IS the reference
    model, so a generated answer's log-prob comes with it (summed while decoding, or vLLM's own), and
    the human answer is scored in the same engine pass (the prompt's prefill; a prompt-scoring request
    in vLLM). No second model copy, no second pool. Start-up (staging and loading the model, building
    the engine) is timed apart from generation and reported with the replica's first shard. Each finished
    answer is counted into the phase's `tally` (an AnswerTally actor) for the job log's progress lines.

    The replica that answers a pass's last shard (the tally counts them) shuts its engine down explicitly before its
    call returns, so the next phase finds its memory (a GPU's, on a GPU node) free without waiting for Ray Data to
    end the actor; a replica Ray Data releases earlier, idle, frees it as its process exits (the engine runs in the
    replica's own process). Should a shut-down replica get another call (a shard answered again after its replica
    died), its engine starts again.
    """

    def __init__(self, spec: EngineSpec, tally=None, tasks: tuple[EngineSpec, ...] = ()):
        from spin_ray.workers import prepare_compute_process

        started = time.perf_counter()
        prepare_compute_process(spec.threads)
        self.spec = spec
        # an engine pass over several prompt sets (`run_pass`): a row's TASK_COLUMN picks its sampling settings
        self.tasks = tasks
        self.progress = TallySender(tally)
        self.engine = self.hf_model = None
        self.start_engine()
        self.startup_seconds = time.perf_counter() - started
        self.progress.started()

    def start_engine(self) -> None:
        """Stage the opponent on this node and build the engine (vLLM, or the HF loop over a loaded model)."""
        from spin_ray.data.tokenization import ChatFormat
        from spin_ray.models.resolution import load_tokenizer, local_model_path, merged_model_path

        spec = self.spec
        path = local_model_path(spec.model, spec.cache_dir)
        tokenizer = load_tokenizer(path, spec.trust_remote_code)
        chat = ChatFormat(tokenizer)
        self.pad_id = tokenizer.pad_token_id
        if spec.engine == "vllm":
            from spin_ray.generation.vllm_engine import VLLMEngine
            from spin_ray.models.adapters import adapter_base

            base = adapter_base(path)  # a LoRA model: the base, staged once per node, plus this adapter
            adapter = {"adapter": path} if base and not spec.serve_merged else {}
            if base and spec.serve_merged:
                path = merged_model_path(path, spec.dtype, spec.trust_remote_code, spec.cache_dir)
            elif base:
                path = local_model_path(base, spec.cache_dir)
            self.engine = VLLMEngine(path, chat,
                                     spec.max_new_tokens, spec.temperature, spec.top_p, spec.batch_size,
                                     spec.dtype, spec.max_model_len, spec.trust_remote_code, spec.use_gpu,
                                     spec.tensor_parallel_size, spec.gpu_memory_utilization, spec.engine_kwargs,
                                     with_logprobs=spec.score_reference, **adapter)
        else:
            from spin_ray.generation.hf_engine import HFEngine
            from spin_ray.models.resolution import load_model

            self.hf_model = load_model(path, spec.dtype, spec.trust_remote_code)
            self.engine = HFEngine(
                self.hf_model, chat, spec.max_new_tokens, spec.temperature, spec.top_p, spec.batch_size
            )

    def close(self) -> None:
        """Shut the engine down and free its model (its memory, on a GPU), then tell the pass's tally."""
        engine, self.engine, self.hf_model = self.engine, None, None
        if engine is None:
            return
        started = time.perf_counter()
        engine.shutdown()
        self.progress.shut_down(time.perf_counter() - started)

    def __del__(self):
        # Ray Data's graceful release of an idle replica: with the HF engine this runs as the actor exits (a vLLM
        # engine keeps frames of its constructor's callers alive, so there the process's exit frees it instead)
        try:
            self.close()
        except Exception:  # an interpreter shutting down may have torn down what closing needs
            pass

    def __call__(self, batch: pa.Table):
        if self.engine is None:
            self.start_engine()
        yield from self._call(batch)
        if self.progress.pass_answered():  # no shard is left for any replica: free the engine now
            self.close()

    def _call(self, batch: pa.Table):
        with_also = ALSO_SCORE_COLUMNS[0] in batch.column_names
        if TASK_COLUMN not in batch.column_names:
            yield from self._answer(batch.to_pylist(), self.spec, with_also)
            return
        groups: dict[int, list[dict]] = {}
        for row in batch.to_pylist():
            groups.setdefault(row[TASK_COLUMN], []).append(row)
        for task, rows in groups.items():
            yield from self._answer(rows, self.tasks[task], with_also)

    def _answer(self, rows: list[dict], spec: EngineSpec, with_also: bool):
        """Answer `rows` with `spec`'s sampling settings; yield each shard as soon as all its answers are done."""
        engine = self.engine
        engine.max_new_tokens, engine.temperature, engine.top_p = spec.max_new_tokens, spec.temperature, spec.top_p
        also_in, also_out = ALSO_SCORE_COLUMNS
        # vLLM scores them with its own requests; the HF engine with one forward when the shard is done
        also = [row.get(also_in) or [] for row in rows] if with_also else None
        engine_also = [] if also is not None and self.hf_model is None else None
        prompts, seeds, score, owner = [], [], [], []
        for position, row in enumerate(rows):
            for column in ("generated", "generated_token_ids", "finish_reasons", "ref_logp_generated"):
                row[column] = [None] * spec.num_samples
            row["ref_logp_real"] = None
            for k in range(spec.num_samples):
                prompts.append(row["prompt_token_ids"])
                seeds.append(sample_seed(spec.seed, row["prompt_id"], k))
                # the human answer is scored once, with the prompt's first sample
                score.append(row["real_token_ids"] if spec.score_reference and k == 0 else None)
                if engine_also is not None:
                    engine_also.append(also[position] if k == 0 else [])
                owner.append((position, k))
        pending: dict[int, int] = {}
        for row in rows:
            pending[row[SHARD_COLUMN]] = pending.get(row[SHARD_COLUMN], 0) + spec.num_samples
        clock = time.perf_counter()
        extra = {"also_score": engine_also} if engine_also is not None else {}
        for index, completion in self.engine.stream(prompts, seeds, score, **extra):
            position, k = owner[index]
            row = rows[position]
            if k == 0 and engine_also is not None:
                row[also_out] = completion.also_scored or []
            row["generated"][k] = completion.text
            row["generated_token_ids"][k] = completion.token_ids
            row["finish_reasons"][k] = completion.finish_reason
            row["ref_logp_generated"][k] = completion.logp
            if k == 0:
                row["ref_logp_real"] = completion.scored_logp
            self.progress.count(len(completion.token_ids))
            pending[row[SHARD_COLUMN]] -= 1
            if pending[row[SHARD_COLUMN]] == 0:
                self.progress.shard_answered()
                done = [r for r in rows if r[SHARD_COLUMN] == row[SHARD_COLUMN]]
                if also is not None and engine_also is None:
                    self._score_also(done)
                engine_seconds = time.perf_counter() - clock
                yield self._finish(done, engine_seconds, spec)
                clock = time.perf_counter()

    def _score_also(self, rows: list[dict]) -> None:
        """The HF engine's way to the rows' also-scored responses: one forward-only pass of its model."""
        from spin_ray.objectives.logprobs import score_responses

        also_in, also_out = ALSO_SCORE_COLUMNS
        pairs = [(row["prompt_token_ids"], response) for row in rows for response in row.get(also_in) or []]
        scores = iter(score_responses(self.hf_model, [p for p, _ in pairs], [r for _, r in pairs], self.pad_id,
                                      self.spec.reference_batch_size).tolist() if pairs else [])
        for row in rows:
            row[also_out] = [next(scores) for _ in row.get(also_in) or []]

    def _finish(self, rows: list[dict], engine_seconds: float, spec: EngineSpec) -> pa.Table:
        startup, self.startup_seconds = self.startup_seconds, 0.0  # counted once, with this replica's first shard
        sampling = sampling_description(spec.max_new_tokens, spec.temperature, spec.top_p, spec.num_samples, spec.seed)
        for row in rows:
            row["generated_tokens"] = [len(answer) for answer in row["generated_token_ids"]]
            row["engine"] = spec.engine
            row["model"] = spec.model
            row["sampling"] = sampling
            row["_engine_seconds"] = engine_seconds
            row["_reference_seconds"] = 0.0
            row["_startup_seconds"] = startup
        if not spec.score_reference:
            for row in rows:  # nothing is scored here: a separate reference pool fills these, or nobody needs them
                row["ref_logp_real"], row["ref_logp_generated"] = None, None
        elif any(row["ref_logp_real"] is None or None in row["ref_logp_generated"] for row in rows):
            # the HF engine's static fallback (sliding-window models) returns no log-probs: one forward scores them
            started = time.perf_counter()
            score_rows(self.hf_model, rows, self.pad_id, spec.reference_batch_size)
            for row in rows:
                row["_reference_seconds"] = time.perf_counter() - started
        return pa.Table.from_pylist(rows)


class ReferenceStage:
    """Forward-only scoring of each row's answers under one model, as its own actor pool: the reference p_t when
    generation does not score (`generation.fuse_reference: false`), the previous iteration's pairs (and T-SPIN's
    y_0) rescored under p_t, and the opponent's held-out answers scored under the new model in evaluation.
    Writes the human answer's and the generated answers' log-probs into `columns`."""

    def __init__(self, model: str, dtype: str, trust_remote_code: bool, batch_size: int, threads: int,
                 use_gpu: bool = False, cache_dir: str | None = None, columns: tuple[str, str] = REFERENCE_COLUMNS):
        from spin_ray.workers import prepare_compute_process

        started = time.perf_counter()
        prepare_compute_process(threads)
        from spin_ray.models.resolution import load_model, load_tokenizer

        self.model = load_model(model, dtype, trust_remote_code, cache_dir).eval().to("cuda" if use_gpu else "cpu")
        self.pad_id = load_tokenizer(model, trust_remote_code, cache_dir).pad_token_id
        self.batch_size, self.columns = batch_size, tuple(columns)
        self.startup_seconds = time.perf_counter() - started

    def __del__(self):
        # released at the pass's end: free the model's memory at once (a GPU's, on a GPU node)
        try:
            self.model = None
            release_device_memory()
        except Exception:  # an interpreter shutting down may have torn down torch
            pass

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        rows = batch.to_pylist()
        score_rows(self.model, rows, self.pad_id, self.batch_size, self.columns)
        seconds = time.perf_counter() - started
        for row in rows:
            row["_reference_seconds"] = seconds
        return pa.Table.from_pylist(rows)
