"""Config schema: YAML + overrides fill typed dataclasses; every bad input names its key."""

from pathlib import Path

import pytest

from dfm.config import Config, ConfigError, config_from_dict, load_config, parse_override, save_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path, ["data.data_dir=/data/latents"])  # latent configs take the store from --data-dir
    assert isinstance(cfg, Config)


def test_overrides_and_types():
    cfg = load_config(CONFIGS / "dfm_digits.yaml", ["train.lr=3e-4", "sample.num_steps_per_scale=[20,5]", "seed=7"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.sample.num_steps_per_scale == [20, 5] and cfg.seed == 7
    assert cfg.stages == 2 and cfg.thresholds() == [0.1]
    assert parse_override("a.b.c=1") == {"a": {"b": {"c": 1}}}


def test_defaults_follow_the_model():
    sit = load_config(None, ["model=SiT-S/2"])
    assert sit.stages == 1 and sit.steps_per_stage() == [50] and sit.thresholds() == []
    dfm = load_config(None, ["model=DFM-SiT-S/2"])
    assert dfm.stages == 2 and dfm.steps_per_stage() == [40, 10] and dfm.thresholds() == [0.1]


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["train.bogus=1"], "unknown config key 'train.bogus'"),
        (["bogus=1"], "unknown config key 'bogus'"),
        (["train.lr=fast"], "config key 'train.lr': expected a number"),
        (["train.max_steps=1.5"], "config key 'train.max_steps': expected an integer"),
        (["train.compile=maybe"], "config key 'train.compile': expected true/false"),
        (["sample.num_steps_per_scale=4"], "config key 'sample.num_steps_per_scale': expected a list"),
        (["train=3"], "config key 'train' is a section"),
        (["model=DiT-Huge/3"], "config key 'model': unknown model"),
        (["data.resolution=17"], "resolution 17x17 is not divisible by 4"),
        (["model=DFM-SiT-S/2", "dfm.stages_count=3"], "patch size 2 cannot serve 3 stages"),
        (["model=DFM-SiT-S/1"], "patch size 1 cannot serve 2 stages"),
        (
            [
                "sample.stage_sampling_thresholds=[0.5, 0.6]",
                "model=DFM-SiT-S/4",
                "dfm.stages_count=3",
                "sample.num_steps_per_scale=[4,2,2]",
                "dfm.stage_weights=[0.8,0.1,0.1]",
            ],
            "strictly decreasing",
        ),
        (["sample.num_steps_per_scale=[40]"], "'sample.num_steps_per_scale' has 1 entries for 2 stages"),
        (["sample.stage_sampling_thresholds=[0.1, 0.05]"], "one entry per stage boundary"),
        (["dfm.stage_weights=[1.0]"], "'dfm.stage_weights' has 1 entries for 2 stages"),
        (["model=SiT-S/2", "dfm.stages_count=2"], "single-stage"),
        (["sample.mode=sde"], "SDE sampler is for single-stage"),
        (
            [
                "model=SiT-S/4",
                "dfm.stages_count=1",
                "dfm.stage_weights=null",
                "sample.num_steps_per_scale=[50]",
                "sample.stage_sampling_thresholds=[]",
                "sample.mode=sde",
                "sample.cfg_scale=4",
            ],
            "config key 'sample.cfg_scale': classifier-free guidance is not implemented",
        ),
        (["arch.pos_embed=learned"], "'arch.pos_embed' must be one of"),
        (["data.kind=latents"], "'data.data_dir' is required"),
        (["train.zero_stage=4"], "'train.zero_stage' must be one of"),
        (["arch.num_heads=5"], "divisible by the head count"),
    ],
)
def test_bad_configs_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "dfm_digits.yaml", overrides)
    assert needle in str(err.value)


