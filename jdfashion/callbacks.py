"""What the training loop does around each step and epoch, as a short list of callbacks.

The loop (``train.fit``) only runs steps; progress, checkpoints, per-epoch metrics and validation
each live in one callback here, so a new concern is a new class, not another branch in the loop.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from rich.console import Console

from jdfashion.atomic import atomic_path
from jdfashion.checkpoint import TrainedModel, save_resume_state, write_metrics
from jdfashion.config import TrainConfig
from jdfashion.data.jdformat import ImageRef
from jdfashion.features import ExtractOptions, compute_features
from jdfashion.metrics import Scores, evaluate
from jdfashion.model.mgpa import MGPA
from jdfashion.paths import MODEL_CURVES
from jdfashion.progress import ProgressLike
from jdfashion.search import topk
from jdfashion.submission import TOP_K


@dataclass
class LoopState:
    """What callbacks read and write: the epoch being run, the per-epoch metrics, the best model so far."""

    model: MGPA
    config: TrainConfig
    epoch: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = float("-inf")
    best_epoch: int | None = None
    best_state: dict[str, torch.Tensor] | None = None

    def epoch_metrics(self, epoch: int) -> dict[str, Any]:
        """The metrics row of ``epoch`` (0 = before training), created on first use."""
        for row in self.metrics:
            if row.get("epoch") == epoch:
                return row
        row: dict[str, Any] = {"epoch": epoch}
        self.metrics.append(row)
        return row


class Callback:
    def on_epoch_start(self, state: LoopState, steps: int, first_step: int) -> None: ...
    def on_step(self, state: LoopState, step: int, logs: dict[str, float]) -> None: ...
    def on_epoch_end(self, state: LoopState) -> None: ...


class ProgressCallback(Callback):
    """Live loss and images/s, as a bar on a terminal or plain lines in a log."""

    def __init__(self, progress: ProgressLike, name: str) -> None:
        self.progress, self.name = progress, name
        self.task: Any = None

    def on_epoch_start(self, state: LoopState, steps: int, first_step: int) -> None:
        description = f"{self.name} epoch {state.epoch + 1}/{state.config.epochs}"
        self.task = self.progress.add_task(description, total=steps, completed=first_step, loss=0.0, rate=0.0)

    def on_step(self, state: LoopState, step: int, logs: dict[str, float]) -> None:
        self.progress.update(self.task, advance=1, loss=logs["mean_loss"], rate=logs["images_per_second"])


class EpochMetricsCallback(Callback):
    """Averages the step logs into the epoch's metrics row."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.started = time.perf_counter()

    def on_epoch_start(self, state: LoopState, steps: int, first_step: int) -> None:
        self.sums, self.steps, self.started = {}, 0, time.perf_counter()

    def on_step(self, state: LoopState, step: int, logs: dict[str, float]) -> None:
        self.steps += 1
        for key in ("loss", "cross_entropy", "triplet", "accuracy", "images"):
            if key in logs:
                self.sums[key] = self.sums.get(key, 0.0) + logs[key]
        logs["mean_loss"] = self.sums["loss"] / self.steps
        logs["images_per_second"] = self.sums["images"] / max(time.perf_counter() - self.started, 1e-9)

    def on_epoch_end(self, state: LoopState) -> None:
        seconds = time.perf_counter() - self.started
        row = state.epoch_metrics(state.epoch + 1)
        steps = max(self.steps, 1)
        row.update(
            {key: value / steps for key, value in self.sums.items() if key not in ("images", "accuracy")}
        )
        row.update(
            {
                "train_accuracy": self.sums.get("accuracy", 0.0) / max(self.sums.get("images", 0.0), 1.0),
                "images_per_second": self.sums.get("images", 0.0) / max(seconds, 1e-9),
                "seconds": seconds,
            }
        )


@dataclass
class ValidationData:
    queries: list[ImageRef]
    gallery: list[ImageRef]
    truth: dict[str, list[str]]
    image_root: Path


