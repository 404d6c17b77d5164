"""Config: defaults, YAML + overrides, and clear errors for unknown keys and bad values."""

from pathlib import Path

import pytest

from spin_ray.config import ConfigError, config_keys, explicit_keys, load_config

ROOT = Path(__file__).resolve().parents[2]


def test_defaults_follow_the_paper():
    config = load_config()
    assert config.training.beta == 0.1
    assert config.training.learning_rate == 5e-7
    assert config.training.optimizer == "rmsprop"
    assert config.training.global_batch_size == 64
    assert config.model.name == "smollm2-135m-instruct"
    assert config.data.train == "gsm8k"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  beta: 0.2\n  loss_type: hinge\nrun:\n  name: a\n")
    config = load_config(path, ["training.beta=0.05", "run.name=b", "data.limit=16", "data.eval=null"])
    assert config.training.beta == 0.05
    assert config.training.loss_type == "hinge"  # from the file, untouched by overrides
    assert config.run.name == "b"
    assert config.data.limit == 16
    assert config.data.eval is None


def test_unknown_key_in_file_is_named_with_a_suggestion(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  betta: 0.2\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "training.betta: unknown config key (did you mean 'training.beta'?)" in str(err.value)
    assert str(path) in str(err.value)


def test_unknown_section_and_override_key():
    with pytest.raises(ConfigError, match="unknown config key 'trainig.beta'.*did you mean 'training.beta'"):
        load_config(overrides=["trainig.beta=0.1"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["training.beta"])


@pytest.mark.parametrize(
    "override, culprit",
    [
        ("training.beta=-1", "training.beta: Input should be greater than 0"),
        ("generation.top_p=1.5", "generation.top_p: Input should be less than or equal to 1"),
        ("generation.engine=tgi", "generation.engine: Input should be 'hf' or 'vllm'"),
        ("training.loss_type=kto", "training.loss_type"),
        ("training.epochs=zero", "training.epochs: Input should be a valid integer"),
        ("run.name=a/b", "run.name: Value error, run name 'a/b' must be a single path component"),
        ("training.micro_batch_size=128", "micro_batch_size (128) exceeds global_batch_size (64)"),
        ("training.attention=flash_varlen", "training.attention flash_varlen needs training.use_gpu=true (its kernels "
         "are CUDA's) and training.compute_dtype bfloat16 or float16; or set training.attention=sdpa"),
    ],
)
def test_out_of_range_values_name_the_key(override, culprit):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert culprit in str(err.value)


def test_non_mapping_and_broken_yaml(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(scalar)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_fingerprint_tracks_every_setting():
    base = load_config()
    assert base.fingerprint() == load_config().fingerprint()
    assert base.fingerprint() != load_config(overrides=["training.beta=0.2"]).fingerprint()


def test_the_configuration_reference_is_generated_from_the_schema():
    import importlib.util

    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    documented = (ROOT / "docs" / "configuration.md").read_text()
    missing = [key for key in config_keys() if f"`{key}`" not in documented]
    assert not missing, f"docs/configuration.md lacks: {missing}"
    assert documented == module.reference(), "docs/configuration.md is stale: run python scripts/config_reference.py"


def test_a_null_stabiliser_takes_the_trained_objectives_recommended_value():
    from spin_ray.objectives.algorithms import ALGORITHMS

    spin = load_config()
    assert (spin.training.nll_weight, spin.training.length_normalize, spin.training.dpop_lambda) == (0.2, True, 0.0)
    assert spin.training.nll_weight == ALGORITHMS["spin"].recommended["training.nll_weight"]
    # a default, not a setting: a resumed run adopts its stored value (manifest.resume_config)
    assert not {"training.nll_weight", "training.length_normalize"} & explicit_keys(spin)
    tspin = load_config(overrides=["algorithm=tspin"])
    assert (tspin.training.nll_weight, tspin.tspin.reward_scale, tspin.tspin.length_normalize,
            tspin.tspin.reference_free) == (0.2, 0.1, True, False)
    assert tspin.needs_reference and not load_config(overrides=["algorithm=tspin", "tspin.reference_free=true"]) \
        .needs_reference
    paper = load_config(overrides=["training.nll_weight=0", "training.length_normalize=false"])
    assert (paper.training.nll_weight, paper.training.length_normalize) == (0.0, False)
    # continued SFT and SPPO take none: their losses have no stabilisers, so they are off, not refused
    for overrides in (["training.objective=sft"], ["algorithm=sppo", "generation.num_samples=2",
                                                   "generation.temperature=0.7"]):
        trained = load_config(overrides=overrides).training
        assert (trained.nll_weight, trained.length_normalize) == (0.0, False)
    # a resolved value is not an explicit setting (a resumed run adopts its stored one), and survives a round trip
    assert "nll_weight" not in spin.training.model_fields_set
    assert load_config(overrides=[f"training.nll_weight={spin.to_dict()['training']['nll_weight']}"]) \
        .training.nll_weight == 0.2
    assert "(spin 0.2, tspin 0.2)" in type(spin.training).model_fields["nll_weight"].description


def test_a_stabiliser_is_refused_where_the_algorithm_table_says_it_does_not_apply():
    from spin_ray.objectives.algorithms import ALGORITHMS

    assert load_config(
        overrides=["training.nll_weight=0.5", "training.dpop_lambda=1", "training.length_normalize=true"]
    )
    assert load_config(overrides=["algorithm=tspin", "training.nll_weight=0.5"]).training.nll_weight == 0.5
    assert ALGORITHMS["tspin"].options == ("nll_weight",) and not ALGORITHMS["sppo"].options
    with pytest.raises(
        ConfigError, match=r"training.dpop_lambda does not apply to algorithm tspin \(it applies to: spin\)"
    ):
        load_config(overrides=["algorithm=tspin", "training.dpop_lambda=1"])
    with pytest.raises(ConfigError, match="training.nll_weight does not apply to training.objective sft"):
        load_config(overrides=["training.objective=sft", "training.nll_weight=0.5"])


def test_the_quality_jobs_recommended_arms_get_the_recommended_loss_and_its_paper_arm_the_papers():
    import importlib.util

    from spin_ray.objectives.algorithms import ALGORITHMS, RECOMMENDABLE

    spec = importlib.util.spec_from_file_location("quality", ROOT / "bench" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    job = ROOT / "jobs" / "gsm8k_smollm2_quality.yaml"

    def loss(config) -> dict:
        return {key: config.to_dict()[key.split(".")[0]][key.split(".")[1]] for key in RECOMMENDABLE}

    # a key the job pinned would override the recommended value in the "recommended" arms (alpha 1.0 once did)
    for arm, algorithm in (("spin_recommended", "spin"), ("tspin_recommended", "tspin")):
        config = load_config(job, quality.ARMS[arm])
        assert loss(config) == {key: ALGORITHMS[algorithm].setting(key) for key in RECOMMENDABLE}, arm
    paper = load_config(job, quality.ARMS["spin_paper"])
    assert {k: v for k, v in loss(paper).items() if k.startswith("training.")} == \
        {k: v for k, v in RECOMMENDABLE.items() if k.startswith("training.")}
