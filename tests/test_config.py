"""Config: every shipped file loads; bad keys, types and values fail naming the key."""

from pathlib import Path

import pytest

from ospo import config
from ospo.config import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_file_loads(path):
    cfg = config.load(path)
    assert cfg.schema_version == config.SCHEMA_VERSION
    # Round trip through the resolved YAML a run writes.
    again = config.build(__import__("yaml").safe_load(config.dump(cfg)))
    assert again.to_dict() == cfg.to_dict()


def test_shipped_configs_exist():
    names = {p.name for p in CONFIG_DIR.glob("*.yaml")}
    assert {"tiny.yaml", "janus-pro-1b.yaml", "janus-pro-7b.yaml"} <= names


def test_real_configs_keep_paper_values():
    for name in ("janus-pro-1b.yaml", "janus-pro-7b.yaml"):
        cfg = config.load(CONFIG_DIR / name)
        assert cfg.perturb.num_variants == 3          # sec. 3.4
        assert cfg.images.guidance_scale == 5.0       # sec. 3.5
        assert cfg.images.skip_layers == 5            # sec. 3.5.2
        assert cfg.vqa.tau == 0.6                     # sec. 3.6
        assert (cfg.train.alpha, cfg.train.beta, cfg.train.sft_weight) == (1.0, 0.5, 2.0)  # sec. 3.7


def test_overrides_apply_and_coerce():
    cfg = config.build({}, ["perturb.num_variants=2", "train.learning_rate=1e-5", "perturb.densify=false"])
    assert cfg.perturb.num_variants == 2
    assert cfg.train.learning_rate == pytest.approx(1e-5)
    assert cfg.perturb.densify is False


@pytest.mark.parametrize("override, key", [
    (["perturb.num_variants=0"], "perturb.num_variants"),
    (["vqa.tau=1.5"], "vqa.tau"),
    (["vqa.tau=-2"], "vqa.tau"),
    (["images.skip_layers=-1"], "images.skip_layers"),
    (["perturb.nope=1"], "perturb.nope"),
    (["nosection.x=1"], "nosection"),
    (["perturb.num_variants=three"], "perturb.num_variants"),
    (["images.mask_source=png"], "images.mask_source"),
    (["prompts.sub_categories=[colour]"], "prompts.sub_categories"),
    (["images.guidance_scale=1.0"], "images.guidance_scale"),
    (["novalue"], "novalue"),
])
def test_bad_values_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        config.build({}, override)
    assert str(e.value).startswith(key)


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("vqa:\n  tau: 3\n")
    with pytest.raises(ConfigError, match="vqa.tau"):
        config.load(p)
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.yaml")


def test_input_paths_resolve_relative_to_the_config_file():
    cfg = config.load(CONFIG_DIR / "tiny.yaml")
    assert Path(cfg.prompts.input).is_absolute() and Path(cfg.prompts.input).exists()


def test_stage_view_hash_changes_only_with_the_stage():
    a = config.build({})
    b = config.build({}, ["vqa.tau=0.5"])
    assert config.config_hash(a.stage_view("perturb")) == config.config_hash(b.stage_view("perturb"))
    assert config.config_hash(a.stage_view("vqa")) != config.config_hash(b.stage_view("vqa"))
