"""``excb export``: the teacher backbone as a plain state dict that loads into torchvision / build_backbone with
strict=True and gives the teacher's features; the generated features.py runs without excb."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from testkit.fake_run import make_run
from torch import nn

from excb.cli import main as cli_main
from excb.evaluation.evaluate import extract_features
from excb.evaluation.export import export_run
from excb.method.augment import MultiCropAugment
from excb.method.backbones import build_backbone

CONVNET = ["model.backbone=convnet", "model.convnet_widths=[8,16]", "model.convnet_pool=2", "data.channels=1",
           "augment.global_size=20"]
RESNET_GRAY = ["model.backbone=resnet18_small", "data.channels=1", "augment.global_size=16"]
RESNET_RGB = ["model.backbone=resnet18_small", "data.channels=3", "data.mean=[0.5,0.4,0.3]",
              "data.std=[0.2,0.25,0.3]", "augment.global_size=16"]


def _torchvision_resnet18_small(channels: int) -> nn.Module:
    """What the export's docs tell a user to build for resnet18_small."""
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def _target_model(cfg) -> nn.Module:
    if cfg.model.backbone == "resnet18_small":
        return _torchvision_resnet18_small(cfg.data.channels)
    return build_backbone(cfg.model.backbone, cfg.data.channels, convnet_widths=tuple(cfg.model.convnet_widths),
                          convnet_pool=cfg.model.convnet_pool, image_size=cfg.augment.global_size)


@pytest.mark.parametrize("overrides", [CONVNET, RESNET_GRAY, RESNET_RGB], ids=["convnet", "resnet-gray", "resnet-rgb"])
def test_export_loads_strictly_and_matches_teacher(tmp_path: Path, overrides: list[str]) -> None:
    run = str(tmp_path / "run")
    _, teacher, cfg = make_run(run, overrides)
    meta = export_run(run)
    out = tmp_path / "run" / "export"
    assert sorted(p.name for p in out.iterdir()) == ["backbone.pt", "export.json", "features.py"]
    on_disk = json.loads((out / "export.json").read_text())
    assert on_disk["backbone"] == cfg.model.backbone and on_disk["channels"] == cfg.data.channels
    assert on_disk["image_size"] == cfg.augment.global_size
    assert on_disk["mean"] == pytest.approx(cfg.data.mean) and on_disk["std"] == pytest.approx(cfg.data.std)
    assert on_disk["feature_dim"] == teacher.backbone.out_dim == meta["feature_dim"]
    assert on_disk["epoch"] == 1 and on_disk["step"] == 10

    weights = torch.load(out / "backbone.pt", weights_only=True)
    model = _target_model(cfg)
    model.load_state_dict(weights, strict=True)
    model.eval()
    if cfg.model.backbone == "resnet18_small":
        assert "conv1.weight" in weights and not any(k.startswith("net.") for k in weights)
    x = torch.randn(5, cfg.data.channels, cfg.augment.global_size, cfg.augment.global_size)
    with torch.no_grad():
        expected = teacher.backbone(x)
        got = model(x)
    assert got.shape == (5, meta["feature_dim"])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert expected.std() > 1e-3  # features are not trivially constant


