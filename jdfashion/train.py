"""The training loop: one MGPA model per (category, backbone), or the tops/bags/shoes router.

Shape (fast-reid's, without registries): ``losses.mgpa_losses`` returns named terms, ``train_step``
runs one batch and returns a dict, ``fit`` runs epochs and a short list of callbacks
(``callbacks.py``: progress, metrics, validation, checkpoint). ``train`` wires them and adds what
happens once: the frozen reference (``epochs=0``), best-on-validation selection, WiSE-FT and whitening.
From a pretrained backbone the frozen reference is a candidate too: what ``train`` ships is never worse
on validation than the untouched network it started from.

CPU runs are bit-reproducible under a seed; a run killed at any point resumes from its last
checkpoint and ends with the weights an uninterrupted run would have had. On CUDA it uses AMP and
channels_last; under ``torchrun`` it trains with DDP (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from jdfashion.callbacks import (
    Callback,
    CheckpointCallback,
    EpochMetricsCallback,
    LoopState,
    ProgressCallback,
    ValidationCallback,
    ValidationData,
    copy_state,
    plot_curves,
    validation_scores,
)
from jdfashion.checkpoint import load_resume_state, save_trained
from jdfashion.config import ROUTER_CLASSES, TrainConfig
from jdfashion.data.jdformat import Category, read_images, read_pairs, read_truth
from jdfashion.data.loader import (
    ItemDataset,
    PKBatchSampler,
    Sample,
    ShardedBatchSampler,
    collate,
    eval_transform,
    train_transform,
)
from jdfashion.data.split import identities as group_identities
from jdfashion.data.split import training_identities
from jdfashion.distributed import distributed_context, pick_device
from jdfashion.losses import mgpa_losses
from jdfashion.model.backbones import BACKBONE_PRESETS, input_normalization
from jdfashion.model.mgpa import MGPA, MGPAConfig, PartWhitening, create_model
from jdfashion.model.whitening import learn_part_whitening
from jdfashion.paths import MODEL_CURVES, DataLayout, WeightsLayout
from jdfashion.progress import ProgressLike, make_progress


@dataclass
class TrainingData:
    samples: list[Sample]
    groups: list[int]  # identity index per sample: what the PK sampler balances
    identities: list[list[str]]  # per class label, the urls that define it (saved for inspection)
    fingerprint: str


@dataclass
class TrainResult:
    directory: Path
    metrics: list[dict[str, Any]]
    model: MGPA


def training_pairs_path(layout: DataLayout) -> Path:
    """The split's training list when ``data split`` has run, else all of p.txt."""
    return layout.train_pairs if layout.train_pairs.exists() else layout.pairs


def load_training_data(layout: DataLayout, config: TrainConfig) -> TrainingData:
    """Retrieval: a class per identity of the category. Router: a class per category, sampled by identity."""
    if config.task == "retrieval":
        category = Category.parse(config.category)
        identities = training_identities(layout, category)
        if not identities:
            raise ValueError(f"{training_pairs_path(layout)}: no training pairs of category {category.label}")
        samples, groups = [], []
        for label, identity in enumerate(identities):
            for ref in [*identity.consumers, *identity.shops]:
                samples.append(Sample(ref, label))
                groups.append(label)
        described = [[ref.url for ref in identity.shops] for identity in identities]
    else:
        identities = group_identities(read_pairs(training_pairs_path(layout)))
        samples, groups = [], []
        for group, identity in enumerate(identities):
            for ref in [*identity.consumers, *identity.shops]:
                samples.append(Sample(ref, int(identity.category)))
                groups.append(group)
        described = [[category.label] for category in Category]
    digest = hashlib.sha256()
    for sample in samples:
        box = sample.ref.box
        digest.update(f"{sample.ref.url} {box.x1} {box.y1} {box.x2} {box.y2} {sample.label}\n".encode())
    return TrainingData(samples, groups, described, digest.hexdigest())


