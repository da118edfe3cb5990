"""The training loop: one MGPA model per (category, backbone), or the tops/bags/shoes router.

CPU runs are bit-reproducible under a seed; a run killed at any point resumes from its last
checkpoint and ends with the weights an uninterrupted run would have had. On CUDA it uses AMP and
channels_last; under ``torchrun`` it trains with DDP (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from jdfashion.checkpoint import load_resume_state, save_resume_state, save_trained, write_metrics
from jdfashion.config import ROUTER_CLASSES, TrainConfig
from jdfashion.data.jdformat import Category, read_pairs
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
from jdfashion.model.backbones import BACKBONE_PRESETS
from jdfashion.model.mgpa import MGPA, MGPAConfig, create_model
from jdfashion.paths import DataLayout, WeightsLayout
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
    return MGPAConfig(
        backbone=config.backbone,
        branches="global" if config.task == "category" else config.branches,
        reduction_dim=config.reduction_dim,
        pooling=config.pooling,
        last_stride_one=config.last_stride_one,
        num_classes=num_classes,
    )


def resolved(config: TrainConfig) -> TrainConfig:
    """Fill the fields left to the backbone preset, so the saved config states what actually ran."""
    preset = BACKBONE_PRESETS.get(config.backbone)
    lr = config.lr if config.lr is not None else (preset.lr if preset else 3.5e-4)
    p = config.identities_per_batch or (preset.identities_per_batch if preset else 32)
    return dataclasses.replace(config, lr=lr, identities_per_batch=p)


def lr_factor(epoch: int, config: TrainConfig) -> float:
    """Linear warm-up from 10 % over ``warmup_epochs``, then x``decay_factor`` at each decay epoch."""
    if epoch < config.warmup_epochs:
        return 0.1 + 0.9 * epoch / config.warmup_epochs
    return config.decay_factor ** sum(epoch >= milestone for milestone in config.decay_epochs)


def batch_hard_triplet(embeddings: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Hardest positive and negative per anchor (Hermans et al. 2017) on unit embeddings."""
    distances = torch.cdist(embeddings, embeddings)
    same = labels[:, None] == labels[None, :]
    hardest_positive = (distances * same).amax(dim=1)
    hardest_negative = distances.masked_fill(same, float("inf")).amin(dim=1)
    return F.relu(hardest_positive - hardest_negative + margin).mean()


