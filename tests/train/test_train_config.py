"""Training configs: every shipped recipe loads; dotted overrides; bad values are one clear error."""

import re
from pathlib import Path

import pytest

from qwenvl_jax.config import ConfigError
from qwenvl_jax.train.config import STAGES, load_train_config

ROOT = Path(__file__).resolve().parents[2]
# Every training recipe: configs/train/ and the demo model's stages (configs/demo*.yaml).
CONFIGS = sorted((ROOT / "configs/train").glob("*.yaml")) + sorted(ROOT.glob("configs/demo*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_recipes_load(path):
    cfg = load_train_config(path)
    assert cfg.train.stage in STAGES


def test_overrides():
    cfg = load_train_config(CONFIGS[0], ["output_dir=/tmp/x", "train.steps=7", "checkpoint.every=3",
                                         "mesh=data=1,fsdp=2,tensor=4", "optim.learning_rate=1e-3",
                                         "data.seq_len=1024", "train.stage=vision"])
    assert (cfg.output_dir, cfg.train.steps, cfg.checkpoint.every) == ("/tmp/x", 7, 3)
    assert cfg.mesh == "data=1,fsdp=2,tensor=4"
    assert cfg.optim.learning_rate == 1e-3 and cfg.data.config.seq_len == 1024
    assert cfg.trainable == ("vision", "merger")


@pytest.mark.parametrize("override,needle", [
    ("train.stpes=3", "unknown key(s) ['stpes']"),
    ("train.steps=many", "train.steps: expected int"),
    ("train.steps=0", "train.steps must be >= 1"),
    ("train.stage=pretrain", "train.stage must be one of"),
    ("optim.learning_rate=-1", "optim.learning_rate must be > 0"),
    ("optim.vision_lr_scale=0", "optim.vision_lr_scale must be > 0"),
    ("optim.patch_embed_lr_scale=-0.1", "optim.patch_embed_lr_scale must be > 0"),
    ("optim.merger_lr_scale=0", "optim.merger_lr_scale must be > 0"),
    ("data.packer=magic", "data.packer must be one of"),
    ("nonsense", "expected KEY=VALUE"),
])
def test_bad_values(override, needle):
    with pytest.raises(ConfigError) as e:
        load_train_config(CONFIGS[0], [override])
    assert needle in str(e.value)


def _float_keys(cls, prefix=""):
    """Dotted keys of every float field in the config tree (optional floats included)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            yield from _float_keys(typ, f"{prefix}{f.name}.")
        elif typ is float or float in typing.get_args(typ):
            yield f"{prefix}{f.name}"


def test_every_float_key_refuses_non_finite_values():
    from qwenvl_jax.train.config import TrainConfig

    keys = list(_float_keys(TrainConfig))
    assert {"optim.learning_rate", "optim.vision_lr_scale"} <= set(keys) and len(keys) > 8
    for key in keys:
        for raw in ("nan", ".nan", ".inf", "-.inf", "1e999"):
            with pytest.raises(ConfigError, match=rf"{re.escape(key)}: must be a finite number"):
                load_train_config(CONFIGS[0], [f"{key}={raw}"])


def test_seed_out_of_range():
    for seed in ("-1", str(2**32), str(2**70)):
        with pytest.raises(ConfigError, match=r"train.seed must be in \[0, 2\*\*32\)"):
            load_train_config(CONFIGS[0], [f"train.seed={seed}"])