def validation_scores(
    model: MGPA, config: TrainConfig, data: ValidationData, num_workers: int = 0, batch_size: int = 64
) -> Scores:
    """mAP@10 and rank-1 of the model as it is now, on the category's validation queries and gallery."""
    was_training = model.training
    trained = TrainedModel(model.eval(), config, model.config, [], "", Path("."))
    options = ExtractOptions(batch_size=batch_size, num_workers=num_workers, show_progress=False)
    queries = compute_features(trained, data.queries, data.image_root, options)
    gallery = compute_features(trained, data.gallery, data.image_root, options)
    _, indices = topk(queries.features, gallery.features, min(TOP_K, len(gallery)))
    run = {q: [gallery.ids[i] for i in row] for q, row in zip(queries.ids, indices.tolist(), strict=True)}
    model.train(was_training)
    return evaluate(run, data.truth)


class ValidationCallback(Callback):
    """Validation mAP@10 before training and after every epoch; keeps the best model's weights, so the
    model shipped is never worse on validation than its starting point."""

    def __init__(self, data: ValidationData, num_workers: int, console: Console | None) -> None:
        self.data, self.num_workers, self.console = data, num_workers, console

    def measure(self, state: LoopState, epoch: int) -> None:
        scores = validation_scores(state.model, state.config, self.data, self.num_workers).overall
        state.epoch_metrics(epoch).update({"val_map": scores.map, "val_rank1": scores.rank1})
        if scores.map > state.best_score:
            state.best_score, state.best_epoch = scores.map, epoch
            state.best_state = copy_state(state.model)
        if self.console:
            self.console.print(
                f"validation after epoch {epoch}: mAP@10 {scores.map:.4f} rank-1 {scores.rank1:.4f} "
                f"(best {state.best_score:.4f} at epoch {state.best_epoch})"
            )

    def on_epoch_end(self, state: LoopState) -> None:
        self.measure(state, state.epoch + 1)


class CheckpointCallback(Callback):
    """The resume checkpoint at every epoch end (and every ``every`` steps), with the best weights so far."""

    def __init__(self, directory: Path, every: int, extra: Callable[[], dict[str, Any]]) -> None:
        self.directory, self.every, self.extra = directory, every, extra

    def save(self, state: LoopState, epoch: int, step: int) -> None:
        save_resume_state(
            self.directory,
            {
                **self.extra(),
                "model": state.model.state_dict(),
                "epoch": epoch,
                "batch": step,
                "metrics": json.dumps(state.metrics),
                "best": json.dumps({"score": state.best_score, "epoch": state.best_epoch}),
                "best_state": state.best_state or {},
            },
        )

    def on_step(self, state: LoopState, step: int, logs: dict[str, float]) -> None:
        if self.every and step % self.every == 0:
            self.save(state, state.epoch, step)

    def on_epoch_end(self, state: LoopState) -> None:
        self.save(state, state.epoch + 1, 0)
        write_metrics(self.directory, state.metrics)
        plot_curves(self.directory / MODEL_CURVES, state.metrics)


def plot_curves(path: Path, metrics: list[dict[str, Any]], size: tuple[int, int] = (640, 360)) -> None:
    """Loss (red, left scale) and validation mAP@10 (blue, 0..1) per epoch, as a small PNG."""
    width, height = size
    margin = 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((margin, margin // 2, width - margin, height - margin), outline="black")
    per_epoch = [row for row in metrics if "stage" not in row]
    epochs = [row["epoch"] for row in per_epoch]
    last = max([*epochs, 1])

    def x_of(epoch: float) -> float:
        return margin + (width - 2 * margin) * epoch / last

    def y_of(value: float, top: float) -> float:
        return height - margin - (height - 1.5 * margin) * value / max(top, 1e-9)

    losses = [(row["epoch"], row["loss"]) for row in per_epoch if "loss" in row and np.isfinite(row["loss"])]
    maps = [(row["epoch"], row["val_map"]) for row in per_epoch if "val_map" in row]
    loss_top = max([loss for _, loss in losses] + [1e-9])
    for points, colour, top in ((losses, "red", loss_top), (maps, "blue", 1.0)):
        xy = [(x_of(epoch), y_of(value, top)) for epoch, value in sorted(points)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
    draw.text((margin, 2), f"loss (red, max {loss_top:.3g})   validation mAP@10 (blue, 0..1)", fill="black")
    draw.text((width // 2 - 20, height - margin + 8), f"epoch 0..{last}", fill="black")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def copy_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