@pytest.mark.slow
def test_features_py_is_standalone_and_matches_evaluation_features(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    _, teacher, cfg = make_run(run, RESNET_RGB)  # data 28×28 → resized to 16×16
    out = tmp_path / "exported"
    assert cli_main(["export", run, "--out", str(out)]) == 0
    source = (out / "features.py").read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "json", "os", "sys", "typing", "torch", "torchvision"}, imported

    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (7, 3, 28, 28), dtype=torch.uint8, generator=gen)
    torch.save(images, tmp_path / "images.pt")
    script = (
        "import sys\n"
        "sys.modules['excb'] = None  # any import of excb now fails\n"
        f"sys.path.insert(0, {str(out)!r})\n"
        "import torch\n"
        "from features import load_backbone, extract_features\n"
        f"model = load_backbone({str(out / 'backbone.pt')!r})\n"
        f"images = torch.load({str(tmp_path / 'images.pt')!r}, weights_only=True)\n"
        f"torch.save(extract_features(model, images, batch_size=3), {str(tmp_path / 'feats.pt')!r})\n"
        "assert not [m for m in sys.modules if m.startswith('excb.')]\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    feats = torch.load(tmp_path / "feats.pt", weights_only=True)
    expected, _ = extract_features(teacher, MultiCropAugment(cfg.augment, cfg.data.mean, cfg.data.std), images)
    assert feats.shape == expected.shape == (7, 512)
    torch.testing.assert_close(feats, expected, rtol=1e-4, atol=1e-4)  # channels_last vs not

    proc = subprocess.run([sys.executable, str(out / "features.py"), str(out)], cwd=tmp_path, capture_output=True,
                          text=True)
    assert proc.returncode == 0 and "features (1, 512)" in proc.stdout, proc.stderr


def test_export_uses_newest_good_checkpoint(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    _, first, _ = make_run(run, CONVNET, epoch=1, seed=1)
    make_run(run, CONVNET, epoch=2, seed=2)
    bad = tmp_path / "run" / "checkpoint_epoch0002" / "state.pt"
    data = bad.read_bytes()
    bad.write_bytes(data[:200] + bytes([data[200] ^ 0xFF]) + data[201:])
    meta = export_run(run, str(tmp_path / "out"))
    assert meta["epoch"] == 1 and meta["checkpoint"].endswith("checkpoint_epoch0001")
    weights = torch.load(tmp_path / "out" / "backbone.pt", weights_only=True)
    expected = {k.removeprefix("backbone."): v for k, v in first.state_dict().items() if k.startswith("backbone.")}
    assert weights.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(weights[k], v), k


def test_export_without_checkpoint_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["export", str(tmp_path / "empty")]) == 2
    assert "no usable checkpoint" in capsys.readouterr().err


def test_export_vit_loads_into_build_backbone_and_the_standalone_model(tmp_path: Path) -> None:
    from excb.evaluation import standalone_features

    run = str(tmp_path / "run")
    _, teacher, cfg = make_run(run, ["model.backbone=vit_s16", "data.channels=1", "augment.global_size=32",
                                     "model.head_norm=none"])
    meta = export_run(run)
    weights = torch.load(tmp_path / "run" / "export" / "backbone.pt", weights_only=True)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        expected = teacher.backbone(x)
        for model in (_target_model(cfg), standalone_features.build_model(meta)):
            model.load_state_dict(weights, strict=True)
            torch.testing.assert_close(model.eval()(x), expected, rtol=1e-5, atol=1e-5)
    assert meta["feature_dim"] == 384 and meta["torchvision"] is None


TORCHVISION_MODELS = [
    ["model.backbone=torchvision:shufflenet_v2_x0_5", "data.channels=1", "augment.global_size=32"],
    ["model.backbone=torchvision:mobilenet_v3_small", "data.channels=3", "data.mean=[0.5,0.4,0.3]",
     "data.std=[0.2,0.25,0.3]", "augment.global_size=32"],
]


@pytest.mark.parametrize("overrides", TORCHVISION_MODELS, ids=["shufflenet_v2_x0_5-gray", "mobilenet_v3_small-rgb"])
def test_torchvision_backbones_export_and_load_strictly(tmp_path: Path, overrides: list[str]) -> None:
    """A ``torchvision:<model>`` backbone exports under torchvision's own key names: the weights load with
    strict=True into ``torchvision.models.get_model(<model>)`` whose last Linear is Identity (as export.json says),
    and through the exported features.py; both give the teacher backbone's features."""
    run = str(tmp_path / "run")
    _, teacher, cfg = make_run(run, overrides)
    meta = export_run(run)
    out = tmp_path / "run" / "export"
    name = cfg.model.backbone.split(":", 1)[1]
    assert meta["torchvision"]["constructor"] == f"torchvision.models.get_model({name!r})"
    weights = torch.load(out / "backbone.pt", weights_only=True)
    model = torchvision.models.get_model(name, weights=None)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    model.get_submodule(linears[-1].rpartition(".")[0]).__setattr__(linears[-1].rpartition(".")[2], nn.Identity())
    model.load_state_dict(weights, strict=True)
    model.eval()
    sys.path.insert(0, str(out))
    try:
        import features  # the exported features.py
        standalone = features.load_backbone(str(out))
    finally:
        sys.path.remove(str(out))
        sys.modules.pop("features", None)
    size, c = cfg.augment.global_size, cfg.data.channels
    x = torch.randn(3, c, size, size)
    with torch.no_grad():
        expected = teacher.backbone(x)
        got = model(x.expand(-1, 3, -1, -1))
        via_features = standalone(x.expand(-1, 3, -1, -1))
    assert got.shape == (3, meta["feature_dim"]) == (3, teacher.backbone.out_dim)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(via_features, expected, rtol=1e-5, atol=1e-5)
    assert expected.std() > 1e-3
