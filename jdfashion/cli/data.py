"""``jdfashion data ...``: get, check, import and split the image lists."""

from __future__ import annotations

from pathlib import Path

import click

from jdfashion.cli.common import (
    console,
    data_option,
    fail_on_value_errors,
)


@click.group()
def data() -> None:
    """Get, check and split the image lists."""


@data.command("demo")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--train-identities", default=24, show_default=True, help="Per category.")
@click.option("--test-identities", default=10, show_default=True, help="Per category.")
@click.option("--consumer-photos", default=3, show_default=True, help="Per identity.")
@click.option("--distractors", default=20, show_default=True, help="Extra shop images per category.")
@click.option("--image-size", default=160, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace list files that are not an earlier demo set.")
@fail_on_value_errors
def data_demo(out: Path, overwrite: bool, **sizes: int) -> None:
    """Generate the synthetic demo dataset in the official layout."""
    from jdfashion.data.demo import DemoConfig, make_demo

    summary = make_demo(out, DemoConfig(**sizes), overwrite=overwrite)
    console.print(f"demo data: {summary.images} images under {out}")


@data.command("split")
@data_option
@click.option("--val-fraction", default=0.2, show_default=True)
@click.option("--distractor-fraction", default=0.1, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--gallery-distractors/--no-gallery-distractors",
    default=False,
    help="Add s.txt images to every validation gallery.",
)
@fail_on_value_errors
def data_split(
    data_root: Path, val_fraction: float, distractor_fraction: float, seed: int, gallery_distractors: bool
) -> None:
    """Split p.txt into training pairs and per-category validation queries, gallery and truth."""
    from jdfashion.data.jdformat import read_images
    from jdfashion.data.split import make_split
    from jdfashion.paths import DataLayout

    layout = DataLayout(data_root)
    extra = read_images(layout.gallery) if gallery_distractors else None
    summary = make_split(layout.pairs, layout, val_fraction, distractor_fraction, seed, extra)
    console.print(summary.as_table())


@data.command("fetch")
@click.argument("lists", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--root", type=click.Path(path_type=Path), required=True, help="Image root (DATA/images).")
@click.option("--workers", default=8, show_default=True)
@click.option("--retries", default=3, show_default=True)
@click.option("--timeout", default=30.0, show_default=True)
@click.option(
    "--backoff", default=0.5, show_default=True, help="Seconds before the first retry; doubles each time."
)
@click.option("--failures", type=click.Path(path_type=Path), default=None, help="Default: ROOT/failures.txt.")
@click.option("--progress/--no-progress", default=True)
@fail_on_value_errors
def data_fetch(lists: tuple[Path, ...], root: Path, failures: Path | None, **settings) -> None:
    """Download the images of any p/q/s list files, resumably; exits 1 when any image could not be had."""
    from jdfashion.data.fetch import fetch, urls_from_lists

    failures = failures or root / "failures.txt"
    report = fetch(urls_from_lists(lists), root, failures_path=failures, **settings)
    console.print(
        f"ok {report.ok}  skipped {report.skipped}  failed {report.failed}  corrupt {report.corrupt}"
    )
    if report.failed or report.corrupt:
        raise click.ClickException(f"{report.failed + report.corrupt} image(s) missing: listed in {failures}")


@data.command("import-manifest")
@click.argument("manifest", type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True)
@fail_on_value_errors
def data_import_manifest(manifest: Path, out: Path) -> None:
    """Convert a CSV manifest (path,identity,domain,category[,role][,x1,y1,x2,y2]) to the official layout."""
    from jdfashion.data.manifest import import_manifest

    console.print(import_manifest(manifest, out).as_table())


@data.command("grocery")
@click.option(
    "--dataset",
    type=click.Path(exists=True, path_type=Path),
    required=True,
    help="grocery-store/dataset folder.",
)
@click.option("--out", type=click.Path(path_type=Path), required=True)
@fail_on_value_errors
def data_grocery(dataset: Path, out: Path) -> None:
    """Lay out the Grocery Store dataset (read in place) with the protocol of docs/REALDATA.md."""
    from jdfashion.data.manifest import grocery_manifest, import_manifest

    csv_path = out / "manifest.csv"
    grocery_manifest(dataset, csv_path)
    console.print(import_manifest(csv_path, out).as_table())
