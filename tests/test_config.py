"""Config loading, overrides and validation (excb.config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from excb.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_configs_load() -> None:
    for path in (ROOT / "experiments").glob("*.yaml"):
        load_config(path)


def test_overrides_are_typed() -> None:
    cfg = load_config(None, ["train.epochs=3", "optim.lr=0.1", "model.convnet_widths=[8, 16]",
                             "model.use_predictor=false"])
    assert cfg.train.epochs == 3 and cfg.optim.lr == 0.1
    assert cfg.model.convnet_widths == [8, 16] and cfg.model.use_predictor is False


@pytest.mark.parametrize("override,key", [
    ("train.epoch=3", "train.epoch"),
    ("trainer.epochs=3", "trainer"),
    ("method.balance_momentum=1.5", "method.balance_momentum"),
    ("method.teacher_temp=0", "method.teacher_temp"),
    ("model.backbone=vgg", "model.backbone"),
    ("train.epochs=two", "train.epochs"),
    ("train.batch_size=255", "train.batch_size"),
    ("optim.optimizer=lamb", "optim.optimizer"),
    ("augment.blur_p=[0.5]", "augment.blur_p"),
])
def test_bad_keys_and_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override, "train.num_workers=2"] if "batch_size" in key else [override])


def test_unknown_key_in_file(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 2\n  warmup: 1\n")
    with pytest.raises(ConfigError, match=r"train\.warmup"):
        load_config(p)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.yaml")
