"""After the last epoch, each choice on validation mAP@10: the best epoch, the WiSE-FT mix, the
whitening (kept only if it helps), and the frozen reference if it beats them all (:func:`finish`)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from torch.utils.data import DataLoader

from jdfashion.callbacks import (
    LoopState,
    ValidationData,
    copy_state,
    validation_scores,
)
from jdfashion.config import TrainConfig
from jdfashion.data.loader import (
    ItemDataset,
    collate,
    eval_transform,
)
from jdfashion.model.mgpa import MGPA, MGPAConfig, PartWhitening, create_model
from jdfashion.model.whitening import learn_part_whitening
from jdfashion.paths import DataLayout

if TYPE_CHECKING:
    from jdfashion.train import TrainingData


def frozen_reference(
    model_config: MGPAConfig, backbone_state: dict[str, torch.Tensor], device: torch.device
) -> MGPA:
    """The ``epochs=0`` model of this backbone: its pretrained weights and the identity head."""
    config = dataclasses.replace(model_config, head="identity", num_classes=0, whiten_dim=0)
    reference = create_model(config)
    reference.backbone.load_state_dict(backbone_state)
    return reference.to(device).eval()


def measure_reference(
    state: LoopState,
    model_config: MGPAConfig,
    backbone_state: dict[str, torch.Tensor],
    validation: ValidationData,
    console: Console | None,
) -> None:
    """Validation of the frozen reference, before training: the score training has to beat. Epoch 0
    is not that score: a fresh reduction head projects the pretrained parts at random."""
    device = next(state.model.parameters()).device
    reference = frozen_reference(model_config, backbone_state, device)
    scores = validation_scores(reference, state.config, validation, state.config.num_workers).overall
    state.metrics.append({"stage": "reference", "val_map": scores.map, "val_rank1": scores.rank1})
    if console:
        console.print(f"frozen reference: validation mAP@10 {scores.map:.4f} rank-1 {scores.rank1:.4f}")


def finish(
    state: LoopState,
    data: TrainingData,
    layout: DataLayout,
    validation: ValidationData | None,
    pretrained_backbone: dict[str, torch.Tensor] | None,
    console: Console | None,
) -> MGPA:
    """After the last epoch, each choice on validation mAP@10: the best epoch, the WiSE-FT mix, the
    whitening (kept only if it helps), and the frozen reference if it beats all that. Returns the
    model to ship; each choice is logged in the metrics (``stage`` rows)."""
    model, config = state.model, state.config
    model.eval()
    if state.best_state is not None and state.best_epoch != config.epochs:
        model.load_state_dict(state.best_state)
        if console:
            console.print(f"keeping epoch {state.best_epoch}: best validation mAP@10 {state.best_score:.4f}")
    if state.best_epoch is not None:
        state.metrics.append({"stage": "selected", "epoch": state.best_epoch, "val_map": state.best_score})
    score = state.best_score
    if config.wise_alphas and pretrained_backbone is not None and validation is not None and config.epochs:
        score = choose_wise_alpha(state, validation, pretrained_backbone, console)
    if config.whitening != "none":
        score = whiten_if_better(state, data, layout, validation, score, console)
    reference = next((row for row in state.metrics if row.get("stage") == "reference"), None)
    if reference is not None and pretrained_backbone is not None and reference["val_map"] > score:
        device = next(model.parameters()).device
        model = frozen_reference(model.config, pretrained_backbone, device)
        score = reference["val_map"]
        if console:
            console.print(f"shipping the frozen reference: training stayed below its validation {score:.4f}")
    if validation is not None:
        source = "reference" if model is not state.model else "trained"
        state.metrics.append({"stage": "shipped", "model": source, "val_map": score})
    return model


def whiten_if_better(
    state: LoopState,
    data: TrainingData,
    layout: DataLayout,
    validation: ValidationData | None,
    score: float,
    console: Console | None,
) -> float:
    """Attach the whitening; with validation lists, keep it only if it does not lower ``score``."""
    model, config = state.model, state.config
    attach_whitening(model, data, layout, config)
    row: dict[str, Any] = {"stage": "whitening", "kind": config.whitening, "dim": model.config.whiten_dim}
    state.metrics.append(row)
    if validation is None:
        return score
    scores = validation_scores(model, config, validation, config.num_workers).overall
    kept = scores.map >= score
    row.update({"val_map": scores.map, "val_rank1": scores.rank1, "kept": kept})
    if not kept:
        model.whitening = None
        model.config = dataclasses.replace(model.config, whiten_dim=0)
    if console:
        verdict = "kept" if kept else f"dropped (without: {score:.4f})"
        console.print(f"{config.whitening} whitening: validation mAP@10 {scores.map:.4f}, {verdict}")
    return scores.map if kept else score


def choose_wise_alpha(
    state: LoopState,
    validation: ValidationData,
    pretrained_backbone: dict[str, torch.Tensor],
    console: Console | None,
) -> float:
    """WiSE-FT (Wortsman et al. 2022): backbone = a x tuned + (1 - a) x pretrained, ``a`` from the
    config's grid by validation mAP@10; a = 1 (the tuned model as is) is always a candidate.
    Returns the chosen mix's score."""
    model, config = state.model, state.config
    tuned = copy_state(model.backbone)
    best_alpha, best_map = 1.0, state.best_score
    for alpha in sorted(set(config.wise_alphas) - {1.0}):
        mixed = interpolate(tuned, pretrained_backbone, alpha)
        model.backbone.load_state_dict(mixed)
        score = validation_scores(model, config, validation, config.num_workers).overall.map
        state.metrics.append({"stage": "wise", "alpha": alpha, "val_map": score})
        if score > best_map:
            best_alpha, best_map = alpha, score
    final = interpolate(tuned, pretrained_backbone, best_alpha)
    model.backbone.load_state_dict(final)
    state.metrics.append({"stage": "wise_selected", "alpha": best_alpha, "val_map": best_map})
    if console:
        console.print(f"WiSE-FT: alpha {best_alpha} (validation mAP@10 {best_map:.4f})")
    return best_map


def interpolate(
    tuned: dict[str, torch.Tensor], pretrained: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """alpha x tuned + (1 - alpha) x pretrained for every float tensor (BN statistics included)."""
    return {
        key: alpha * value + (1 - alpha) * pretrained[key] if value.is_floating_point() else value
        for key, value in tuned.items()
    }


def attach_whitening(model: MGPA, data: TrainingData, layout: DataLayout, config: TrainConfig) -> None:
    """Learn per-part whitening from the training images (no augmentation) and add it to the model."""
    device = next(model.parameters()).device
    mean, std = model.config.normalization
    loader = DataLoader(
        ItemDataset(data.samples, layout.images, eval_transform(config.image_size, mean, std)),
        batch_size=64,
        num_workers=config.num_workers,
        collate_fn=collate,
    )
    parts, labels = [], []
    with torch.inference_mode():
        for batch in loader:
            ok = batch["ok"]
            parts.append(model.part_features(batch["images"].to(device))[ok.to(device)].float().cpu())
            labels.append(batch["labels"][ok])
    whitening_mean, projection = learn_part_whitening(
        torch.cat(parts), torch.cat(labels), config.whitening, config.whiten_dim, config.whiten_shrinkage
    )
    model.config = dataclasses.replace(model.config, whiten_dim=projection.shape[2])
    model.whitening = PartWhitening(model.num_parts, model.part_dim, projection.shape[2]).to(device)
    model.whitening.mean.copy_(whitening_mean)
    model.whitening.projection.copy_(projection)
