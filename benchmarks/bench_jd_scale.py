"""Extraction hours for the real JD test set: the card's four backbones at the paper's 384 px.

The challenge's test lists hold 154,294 gallery images and 1,000 queries, to be extracted once per
backbone (ResNet-101, ResNet-152, ResNeXt-101, DenseNet-169). This script measures each backbone's
MGPA extraction rate (``FeatureCache.extract``, randomly initialised, on generated demo photos) on
whatever device is present (CUDA with AMP and channels_last when there is one, else this CPU) and
turns it into device-hours for the full test set. Named baseline: the plain timm loop of the same
backbone (stock model, PIL from disk, timm transform; autocast on CUDA, as a user would write it), in
the same run. Each variant runs once, in a fresh process, after one warm-up batch.

On a GPU machine, ``nox -s benchmarks -- jd_scale`` gives the GPU-hour figure the README quotes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from bench_extraction import ExtractionSize, prepare, run_cache, run_timm_disk
from common import Column, isolated, machine_info, parse_args, write_results

JD_TEST_IMAGES = 154_294 + 1_000  # gallery + queries of the final test lists (docs/METHOD.md)
BACKBONES = ("resnet101", "resnet152", "resnext101", "densenet169")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cpu = device == "cpu"
    image_size, photo_size = (96, 128) if args.quick else (384, 512)
    batch_size = 4 if args.quick or cpu else 64
    # 30 demo images on a CPU (about a minute per backbone at 384 px), 660 on a GPU
    identities, distractors = (2, 2) if args.quick or cpu else (40, 60)
    rows = []
    for backbone in BACKBONES[:1] if args.quick else BACKBONES:
        size = ExtractionSize(backbone, image_size, batch_size, identities, distractors, photo_size)
        with tempfile.TemporaryDirectory(prefix="jdfashion-bench-jd-scale-") as scratch:
            workspace = prepare(size, Path(scratch))
            print(
                f"{backbone}: MGPA extraction and plain loop on {len(workspace.refs)} images ...", flush=True
            )
            mgpa, mgpa_rss = isolated(run_cache, size, workspace, 2, 0.0, device, flush_denormal=True)
            plain, _ = isolated(run_timm_disk, size, workspace, device, flush_denormal=True)
        rate = mgpa["images"] / mgpa["seconds"]
        plain_rate = plain["images"] / plain["seconds"]
        rows.append(
            {
                "backbone": backbone,
                "images": mgpa["images"],
                "images_per_second": rate,
                "plain_images_per_second": plain_rate,
                "vs_plain_loop": rate / plain_rate,
                "hours": JD_TEST_IMAGES / rate / 3600,
                "peak_rss_mib": mgpa_rss,
            }
        )
    total = sum(row["hours"] for row in rows)
    rows.append({"backbone": "all four", "hours": total})
    columns = [
        Column("backbone", "backbone"),
        Column("images", "images timed"),
        Column("images_per_second", "MGPA extract images/s", ".2f"),
        Column("plain_images_per_second", "plain timm loop images/s", ".2f"),
        Column("vs_plain_loop", "rate / plain loop", ".2f"),
        Column("hours", f"{device} hours for {JD_TEST_IMAGES:,} images", ",.1f"),
        Column("peak_rss_mib", "peak RSS MiB", ",.0f"),
    ]
    hardware = torch.cuda.get_device_name() if not cpu else "CPU"
    notes = [
        f"Device: {hardware}. {image_size} px, batch {batch_size}, random weights, 16 parts, fp16 cache; "
        f"demo photos of {photo_size} px (JD photos are larger: decoding costs more there).",
        "Hours = 155,294 / the measured rate; a machine with N such devices under "
        "`torchrun --nproc_per_node N -m jdfashion extract` divides them by N (the cache's chunks are "
        "split over the processes; see the README).",
        "On a CPU only about 30 images per backbone are timed, so CPU figures are rough.",
    ]
    write_results(
        "jd_scale",
        "Extraction time for the JD test set at 384 px",
        columns,
        rows,
        quick=args.quick,
        machine=machine_info(),
        parameters={"device": device, "image_size": image_size, "batch_size": batch_size},
        notes=notes,
    )


if __name__ == "__main__":
    main()