def test_bad_yaml_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stepz: 10\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'train.max_stepz'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_saved_config_round_trips(tmp_path):
    import yaml

    cfg = load_config(CONFIGS / "dfm_digits.yaml", ["train.lr=2e-4"])
    save_config(cfg, tmp_path / "c.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "c.yaml").read_text()))
    assert again == cfg


def test_latent_shape_and_classes_come_from_the_store(tmp_path):
    """Resolution, channels and classes are read from the store's manifest when the config is loaded (before
    anything is built); a value the config gives must match, naming the key and the store."""
    import numpy as np

    from dfm.data import check_store_matches
    from dfm.data.store import write_store

    moments = np.concatenate([np.zeros((8, 4, 16, 16)), np.ones((8, 4, 16, 16))], axis=1).astype(np.float32)
    write_store(tmp_path / "store", moments, np.arange(8) % 6, num_classes=6)
    base = [f"data.data_dir={tmp_path / 'store'}", "data.kind=latents"]
    cfg = load_config(None, base)
    assert (cfg.data.resolution, cfg.data.channels, cfg.data.num_classes) == (16, 4, 6)
    check_store_matches(cfg.data)
    matching = load_config(None, base + ["data.resolution=16", "data.channels=4", "data.num_classes=10"])
    assert matching.data.num_classes == 10  # more classes than the store uses: allowed
    for override, needle in [
        ("data.resolution=32", r"'data.resolution' is 32 but the latent store .*store has 16 .*drop the key"),
        ("data.channels=3", r"'data.channels' is 3 but the latent store .*store has 4"),
        ("data.num_classes=5", r"'data.num_classes' is 5 but the latent store .*store has 6"),  # fewer: refused
    ]:
        with pytest.raises(ConfigError, match=needle):
            load_config(None, base + [override])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"config key 'data.data_dir': .*empty holds no manifest.json"):
        load_config(None, ["data.kind=latents", f"data.data_dir={tmp_path / 'empty'}"])
    with pytest.raises(ConfigError, match=r"'data.data_dir' is required for data.kind=latents: the latent store gives"):
        load_config(None, ["data.kind=latents"])
    digits = load_config(None, [])
    assert (digits.data.resolution, digits.data.channels, digits.data.num_classes) == (16, 1, 10)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["dfm.stage_weights=[.nan,1]"], "config key 'dfm.stage_weights[0]': expected a finite number"),
        (["train.lr=.inf"], "config key 'train.lr': expected a finite number"),
        (["train.lr=-1e-4"], "config key 'train.lr' must be >= 0"),
        (["arch.num_heads=0"], "config key 'arch.num_heads' must be a positive integer"),
        (["arch.hidden_size=0"], "config key 'arch.hidden_size' must be a positive integer"),
        (["arch.depth=0"], "config key 'arch.depth' must be a positive integer"),
        (["data.resolution=0"], "config key 'data.resolution': resolution 0x0"),
        (
            [
                "model=SiT-S/4",
                "dfm.stages_count=1",
                "sample.num_steps_per_scale=[50]",
                "dfm.stage_weights=[1]",
                "sample.stage_sampling_thresholds=[]",
                "sample.mode=sde",
                "sample.num_steps=0",
            ],
            "config key 'sample.num_steps' must be >= 1",
        ),
        (["seed=9223372036854775808"], "config key 'seed' must lie in [0, 2^63)"),
        (["seed=-1"], "config key 'seed' must lie in [0, 2^63)"),
        (["sample.per_class=0"], "config key 'sample.per_class' must be >= 1"),
        (["data.num_classes=3"], "config key 'data.num_classes' must be >= 10 for the digits"),
        (["train.zero_stage=true"], "config key 'train.zero_stage' must be one of [0, 1, 2, 3], got True"),
        (["data.kind=pixels"], "config key 'data.kind' must be one of ['digits', 'latents']"),
        (["train.precision=fp16"], "config key 'train.precision' must be one of ['auto', 'bf16', 'fp32']"),
        (["sample.method=rk4"], "config key 'sample.method' must be one of ['euler', 'heun']"),
        (["train.betas=[0.9, 1.5]"], "config key 'train.betas' needs two values in [0, 1)"),
    ],
)
def test_values_that_would_crash_or_train_nonsense_are_refused(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "dfm_digits.yaml", overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_empty_yaml_and_duplicate_keys_are_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    with pytest.raises(ConfigError, match=r"empty\.yaml must hold a non-empty mapping"):
        load_config(empty)
    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  lr: 1.0e-4\n  max_steps: 10\n  lr: 3.0e-4\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml: line 4: key 'lr' is given twice"):
        load_config(twice)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_config(broken)
