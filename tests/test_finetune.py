"""Training that keeps what pretraining taught: the frozen reference, best-on-validation selection,
parameter groups, LP-FT, frozen BatchNorm, WiSE-FT and whitening, on generated images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from jdfashion.checkpoint import load_trained
from jdfashion.config import TrainConfig
from jdfashion.model.backbones import create_backbone
from jdfashion.model.mgpa import MGPAConfig, create_model
from jdfashion.model.whitening import learn_part_whitening
from jdfashion.paths import MODEL_CONFIG, MODEL_CURVES, MODEL_METRICS
from jdfashion.train import build_optimizer, interpolate, train

TINY = {"image_size": 64, "identities_per_batch": 2, "num_workers": 0, "warmup_epochs": 0}
LITE0 = {"backbone": "efficientnet_lite0", "pretrained": "package", "category": "clothes", **TINY}


def epochs_of(metrics: list[dict]) -> list[int]:
    return [row["epoch"] for row in metrics if "stage" not in row]


def test_epochs_zero_writes_the_untouched_pretrained_backbone_with_an_identity_head(
    demo_data: Path, tmp_path: Path
) -> None:
    result = train(
        TrainConfig(epochs=0, branches="horizontal", **LITE0), demo_data, tmp_path, show_progress=False
    )
    loaded = load_trained(result.directory)
    assert loaded.model_config.head == "identity" and loaded.model_config.num_classes == 0
    assert loaded.model_config.normalization == ((0.5,) * 3, (0.5,) * 3)
    pretrained, channels = create_backbone("efficientnet_lite0", pretrained="package")
    for name, tensor in pretrained.state_dict().items():
        assert torch.equal(loaded.model.backbone.state_dict()[name], tensor), name
    features = loaded.model(torch.rand(2, 3, 64, 64))
    assert features.shape == (2, 6 * channels)  # global + horizontal-2 + horizontal-3, C each
    assert torch.allclose(features.norm(dim=1), torch.ones(2), atol=1e-5)
    (row,) = [r for r in result.metrics if "stage" not in r]  # validation of the frozen model
    assert row["epoch"] == 0 and 0 < row["val_map"] <= 1


def test_router_cannot_be_frozen(demo_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="router needs at least 1 epoch"):
        train(TrainConfig(epochs=0, task="category", **TINY), demo_data, tmp_path, show_progress=False)


def test_a_destructive_run_ships_its_epoch_zero_weights(demo_data: Path, tmp_path: Path) -> None:
    """An absurd learning rate wrecks the backbone; validation keeps the starting point instead."""
    config = TrainConfig(epochs=2, lr=3.0, optimizer="sgd", **LITE0)
    torch.manual_seed(config.seed)
    result = train(config, demo_data, tmp_path, show_progress=False)
    metrics = json.loads((result.directory / MODEL_METRICS).read_text())
    assert epochs_of(metrics) == [0, 1, 2]
    scores = {row["epoch"]: row["val_map"] for row in metrics if "stage" not in row}
    selected = next(row for row in metrics if row.get("stage") == "selected")
    assert selected["val_map"] == max(scores.values())
    assert selected["val_map"] >= scores[0]
    if selected["epoch"] == 0:  # the usual outcome: the saved backbone is the pretrained one
        pretrained, _ = create_backbone("efficientnet_lite0", pretrained="package")
        saved = load_trained(result.directory).model.backbone.state_dict()
        assert all(torch.equal(saved[k], v) for k, v in pretrained.state_dict().items())
    with Image.open(result.directory / MODEL_CURVES) as curves:
        assert curves.size == (640, 360)


def test_parameter_groups_scale_the_backbone_and_spare_norms_and_biases() -> None:
    model = create_model(MGPAConfig(backbone="resnet18", num_classes=5))
    config = TrainConfig(
        backbone="resnet18", lr=1e-3, backbone_lr_mult=0.1, weight_decay=0.01, optimizer="adamw"
    )
    optimizer = build_optimizer(model, config)
    assert isinstance(optimizer, torch.optim.AdamW)
    seen = 0
    for group in optimizer.param_groups:
        seen += len(group["params"])
        assert group["lr_scale"] == (0.1 if group["backbone"] else 1.0)
        assert all((p.ndim > 1) == (group["weight_decay"] > 0) for p in group["params"])
    assert seen == len(list(model.parameters()))


def test_head_warmup_leaves_the_backbone_untouched_batchnorm_included(
    demo_data: Path, tmp_path: Path
) -> None:
    config = TrainConfig(epochs=1, head_warmup_epochs=1, validate=False, **LITE0)
    result = train(config, demo_data, tmp_path, show_progress=False)
    pretrained, _ = create_backbone("efficientnet_lite0", pretrained="package")
    tuned = result.model.backbone.state_dict()
    assert all(torch.equal(tuned[k], v) for k, v in pretrained.state_dict().items())
    assert not torch.equal(
        result.model.head.reduction_weight, create_model(result.model.config).head.reduction_weight
    )


def test_frozen_batchnorm_keeps_running_statistics(demo_data: Path, tmp_path: Path) -> None:
    config = TrainConfig(epochs=1, freeze_bn=True, validate=False, **LITE0)
    result = train(config, demo_data, tmp_path, show_progress=False)
    pretrained, _ = create_backbone("efficientnet_lite0", pretrained="package")
    tuned = result.model.backbone.state_dict()
    stats = [k for k in tuned if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(tuned[k], pretrained.state_dict()[k]) for k in stats)
    conv = next(k for k in tuned if k.endswith("conv_stem.weight"))
    assert not torch.equal(tuned[conv], pretrained.state_dict()[conv])  # the weights did train


def test_wise_ft_picks_a_mix_on_validation_and_ships_it(demo_data: Path, tmp_path: Path) -> None:
    config = TrainConfig(epochs=1, lr=1e-3, wise_alphas=(0.0, 0.5), **LITE0)
    result = train(config, demo_data, tmp_path, show_progress=False)
    tried = {row["alpha"]: row["val_map"] for row in result.metrics if row.get("stage") == "wise"}
    assert set(tried) == {0.0, 0.5}
    chosen = next(row for row in result.metrics if row.get("stage") == "wise_selected")
    selected = next(row for row in result.metrics if row.get("stage") == "selected")
    assert chosen["val_map"] == max([*tried.values(), selected["val_map"]])
    if chosen["alpha"] == 0.0:
        pretrained, _ = create_backbone("efficientnet_lite0", pretrained="package")
        shipped = load_trained(result.directory).model.backbone.state_dict()
        assert all(torch.allclose(shipped[k].float(), v.float()) for k, v in pretrained.state_dict().items())


def test_interpolate_mixes_float_tensors_only() -> None:
    tuned = {"w": torch.full((2,), 4.0), "n": torch.tensor(7)}
    pretrained = {"w": torch.zeros(2), "n": torch.tensor(1)}
    mixed = interpolate(tuned, pretrained, 0.25)
    assert torch.equal(mixed["w"], torch.full((2,), 1.0)) and int(mixed["n"]) == 7


def test_supervised_whitening_is_saved_and_reloaded(demo_data: Path, tmp_path: Path) -> None:
    config = TrainConfig(epochs=0, branches="horizontal", whitening="supervised", whiten_dim=32, **LITE0)
    result = train(config, demo_data, tmp_path, show_progress=False)
    saved = json.loads((result.directory / MODEL_CONFIG).read_text())
    assert saved["model"]["whiten_dim"] == 32
    loaded = load_trained(result.directory)
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.model(images), result.model.eval()(images), atol=1e-5)
        assert loaded.model(images).shape == (3, 6 * 32)
    whitened = next(row for row in result.metrics if row.get("stage") == "whitening")
    assert whitened["kind"] == "supervised" and 0 < whitened["val_map"] <= 1


def test_supervised_whitening_equalises_within_identity_spread() -> None:
    """After whitening the within-identity covariance of the training data is (shrunk) identity-like:
    the direction that only varies inside identities no longer dominates."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(20).repeat_interleave(10)
    centres = torch.randn(20, 8, generator=generator)
    noise = torch.randn(200, 8, generator=generator) * 0.05
    noise[:, 0] *= 40  # a nuisance direction, large within every identity
    parts = (centres[labels] + noise)[:, None, :]
    mean, projection = learn_part_whitening(parts, labels, "supervised", dim=8, shrinkage=0.0)
    assert mean.shape == (1, 8) and projection.shape == (1, 8, 8)
    x = torch.nn.functional.normalize(parts[:, 0].double(), dim=-1) - mean[0].double()
    whitened = x @ projection[0].double()
    class_means = torch.stack([whitened[labels == c].mean(0) for c in range(20)])
    within = whitened - class_means[labels]
    covariance = within.T @ within / len(within)
    assert torch.allclose(covariance, torch.eye(8, dtype=covariance.dtype), atol=1e-3)
