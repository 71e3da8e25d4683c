"""Configs: YAML -> typed dataclasses, errors naming file and key, key=value overrides, dump/load round trip."""

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from latentdiff.config import (
    Config,
    ConfigError,
    ConfigTypeError,
    DataSection,
    TrainSection,
    apply_override,
    dump_config,
    from_dict,
    load_config,
    update,
    validate_fields,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path, text, name="x.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["digits_ddpm.yaml", "tiny_test.yaml"])
def test_shipped_configs_load_and_build_their_parts(name):
    from latentdiff.data import make_dataset
    from latentdiff.nn.unet import PRESETS, UNetConfig

    cfg = load_config(CONFIGS / name)
    assert isinstance(cfg, Config) and cfg.model["preset"] in PRESETS
    assert cfg.train.cond_drop_prob == pytest.approx(0.1) and cfg.data.name == "digits"
    # The open model section validates against the network's own config dataclass, errors naming the file.
    fields = validate_fields(UNetConfig, cfg.model, str(CONFIGS / name), "model.", ignore=("preset",))
    unet = dataclasses.replace(PRESETS[cfg.model["preset"]], **{k: v for k, v in fields.items() if k != "preset"})
    ds = make_dataset(cfg.data)
    assert unet.in_channels == ds.channels and unet.num_classes == ds.num_classes
    assert ds[0]["image"].shape[-1] == cfg.data.size and ds[0]["image"].shape[-1] % unet.downsampling_factor == 0


def test_digits_config_values():
    cfg = load_config(CONFIGS / "digits_ddpm.yaml")
    assert cfg.data.size == 8 and cfg.model["num_classes"] == 10
    assert cfg.sample.sampler != "ddpm" and cfg.sample.steps <= 50 and cfg.sample.guidance > 1
    assert isinstance(cfg.train.lr, float) and cfg.train.betas == (0.9, 0.999)


def test_unknown_key_suggests_the_near_one(tmp_path):
    path = write(tmp_path, "train:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: unknown key 'train.lrr' (did you mean 'train.lr'?)"
    path = write(tmp_path, "trian:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trian' \(did you mean 'train'\?\)"):
        load_config(path)
    path = write(tmp_path, "sample:\n  zzz: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'sample.zzz' \(known: sampler, steps"):
        load_config(path)


def test_wrong_types_name_file_and_key(tmp_path):
    cases = {
        "train:\n  steps: ten\n": "train.steps must be an int, got 'ten'",
        "train:\n  steps: 1.5\n": "train.steps must be an int, got 1.5",
        "train:\n  ema_warmup: 1\n": "train.ema_warmup must be a bool (true/false), got 1",
        "train:\n  lr: fast\n": "train.lr must be a number, got 'fast'",
        "train:\n  betas: [0.9]\n": "train.betas must be a list of 2 values, got [0.9]",
        "train:\n  betas: [0.9, x]\n": "train.betas[1] must be a number, got 'x'",
        "data:\n  crop: centre\n": "data.crop must be one of 'center', 'random', got 'centre' (did you mean 'center'?)",
        "data:\n  root: [a]\n": "data.root must be a string or null, got ['a']",
        "sample:\n  labels: [1, two]\n": "sample.labels[1] must be an int, got 'two'",
        "train: 5\n": "train must be a mapping, got 5",
        "model: [1, 2]\n": "model must be a mapping, got [1, 2]",
    }
    for text, message in cases.items():
        path = write(tmp_path, text)
        with pytest.raises(ConfigTypeError) as e:
            load_config(path)
        assert str(e.value) == f"{path}: {message}"


def test_ranges_yaml_quirks_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"x.yaml: train.steps must be >= 1, got 0"):
        load_config(write(tmp_path, "train:\n  steps: 0\n"))
    with pytest.raises(ConfigError, match=r"train.cond_drop_prob must be <= 1.0, got 1.5"):
        load_config(write(tmp_path, "train:\n  cond_drop_prob: 1.5\n"))
    with pytest.raises(ConfigError, match=r"train.lr must be > 0.0"):
        load_config(write(tmp_path, "train:\n  lr: 0\n"))
    cfg = load_config(write(tmp_path, "train:\n  lr: 1e-3\n  steps: 1.0e+4\n"))  # PyYAML: 1e-3 is a string
    assert cfg.train.lr == 0.001 and cfg.train.steps == 10000 and type(cfg.train.steps) is int
    with pytest.raises(ConfigError, match=r"duplicate key 'lr'"):
        load_config(write(tmp_path, "train:\n  lr: 0.1\n  lr: 0.2\n"))
    with pytest.raises(ConfigError, match=r"x.yaml: invalid YAML"):
        load_config(write(tmp_path, "train: [\n"))
    with pytest.raises(ConfigError, match=r"top level must be a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    assert load_config(write(tmp_path, "")) == Config()


def test_overrides(tmp_path):
    path = write(tmp_path, "model:\n  preset: digits\ntrain:\n  lr: 0.1\n")
    cfg = load_config(path, ["train.lr=1e-3", "model.channel_mult=[1,2,2]", "data.root=2024", "sample.labels=[3]",
                             "train.resume=null", "data.options.length=5", "diffusion.schedule_options={s: 0.01}"])
    assert cfg.train.lr == 0.001 and cfg.model == {"preset": "digits", "channel_mult": [1, 2, 2]}
    assert cfg.data.root == "2024" and cfg.sample.labels == [3] and cfg.train.resume is None
    assert cfg.data.options == {"length": 5} and cfg.diffusion.schedule_options == {"s": 0.01}
    assert load_config(path, ["train.lr=0.5", "train.lr=0.25"]).train.lr == 0.25  # in order
    assert load_config(path).train.lr == 0.1  # overrides did not touch the file's config
    base = Config()
    assert apply_override(base, "train.steps=7").train.steps == 7 and base.train.steps == 10_000  # a copy
    bad = {
        "train.lrr=1": "override 'train.lrr=1': unknown key 'train.lrr' (did you mean 'train.lr'?)",
        "train.steps=ten": "override 'train.steps=ten': train.steps must be an int, got 'ten'",
        "data.channels=2": "override 'data.channels=2': data.channels must be one of 1, 3, 4 or null, got 2",
        "train.steps=-1": "override 'train.steps=-1': train.steps must be >= 1, got -1",
        "train.lr.x=1": "override 'train.lr.x=1': train.lr is 0.1, not a section with key 'x'",
        "train.lr": "override 'train.lr': expected key=value, e.g. train.lr=1e-4",
        "train..lr=1": "override 'train..lr=1': malformed key 'train..lr'",
        "sample.labels=[1": "override 'sample.labels=[1': the value is not valid YAML",
    }
    for text, message in bad.items():
        with pytest.raises(ConfigError) as e:
            load_config(path, [text])
        assert str(e.value).startswith(message), (str(e.value), message)


def test_dump_load_round_trip(tmp_path):
    cfg = load_config(CONFIGS / "digits_ddpm.yaml", ["train.betas=[0.8, 0.95]", "sample.prompt=a seven"])
    out = tmp_path / "run" / "config.yaml"
    dump_config(cfg, out)
    again = load_config(out)
    assert again == cfg and again.train.betas == (0.8, 0.95)
    dump_config(dataclasses.replace(cfg, model={"preset": "tiny"}), out)  # overwrite in place
    assert load_config(out).model == {"preset": "tiny"}
    assert os.listdir(out.parent) == ["config.yaml"]  # no temporary file left behind


@dataclass
class Inner:
    k: int                                   # required
    name: str | None = None


@dataclass
class Outer:
    inner: Inner
    mode: Literal["a", "b"] = "a"
    sizes: tuple[int, ...] = (1,)
    weights: list[float] = field(default_factory=list)
    table: dict[str, int] = field(default_factory=dict)
    either: int | str = 0


def test_from_dict_on_any_dataclass():
    obj = from_dict(Outer, {"inner": {"k": 3}, "mode": "b", "sizes": [1, 2], "weights": [1, 2.5],
                            "table": {"x": 1}, "either": "s"}, where="w")
    assert obj == Outer(Inner(3), "b", (1, 2), [1.0, 2.5], {"x": 1}, "s")
    assert isinstance(obj.weights[0], float)
    with pytest.raises(ConfigError, match=r"^w: missing required key 'inner.k'$"):
        from_dict(Outer, {"inner": {}}, where="w")
    with pytest.raises(ConfigError, match=r"^w: missing required key 'inner'$"):
        from_dict(Outer, {}, where="w")
    with pytest.raises(ConfigTypeError, match=r"^w: table.x must be an int, got 'y'$"):
        from_dict(Outer, {"inner": {"k": 1}, "table": {"x": "y"}}, where="w")
    with pytest.raises(ConfigTypeError, match=r"^w: either must be an int or a string, got 1.5$"):
        from_dict(Outer, {"inner": {"k": 1}, "either": 1.5}, where="w")
    with pytest.raises(ConfigTypeError, match=r"inner.k must be an int, got True"):
        from_dict(Outer, {"inner": {"k": True}}, where="w")


def test_update_and_validate_partial_sections():
    base = TrainSection()
    new = update(base, {"lr": "3e-4", "betas": [0.5, 0.6]}, where="f.yaml", prefix="train.")
    assert new.lr == 3e-4 and new.betas == (0.5, 0.6) and base.lr == 2e-4
    with pytest.raises(ConfigError, match=r"^f.yaml: unknown key 'train.lrr' \(did you mean 'train.lr'\?\)$"):
        update(base, {"lrr": 1}, where="f.yaml", prefix="train.")
    assert validate_fields(DataSection, {"size": 8, "preset": object}, ignore=("preset",))["size"] == 8


def test_class_checks_in_post_init_name_the_file(tmp_path):
    @dataclass
    class Checked:
        n: int = 1

        def __post_init__(self):
            if self.n % 2:
                raise ValueError("n must be even")

    with pytest.raises(ConfigError, match=r"^c.yaml: sec: n must be even$"):
        from_dict(Checked, {"n": 3}, where="c.yaml", prefix="sec.")


def test_train_section_is_a_superset_of_the_loop_config():
    import latentdiff.train.config as train_config  # the project's own module: an ImportError fails the test
    loop_fields = {f.name for f in dataclasses.fields(train_config.TrainConfig)}
    section = TrainSection()
    missing = loop_fields - {f.name for f in dataclasses.fields(TrainSection)}
    assert not missing, f"TrainSection lacks {sorted(missing)}"
    train_config.TrainConfig(**{name: getattr(section, name) for name in loop_fields})  # the defaults are valid there


def test_one_train_config_with_one_set_of_defaults():
    from latentdiff import config as config_mod
    from latentdiff.train import TrainConfig

    assert TrainConfig is config_mod.TrainConfig is TrainSection
    assert load_config(CONFIGS / "digits_ddpm.yaml").train.__class__ is TrainConfig  # what the loop gets
    defaults = TrainConfig()
    assert (defaults.steps, defaults.batch_size, defaults.lr) == (10_000, 64, 2e-4)
    assert config_mod.Config().train == defaults and config_mod.AutoencoderRunConfig().train.ema_decay == 0.0
    # Built in Python, the class checks what a file would: types and ranges, errors naming the field.
    with pytest.raises(ConfigError, match=r"^TrainConfig: lr must be > 0.0, got 0.0$"):
        TrainConfig(lr=0)
    with pytest.raises(ConfigError, match=r"^TrainConfig: betas\[1\] must be < 1.0, got 1.0$"):
        TrainConfig(betas=(0.9, 1.0))
    with pytest.raises(ConfigTypeError, match=r"^TrainConfig: lr_schedule must be one of .*\(did you mean 'cosine'"):
        TrainConfig(lr_schedule="cosin")
    assert TrainConfig(betas=[0.5, 0.6], steps=1.0).betas == (0.5, 0.6)  # lists as YAML gives them; 1.0 as 1


def test_unknown_keys_get_the_same_message_from_every_config_class():
    import importlib

    from latentdiff.eval.oracle import OracleConfig
    from latentdiff.eval.shapes_oracle import ShapesOracleConfig
    from latentdiff.nn.autoencoder import AutoencoderConfig
    from latentdiff.nn.unet import UNetConfig, unet_from_preset
    from latentdiff.train import TrainConfig
    from latentdiff.train.autoencoder_objective import AutoencoderLossConfig

    for cls, typo, near in ((TrainConfig, "stepz", "steps"), (UNetConfig, "num_head", "num_heads"),
                            (AutoencoderConfig, "embed_dims", "embed_dim"),
                            (AutoencoderLossConfig, "kl_weigth", "kl_weight"),
                            (OracleConfig, "feature_dims", "feature_dim"), (ShapesOracleConfig, "widht", "widths")):
        with pytest.raises(ConfigError) as e:
            cls.from_dict({typo: 1})
        assert str(e.value) == f"{cls.__name__}: unknown key '{typo}' (did you mean '{near}'?)"
        with pytest.raises(ConfigError, match=rf"^f.json: unknown key 'config.{typo}' \(did you mean 'config.{near}'"):
            cls.from_dict({typo: 1}, where="f.json", prefix="config.")
    with pytest.raises(ConfigError, match=r"^UNet preset 'tiny': unknown key 'num_head' \(did you mean 'num_heads'"):
        unet_from_preset("tiny", num_head=2)
    with pytest.raises(ValueError, match="unknown UNet preset 'nope'"):
        unet_from_preset("nope")
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("latentdiff.strict")  # the second builder is gone


def test_model_section_unknown_key_names_the_dotted_key(tmp_path):
    from latentdiff.diffusion import GaussianDiffusion
    from latentdiff.pipeline import unet_config
    from latentdiff.schedules import make_betas

    diffusion = GaussianDiffusion(make_betas("linear", 10))
    cfg = Config(model={"preset": "tiny", "num_head": 2})
    with pytest.raises(ConfigError, match=r"^config: unknown key 'model.num_head' \(did you mean 'model.num_heads'"):
        unet_config(cfg, diffusion, 3)
    with pytest.raises(ConfigError, match=r"^model.preset: unknown U-Net preset 'tinyy'"):
        unet_config(Config(model={"preset": "tinyy"}), diffusion, 3)
    unet = unet_config(Config(model={"preset": "tiny", "channel_mult": [1, 2]}), diffusion, 3)
    assert unet.channel_mult == (1, 2) and unet.in_channels == 3
