"""Training configs: every shipped recipe loads; dotted overrides; bad values are one clear error."""

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