def mgpa_loss(model_output: Any, labels: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """The paper's sum of per-part cross-entropies, plus the optional triplet term."""
    loss = sum(
        F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
        for logits in model_output.logits
    )
    if config.triplet_weight > 0:
        parts = (
            F.normalize(model_output.parts.float(), dim=-1).flatten(1) / model_output.parts.shape[1] ** 0.5
        )
        loss = loss + config.triplet_weight * batch_hard_triplet(parts, labels, config.triplet_margin)
    return loss


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextmanager
def distributed_context() -> Iterator[Distributed]:
    """Initialise DDP when launched by torchrun; tear down in the order this torch needs to exit cleanly."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield Distributed()
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    info = Distributed(dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    try:
        yield info
    finally:
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def pick_device(requested: str | None, dist_info: Distributed) -> torch.device:
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", dist_info.local_rank)
    return torch.device("cpu")


def progress_bar() -> ProgressLike:
    return make_progress({"loss": "loss {loss:.3f}", "rate": "{rate:.1f} img/s"})


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
    """Train one model and write it under ``weights_root``; ``resume`` continues from ``last.ckpt``."""
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
        memory_format = torch.channels_last if use_cuda and config.channels_last else torch.contiguous_format
        model.to(run_device, memory_format=memory_format)
        optimizer = build_optimizer(model, config)
        amp_dtype = torch.bfloat16 if use_cuda and torch.cuda.is_bf16_supported() else torch.float16
        scaler = torch.amp.GradScaler("cuda", enabled=use_cuda and config.amp and amp_dtype == torch.float16)

        start_epoch, start_batch, metrics = 0, 0, []
        state = load_resume_state(out_dir) if resume else None
        if state is not None:
            check_resumable(state, config, data.fingerprint, out_dir)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            start_epoch, start_batch = int(state["epoch"]), int(state["batch"])
            metrics = json.loads(state["metrics"])

        trained: torch.nn.Module = model
        if dist_info.world_size > 1:
            trained = DistributedDataParallel(model, device_ids=[run_device.index] if use_cuda else None)

        base_sampler = PKBatchSampler(
            data.groups, config.identities_per_batch, config.images_per_identity, config.seed
        )
        sampler = ShardedBatchSampler(base_sampler, dist_info.rank, dist_info.world_size)
        dataset = ItemDataset(data.samples, layout.images, train_transform(config.image_size, config.augment))
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=config.num_workers,
            collate_fn=collate,
            pin_memory=use_cuda,
            persistent_workers=False,
        )
        autocast = torch.autocast("cuda", dtype=amp_dtype) if use_cuda and config.amp else nullcontext()

        def checkpoint(epoch: int, batch: int) -> None:
            if dist_info.is_main:
                save_resume_state(
                    out_dir,
                    {
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(),
                        "epoch": epoch,
                        "batch": batch,
                        "metrics": json.dumps(metrics),
                        "config": json.dumps(config.to_dict()),
                        "data_fingerprint": data.fingerprint,
                    },
                )

        with progress_bar() if show_progress and dist_info.is_main else nullcontext() as progress:
            for epoch in range(start_epoch, config.epochs):
                first_batch = start_batch if epoch == start_epoch else 0
                sampler.set_epoch(epoch, first_batch)
                for group in optimizer.param_groups:
                    group["lr"] = config.lr * lr_factor(epoch, config)
                task = (
                    progress.add_task(
                        f"{config.output_name}/{config.backbone} epoch {epoch + 1}/{config.epochs}",
                        total=len(sampler),
                        completed=first_batch,
                        loss=0.0,
                        rate=0.0,
                    )
                    if progress
                    else None
                )
                trained.train()
                losses, correct, seen, started = [], 0, 0, time.perf_counter()
                for batch_index, batch in enumerate(loader, start=first_batch):
                    images = batch["images"].to(run_device, non_blocking=True, memory_format=memory_format)
                    labels = batch["labels"].to(run_device, non_blocking=True)
                    with autocast:
                        output = trained(images)
                        loss = mgpa_loss(output, labels, config)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    losses.append(loss.item())
                    mean_logits = torch.stack([logits.float() for logits in output.logits]).mean(0)
                    correct += int((mean_logits.argmax(1) == labels).sum())
                    seen += len(labels)
                    rate = seen * dist_info.world_size / (time.perf_counter() - started)
                    if progress:
                        progress.update(task, advance=1, loss=float(np.mean(losses)), rate=rate)
                    if config.checkpoint_every and (batch_index + 1) % config.checkpoint_every == 0:
                        checkpoint(epoch, batch_index + 1)
                    if on_step:
                        on_step(epoch, batch_index + 1)
                seconds = time.perf_counter() - started
                metrics.append(
                    {
                        "epoch": epoch + 1,
                        "loss": float(np.mean(losses)) if losses else float("nan"),
                        "train_accuracy": correct / max(seen, 1),
                        "images_per_second": seen * dist_info.world_size / max(seconds, 1e-9),
                        "seconds": seconds,
                        "lr": optimizer.param_groups[0]["lr"],
                    }
                )
                checkpoint(epoch + 1, 0)
                if dist_info.is_main:
                    write_metrics(out_dir, metrics)

        if dist_info.is_main:
            save_trained(out_dir, model, config, model_config, data.identities, data.fingerprint, metrics)
        del trained, loader
    return TrainResult(out_dir, metrics, model)


def build_optimizer(model: MGPA, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr=config.lr, momentum=0.9, weight_decay=config.weight_decay, nesterov=True
        )
    raise ValueError(f"unknown optimizer {config.optimizer!r} (expected 'adam' or 'sgd')")


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