def model_config_for(config: TrainConfig, num_classes: int) -> MGPAConfig:
    """``epochs=0`` is the frozen reference: the identity head, nothing between backbone and search
    that training would have to learn."""
    frozen = config.epochs == 0
    if frozen and config.task == "category":
        raise ValueError("epochs: the category router needs at least 1 epoch (its classifier is trained)")
    mean, std = input_normalization(config.backbone)
    return MGPAConfig(
        backbone=config.backbone,
        branches="global" if config.task == "category" else config.branches,
        reduction_dim=config.reduction_dim,
        pooling=config.pooling,
        last_stride_one=config.last_stride_one,
        num_classes=0 if frozen else num_classes,
        head="identity" if frozen else "reduction",
        input_mean=mean,
        input_std=std,
    )


def resolved(config: TrainConfig) -> TrainConfig:
    """Fill the fields left to the backbone preset, so the saved config states what actually ran."""
    preset = BACKBONE_PRESETS.get(config.backbone)
    lr = config.lr if config.lr is not None else (preset.lr if preset else 3.5e-4)
    p = config.identities_per_batch or (preset.identities_per_batch if preset else 32)
    return dataclasses.replace(config, lr=lr, identities_per_batch=p)


def lr_factor(progress: float, config: TrainConfig) -> float:
    """``progress`` in epochs (fractional within an epoch): linear warm-up from 10 % over
    ``warmup_epochs``, updated every iteration, then x``decay_factor`` at each decay epoch."""
    if progress < config.warmup_epochs:
        return 0.1 + 0.9 * progress / config.warmup_epochs
    return config.decay_factor ** sum(progress >= milestone for milestone in config.decay_epochs)


def parameter_groups(model: MGPA, config: TrainConfig) -> list[dict[str, Any]]:
    """Backbone and head groups (the backbone at ``backbone_lr_mult`` x lr), each split so that norms and
    biases (1-d tensors) get no weight decay. ``lr_scale`` is kept so the schedule can rescale each."""
    groups = []
    for part, scale in ((model.backbone, config.backbone_lr_mult), (model.head, 1.0)):
        params = [p for p in part.parameters() if p.requires_grad]
        for decay in (True, False):
            chosen = [p for p in params if (p.ndim > 1) == decay]
            if chosen:
                groups.append(
                    {
                        "params": chosen,
                        "weight_decay": config.weight_decay if decay else 0.0,
                        "lr_scale": scale,
                        "backbone": part is model.backbone,
                    }
                )
    return groups


def build_optimizer(model: MGPA, config: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True)
    raise ValueError(f"unknown optimizer {config.optimizer!r} (expected 'adam', 'adamw' or 'sgd')")


def set_learning_rates(optimizer: torch.optim.Optimizer, progress: float, config: TrainConfig) -> None:
    """The schedule, per group; during the LP-FT head warm-up the backbone's lr is 0 (frozen)."""
    factor = lr_factor(progress, config)
    for group in optimizer.param_groups:
        frozen = group.get("backbone", False) and progress < config.head_warmup_epochs
        group["lr"] = 0.0 if frozen else config.lr * factor * group.get("lr_scale", 1.0)


def set_train_mode(model: MGPA, config: TrainConfig, epoch: int) -> None:
    """Train mode, except the backbone's BatchNorm statistics when frozen (``freeze_bn``, or the LP-FT
    head warm-up, where the whole backbone must stay as pretrained)."""
    model.train()
    if config.freeze_bn or epoch < config.head_warmup_epochs:
        for module in model.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def train_step(
    model: nn.Module,
    batch: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    config: TrainConfig,
    device: torch.device,
    autocast: Any,
    memory_format: torch.memory_format,
) -> dict[str, float]:
    """One optimisation step; returns the loss terms, correct predictions and batch size."""
    images = batch["images"].to(device, non_blocking=True, memory_format=memory_format)
    labels = batch["labels"].to(device, non_blocking=True)
    with autocast:
        output = model(images)
        terms = mgpa_losses(output, labels, config)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(terms["loss"]).backward()
    scaler.step(optimizer)
    scaler.update()
    mean_logits = torch.stack([logits.float() for logits in output.logits]).mean(0)
    logs = {name: float(value.detach()) for name, value in terms.items()}
    logs["accuracy"] = float((mean_logits.argmax(1) == labels).sum())
    logs["images"] = float(len(labels))
    return logs


