"""``quickstart`` and ``bench real``: whole runs, on the demo data and on the Grocery protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from jdfashion.cli.common import (
    console,
    device_option,
    fail_on_value_errors,
)
from jdfashion.realdata.settings import RealRun
from jdfashion.settings import click_options, from_options


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo"), show_default=True)
@click.option("--team", default="demo", show_default=True)
@device_option
@fail_on_value_errors
def quickstart(out: Path, team: str, device: str | None) -> None:
    """The whole chain on generated demo data: data, split, train, extract, fuse, submit, score, show."""
    from jdfashion.quickstart import run_quickstart

    run_quickstart(out, team=team, device=device, console=console)


@click.group()
def bench() -> None:
    """Measured evaluations on real data."""


@bench.command("real")
@click_options(RealRun)
@fail_on_value_errors
def bench_real(**flags: Any) -> None:
    """The Grocery Store protocol: histogram, MGPA branch ablation, frozen vs trained, tuned fusion,
    upright and rotated queries."""
    from jdfashion.realdata.bench import run_real_protocol

    run_real_protocol(from_options(RealRun, flags), console=console)
