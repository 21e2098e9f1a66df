"""Config loading, overrides and validation (excb.config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from excb.config import ConfigError, dump_yaml, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_configs_load() -> None:
    from excb.run.sweep import load_sweep

    paths = sorted((ROOT / "experiments").glob("*.yaml"))
    assert paths
    for path in paths:  # sweep files name a base config and a space; the rest are run configs
        load_sweep(path) if path.name.startswith("sweep_") else load_config(path)


def test_mid_epoch_checkpoint_intervals_are_optional() -> None:
    assert load_config(None).train.checkpoint_every_steps is None
    cfg = load_config(None, ["train.checkpoint_every_steps=500", "train.checkpoint_every_minutes=30"])
    assert cfg.train.checkpoint_every_steps == 500 and cfg.train.checkpoint_every_minutes == 30.0
    with pytest.raises(ConfigError, match="log_every_steps"):
        load_config(None, ["train.checkpoint_every_minutes=30", "train.log_every_steps=0"])


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
    ("data.train_decode=stretch", "data.train_decode"),
    ("model.projector_batching=per_crop", "model.projector_batching"),
    ("augment.blur_kernel_size=8", "augment.blur_kernel_size"),
    ("train.checkpoint_every_steps=0", "train.checkpoint_every_steps"),
    ("train.checkpoint_every_steps=-5", "train.checkpoint_every_steps"),
    ("train.checkpoint_every_minutes=0", "train.checkpoint_every_minutes"),
    ("train.checkpoint_every_minutes=-1.5", "train.checkpoint_every_minutes"),
    ("method.kmeans_samples=1000", "method.kmeans_samples"),  # fewer than the 1024 prototypes
])
def test_bad_keys_and_values_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override, "train.num_workers=2"] if "batch_size" in key else [override])


def test_released_blur_with_own_probabilities_is_refused_naming_both_keys(tmp_path: Path) -> None:
    """blur_mode=authors reproduces what the released code does to ITS list [1.0, 0.1]; with another list the
    combination was never run by the authors, so it is refused at load."""
    p = tmp_path / "c.yaml"
    p.write_text("augment:\n  blur_mode: authors\n  blur_p: [0.5, 0.1]\n")
    with pytest.raises(ConfigError, match=r"augment\.blur_p.*augment\.blur_mode=authors"):
        load_config(p)
    assert load_config(None, ["augment.blur_mode=authors"]).augment.blur_p == [1.0, 0.1]
    assert load_config(None, ["augment.blur_p=[0.5, 0.1]"]).augment.blur_mode == "nominal"


def test_unknown_key_in_file(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 2\n  warmup: 1\n")
    with pytest.raises(ConfigError, match=r"train\.warmup"):
        load_config(p)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.yaml")


def test_worker_counts_resources_and_elastic_range() -> None:
    fixed = load_config(None, ["train.num_workers=2"]).train
    assert (fixed.min_workers, fixed.max_workers, fixed.elastic) == (2, 2, False)
    elastic = load_config(None, ["train.num_workers=[1, 4]", "train.max_failures=-1", "train.batch_size=256",
                                 "train.worker_resources={slot: 1}"]).train
    assert (elastic.min_workers, elastic.max_workers, elastic.elastic, elastic.per_worker_batch) == (1, 4, True, 64)
    assert elastic.worker_resources == {"slot": 1.0}
    for bad, key in ((["train.num_workers=[1, 2, 3]"], "train.num_workers"),
                     (["train.num_workers=[3, 2]", "train.max_failures=1"], "train.num_workers"),
                     (["train.num_workers=[1, 2]"], "train.max_failures"),  # elastic needs failures allowed
                     (["train.worker_resources=4"], "train.worker_resources"),
                     (["train.precision=fp16"], "train.precision"),
                     (["storage.access_key_id=only-half"], "storage.access_key_id")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, bad)


def test_saved_config_redacts_credentials() -> None:
    cfg = load_config(None, ["storage.access_key_id=AKIDSECRET", "storage.secret_access_key=VERYSECRET"])
    text = dump_yaml(cfg)
    assert "AKIDSECRET" not in text and "VERYSECRET" not in text and "***" in text
    assert cfg.to_dict()["storage"]["secret_access_key"] == "VERYSECRET"  # workers still get the real value
