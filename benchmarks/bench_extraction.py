"""Feature extraction images/s on CPU: jdfashion's FeatureCache.extract against plain timm forward loops.

The model is a randomly initialised MGPA (resnet50, 16 parts) saved by a 0-epoch ``train`` run, at
128 px (64 px with ``--quick``); the images are generated demo photos (query and gallery lists).
Variants, each in a fresh process, each after one warm-up batch, in interleaved rounds
(``--repeats``, default 3):

* jdfashion ``FeatureCache.extract`` with its default 2 DataLoader workers, and with 0 (decoding in
  the main process, like the plain loop): decode, box crop, resize, MGPA forward, fp16 cache write;
* plain timm loop from disk: the stock timm resnet50 (global pooling, 32x downsampling), images
  read with PIL, box-cropped and transformed by timm's ``create_transform``, one batch at a time;
* plain timm forward on the same images preloaded as tensors: the network alone;
* the MGPA model forward on preloaded tensors, channels_last as extraction runs it: the network
  alone, with the stride-1 last stage and the part head, so the pipeline's cost and the model's
  cost can be told apart;
* jdfashion ``FeatureCache.extract`` of one rotated view (rotation TTA: every extra angle is one more
  extraction of that side, plus the in-plane rotation of each image);
* jdfashion ``FeatureCache.extract`` with deskew (``--deskew-queries``: each image's tilt read from its
  edges and turned back at source resolution before the resize);
* jdfashion ``FeatureCache.extract`` through ONNX Runtime (``--runtime onnxruntime``, the model's
  ``jdfashion export``) in fp32 and int8 (``export --int8``), and ONNX Runtime's forward alone on the
  preloaded tensors: fp32 with every graph optimisation (what the runtime uses), fp32 with the basic
  ones only, and int8, so each step's share of the gain is visible.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from common import Column, isolated, machine_info, parse_args, write_results
from PIL import Image
from timm.data import create_transform

from jdfashion.checkpoint import load_trained
from jdfashion.config import TrainConfig
from jdfashion.data.demo import DemoConfig, make_demo
from jdfashion.data.images import url_to_path
from jdfashion.data.jdformat import ImageRef, read_images
from jdfashion.data.split import make_split
from jdfashion.export import (
    CALIBRATION_IMAGES,
    GraphOptimisation,
    OnnxInfo,
    check_batch,
    export_onnx,
    onnx_paths,
    open_session,
    quantize_onnx,
    run_session,
)
from jdfashion.features import ExtractOptions, FeatureCache
from jdfashion.model.backbones import timm_name_for
from jdfashion.options import ExportedRuntime, Runtime
from jdfashion.paths import DataLayout
from jdfashion.train import train


@dataclass(frozen=True)
class ExtractionSize:
    backbone: str
    image_size: int
    batch_size: int
    test_identities: int
    distractors: int
    photo_size: int


FULL = ExtractionSize(
    "resnet50", image_size=128, batch_size=64, test_identities=40, distractors=60, photo_size=256
)
QUICK = ExtractionSize(
    "resnet50", image_size=64, batch_size=16, test_identities=4, distractors=4, photo_size=96
)


@dataclass(frozen=True)
class Workspace:
    model_dir: Path
    image_root: Path
    refs: tuple[ImageRef, ...]
    scratch: Path
    exports: dict[str, OnnxInfo]


def prepare(size: ExtractionSize, root: Path) -> Workspace:
    """Demo photos, a split, and an untrained MGPA saved the way ``train`` saves every model."""
    data = root / "data"
    demo = make_demo(
        data,
        DemoConfig(
            train_identities=8,
            test_identities=size.test_identities,
            distractors=size.distractors,
            image_size=size.photo_size,
        ),
    )
    make_split(demo.layout.pairs, demo.layout)
    config = TrainConfig(
        backbone=size.backbone, image_size=size.image_size, epochs=0, identities_per_batch=4, num_workers=0
    )
    model_dir = train(config, data, root / "weights", show_progress=False).directory
    layout = DataLayout(data)
    refs = tuple(read_images(layout.queries)) + tuple(read_images(layout.gallery))
    # The exports every ONNX Runtime variant reads, as ``jdfashion export [--int8]`` writes them.
    trained = load_trained(model_dir)
    exports = {"fp32": export_onnx(trained, check_batch(trained, refs, layout.images))}
    calibration = check_batch(trained, refs, layout.images, CALIBRATION_IMAGES)
    exports["int8"] = quantize_onnx(trained, calibration, check_batch(trained, refs[::-1], layout.images))
    return Workspace(model_dir, layout.images, refs, root / "scratch", exports)


def batches(items: Sequence[Any], batch_size: int) -> list[Sequence[Any]]:
    return [items[start : start + batch_size] for start in range(0, len(items), batch_size)]


def run_cache(
    size: ExtractionSize,
    workspace: Workspace,
    num_workers: int,
    rotation: float = 0.0,
    device: str = "cpu",
    deskew: bool = False,
    runtime: Runtime = "torch",
) -> dict[str, Any]:
    """Into a fresh folder each call: a cache left by an earlier round would be read, not computed."""
    trained = load_trained(workspace.model_dir, device)
    workspace.scratch.mkdir(parents=True, exist_ok=True)
    cache_root = Path(tempfile.mkdtemp(prefix="cache-", dir=workspace.scratch))
    options = ExtractOptions(
        batch_size=size.batch_size,
        num_workers=num_workers,
        show_progress=False,
        rotation=rotation,
        deskew=deskew,
        runtime=runtime,
    )
    FeatureCache(cache_root / "warm-up").extract(
        trained, workspace.refs[: size.batch_size], workspace.image_root, options
    )
    started = time.perf_counter()
    features = FeatureCache(cache_root / "timed").extract(
        trained, workspace.refs, workspace.image_root, options
    )
    seconds = time.perf_counter() - started
    shutil.rmtree(cache_root)
    return {"images": len(features), "seconds": seconds, "dim": features.features.shape[1]}


def run_cache_deskewed(size: ExtractionSize, workspace: Workspace, num_workers: int) -> dict[str, Any]:
    return run_cache(size, workspace, num_workers, deskew=True)


def run_cache_exported(
    size: ExtractionSize, workspace: Workspace, num_workers: int, runtime: Runtime
) -> dict[str, Any]:
    return run_cache(size, workspace, num_workers, runtime=runtime)


def run_onnx_tensors(
    size: ExtractionSize, workspace: Workspace, runtime: ExportedRuntime, optimisation: GraphOptimisation
) -> dict[str, Any]:
    """ONNX Runtime's forward alone, on the same preloaded tensors as the PyTorch forward rows."""
    session = open_session(onnx_paths(workspace.model_dir, runtime)[0], optimisation=optimisation)
    return forward_preloaded(lambda images: run_session(session, images), size, workspace)


