"""``jdfashion quickstart``: the whole chain on generated demo data, sized to finish in minutes on a CPU."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from jdfashion.baseline import color_histogram_features
from jdfashion.config import TrainConfig
from jdfashion.data.demo import DemoConfig, make_demo
from jdfashion.data.jdformat import Category, read_images, read_truth
from jdfashion.data.split import make_split
from jdfashion.fusion import fusion_table
from jdfashion.metrics import Scores, evaluate, scores_table
from jdfashion.model.backbones import BACKBONE_PRESETS, DEFAULT_BACKBONE
from jdfashion.options import RetrievalOptions
from jdfashion.pipeline import compare_postprocessing, submit, tune_fusion
from jdfashion.report import render_sheet
from jdfashion.search import topk
from jdfashion.submission import read_submission, submission_filename, validate_submission, write_submission
from jdfashion.train import train
from jdfashion.workspace import Workspace

QUICK_BACKBONES = (DEFAULT_BACKBONE, "resnet18")
ROUTER_BACKBONE = DEFAULT_BACKBONE


@dataclass
class QuickstartSettings:
    """Small on purpose: the point is to exercise every stage, not to reach paper accuracy."""

    backbones: tuple[str, ...] = QUICK_BACKBONES
    image_size: int = 96
    epochs: int = 6
    identities_per_batch: int = 8
    demo: DemoConfig = field(default_factory=DemoConfig)


@dataclass
class Stopwatch:
    rows: list[tuple[str, float]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.rows.append((stage, now - self.started))
        self.started = now

    def table(self) -> Table:
        table = Table(title="quickstart stages")
        table.add_column("stage")
        table.add_column("seconds", justify="right")
        for stage, seconds in self.rows:
            table.add_row(stage, f"{seconds:.1f}")
        table.add_row("[bold]total", f"[bold]{sum(s for _, s in self.rows):.1f}")
        return table


def histogram_baseline(workspace: Workspace, team: str, out_dir: Path) -> Path:
    """Colour-histogram retrieval over the whole test gallery: the floor every learned model must beat."""
    queries = read_images(workspace.data.queries)
    gallery = read_images(workspace.data.gallery)
    query_features = color_histogram_features(queries, workspace.data.images).features
    gallery_features = color_histogram_features(gallery, workspace.data.images).features
    _, indices = topk(query_features, gallery_features, 10)
    ranked = {q.url: [gallery[i].url for i in row] for q, row in zip(queries, indices.tolist(), strict=True)}
    path = out_dir / submission_filename(team)
    write_submission(path, [q.url for q in queries], ranked, gallery={g.url for g in gallery})
    return path


def postprocessing_table(variants: dict[str, Scores]) -> Table:
    table = Table(title="fused, validation: re-ranking options (each alone)")
    for column in ("option", "rank-1", "mAP@10"):
        table.add_column(column, justify="left" if column == "option" else "right")
    for name, scores in variants.items():
        table.add_row(name, f"{scores.overall.rank1:.2%}", f"{scores.overall.map:.4f}")
    return table


def score_on_test(workspace: Workspace, submission: Path) -> Scores:
    truth = read_truth(workspace.data.truth)
    return evaluate(read_submission(submission), truth)


def run_quickstart(
    out: Path,
    *,
    team: str = "demo",
    device: str | None = None,
    settings: QuickstartSettings | None = None,
    console: Console | None = None,
) -> Scores:
    settings = settings or QuickstartSettings()
    console = console or Console()
    clock = Stopwatch()
    workspace = Workspace.at(out / "data", out / "weights", device)
    submissions = out / "submissions"

    make_demo(workspace.data.root, settings.demo)
    split = make_split(
        workspace.data.pairs,
        workspace.data,
        seed=settings.demo.seed,
        extra_distractors=read_images(workspace.data.gallery),  # other items: a realistic gallery size
    )
    console.print(split.as_table())
    clock.lap("demo data + split")

    baseline = score_on_test(workspace, histogram_baseline(workspace, f"{team}-histogram", submissions))
    console.print(scores_table(baseline, title="colour-histogram baseline, test"))
    clock.lap("colour-histogram baseline")

    common = {
        "image_size": settings.image_size,
        "epochs": settings.epochs,
        "identities_per_batch": settings.identities_per_batch,
        "warmup_epochs": 1,
        "lr": 1e-3,  # few steps: a higher rate than the paper's 3.5e-4 converges in time
        "decay_epochs": (settings.epochs - 2,),
        "num_workers": 0,
    }
    train(
        TrainConfig(backbone=ROUTER_BACKBONE, task="category", pretrained="package", **common),
        workspace.data.root,
        workspace.weights.root,
        device=device,
    )
    clock.lap("train category router")
    for backbone in settings.backbones:
        for category in Category:
            train(
                TrainConfig(
                    backbone=backbone,
                    category=category.label,
                    pretrained="package" if BACKBONE_PRESETS[backbone].weights_package else "none",
                    **common,
                ),
                workspace.data.root,
                workspace.weights.root,
                device=device,
            )
        clock.lap(f"train {backbone} x3 categories")

    options = RetrievalOptions(num_workers=0)
    weights, results = tune_fusion(workspace, settings.backbones, list(Category), options)
    weights.save(workspace.weights.fusion)
    for category, result in results.items():
        console.print(fusion_table(result, title=f"{category.label}: validation, per model and fused"))
    variants = compare_postprocessing(workspace, weights, list(Category), options)
    console.print(postprocessing_table(variants))
    clock.lap("extract validation + tune fusion + re-ranking variants")

    path = submit(workspace, team, weights, ROUTER_BACKBONE, options, submissions)
    queries = [ref.url for ref in read_images(workspace.data.queries)]
    gallery = {ref.url for ref in read_images(workspace.data.gallery)}
    problems = validate_submission(path, queries, gallery)
    if problems:
        raise ValueError(f"{path}: the submission is invalid: {problems[0]}")
    scores = score_on_test(workspace, path)
    console.print(scores_table(scores, title=f"{path.name}, test (fused {', '.join(settings.backbones)})"))
    clock.lap("route + extract test + submit + score")

    ranked = read_submission(path)
    render_sheet(
        [ref for ref in read_images(workspace.data.queries)],
        ranked,
        read_truth(workspace.data.truth),
        {ref.url: ref for ref in read_images(workspace.data.gallery)},
        workspace.data.images,
        out / "sheet.png",
        out / "sheet.html",
    )
    clock.lap("results sheet")
    console.print(clock.table())
    console.print(
        f"[green]submission[/] {path}  rank-1 {scores.overall.rank1:.3f}  mAP@10 {scores.overall.map:.3f}  "
        f"(histogram baseline: rank-1 {baseline.overall.rank1:.3f}  mAP@10 {baseline.overall.map:.3f})"
    )
    return scores
