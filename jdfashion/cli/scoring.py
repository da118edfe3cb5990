"""``validate``, ``score`` and ``show``: check a submission file, score it, look at it."""

from __future__ import annotations

import json
from pathlib import Path

import click

from jdfashion.cli.common import (
    console,
    data_option,
    fail_on_value_errors,
)


@click.command()
@click.argument("submission", type=click.Path(exists=True, path_type=Path))
@click.option("--queries", type=click.Path(exists=True, path_type=Path), required=True, help="q_all.txt")
@click.option("--gallery", type=click.Path(exists=True, path_type=Path), required=True, help="s.txt")
@fail_on_value_errors
def validate(submission: Path, queries: Path, gallery: Path) -> None:
    """List every problem of a submission file, with line numbers."""
    from jdfashion.data.jdformat import read_images
    from jdfashion.submission import validate_submission

    problems = validate_submission(
        submission, [r.url for r in read_images(queries)], {r.url for r in read_images(gallery)}
    )
    for problem in problems:
        console.print(f"{submission}:{problem.line}: {problem.message}", markup=False, soft_wrap=True)
    if problems:
        raise click.ClickException(f"{len(problems)} problem(s): the organisers would reject this file")
    console.print(f"[green]{submission} is a valid submission[/]")


@click.command()
@click.argument("submission", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--truth", type=click.Path(exists=True, path_type=Path), required=True, help="Ground truth (gt.txt)."
)
@click.option(
    "--ap-norm",
    type=click.Choice(["min", "truth", "hits"]),
    default="min",
    show_default=True,
    help="AP@10 divisor: min(|T|,10) (docs/METHOD.md), |T|, or hits in the top 10.",
)
@click.option(
    "--categories",
    "categories_path",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Optional p-format or 'url category' file for per-category rows.",
)
@click.option("--json", "as_json", is_flag=True)
@fail_on_value_errors
def score(submission: Path, truth: Path, ap_norm: str, categories_path: Path | None, as_json: bool) -> None:
    """rank-1 and mAP@10 of a submission against a ground-truth file."""
    from jdfashion.data.jdformat import read_truth
    from jdfashion.metrics import evaluate, scores_table
    from jdfashion.paths import fixing_command
    from jdfashion.submission import read_submission

    categories = read_query_categories(categories_path) if categories_path else None
    relevant = read_truth(truth)
    if not relevant:
        fix = fixing_command(truth) or "jdfashion data import-manifest YOUR.csv --out DATA"
        raise click.ClickException(f"{truth}: lists no queries; write the test truth: {fix}")
    scores = evaluate(read_submission(submission), relevant, ap_norm=ap_norm, categories=categories)
    if as_json:
        click.echo(json.dumps(scores.to_dict(), indent=1))
    else:
        console.print(scores_table(scores, title=str(submission)))


def read_query_categories(path: Path) -> dict[str, str]:
    """``url category`` per line (category as 0/1/2 or a name)."""
    from jdfashion.data.jdformat import Category, FormatError

    categories = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            fields = line.split()
            if len(fields) != 2:
                raise FormatError(
                    path, number, "field count", f"expected 'url category', got {len(fields)} fields"
                )
            try:
                categories[fields[0]] = Category.parse(fields[1]).label
            except ValueError as error:
                raise FormatError(path, number, "category", str(error)) from error
    return categories


@click.command()
@click.argument("submission", type=click.Path(exists=True, path_type=Path))
@data_option
@click.option(
    "--truth",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Default: DATA/gt.txt if present.",
)
@click.option("--out", type=click.Path(path_type=Path), default=Path("sheet.png"), show_default=True)
@click.option("--queries", "max_queries", default=8, show_default=True)
@fail_on_value_errors
def show(submission: Path, data_root: Path, truth: Path | None, out: Path, max_queries: int) -> None:
    """A PNG + HTML sheet of queries and their top 10, matches framed green, misses red."""
    from jdfashion.data.jdformat import read_images, read_truth
    from jdfashion.paths import DataLayout
    from jdfashion.report import render_sheet
    from jdfashion.submission import read_submission

    layout = DataLayout(data_root)
    truth = truth or (layout.truth if layout.truth.exists() else None)
    ranked = read_submission(submission)
    queries = [ref for ref in read_images(layout.queries) if ref.url in ranked]
    gallery = {ref.url: ref for ref in read_images(layout.gallery)}
    render_sheet(
        queries,
        ranked,
        read_truth(truth) if truth else None,
        gallery,
        layout.images,
        out,
        out.with_suffix(".html"),
        max_queries=max_queries,
    )
    console.print(f"[green]wrote[/] {out} and {out.with_suffix('.html')}")