def plain_timm_model(size: ExtractionSize) -> torch.nn.Module:
    return timm.create_model(timm_name_for(size.backbone), pretrained=False, num_classes=0).eval()


def read_plain(refs: Sequence[ImageRef], image_root: Path, transform: Any) -> torch.Tensor:
    """What a plain loop does: open with PIL, crop the box, apply timm's eval transform, stack."""
    tensors = []
    for ref in refs:
        box = ref.box
        with Image.open(url_to_path(ref.url, image_root)) as image:
            crop = image.convert("RGB").crop((box.x1, box.y1, box.x2, box.y2))
        tensors.append(transform(crop))
    return torch.stack(tensors)


def plain_transform(size: ExtractionSize) -> Any:
    return create_transform(
        input_size=(3, size.image_size, size.image_size), crop_pct=1.0, interpolation="bilinear"
    )


def run_timm_disk(size: ExtractionSize, workspace: Workspace, device: str = "cpu") -> dict[str, Any]:
    """On CUDA with autocast, as a user would write it there."""
    model, transform = plain_timm_model(size).to(device), plain_transform(size)
    groups = batches(workspace.refs, size.batch_size)
    autocast = torch.autocast("cuda", dtype=torch.float16, enabled=device == "cuda")
    with torch.inference_mode(), autocast:
        model(read_plain(groups[0], workspace.image_root, transform).to(device))
        started = time.perf_counter()
        for group in groups:
            outputs = model(read_plain(group, workspace.image_root, transform).to(device))
        outputs = outputs.cpu()  # waits for the device
        seconds = time.perf_counter() - started
    return {"images": len(workspace.refs), "seconds": seconds, "dim": outputs.shape[1]}


