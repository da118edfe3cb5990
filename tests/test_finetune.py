"""Training that keeps what pretraining taught: the frozen reference, best-on-validation selection,
parameter groups, LP-FT, frozen BatchNorm, WiSE-FT and whitening, on generated images."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from jdfashion.callbacks import LoopState
from jdfashion.checkpoint import load_trained
from jdfashion.config import TrainConfig
from jdfashion.finishing import interpolate, whiten_if_better
from jdfashion.model.backbones import create_backbone
from jdfashion.model.mgpa import MGPAConfig, create_model
from jdfashion.model.whitening import learn_part_whitening
from jdfashion.paths import MODEL_CONFIG, MODEL_CURVES, MODEL_METRICS, DataLayout
from jdfashion.train import (
    build_optimizer,
    load_training_data,
    load_validation,
    model_config_for,
    train,
)

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


def test_a_run_below_its_starting_point_ships_the_frozen_reference(roomy_demo: Path, tmp_path: Path) -> None:
    """A 2-d part projection and an absurd learning rate keep every trained candidate (epoch 0's random
    head included) far below the untouched network: validation ships the ``epochs=0`` model itself."""
    config = TrainConfig(
        epochs=1, lr=3.0, optimizer="sgd", branches="global", reduction_dim=2, wise_alphas=(0.5,), **LITE0
    )
    result = train(config, roomy_demo, tmp_path, show_progress=False)
    metrics = json.loads((result.directory / MODEL_METRICS).read_text())
    assert epochs_of(metrics) == [0, 1]
    trained = [row["val_map"] for row in metrics if "stage" not in row or row["stage"] == "wise"]
    reference = next(row for row in metrics if row.get("stage") == "reference")
    assert reference["val_map"] > max(trained) + 0.1
    assert metrics[-1] == {"stage": "shipped", "model": "reference", "val_map": reference["val_map"]}
    frozen = train(replace(config, epochs=0), roomy_demo, tmp_path / "frozen", show_progress=False)
    loaded, expected = load_trained(result.directory), load_trained(frozen.directory)
    assert loaded.model_config == expected.model_config and loaded.model_config.head == "identity"
    saved, untouched = loaded.model.state_dict(), expected.model.state_dict()
    assert saved.keys() == untouched.keys() and all(torch.equal(saved[k], untouched[k]) for k in saved)
    with Image.open(result.directory / MODEL_CURVES) as curves:
        assert curves.size == (640, 360)


def test_a_run_above_its_starting_point_ships_the_trained_model(roomy_demo: Path, tmp_path: Path) -> None:
    """At a sane learning rate one epoch beats the untouched network here: the trained model ships."""
    config = TrainConfig(epochs=1, lr=1e-4, branches="global", **LITE0)
    result = train(config, roomy_demo, tmp_path, show_progress=False)
    scores = {row["epoch"]: row["val_map"] for row in result.metrics if "stage" not in row}
    reference = next(row for row in result.metrics if row.get("stage") == "reference")
    assert scores[1] > reference["val_map"]
    assert result.metrics[-1] == {"stage": "shipped", "model": "trained", "val_map": scores[1]}
    assert load_trained(result.directory).model_config.head == "reduction"


def test_a_run_from_scratch_has_no_frozen_reference(demo_data: Path, tmp_path: Path) -> None:
    """Random weights are no reference worth keeping: selection is among the epochs alone."""
    config = TrainConfig(backbone="resnet18", epochs=1, lr=1e-3, **TINY)
    metrics = train(config, demo_data, tmp_path, show_progress=False).metrics
    assert not [row for row in metrics if row.get("stage") == "reference"]
    shipped = next(row for row in metrics if row.get("stage") == "shipped")
    assert shipped["model"] == "trained"
    assert shipped["val_map"] == max(row["val_map"] for row in metrics if "stage" not in row)


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
    """Without validation the whitening is always kept (nothing could say it hurts)."""
    config = TrainConfig(
        epochs=0, branches="horizontal", whitening="supervised", whiten_dim=32, validate=False, **LITE0
    )
    result = train(config, demo_data, tmp_path, show_progress=False)
    saved = json.loads((result.directory / MODEL_CONFIG).read_text())
    assert saved["model"]["whiten_dim"] == 32
    loaded = load_trained(result.directory)
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.model(images), result.model.eval()(images), atol=1e-5)
        assert loaded.model(images).shape == (3, 6 * 32)
    (whitened,) = [row for row in result.metrics if row.get("stage") == "whitening"]
    assert whitened == {"stage": "whitening", "kind": "supervised", "dim": 32}


@pytest.mark.parametrize("score_without", [float("-inf"), 1.0])
def test_whitening_is_kept_only_if_validation_does_not_drop(
    demo_data: Path, tmp_path: Path, score_without: float
) -> None:
    """Against a score it cannot miss (-inf) the whitening stays; against one it cannot beat (a perfect
    mAP@10 of 1.0, unreachable on this data) it goes, and the model is as it was without it."""
    config = TrainConfig(epochs=0, branches="horizontal", whitening="supervised", whiten_dim=32, **LITE0)
    model = create_model(model_config_for(config, 0), pretrained="package").eval()
    state = LoopState(model, config)
    layout = DataLayout(demo_data)
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        plain = model(images)
    validation = load_validation(layout, config)
    assert validation is not None
    data = load_training_data(layout, config)
    score = whiten_if_better(state, data, layout, validation, score_without, None)
    (row,) = state.metrics
    assert 0 < row["val_map"] < 1 and row["kept"] == (score_without < 0)
    with torch.no_grad():
        features = model(images)
    if row["kept"]:
        assert score == row["val_map"] and model.config.whiten_dim == 32 and features.shape == (3, 6 * 32)
    else:
        assert score == 1.0 and model.whitening is None and model.config.whiten_dim == 0
        assert torch.equal(features, plain)


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
