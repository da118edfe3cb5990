"""The Grocery Store protocol (docs/REALDATA.md): every results-table row from one call, each rerunnable.

Real photos of real products test what the generated demo data cannot: whether training adds anything
to the pretrained network it starts from, and whether the MGPA branches help, on identities never
seen in training. ``protocol`` builds the lists (images read in place through ``file://`` URLs),
``rows`` defines and runs each row, ``table`` holds the results and renders them.

CPU time counts this process and the DataLoader workers it has reaped (``os.times``), because on two
cores the workers' decoding is a real share of the cost that ``time.process_time`` alone would hide.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from jdfashion.atomic import atomic_write_text
from jdfashion.options import RetrievalOptions, RotationSide
from jdfashion.realdata.protocol import Protocol, build_protocol, build_rotated_queries
from jdfashion.realdata.rows import (
    DEFAULT_ROWS,
    LOADER_WORKERS,
    MIN_IMAGE_SIZE,
    ROWS,
    SMOKE_ROWS,
    SMOKE_TRAIN_PHOTOS,
    RowKind,
    RowSpec,
    RunSettings,
    train_config,
)
from jdfashion.realdata.run import fused_row, histogram_row, model_row
from jdfashion.realdata.steps import measure_step_times
from jdfashion.realdata.table import RealDataReport, RowResult, StepTimes

__all__ = ["ROWS", "Protocol", "RealDataReport", "RowResult", "StepTimes", "run_real_protocol"]
RESULTS_NAME = "REALDATA-results"


def run_real_protocol(
    dataset: Path,
    out: Path,
    *,
    smoke: bool = False,
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int | None = None,
    image_size: int | None = None,
    rows: Sequence[str] | None = None,
    max_queries: int | None = None,
    max_train_photos: int | None = None,
    time_steps: bool = True,
    show_progress: bool = True,
    rotation: bool = True,
    rotation_side: RotationSide = "query",
    console: Console | None = None,
) -> RealDataReport:
    """Build the split, run each row, write ``out/REALDATA-results.md`` and ``.json``.

    ``smoke`` runs one seed, :data:`SMOKE_ROWS`, one epoch, 128 px and fewer training photos (the CI
    check); otherwise :data:`DEFAULT_ROWS`. ``rows`` (re)runs named rows instead (see :data:`ROWS`);
    rows already in ``out``'s results with the same settings are kept in the table. ``max_queries``
    thins test and validation queries and ``max_train_photos`` the training photos per identity
    (tests and smoke). ``rotation`` also scores every model row on the test queries turned by seeded
    angles, and both query sets with rotation TTA on ``rotation_side``.
    """
    console = console or Console()
    seeds = tuple(seeds)[:1] if smoke else tuple(seeds)
    names = list(rows) if rows else list(SMOKE_ROWS if smoke else DEFAULT_ROWS)
    unknown = [name for name in names if name not in ROWS]
    if unknown:
        raise ValueError(f"unknown rows {', '.join(unknown)}; known: {', '.join(ROWS)}")
    if not seeds:
        raise ValueError("give at least one seed")
    if image_size is not None and image_size < MIN_IMAGE_SIZE:
        raise ValueError(
            f"image_size must be >= {MIN_IMAGE_SIZE} (8x8 maps: 3-way parts and rings are regions), "
            f"got {image_size}"
        )
    if epochs is not None and epochs < 1:
        raise ValueError(f"epochs must be >= 1 (frozen rows train 0 epochs anyway), got {epochs}")
    if smoke and max_train_photos is None:
        max_train_photos = SMOKE_TRAIN_PHOTOS
    dataset, out = Path(dataset), Path(out)
    if not (dataset / "classes.csv").is_file():
        raise FileNotFoundError(f"{dataset / 'classes.csv'}: not the Grocery Store dataset/ folder")

    settings = RunSettings(
        out,
        seeds,
        epochs,
        image_size,
        smoke,
        RetrievalOptions(num_workers=LOADER_WORKERS, show_progress=show_progress),
        rotation,
        rotation_side,
    )
    protocol = build_protocol(dataset, settings.data_root, max_queries, max_train_photos)
    if rotation:
        build_rotated_queries(settings.data_root)
    console.print(
        f"protocol: {protocol.train_identities} training identities, {protocol.val_identities} validation; "
        f"test {protocol.test_queries} queries x {protocol.test_gallery} gallery"
    )
    runners: dict[RowKind, Callable[[RowSpec], RowResult]] = {
        "histogram": lambda spec: histogram_row(spec, settings),
        "model": lambda spec: model_row(spec, settings, console),
        "fused": lambda spec: fused_row(spec, settings, console),
    }
    recorded = {
        "smoke": smoke,
        "seeds": list(seeds),
        "epochs": epochs,
        "image_size": image_size,
        "max_queries": max_queries,
        "max_train_photos": max_train_photos,
        "rotation": rotation,
        "rotation_side": rotation_side,
        "command": _command(dataset, out, smoke, seeds, epochs, image_size, rows, rotation, rotation_side),
    }
    previous = _previous_rows(out, recorded)
    step_times = None
    if time_steps:
        tuned = ROWS["lite0-tuned-all"]
        config = train_config(tuned, seeds[0], settings.epochs_for(tuned), settings.size_for(tuned))
        step_times = measure_step_times(config, settings.data_root, batches=2 if smoke else 4, row=tuned.name)
    report = RealDataReport(protocol, [], recorded, step_times)
    for name in names:
        previous[name] = runners[ROWS[name].kind](ROWS[name])
        console.print(f"[bold]{name}[/] done")
        # Written after every row: a long run that is stopped still leaves the rows it finished.
        report.rows = [previous[row] for row in ROWS if row in previous]
        atomic_write_text(out / f"{RESULTS_NAME}.json", json.dumps(report.to_dict(), indent=1))
        atomic_write_text(out / f"{RESULTS_NAME}.md", report.to_markdown())
    return report


def _previous_rows(out: Path, settings: dict[str, Any]) -> dict[str, RowResult]:
    """Rows of an earlier run into ``out`` with equal settings, so a one-row rerun keeps the table whole."""
    path = out / f"{RESULTS_NAME}.json"
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text())
    same = all(
        earlier["settings"].get(key) == settings[key]
        for key in (
            "smoke",
            "epochs",
            "image_size",
            "max_queries",
            "max_train_photos",
            "rotation",
            "rotation_side",
        )
    )
    return {row["name"]: RowResult.from_dict(row) for row in earlier["rows"]} if same else {}


def _command(
    dataset: Path,
    out: Path,
    smoke: bool,
    seeds: Sequence[int],
    epochs: int | None,
    image_size: int | None,
    rows: Sequence[str] | None,
    rotation: bool,
    rotation_side: str,
) -> str:
    parts = ["jdfashion bench real", f"--dataset {dataset}", f"--out {out}"]
    parts += ["--smoke"] if smoke else [f"--seeds {','.join(map(str, seeds))}"]
    parts += [f"--epochs {epochs}"] if epochs else []
    parts += [f"--image-size {image_size}"] if image_size else []
    parts += [f"--rows {','.join(rows)}"] if rows else []
    parts += [] if rotation else ["--no-rotation"]
    parts += [f"--rotation-side {rotation_side}"] if rotation and rotation_side != "query" else []
    return " ".join(parts)