def forward_preloaded(
    model: Callable[[torch.Tensor], torch.Tensor],
    size: ExtractionSize,
    workspace: Workspace,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> dict[str, Any]:
    """Images decoded before the clock starts; only the forward passes are timed."""
    transform = plain_transform(size)
    if isinstance(model, torch.nn.Module):
        model = model.to(memory_format=memory_format)
    inputs = [
        read_plain(group, workspace.image_root, transform).contiguous(memory_format=memory_format)
        for group in batches(workspace.refs, size.batch_size)
    ]
    with torch.inference_mode():
        model(inputs[0])
        started = time.perf_counter()
        for images in inputs:
            outputs = model(images)
        seconds = time.perf_counter() - started
    return {"images": len(workspace.refs), "seconds": seconds, "dim": outputs.shape[1]}


def run_timm_tensors(size: ExtractionSize, workspace: Workspace) -> dict[str, Any]:
    return forward_preloaded(plain_timm_model(size), size, workspace)


def run_mgpa_tensors(size: ExtractionSize, workspace: Workspace) -> dict[str, Any]:
    """In channels_last, as ``FeatureCache.extract`` runs it."""
    model = load_trained(workspace.model_dir).model
    return forward_preloaded(model, size, workspace, torch.channels_last)


PLAIN_LOOP = "plain timm {backbone} loop, PIL from disk"


def interleaved_rounds(
    variants: Sequence[tuple[str, Any, tuple[Any, ...]]],
    size: ExtractionSize,
    workspace: Workspace,
    repeats: int,
) -> dict[str, list[tuple[dict[str, Any], float]]]:
    """Every variant once per round, each round starting one variant later, so that a machine's drift
    (other work, thermal state, page cache) falls on every variant alike rather than on whichever runs
    first."""
    outcomes: dict[str, list[tuple[dict[str, Any], float]]] = {label: [] for label, _, _ in variants}
    for round_number in range(repeats):
        shift = round_number % len(variants)
        for label, function, extra in [*variants[shift:], *variants[:shift]]:
            print(f"round {round_number + 1}/{repeats}: {label} ...", flush=True)
            outcomes[label].append(isolated(function, size, workspace, *extra, flush_denormal=True))
    return outcomes


def summary_rows(
    outcomes: dict[str, list[tuple[dict[str, Any], float]]], baseline: str
) -> list[dict[str, Any]]:
    """Median images/s per variant and its range; the ratio to the baseline is the median of the
    per-round ratios (each against the baseline's run in the same round); peak RSS is the largest over
    the rounds, also as a ratio to the baseline's."""
    baseline_rates = [result["images"] / result["seconds"] for result, _ in outcomes[baseline]]
    baseline_rss = max(peak_rss for _, peak_rss in outcomes[baseline])
    rows = []
    for label, runs in outcomes.items():
        rates = [result["images"] / result["seconds"] for result, _ in runs]
        rows.append(
            {
                "variant": label,
                "images": runs[0][0]["images"],
                "seconds": statistics.median(result["seconds"] for result, _ in runs),
                "images_per_second": statistics.median(rates),
                "range": f"{min(rates):.1f}-{max(rates):.1f}",
                "vs_plain_loop": statistics.median(
                    rate / reference for rate, reference in zip(rates, baseline_rates, strict=True)
                ),
                "dim": runs[0][0]["dim"],
                "peak_rss_mib": max(peak_rss for _, peak_rss in runs),
                "rss_vs_plain_loop": max(peak_rss for _, peak_rss in runs) / baseline_rss,
            }
        )
    return rows


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], repeats=3)
    size = QUICK if args.quick else FULL
    machine = machine_info()
    plain_loop = PLAIN_LOOP.format(backbone=size.backbone)
    variants = [
        ("jdfashion FeatureCache.extract, 2 loader workers (default)", run_cache, (2,)),
        ("jdfashion FeatureCache.extract, 0 loader workers", run_cache, (0,)),
        (plain_loop, run_timm_disk, ()),
        (f"plain timm {size.backbone} forward, preloaded tensors", run_timm_tensors, ()),
        ("jdfashion MGPA model forward, preloaded tensors, channels_last", run_mgpa_tensors, ()),
        (
            "jdfashion FeatureCache.extract, 2 workers, one rotated view (45 deg, rotation TTA)",
            run_cache,
            (2, 45.0),
        ),
        ("jdfashion FeatureCache.extract, 2 workers, deskewed (--deskew-queries)", run_cache_deskewed, (2,)),
        (
            "jdfashion FeatureCache.extract, 2 workers, ONNX Runtime fp32 (--runtime onnxruntime)",
            run_cache_exported,
            (2, "onnxruntime"),
        ),
        (
            "jdfashion FeatureCache.extract, 2 workers, ONNX Runtime int8 (--runtime onnxruntime-int8)",
            run_cache_exported,
            (2, "onnxruntime-int8"),
        ),
        (
            "ONNX Runtime fp32 forward, preloaded tensors, all graph optimisations",
            run_onnx_tensors,
            ("onnxruntime", "all"),
        ),
        (
            "ONNX Runtime fp32 forward, preloaded tensors, basic graph optimisations",
            run_onnx_tensors,
            ("onnxruntime", "basic"),
        ),
        ("ONNX Runtime int8 forward, preloaded tensors", run_onnx_tensors, ("onnxruntime-int8", "all")),
    ]
    with tempfile.TemporaryDirectory(prefix="jdfashion-bench-extraction-") as scratch:
        workspace = prepare(size, Path(scratch))
        outcomes = interleaved_rounds(variants, size, workspace, args.repeats)
    fp32, int8 = workspace.exports["fp32"], workspace.exports["int8"]
    rows = summary_rows(outcomes, plain_loop)
    columns = [
        Column("variant", "variant"),
        Column("images", "images"),
        Column("seconds", "median s", ".2f"),
        Column("images_per_second", "images/s (median)", ".1f"),
        Column("range", "images/s range"),
        Column("vs_plain_loop", "rate / plain timm loop", ".2f"),
        Column("dim", "feature dim"),
        Column("peak_rss_mib", "peak RSS MiB", ",.0f"),
        Column("rss_vs_plain_loop", "peak RSS / plain timm loop", ".2f"),
    ]
    notes = [
        f"{args.repeats} interleaved round(s) of every variant, each round starting one variant later; "
        "medians and the range over rounds. The ratio is the median over rounds of the variant's rate "
        "over the plain timm loop's in the same round (the loop a user would otherwise write).",
        f"{size.backbone} at {size.image_size} px, batch {size.batch_size}, random weights, CPU, "
        f"{machine['threads']} compute threads; demo photos of {size.photo_size} px (smaller than "
        "JD's photos, so decoding costs less here than on the real data).",
        "The MGPA backbone keeps its last stage at stride 1 (4x the positions of the stock model there) "
        "and adds the 16-part head; the preloaded-tensor rows show what that costs apart from loading.",
        "jdfashion extracts in channels_last (model and batches; oneDNN's faster convolution layout on "
        "CPU, cuDNN's on GPU); the plain timm rows use timm's default contiguous layout, as a plain loop "
        "does.",
        "jdfashion timings include writing the fp16 cache chunk and its index; peak RSS is the main "
        "process's (DataLoader workers are separate processes).",
        "Every variant runs with torch.set_flush_denormal(True): with random weights, denormal "
        "activations made forwards up to 30x slower in a check here, by input rather than by model.",
        "Rotation TTA extracts one side once per angle: the rotated-view row is the cost of one extra "
        "angle (its rate / the default row's includes the in-plane rotation of every image).",
        "Deskew reads each image's edge directions at 256 px and turns it at source resolution (bicubic), "
        "in the loader workers: its rate / the default row's is its cost per image.",
        "ONNX Runtime runs the model's `jdfashion export` (opset 18, dynamic batch), with as many intra-op "
        "threads as torch; the export's features matched PyTorch's to a lowest cosine of "
        f"{fp32.min_cosine:.7f} over {fp32.checked_images} images. int8: {int8.quantization}; lowest "
        f"cosine {int8.min_cosine:.4f} (random weights here: retrieval quality is measured on real photos, "
        "docs/REALDATA.md, and `export --int8` keeps the file only where validation mAP@10 holds).",
    ]
    write_results(
        "extraction",
        "Feature extraction on CPU",
        columns,
        rows,
        quick=args.quick,
        machine=machine,
        parameters={**asdict(size), "images": len(workspace.refs), "repeats": args.repeats},
        notes=notes,
    )


if __name__ == "__main__":
    main()
