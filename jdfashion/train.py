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
    train_transform,
)
from jdfashion.data.split import identities as group_identities
from jdfashion.data.split import training_identities
from jdfashion.distributed import distributed_context, pick_device
from jdfashion.finishing import finish, measure_reference
from jdfashion.losses import mgpa_losses
from jdfashion.model.backbones import BACKBONE_PRESETS, input_normalization
from jdfashion.model.mgpa import MGPA, MGPAConfig, create_model
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


def build_model(config: TrainConfig, num_classes: int) -> MGPA:
    """The network a run starts from: the backbone with its pretrained weights, a fresh head."""
    return create_model(
        model_config_for(config, num_classes),
        pretrained=config.pretrained_weights,
        pretrained_file=config.pretrained_file,
    )


def training_sampler(
    data: TrainingData, config: TrainConfig, rank: int = 0, world_size: int = 1
) -> ShardedBatchSampler:
    """PK batches (P identities x K images), this process's share of them under DDP."""
    base = PKBatchSampler(data.groups, config.identities_per_batch, config.images_per_identity, config.seed)
    return ShardedBatchSampler(base, rank, world_size)


def training_dataset(data: TrainingData, layout: DataLayout, config: TrainConfig) -> ItemDataset:
    """The training images with the run's augmentation, normalised as the backbone was pretrained."""
    mean, std = input_normalization(config.backbone)
    transform = train_transform(config.image_size, mean, std, config.augment, config.rotate_degrees)
    return ItemDataset(data.samples, layout.images, transform)


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
    out_dir = WeightsLayout(Path(weights_root)).model_dir(config.output_name, config.backbone)

    with distributed_context() as dist_info:
        torch.manual_seed(config.seed)
        run_device = pick_device(device, dist_info)
        use_cuda = run_device.type == "cuda"
        if not use_cuda:
            torch.set_flush_denormal(True)  # denormal activations slow CPU arithmetic up to 30x
        model = build_model(config, num_classes)
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
                    measure_reference(state, model.config, pretrained_backbone, validation, console)

            trained: nn.Module = model
            if dist_info.world_size > 1:
                trained = DistributedDataParallel(model, device_ids=[run_device.index] if use_cuda else None)
            sampler = training_sampler(data, config, dist_info.rank, dist_info.world_size)
            loader = DataLoader(
                training_dataset(data, layout, config),
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
