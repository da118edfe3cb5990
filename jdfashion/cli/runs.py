"""``quickstart`` and ``bench real``: whole runs, on the demo data and on the Grocery protocol."""

from __future__ import annotations

from pathlib import Path

import click

from jdfashion.cli.common import (
    console,
    device_option,
    fail_on_value_errors,
)


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
@click.option(
    "--dataset",
    type=click.Path(exists=True, path_type=Path),
    default=Path("../shared/data/grocery-store/dataset"),
    show_default=True,
    help="The Grocery Store dataset folder (read in place).",
)
@click.option("--out", type=click.Path(path_type=Path), default=Path("runs/real"), show_default=True)
@click.option("--smoke", is_flag=True, help="One seed, few rows and epochs, tiny images (the CI check).")
@click.option("--seeds", default="0,1,2", show_default=True, help="Seeds for the repeated rows.")
@click.option("--epochs", type=int, default=None, help="Override every row's epochs.")
@click.option("--image-size", type=int, default=None, help="Override every row's image size.")
@click.option("--rows", default=None, help="Comma list of row names to (re)run; see docs/REALDATA.md.")
@click.option(
    "--rotation/--no-rotation",
    default=True,
    show_default=True,
    help="Also score rotated test queries, and both query sets with rotation TTA.",
)
@click.option(
    "--rotation-side",
    type=click.Choice(["query", "gallery"]),
    default="query",
    show_default=True,
    help="Whose images rotation TTA turns (docs/REALDATA.md measures both).",
)
@fail_on_value_errors
def bench_real(dataset, out, smoke, seeds, epochs, image_size, rows, rotation, rotation_side) -> None:
    """The Grocery Store protocol: histogram, MGPA branch ablation, frozen vs trained, tuned fusion,
    upright and rotated queries."""
    from jdfashion.realdata import run_real_protocol

    run_real_protocol(
        dataset,
        out,
        smoke=smoke,
        seeds=tuple(int(s) for s in seeds.split(",")),
        epochs=epochs,
        image_size=image_size,
        rows=rows.split(",") if rows else None,
        rotation=rotation,
        rotation_side=rotation_side,
        console=console,
    )