def fit(
    state: LoopState,
    step: Callable[[dict[str, torch.Tensor]], dict[str, float]],
    loader: DataLoader,
    sampler: ShardedBatchSampler,
    optimizer: torch.optim.Optimizer,
    callbacks: Sequence[Callback],
    start_epoch: int = 0,
    start_batch: int = 0,
    world_size: int = 1,
) -> None:
    """Epochs from ``start_epoch`` (its first ``start_batch`` steps already done) to ``config.epochs``."""
    config = state.config
    for epoch in range(start_epoch, config.epochs):
        state.epoch = epoch
        first = start_batch if epoch == start_epoch else 0
        sampler.set_epoch(epoch, first)
        steps = len(sampler)
        for callback in callbacks:
            callback.on_epoch_start(state, steps, first)
        set_train_mode(state.model, config, epoch)
        if (
            world_size == 1
        ):  # LP-FT head epochs: no backward through the frozen backbone (DDP needs every grad)
            state.model.backbone.requires_grad_(epoch >= config.head_warmup_epochs)
        for index, batch in enumerate(loader, start=first):
            set_learning_rates(optimizer, epoch + index / max(steps, 1), config)
            logs = step(batch)
            logs["images"] *= world_size
            for callback in callbacks:
                callback.on_step(state, index + 1, logs)
        for callback in callbacks:
            callback.on_epoch_end(state)
    state.model.backbone.requires_grad_(True)


def progress_bar() -> ProgressLike:
    return make_progress({"loss": "loss {loss:.3f}", "rate": "{rate:.1f} img/s"})


def load_validation(layout: DataLayout, config: TrainConfig) -> ValidationData | None:
    """The category's validation lists (``data split``), when they exist and validation is on."""
    if not config.validate or config.task != "retrieval":
        return None
    category = Category.parse(config.category)
    if not layout.val_queries(category).exists():
        return None
    return ValidationData(
        read_images(layout.val_queries(category)),
        read_images(layout.val_gallery(category)),
        read_truth(layout.val_truth(category)),
        layout.images,
    )


