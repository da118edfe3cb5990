"""``jdfashion bench real``: build the protocol, run each row, write the table (one call, each row
rerunnable)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from jdfashion.atomic import atomic_write_text
from jdfashion.options import RetrievalOptions
from jdfashion.realdata.protocol import build_protocol, build_rotated_queries
from jdfashion.realdata.rows import (
    DEFAULT_ROWS,
    LOADER_WORKERS,
    ROWS,
    SMOKE_ROWS,
    SMOKE_TRAIN_PHOTOS,
    RowKind,
    RowSpec,
    RunSettings,
    train_config,
)
from jdfashion.realdata.run import fused_row, histogram_row, model_row
from jdfashion.realdata.settings import RESULT_SETTINGS, RealRun
from jdfashion.realdata.steps import measure_step_times
from jdfashion.realdata.table import RealDataReport, RowResult

RESULTS_NAME = "REALDATA-results"


def run_real_protocol(run: RealRun, console: Console | None = None) -> RealDataReport:
    """Build the split, run each row, write ``out/REALDATA-results.md`` and ``.json``.

    ``smoke`` runs one seed, :data:`SMOKE_ROWS`, one epoch, 128 px and fewer training photos (the CI
    check); otherwise :data:`DEFAULT_ROWS`. ``rows`` (re)runs named rows instead (see :data:`ROWS`);
    rows already in ``out``'s results with the same settings are kept in the table. ``rotation``
    also scores every model row on the test queries turned by seeded angles, and both query sets with
    rotation TTA on ``rotation_side``.
    """
    console = console or Console()
    if run.smoke:
        run = dataclasses.replace(
            run, seeds=run.seeds[:1], max_train_photos=run.max_train_photos or SMOKE_TRAIN_PHOTOS
        )
    names = list(run.rows or (SMOKE_ROWS if run.smoke else DEFAULT_ROWS))
    dataset, out = run.dataset, run.out
    if not (dataset / "classes.csv").is_file():
        raise FileNotFoundError(f"{dataset / 'classes.csv'}: not the Grocery Store dataset/ folder")
    settings = RunSettings(run, RetrievalOptions(num_workers=LOADER_WORKERS, show_progress=run.show_progress))
    protocol = build_protocol(dataset, settings.data_root, run.max_queries, run.max_train_photos)
    if run.rotation:
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
    recorded = run.record(settings.options)
    previous = _previous_rows(out, recorded)
    step_times = None
    if run.time_steps:
        tuned = ROWS["lite0-tuned-all"]
        config = train_config(tuned, run.seeds[0], settings.epochs_for(tuned), settings.size_for(tuned))
        step_times = measure_step_times(
            config, settings.data_root, batches=2 if run.smoke else 4, row=tuned.name
        )
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
    same = all(earlier["settings"].get(key) == settings[key] for key in RESULT_SETTINGS)
    return {row["name"]: RowResult.from_dict(row) for row in earlier["rows"]} if same else {}
