"""``jdfashion train``: one MGPA model per category and backbone (or the category router)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
from jdfashion.config import RECIPES, TrainConfig, recipe_config
from jdfashion.settings import click_options, given_options


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
    type=click.Choice(sorted(RECIPES)),
    default=None,
    help="Defaults for the options below. Default: finetune for a pretrained backbone (lower backbone lr, "
    "head-only first epoch, frozen BN, WiSE-FT), else paper. Options given explicitly win.",
)
@click_options(TrainConfig, unset=True)
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
    **options: Any,
) -> None:
    """Train MGPA models (one per category) or the category router."""
    from jdfashion.train import train as run_training
    from jdfashion.workspace import Workspace

    values = given_options(TrainConfig, options)
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


@click.command()
@click.option("--backbone", default=None, help="Default: every model trained for the category.")
@click.option(
    "--category",
    type=CATEGORY_CHOICES,
    default="all",
    show_default=True,
    help="Whose model: every category the data holds by default.",
)
@click.option(
    "--int8",
    is_flag=True,
    help="Also a static int8 file (model.int8.onnx, calibrated on training photos) for --runtime "
    "onnxruntime-int8, kept only if its validation mAP@10 is within 0.01 of the fp32 file's.",
)
@data_option
@weights_option
@fail_on_value_errors
def export(backbone: str | None, category: str, int8: bool, data_root: Path, weights_root: Path) -> None:
    """Export trained models to ONNX (model.onnx beside the weights) for ``--runtime onnxruntime``.

    Each file is checked on real validation photos against the PyTorch model before it replaces
    anything: fp32 features must agree to a cosine of 0.9999."""
    from jdfashion.export import export_category_model
    from jdfashion.workspace import Workspace

    workspace = Workspace.at(data_root, weights_root, "cpu")
    for target in categories_of(category, workspace):
        for name in workspace.backbones(target, [backbone] if backbone else None):
            for info in export_category_model(workspace, target, name, int8=int8):
                console.print(f"[green]exported[/] {target.label}/{name}: {info.summary}", soft_wrap=True)
