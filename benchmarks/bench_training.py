"""Training images/s on CPU: the MGPA network against the same backbone with one global-pooling classifier.

Both variants run through the same loop (``jdfashion.train.train``) on the same generated demo
data, the same PK batches (P=4 identities x K=2 images), the same stride-1 backbone and the same
augmentation: only the head differs. MGPA (``branches="all"``) pools 16 parts, each with its own
256-d reduction, BatchNorm and classifier; the baseline (``branches="global"``) has one such part,
a plain global-pooling classifier. Their rate ratio is the cost of the multi-part head.

The rate is measured from the loop's ``on_step`` callbacks and leaves out each epoch's first step
(DataLoader start-up, first-call allocations), so it is the steady training rate.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from common import Column, isolated, machine_info, parse_args, write_results

from jdfashion.config import TrainConfig
from jdfashion.data.demo import DemoConfig, make_demo
from jdfashion.data.split import make_split
from jdfashion.model.partition import BRANCH_SETS
from jdfashion.train import train

HEADS = {"all": "MGPA, 16 parts", "global": "global pooling (baseline)"}


@dataclass(frozen=True)
class TrainingSize:
    backbones: tuple[str, ...]
    image_sizes: tuple[int, ...]
    epochs_by_size: tuple[int, ...]  # per image size: enough timed steps at small sizes, few at large
    train_identities: int
    photo_size: int
    identities_per_batch: int = 4
    images_per_identity: int = 2
    num_workers: int = 2


FULL = TrainingSize(
    backbones=("resnet50", "efficientnet_lite0"),
    image_sizes=(128, 384),
    epochs_by_size=(3, 1),
    train_identities=24,
    photo_size=256,
)
QUICK = TrainingSize(
    backbones=("resnet50",), image_sizes=(64,), epochs_by_size=(2,), train_identities=16, photo_size=96
)


def run_training(config: TrainConfig, data_root: Path, weights_root: Path) -> dict[str, Any]:
    """Train once, recording when each step ended; steady images/s from the steps after each epoch's first."""
    step_ends: list[tuple[int, float]] = []
    result = train(
        config,
        data_root,
        weights_root,
        show_progress=False,
        on_step=lambda epoch, _: step_ends.append((epoch, time.perf_counter())),
    )
    intervals = [
        later - earlier
        for (epoch, earlier), (later_epoch, later) in itertools.pairwise(step_ends)
        if epoch == later_epoch
    ]
    batch = config.identities_per_batch * config.images_per_identity
    return {
        "steps": len(step_ends),
        "timed_steps": len(intervals),
        "batch": batch,
        "seconds_per_step": float(np.mean(intervals)),
        "step_spread": float(np.std(intervals) / np.mean(intervals)),
        "images_per_second": batch * len(intervals) / sum(intervals),
        "last_epoch_images_per_second": result.metrics[-1]["images_per_second"],
        "parts": result.model.num_parts,
    }


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    size = QUICK if args.quick else FULL
    machine = machine_info()
    rows = []
    with tempfile.TemporaryDirectory(prefix="jdfashion-bench-training-") as scratch:
        data = Path(scratch) / "data"
        demo = make_demo(
            data,
            DemoConfig(train_identities=size.train_identities, test_identities=2, image_size=size.photo_size),
        )
        make_split(demo.layout.pairs, demo.layout)
        for backbone in size.backbones:
            for image_size, epochs in zip(size.image_sizes, size.epochs_by_size, strict=True):
                rates = {}
                for branches in HEADS:
                    config = TrainConfig(
                        backbone=backbone,
                        branches=branches,
                        image_size=image_size,
                        epochs=epochs,
                        identities_per_batch=size.identities_per_batch,
                        images_per_identity=size.images_per_identity,
                        num_workers=size.num_workers,
                    )
                    print(f"training {backbone} {image_size} px, branches {branches} ...", flush=True)
                    weights = Path(scratch) / f"weights-{backbone}-{image_size}-{branches}"
                    result, peak_rss = isolated(run_training, config, data, weights, flush_denormal=True)
                    rates[branches] = result["images_per_second"]
                    rows.append(
                        {
                            "backbone": backbone,
                            "image_size": image_size,
                            "head": HEADS[branches],
                            **result,
                            "peak_rss_mib": peak_rss,
                        }
                    )
                rows[-2]["vs_baseline"] = rates["all"] / rates["global"]
                rows[-1]["vs_baseline"] = 1.0
    columns = [
        Column("backbone", "backbone"),
        Column("image_size", "px"),
        Column("head", "head"),
        Column("parts", "parts"),
        Column("timed_steps", "timed steps"),
        Column("seconds_per_step", "s/step", ".2f"),
        Column("step_spread", "step time CV", ".0%"),
        Column("images_per_second", "images/s", ".2f"),
        Column("vs_baseline", "rate / baseline", ".2f"),
        Column("last_epoch_images_per_second", "epoch images/s (with first step)", ".2f"),
        Column("peak_rss_mib", "peak RSS MiB", ",.0f"),
    ]
    notes = [
        f"Batch {size.identities_per_batch}x{size.images_per_identity} = "
        f"{size.identities_per_batch * size.images_per_identity} images; random weights, Adam, 'paper' "
        f"augmentation, {size.num_workers} DataLoader workers, CPU, {machine['threads']} compute "
        f"threads, fp32 (AMP is CUDA only); MGPA branches: {', '.join(BRANCH_SETS['all'])}.",
        f"Demo data: {size.train_identities} training identities per category ({size.photo_size} px "
        f"photos), clothes model; epochs per image size "
        f"{dict(zip(size.image_sizes, size.epochs_by_size, strict=True))}. Few steps are timed: the step "
        "time CV (std / mean over the timed steps) says how far to trust a rate.",
        "Each variant ran in a fresh process with torch.set_flush_denormal(True) (random weights produce "
        "denormals that slow CPU arithmetic by an input-dependent factor).",
    ]
    write_results(
        "training",
        "Training rate on CPU: MGPA head vs global-pooling baseline",
        columns,
        rows,
        quick=args.quick,
        machine=machine,
        parameters=asdict(size),
        notes=notes,
    )


if __name__ == "__main__":
    main()
