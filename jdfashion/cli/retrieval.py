"""``extract``, ``fuse`` and ``submit``: the retrieval flags (one declaration, read into
:class:`jdfashion.options.RetrievalOptions`) and the commands that rank with them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from jdfashion.cli.common import (
    backbone_names,
    backbones_option,
    categories_of,
    category_option,
    chosen_category,
    console,
    data_option,
    device_option,
    fail_on_value_errors,
    weights_option,
)
from jdfashion.options import RetrievalOptions
from jdfashion.settings import click_options, from_options


def retrieval_options(**flags: Any) -> RetrievalOptions:
    """The options of :func:`retrieval_flags` as the API's :class:`RetrievalOptions`."""
    return from_options(RetrievalOptions, flags)


def retrieval_flags(function: Callable[..., Any]) -> Callable[..., Any]:
    """The inference options shared by extract/fuse/submit, so what is tuned is what is submitted:
    one option per field of :class:`RetrievalOptions`, declared there."""
    return click_options(RetrievalOptions)(function)


@click.command()
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
    from jdfashion.distributed import distributed_context
    from jdfashion.workspace import (
        Workspace,
        assign_test,
        extract_test,
        extract_validation,
        extraction_targets,
    )

    with distributed_context() as ranks:
        workspace = Workspace.at(data_root, weights_root, device)
        options = retrieval_options(**flags)
        if not ranks.is_main:
            options = dataclasses.replace(options, show_progress=False)
        names = [backbone] if backbone else backbone_names(backbones)
        targets = extraction_targets(workspace, chosen_category(category), names, every_model)
        if split == "test":
            assignment = assign_test(workspace, router_backbone, options, chosen_category(category))
            targets = [(cat, name) for cat, name in targets if cat in assignment.categories]
        for cat, name in targets:
            if split == "val":
                queries, gallery = extract_validation(workspace, name, cat, options)
            else:
                queries, gallery = extract_test(workspace, name, cat, assignment, options)
            failed = len(queries.failed) + len(gallery.failed)
            if ranks.is_main:
                console.print(
                    f"{cat.label}/{name} {split}: {len(queries)} queries, {len(gallery)} gallery"
                    + (f", [red]{failed} images failed to decode[/]" if failed else "")
                )


@click.command()
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
    from jdfashion.workspace import Workspace

    if bool(spec) == tune:
        raise click.UsageError("give exactly one of --weights SPEC and --tune")
    given = parse_weights(spec) if spec else None  # a bad spec fails before any data is read
    workspace = Workspace.at(data_root, weights_root, device)
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


@click.command()
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
    from jdfashion.workspace import Workspace

    workspace = Workspace.at(data_root, weights_root, device)
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