def train(
    config: TrainConfig,
    data_root: Path,
    weights_root: Path = Path("weights"),
    *,
    resume: bool = False,
    device: str | None = None,
    show_progress: bool = True,
    on_step: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train one model and write it under ``weights_root``; ``resume`` continues from ``last.ckpt``.

    With validation lists, the model is scored before training and after every epoch and the best
    epoch is what is saved (epoch 0, the untouched start, included); WiSE-FT and whitening follow.
    """
    config = resolved(config)
    layout = DataLayout(Path(data_root))
    data = load_training_data(layout, config)
    num_classes = ROUTER_CLASSES if config.task == "category" else len(data.identities)
    model_config = model_config_for(config, num_classes)
    out_dir = WeightsLayout(Path(weights_root)).model_dir(config.output_name, config.backbone)

    with distributed_context() as dist_info:
        torch.manual_seed(config.seed)
        run_device = pick_device(device, dist_info)
        use_cuda = run_device.type == "cuda"
        if not use_cuda:
            torch.set_flush_denormal(True)  # denormal activations slow CPU arithmetic up to 30x
        model = create_model(
            model_config, pretrained=config.pretrained_weights, pretrained_file=config.pretrained_file
        )
        # The untouched backbone: WiSE-FT's other end, and the frozen reference's weights.
        keep_start = config.epochs > 0 and (bool(config.wise_alphas) or starts_pretrained(config))
        pretrained_backbone = copy_state(model.backbone) if keep_start else None
        memory_format = torch.channels_last if use_cuda and config.channels_last else torch.contiguous_format
        model.to(run_device, memory_format=memory_format)
        console = Console() if show_progress and dist_info.is_main else None
        validation = load_validation(layout, config) if dist_info.is_main else None
        state = LoopState(model, config)

        if config.epochs > 0:
            optimizer = build_optimizer(model, config)
            amp_dtype = torch.bfloat16 if use_cuda and torch.cuda.is_bf16_supported() else torch.float16
            scaler = torch.amp.GradScaler(
                "cuda", enabled=use_cuda and config.amp and amp_dtype == torch.float16
            )
            start_epoch, start_batch = 0, 0
            saved = load_resume_state(out_dir) if resume else None
            if saved is not None:
                check_resumable(saved, config, data.fingerprint, out_dir)
                model.load_state_dict(saved["model"])
                optimizer.load_state_dict(saved["optimizer"])
                scaler.load_state_dict(saved["scaler"])
                start_epoch, start_batch = int(saved["epoch"]), int(saved["batch"])
                state.metrics = json.loads(saved["metrics"])
                best = json.loads(saved["best"])
                state.best_score, state.best_epoch = best["score"], best["epoch"]
                state.best_state = saved["best_state"] or None
            validator = ValidationCallback(validation, config.num_workers, console) if validation else None
            if validator and saved is None:
                validator.measure(state, 0)
                if starts_pretrained(config) and pretrained_backbone is not None:
                    measure_reference(state, model_config, pretrained_backbone, validation, console)

            trained: nn.Module = model
            if dist_info.world_size > 1:
                trained = DistributedDataParallel(model, device_ids=[run_device.index] if use_cuda else None)
            base_sampler = PKBatchSampler(
                data.groups, config.identities_per_batch, config.images_per_identity, config.seed
            )
            sampler = ShardedBatchSampler(base_sampler, dist_info.rank, dist_info.world_size)
            mean, std = model_config.normalization
            transform = train_transform(config.image_size, mean, std, config.augment, config.rotate_degrees)
            loader = DataLoader(
                ItemDataset(data.samples, layout.images, transform),
                batch_sampler=sampler,
                num_workers=config.num_workers,
                collate_fn=collate,
                pin_memory=use_cuda,
                persistent_workers=False,
            )
            autocast = torch.autocast("cuda", dtype=amp_dtype) if use_cuda and config.amp else nullcontext()
            callbacks: list[Callback] = [EpochMetricsCallback()]
            with progress_bar() if console else nullcontext() as progress:
                if progress is not None:
                    callbacks.append(ProgressCallback(progress, f"{config.output_name}/{config.backbone}"))
                if validator:
                    callbacks.append(validator)
                if dist_info.is_main:

                    def resume_state() -> dict[str, Any]:
                        return {
                            "optimizer": optimizer.state_dict(),
                            "scaler": scaler.state_dict(),
                            "config": json.dumps(config.to_dict()),
                            "data_fingerprint": data.fingerprint,
                        }

                    callbacks.append(CheckpointCallback(out_dir, config.checkpoint_every, resume_state))
                if on_step:
                    callbacks.append(_StepHook(on_step))

                def step(batch: dict[str, torch.Tensor]) -> dict[str, float]:
                    return train_step(
                        trained, batch, optimizer, scaler, config, run_device, autocast, memory_format
                    )

                fit(
                    state,
                    step,
                    loader,
                    sampler,
                    optimizer,
                    callbacks,
                    start_epoch,
                    start_batch,
                    dist_info.world_size,
                )
            del trained, loader
        elif validation and dist_info.is_main:
            ValidationCallback(validation, config.num_workers, console).measure(state, 0)

        if dist_info.is_main:
            model = finish(state, data, layout, validation, pretrained_backbone, console)
            save_trained(
                out_dir, model, config, model.config, data.identities, data.fingerprint, state.metrics
            )
            plot_curves(out_dir / MODEL_CURVES, state.metrics)
    return TrainResult(out_dir, state.metrics, model)


class _StepHook(Callback):
    """The ``on_step(epoch, step)`` argument of ``train`` (tests use it to kill a run mid-epoch)."""

    def __init__(self, hook: Callable[[int, int], None]) -> None:
        self.hook = hook

    def on_step(self, state: LoopState, step: int, logs: dict[str, float]) -> None:
        self.hook(state.epoch, step)


def starts_pretrained(config: TrainConfig) -> bool:
    return bool(config.pretrained_weights or config.pretrained_file)


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


def check_resumable(state: dict[str, Any], config: TrainConfig, fingerprint: str, out_dir: Path) -> None:
    """A checkpoint from other settings or other data would silently train a hybrid: refuse it."""
    saved = json.loads(state["config"])
    current = json.loads(json.dumps(config.to_dict()))
    differing = sorted(
        key
        for key, value in current.items()
        if key not in ("epochs", "num_workers") and saved.get(key) != value
    )
    if differing:
        raise ValueError(
            f"{out_dir}: cannot resume, the checkpoint was trained with other {', '.join(differing)}"
        )
    if state["data_fingerprint"] != fingerprint:
        raise ValueError(f"{out_dir}: cannot resume, the training list changed since the checkpoint")
