"""Where a training step's time goes, one stage at a time: the profile beside the real-data table."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from jdfashion.config import TrainConfig
from jdfashion.data.loader import collate
from jdfashion.losses import mgpa_losses
from jdfashion.paths import (
    DataLayout,
)
from jdfashion.realdata.table import StepTimes
from jdfashion.train import (
    build_model,
    build_optimizer,
    load_training_data,
    resolved,
    training_dataset,
    training_sampler,
)


def measure_step_times(config: TrainConfig, data_root: Path, batches: int = 4, row: str = "") -> StepTimes:
    """Time data loading, forward and backward of ``batches`` training batches one stage at a time.

    Stages run back to back without the DataLoader's overlap (loading in this process), so each share
    is the stage's own cost; the first batch warms up allocators and is not counted.
    """
    config = resolved(config)
    layout = DataLayout(Path(data_root))
    data = load_training_data(layout, config)
    torch.manual_seed(config.seed)
    model = build_model(config, len(data.identities))
    optimizer = build_optimizer(model, config)
    sampler = training_sampler(data, config)
    dataset = training_dataset(data, layout, config)
    model.train()
    totals = {"data": 0.0, "forward": 0.0, "backward": 0.0}
    epoch = 0
    for step in range(batches + 1):
        if step % len(sampler) == 0:
            sampler.set_epoch(epoch)
            epoch += 1
            loader = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=0, collate_fn=collate))
        timings = _time_step(model, optimizer, loader, config)
        if step:
            for stage, seconds in timings.items():
                totals[stage] += seconds
    return StepTimes(
        row or f"{config.backbone} {config.branches}",
        config.image_size,
        config.identities_per_batch * config.images_per_identity,
        batches,
        totals["data"] / batches,
        totals["forward"] / batches,
        totals["backward"] / batches,
    )


def _time_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterator[dict[str, torch.Tensor]],
    config: TrainConfig,
) -> dict[str, float]:
    marks = [time.perf_counter()]
    batch = next(loader)
    marks.append(time.perf_counter())
    loss = mgpa_losses(model(batch["images"]), batch["labels"], config)["loss"]
    marks.append(time.perf_counter())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    marks.append(time.perf_counter())
    return dict(
        zip(("data", "forward", "backward"), (b - a for a, b in itertools.pairwise(marks)), strict=True)
    )
