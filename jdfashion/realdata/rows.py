"""The rows of the Grocery Store table: what each pipeline is, and how it is trained, extracted and scored.

A row is a ``RowSpec``: the colour histogram, one model (a backbone, a branch set, a recipe: ``frozen``
= ``train --epochs 0``, the untouched pretrained network; ``tuned`` = the ``finetune`` recipe), or a
fusion of other rows' models with weights tuned on validation; any of the last two may self-train on
the searched queries (``jdfashion.selftrain``, one seed per run). Every model goes through the
toolkit's own ``train`` -> feature cache -> exact search -> ``metrics.evaluate``, as a user's would.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from rich.console import Console
from torch.utils.data import DataLoader

from jdfashion.atomic import atomic_write_text
from jdfashion.baseline import color_histogram_features
from jdfashion.config import TrainConfig, recipe_config
from jdfashion.data.jdformat import ImageRef, read_images, read_truth
from jdfashion.data.loader import ItemDataset, PKBatchSampler, collate, train_transform
from jdfashion.data.manifest import GROCERY_CATEGORY
from jdfashion.features import FeatureSet
from jdfashion.fusion import ScoreNormalisation, TuneResult
from jdfashion.losses import mgpa_losses
from jdfashion.metrics import Scores, evaluate
from jdfashion.model.backbones import BACKBONE_PRESETS, DEFAULT_BACKBONE, PACKAGED_BACKBONES
from jdfashion.model.mgpa import create_model
from jdfashion.paths import (
    MODEL_CONFIG,
    MODEL_METRICS,
    MODEL_WEIGHTS,
    RESUME_CHECKPOINT,
    DataLayout,
    WeightsLayout,
)
from jdfashion.pipeline import (
    ROTATION_TTA,
    TOP_K,
    RetrievalOptions,
    RotationSide,
    ValidationSet,
    Workspace,
    ranked_lists,
    tune_on_validation,
    validation_features,
    validation_set,
)
from jdfashion.realdata.protocol import ROTATED_DIR, fold_layouts
from jdfashion.realdata.table import RowResult, StepTimes
from jdfashion.search import topk
from jdfashion.selftrain import SelfTraining
from jdfashion.train import build_optimizer, load_training_data, model_config_for, resolved, train

RowKind = Literal["histogram", "model", "fused"]
Recipe = Literal["frozen", "tuned"]
# Fusion weights: equal, tuned on the protocol's validation (fold 0), or tuned per validation fold,
# averaged and shrunk toward equal by the amount that scored best across folds (``_Pipeline.folds``).
Weighting = Literal["equal", "tuned", "folds"]
SHRINK_STEPS = (0.0, 0.25, 0.5, 0.75, 1.0)
# The backbones with ImageNet weights on this machine (the packaged ones), by their short row names.
SHORT_NAMES = {backbone: backbone.removeprefix("efficientnet_") for backbone in PACKAGED_BACKBONES}
BACKBONE = DEFAULT_BACKBONE  # the one every ablation row (branch sets, recipes, whitening) runs on
SHORT = SHORT_NAMES[BACKBONE]
# The other backbones' rows: the frozen branch sets that lead on Lite0, and its best pipeline.
OTHER_BACKBONE_BRANCHES = ("horizontal", "all")
ENSEMBLE = "+".join(SHORT_NAMES.values())
BRANCH_ROWS = ("global", "horizontal", "vertical", "annular", "all")
WHITENED_FROZEN = ("global", "horizontal", "all")
TUNED_BRANCHES = ("global", "horizontal", "all")
# Trained rows whose spread over seeds the table reports; frozen rows are deterministic (one run).
MULTI_SEED_BRANCHES = ("global", "all")
FUSED_MEMBERS = ("lite0-frozen-horizontal-white", "lite0-frozen-annular", "lite0-tuned-all")
# Self-trained rows map the frozen network's features: they use the frozen rows' models and caches.
SELF_TRAINED_BRANCHES = ("global", "horizontal", "annular", "all")
SELF_TRAINED_MEMBERS = ("lite0-frozen-horizontal", "lite0-frozen-annular", "lite0-frozen-all")

# Each backbone at its pretraining size (RunSettings.size_for): Lite0's 224 px gives 14x14 maps with the
# last stride removed, so every 3-way part has 4-5 rows; the smoke run's 128 px still gives 8x8.
DEFAULT_EPOCHS = 2  # the finetune recipe's head-only epoch, then one epoch of the whole network
SMOKE_EPOCHS = 2
SMOKE_IMAGE_SIZE = 128
SMOKE_TRAIN_PHOTOS = 12  # consumer photos per training identity in the smoke run
SMOKE_ROWS = (
    "histogram",
    "lite0-frozen-global",
    "lite0-selftrained-global",
    "lite0-frozen-horizontal-white",
    "lite0-tuned-all",
    "fused",
    "lite1-frozen-horizontal",
    "lite2-frozen-horizontal",
    "fused-frozen-horizontal-lite0+lite1+lite2-folds",
)
# Every map side must hold 8 cells (stride 16 with the last stride removed): the 3-way cuts and the
# annular rings are then real regions, not single cells or L-shapes.
MIN_IMAGE_SIZE = 128
IDENTITIES_PER_BATCH = 16
IMAGES_PER_IDENTITY = 4
# Loading is a few per cent of a step here, and in-process loading leaves both cores to the model.
LOADER_WORKERS = 0
TIMING_FILE = "timing.json"
SEED_COST_FILE = "seed-cost.json"


@dataclass(frozen=True)
class QueryVariant:
    """The test queries as given or turned (``protocol.build_rotated_queries``), with or without
    rotation TTA and the transductive options: the extra columns of the table."""

    name: str
    rotated: bool
    tta: bool
    transductive: bool = False
    # Each query turned back by its own tilt (``--deskew-queries``), with quarter-turn views or not.
    deskew: bool = False
    quarter_views: bool = False
    # One quarter view kept per query, the one the turn classifier votes upright (``--choose-upright``).
    choose_upright: bool = False


# Rows whose TTA columns are measured: query-side TTA extracts the 923 queries 4 more times per
# query set (about 10 minutes a row here), so only the rows that answer issue 11's questions.
TTA_ROWS = (
    "lite0-frozen-global",  # the paper's baseline pooling
    "lite0-frozen-horizontal",  # the best branch set
    "lite0-frozen-annular",  # the paper's rotation-robust one
    "lite0-selftrained-horizontal-transductive",  # the best pipeline, on the frozen horizontal TTA views
)
# Domain centring 0.5 + query augmentation 5 (neighbours at RetrievalOptions' default weight): the
# values validation chose (docs/REALDATA.md).
TRANSDUCTIVE = {"centring": 0.5, "query_augmentation": 5}
QUERY_VARIANTS = (
    QueryVariant("rotated", rotated=True, tta=False),
    QueryVariant("upright + TTA", rotated=False, tta=True),
    QueryVariant("rotated + TTA", rotated=True, tta=True),
    QueryVariant("upright + transductive", rotated=False, tta=False, transductive=True),
    QueryVariant("rotated + TTA + transductive", rotated=True, tta=True, transductive=True),
    QueryVariant("upright + deskew", rotated=False, tta=False, deskew=True),
    QueryVariant("rotated + deskew", rotated=True, tta=False, deskew=True),
    QueryVariant(
        "upright + deskew + quarter views", rotated=False, tta=False, deskew=True, quarter_views=True
    ),
    QueryVariant(
        "rotated + deskew + quarter views", rotated=True, tta=False, deskew=True, quarter_views=True
    ),
    *(
        QueryVariant(
            f"{'rotated' if rotated else 'upright'} + deskew + upright view",
            rotated=rotated,
            tta=False,
            deskew=True,
            quarter_views=True,
            choose_upright=True,
        )
        for rotated in (False, True)
    ),
)
# Rows whose deskew columns are measured (issue 11): the best branch set and the best pipeline on its
# features, 923 queries x 8 extractions once (about 7 minutes here), shared by both rows, and the
# upright-view columns' turn classifier: 1,200 training photos x 4 turns once (about 4 minutes).
DESKEW_ROWS = ("lite0-frozen-horizontal", "lite0-selftrained-horizontal-transductive")
# After deskewing, a photo turned past 45 degrees is a quarter turn away from upright.
QUARTER_VIEWS = (0.0, 90.0, -90.0)


@dataclass(frozen=True)
class RowSpec:
    name: str
    kind: RowKind
    backbone: str = ""
    branches: str = ""
    recipe: Recipe = "frozen"
    whitening: Literal["none", "supervised"] = "none"
    members: tuple[str, ...] = ()
    # The row whose trained model this row ranks with (rows that differ only in retrieval options use
    # the frozen row's model and feature caches), else itself.
    model_row: str = ""
    self_training: bool = False
    transductive: bool = False  # domain centring + query augmentation (TRANSDUCTIVE) in the main columns
    # Fused rows: weights tuned on validation or equal, and each model's scores per query normalised.
    weighting: Weighting = "tuned"
    score_normalisation: ScoreNormalisation = "none"

    @property
    def trains(self) -> bool:
        """Whether the row's model, or a member's, learned from the training identities (which
        validation folds 1.. are made of, so only fold 0 validates it)."""
        if self.kind == "fused":
            return any(ROWS[member].trains for member in self.members)
        return ROWS[self.model_row].trains if self.model_row else self.recipe == "tuned"

    @property
    def multi_seed(self) -> bool:
        return (
            self.self_training
            or (self.recipe == "tuned" and self.branches in MULTI_SEED_BRANCHES)
            or any(ROWS[member].multi_seed for member in self.members)
        )

    @property
    def label(self) -> str:
        if self.kind == "histogram":
            return "-"
        learned = (" + self-training" if self.self_training else "") + (
            " + transductive" if self.transductive else ""
        )
        if self.kind == "fused":
            normalised = "" if self.score_normalisation == "none" else f", {self.score_normalisation}"
            return f"fused ({self.weighting}{normalised}): " + " + ".join(self.members) + learned
        whitened = " + whitening" if self.whitening != "none" else ""
        return self.recipe + whitened + learned

    def options(self, base: RetrievalOptions, seed: int) -> RetrievalOptions:
        """The retrieval options of this row's ``seed``: self-training seeded by it, if on."""
        options = replace(base, **TRANSDUCTIVE) if self.transductive else base
        options = replace(options, score_normalisation=self.score_normalisation)
        return replace(options, self_training=SelfTraining(seed=seed)) if self.self_training else options


def _row_specs() -> dict[str, RowSpec]:
    specs = [RowSpec("histogram", "histogram")]
    specs += [RowSpec(f"{SHORT}-frozen-{b}", "model", BACKBONE, b) for b in BRANCH_ROWS]
    specs += [
        RowSpec(f"{SHORT}-frozen-{b}-white", "model", BACKBONE, b, whitening="supervised")
        for b in WHITENED_FROZEN
    ]
    specs += [RowSpec(f"{SHORT}-tuned-{b}", "model", BACKBONE, b, recipe="tuned") for b in TUNED_BRANCHES]
    # The same frozen models under test-time options: transductive, self-trained, both.
    for b in SELF_TRAINED_BRANCHES:
        frozen = f"{SHORT}-frozen-{b}"
        specs.append(
            RowSpec(f"{frozen}-transductive", "model", BACKBONE, b, model_row=frozen, transductive=True)
        )
        for transductive in (False, True):
            name = f"{SHORT}-selftrained-{b}" + ("-transductive" if transductive else "")
            specs.append(
                RowSpec(
                    name,
                    "model",
                    BACKBONE,
                    b,
                    model_row=frozen,
                    self_training=True,
                    transductive=transductive,
                )
            )
    for backbone in PACKAGED_BACKBONES[1:]:
        short = SHORT_NAMES[backbone]
        specs += [RowSpec(f"{short}-frozen-{b}", "model", backbone, b) for b in OTHER_BACKBONE_BRANCHES]
        specs.append(
            RowSpec(
                f"{short}-selftrained-horizontal-transductive",
                "model",
                backbone,
                "horizontal",
                model_row=f"{short}-frozen-horizontal",
                self_training=True,
                transductive=True,
            )
        )
    specs += _ensemble_specs()
    specs.append(RowSpec("fused", "fused", BACKBONE, "", members=FUSED_MEMBERS))
    specs.append(
        RowSpec(
            "fused-selftrained-transductive",
            "fused",
            BACKBONE,
            "",
            members=SELF_TRAINED_MEMBERS,
            self_training=True,
            transductive=True,
        )
    )
    return {spec.name: spec for spec in specs}


def _ensemble_specs() -> list[RowSpec]:
    """Fusion across the packaged backbones, frozen and through the best pipeline, with equal weights,
    weights tuned on validation and on the folds, each with raw and z-scored cosines: what tuning and
    normalisation buy, side by side."""
    members = tuple(f"{short}-frozen-horizontal" for short in SHORT_NAMES.values())
    specs = []
    for level, learned in (("frozen", {}), ("best", {"self_training": True, "transductive": True})):
        for normalisation, weighting in itertools.product(("none", "zscore"), ("equal", "tuned", "folds")):
            suffix = "" if normalisation == "none" else f"-{normalisation}"
            specs.append(
                RowSpec(
                    f"fused-{level}-horizontal-{ENSEMBLE}-{weighting}{suffix}",
                    "fused",
                    ENSEMBLE,
                    "horizontal",
                    members=members,
                    weighting=weighting,
                    score_normalisation=normalisation,
                    **learned,
                )
            )
    return specs


ROWS = _row_specs()


# What `bench real` runs without --rows: every frozen branch set of Lite0 with its transductive twin,
# the frozen horizontal and all rows of Lite1 and Lite2, each backbone's best pipeline (self-trained
# horizontal + transductive, and Lite0's self-trained horizontal alone), and the ensemble of the three
# frozen horizontal networks, frozen and through the best pipeline, with equal, tuned and fold-tuned
# weights. Left to --rows (docs/REALDATA.md says what each measured): the fine-tunes (on this protocol
# the default one ships its frozen reference, so its row repeats lite0-frozen-horizontal, for 22-50
# min), the whitened rows (below their frozen rows on the test), Lite0's other self-trained branch sets
# and its branch-set fusions (the ensemble across backbones supersedes them), and the z-scored
# ensembles (within 0.001 of raw cosines at equal weights).
def _runs_by_default(spec: RowSpec) -> bool:
    if spec.whitening != "none" or spec.recipe == "tuned" or spec.score_normalisation != "none":
        return False
    if spec.kind == "fused":
        return spec.backbone == ENSEMBLE
    return not spec.self_training or spec.branches == "horizontal"


DEFAULT_ROWS = tuple(
    sorted(
        (
            name
            for name, spec in ROWS.items()
            if _runs_by_default(spec) and all(_runs_by_default(ROWS[member]) for member in spec.members)
        ),
        key=lambda name: ROWS[name].recipe == "tuned",
    )
)


@dataclass(frozen=True)
class RunSettings:
    out: Path
    seeds: tuple[int, ...]
    epochs: int | None
    image_size: int | None
    smoke: bool
    options: RetrievalOptions
    # Score QUERY_VARIANTS too: the TTA ones for TTA_ROWS, the deskew ones for DESKEW_ROWS, neither in smoke.
    rotation: bool = False
    rotation_side: RotationSide = "query"
    # One workspace per model for the whole run: rows on the same model (a self-trained row, its
    # transductive twin, their fusion, the variant columns) then share its loaded weights and every
    # self-trained map, each learned once per query set and options.
    _workspaces: dict[tuple[Path, int], Workspace] = field(default_factory=dict, repr=False, compare=False)

    @property
    def data_root(self) -> Path:
        """The protocol's data (``build_protocol``'s output): training, validation and test lists."""
        return self.out / "data"

    def workspace(self, weights_root: Path, *, retrained: bool = False, fold: int = 0) -> Workspace:
        """The run's workspace of the model under ``weights_root`` on validation fold ``fold`` (0: the
        protocol's own data root); ``retrained`` drops what earlier ones loaded or learned."""
        if retrained:
            for key in [key for key in self._workspaces if key[0] == weights_root]:
                del self._workspaces[key]
        if (weights_root, fold) not in self._workspaces:
            root = fold_layouts(self.data_root)[fold].root
            self._workspaces[weights_root, fold] = Workspace.at(root, weights_root, device="cpu")
        return self._workspaces[weights_root, fold]

    @property
    def folds(self) -> int:
        return len(fold_layouts(self.data_root))

    def variants(self, spec: RowSpec) -> tuple[QueryVariant, ...]:
        if not self.rotation:
            return ()
        tta = spec.name in TTA_ROWS and not self.smoke
        deskew = spec.name in DESKEW_ROWS and not self.smoke
        return tuple(
            variant
            for variant in QUERY_VARIANTS
            if (tta or not variant.tta) and (deskew or not variant.deskew)
        )

    def options_for(self, variant: QueryVariant, row_options: RetrievalOptions) -> RetrievalOptions:
        """``row_options`` (the row's own, e.g. self-training) with the variant's on top."""
        options = replace(row_options, **TRANSDUCTIVE) if variant.transductive else row_options
        if variant.deskew:
            views = QUARTER_VIEWS if variant.quarter_views else (0.0,)
            return replace(
                options,
                deskew_queries=True,
                rotations=views,
                rotation_side="query",
                choose_upright=variant.choose_upright,
            )
        if not variant.tta:
            return options
        return replace(options, rotations=ROTATION_TTA, rotation_side=self.rotation_side)

    def queries_for(self, variant: QueryVariant) -> tuple[list[ImageRef], dict[str, list[str]]]:
        layout = DataLayout(self.data_root / ROTATED_DIR if variant.rotated else self.data_root)
        return read_images(layout.queries), read_truth(layout.truth)

    def epochs_for(self, spec: RowSpec) -> int:
        if spec.recipe == "frozen":
            return 0
        return self.epochs or (SMOKE_EPOCHS if self.smoke else DEFAULT_EPOCHS)

    def size_for(self, spec: RowSpec) -> int:
        """The given size, else the smoke run's, else the row's backbone's native size (224 / 240 / 260
        for Lite0 / 1 / 2, from timm's pretrained configs)."""
        if self.image_size or self.smoke:
            return self.image_size or SMOKE_IMAGE_SIZE
        return BACKBONE_PRESETS[spec.backbone].native_size

    def seeds_for(self, spec: RowSpec) -> tuple[int, ...]:
        return self.seeds if spec.multi_seed else self.seeds[:1]

    def weights_root(self, spec_name: str, seed: int) -> Path:
        return self.out / "weights" / spec_name / f"seed{seed}"


def train_config(spec: RowSpec, seed: int, epochs: int, image_size: int) -> TrainConfig:
    """One row's training run. Frozen rows: ``epochs=0`` (the reference). Tuned rows: the ``finetune``
    recipe, shipped as the default for pretrained backbones."""
    fields = {
        "backbone": spec.backbone,
        "category": GROCERY_CATEGORY.label,
        "branches": spec.branches,
        "image_size": image_size,
        "epochs": epochs,
        "decay_epochs": (max(1, round(epochs * 2 / 3)),),
        "identities_per_batch": IDENTITIES_PER_BATCH,
        "images_per_identity": IMAGES_PER_IDENTITY,
        "pretrained": "package",
        "seed": seed,
        "num_workers": LOADER_WORKERS,
        "whitening": spec.whitening,
    }
    if spec.recipe == "frozen":
        return TrainConfig(**fields)
    return recipe_config("finetune", **fields)


def trained_model(
    spec: RowSpec, seed: int, settings: RunSettings, console: Console
) -> tuple[Workspace, bool]:
    """The workspace of the row's model for ``seed`` and whether it was trained now (else reused: an
    identical finished run was on disk). Training cost is kept beside the weights, so a reused model
    still reports what it took."""
    config = resolved(train_config(spec, seed, settings.epochs_for(spec), settings.size_for(spec)))
    weights_root = settings.weights_root(spec.name, seed)
    model_dir = WeightsLayout(weights_root).model_dir(GROCERY_CATEGORY, spec.backbone)
    reuse = _finished(model_dir, config)
    if reuse:
        console.print(f"[dim]{spec.name} seed {seed}: reusing {model_dir}")
    else:
        console.print(f"{spec.name} seed {seed}: {config.epochs} epochs at {config.image_size} px")
        with clock() as spent:
            train(config, settings.data_root, weights_root, show_progress=settings.options.show_progress)
        atomic_write_text(model_dir / TIMING_FILE, json.dumps(spent))
        # Resume state of a finished run: 0.1-0.3 GB per model that nothing here reads again.
        (model_dir / RESUME_CHECKPOINT).unlink(missing_ok=True)
    return settings.workspace(weights_root, retrained=not reuse), not reuse


@contextmanager
def clock() -> Iterator[dict[str, float]]:
    """CPU seconds of this process and its reaped children, and wall seconds, of the enclosed work."""
    spent: dict[str, float] = {}
    before, started = os.times(), time.perf_counter()
    try:
        yield spent
    finally:
        after = os.times()
        spent["cpu"] = sum(getattr(after, n) - getattr(before, n) for n in _CPU_FIELDS)
        spent["wall"] = time.perf_counter() - started


_CPU_FIELDS = ("user", "system", "children_user", "children_system")


def _finished(model_dir: Path, config: TrainConfig) -> bool:
    if not (model_dir / MODEL_WEIGHTS).exists() or not (model_dir / TIMING_FILE).exists():
        return False
    saved = json.loads((model_dir / MODEL_CONFIG).read_text())["train"]
    return saved == json.loads(json.dumps(config.to_dict()))


def _training_cost(workspace: Workspace, backbone: str) -> dict[str, float]:
    return json.loads((workspace.weights.model_dir(GROCERY_CATEGORY, backbone) / TIMING_FILE).read_text())


def _test_sets(layout: DataLayout) -> tuple[list[ImageRef], list[ImageRef], dict[str, list[str]]]:
    return read_images(layout.queries), read_images(layout.gallery), read_truth(layout.truth)


def _score_both(run: dict[str, list[str]], truth: dict[str, list[str]]) -> tuple[Scores, Scores]:
    """Scores of whole-gallery rankings on the protocol gallery and on the 16 test iconic images alone
    (dropping the other ids from a ranking is exactly ranking the smaller gallery)."""
    matches = {url for urls in truth.values() for url in urls}
    protocol = evaluate({query: ranked[:TOP_K] for query, ranked in run.items()}, truth)
    test_only = evaluate(
        {query: [url for url in ranked if url in matches][:TOP_K] for query, ranked in run.items()}, truth
    )
    return protocol, test_only


def _rank_and_score(
    sets: dict[str, tuple[FeatureSet, FeatureSet]],
    weights: dict[str, float],
    truth: dict[str, list[str]],
    options: RetrievalOptions,
) -> tuple[Scores, Scores]:
    """Fused whole-gallery rankings (every gallery id, so the 16-image view can be cut from them), scored."""
    queries = {name: pair[0] for name, pair in sets.items()}
    gallery = {name: pair[1] for name, pair in sets.items()}
    size = len(next(iter(gallery.values())))
    return _score_both(ranked_lists(queries, gallery, weights, options, k=size), truth)


def histogram_row(spec: RowSpec, settings: RunSettings) -> RowResult:
    layout = DataLayout(settings.data_root)
    queries, gallery, truth = _test_sets(layout)
    with clock() as spent:
        query_features = color_histogram_features(queries, layout.images, workers=2).features
        gallery_features = color_histogram_features(gallery, layout.images, workers=2).features
        _, indices = topk(torch.from_numpy(query_features), torch.from_numpy(gallery_features), len(gallery))
        gallery_ids = [ref.url for ref in gallery]
        run = {
            ref.url: [gallery_ids[i] for i in row] for ref, row in zip(queries, indices.tolist(), strict=True)
        }
        scores, test_only = _score_both(run, truth)
    return _result(
        spec,
        (),
        [(scores, test_only)],
        spent["cpu"],
        spent["wall"],
        (len(queries), len(gallery)),
        "HSV 8x8x8 colour histogram, no training",
    )


def model_row(spec: RowSpec, settings: RunSettings, console: Console) -> RowResult:
    layout = DataLayout(settings.data_root)
    queries, gallery, truth = _test_sets(layout)
    per_seed: list[tuple[Scores, Scores]] = []
    rotation: list[dict[str, Scores]] = []
    validation: list[Scores] = []
    folds: list[list[Scores]] = []
    cpu = wall = 0.0
    selections = []
    for seed in settings.seeds_for(spec):
        options = spec.options(settings.options, seed)
        # A row on another row's model (self-training) uses that row's model and feature caches.
        model_spec, model_seed = (ROWS[spec.model_row], settings.seeds[0]) if spec.model_row else (spec, seed)
        with clock() as spent:
            workspace, trained_now = trained_model(model_spec, model_seed, settings, console)
            sets = _test_features(workspace, spec.backbone, queries, gallery, options)
            per_seed.append(_rank_and_score({spec.backbone: sets}, {spec.backbone: 1.0}, truth, options))
        cost = spent if spec.model_row else _seed_cost(workspace, spec.backbone, spent, trained_now)
        cpu, wall = cpu + cost["cpu"], wall + cost["wall"]
        single = _Pipeline(
            {spec.backbone: (workspace, spec.backbone)}, gallery, "equal", settings, spec.trains
        )
        folds.append(single.fold_validation(options))
        validation.append(folds[-1][0])  # fold 0, the protocol's own validation
        chosen = _validation_text(validation[-1]) if spec.model_row else None
        selections.append(f"seed {seed}: {chosen or _selection_text(workspace, spec.backbone)}")
        console.print(f"{spec.name} seed {seed}: {_scores_text(*per_seed[-1])}")
        rotation.append(_variant_scores(settings.variants(spec), settings, single, options, console))
    return _result(
        spec,
        settings.seeds_for(spec),
        per_seed,
        cpu,
        wall,
        (len(queries), len(gallery)),
        "; ".join(selections),
        epochs=settings.epochs_for(spec),
        image_size=settings.size_for(spec),
        rotation=rotation,
        validation=validation,
        folds=folds,
    )


def _selection_text(workspace: Workspace, backbone: str) -> str:
    """What validation chose for this model: its epoch-0 and kept scores, WiSE-FT mix, whitening, and
    whether it shipped the frozen reference instead."""
    metrics = json.loads(
        (workspace.weights.model_dir(GROCERY_CATEGORY, backbone) / MODEL_METRICS).read_text()
    )
    parts = []
    start = next((row for row in metrics if row.get("epoch") == 0 and "stage" not in row), None)
    if start and "val_map" in start:
        parts.append(f"val mAP@10 at epoch 0 {start['val_map']:.3f}")
    for row in metrics:
        if row.get("stage") == "selected" and row["epoch"]:
            parts.append(f"kept epoch {row['epoch']} ({row['val_map']:.3f})")
        elif row.get("stage") == "selected":
            parts.append("kept epoch 0")
        elif row.get("stage") == "wise_selected":
            parts.append(f"WiSE-FT alpha {row['alpha']} ({row['val_map']:.3f})")
        elif row.get("stage") == "whitening":
            verdict = "" if row.get("kept", True) else ", dropped"
            parts.append(f"whitened {row.get('val_map', float('nan')):.3f}{verdict}")
        elif row.get("stage") == "reference":
            parts.append(f"frozen reference {row['val_map']:.3f}")
        elif row.get("stage") == "shipped" and row["model"] == "reference":
            parts.append("shipped the frozen reference")
    return ", ".join(parts)


def _validation_text(scores: Scores) -> str:
    """Validation scores of a model under a row's retrieval options (the frozen model's own are in its
    row): does validation agree with the test about what the options add?"""
    return (
        f"validation rank-1 {scores.overall.rank1:.3f} mAP@10 {scores.overall.map:.3f} with the row's options"
    )


def _seed_cost(
    workspace: Workspace, backbone: str, spent: dict[str, float], trained_now: bool
) -> dict[str, float]:
    """What one seed of a row cost from scratch (training + test extraction). Measured when the model
    was trained in this call; else the record of the call that trained it, as the features may now
    come from the cache; without a record, the model's training time plus this call's work."""
    path = workspace.weights.root / SEED_COST_FILE
    if path.exists() and not trained_now:
        return json.loads(path.read_text())
    training = {"cpu": 0.0, "wall": 0.0} if trained_now else _training_cost(workspace, backbone)
    cost = {key: spent[key] + training[key] for key in ("cpu", "wall")}
    atomic_write_text(path, json.dumps(cost))
    return cost


def fused_row(spec: RowSpec, settings: RunSettings, console: Console) -> RowResult:
    """Per seed, the member rows' models, weighted by validation mAP@10 (``fusion.tune_weights``), on
    the test. Frozen members are legitimate: they are what the trained members must add to."""
    layout = DataLayout(settings.data_root)
    queries, gallery, truth = _test_sets(layout)
    per_seed: list[tuple[Scores, Scores]] = []
    rotation: list[dict[str, Scores]] = []
    validation: list[Scores] = []
    folds: list[list[Scores]] = []
    cpu = wall = 0.0
    chosen = []
    for seed in settings.seeds_for(spec):
        workspaces = {}
        for member in spec.members:
            member_spec = ROWS[member]
            member_seed = seed if member_spec.multi_seed else settings.seeds[0]
            workspaces[member] = (
                trained_model(member_spec, member_seed, settings, console)[0],
                member_spec.backbone,
            )

        fusion = _Pipeline(workspaces, gallery, spec.weighting, settings, spec.trains)
        options = spec.options(settings.options, seed)
        with clock() as spent:
            per_seed.append(
                _rank_and_score(fusion.sets(options, queries), fusion.weights(options), truth, options)
            )
        cpu, wall = cpu + spent["cpu"], wall + spent["wall"]
        folds.append(fusion.fold_validation(options))
        validation.append(folds[-1][0])
        tuned = fusion.tuning(options)
        weights_text = ", ".join(f"{m} {w:.2f}" for m, w in sorted(fusion.weights(options).items()))
        if spec.weighting == "folds":
            weights_text += f" (shrunk {fusion.folds(options)[1]:.2f} toward equal)"
        alone = ", ".join(f"{m} {v:.3f}" for m, (v, _) in sorted(tuned.per_model.items()))
        chosen.append(
            f"seed {seed}: {weights_text} (val mAP@10 fused {validation[-1].overall.map:.3f}; alone {alone})"
        )
        console.print(f"fused seed {seed}: {weights_text}; {_scores_text(*per_seed[-1])}")
        rotation.append(_variant_scores(settings.variants(spec), settings, fusion, options, console))
    weighting = {
        "equal": "equal",
        "tuned": "tuned on validation",
        "folds": "tuned per validation fold, averaged, shrunk toward equal as the folds chose",
    }[spec.weighting]
    note = f"weights {weighting}; seconds exclude training the members (their rows); "
    return _result(
        spec,
        settings.seeds_for(spec),
        per_seed,
        cpu,
        wall,
        (len(queries), len(gallery)),
        note + "; ".join(chosen),
        rotation=rotation,
        validation=validation,
        folds=folds,
    )


@dataclass
class _Pipeline:
    """One seed's models of a row (name -> workspace, backbone) and their weights (equal, tuned on
    validation, or tuned on the folds) under the same retrieval options (rotation TTA on, if on) as
    the test ranking. ``trains``: a member learned from the training identities, which folds 1.. are
    made of, so only fold 0 validates it."""

    models: dict[str, tuple[Workspace, str]]
    gallery: list[ImageRef]
    weighting: Weighting
    settings: RunSettings
    trains: bool = False
    _tunings: dict[tuple[RetrievalOptions, int], TuneResult] = field(default_factory=dict)
    _folds: dict[RetrievalOptions, tuple[dict[str, float], float]] = field(default_factory=dict)
    _lists: dict[int, ValidationSet] = field(default_factory=dict)  # each fold's, read once

    def sets(
        self, options: RetrievalOptions, queries: list[ImageRef]
    ) -> dict[str, tuple[FeatureSet, FeatureSet]]:
        return {m: _test_features(w, b, queries, self.gallery, options) for m, (w, b) in self.models.items()}

    def weights(self, options: RetrievalOptions) -> dict[str, float]:
        if self.weighting == "tuned":
            return self.tuning(options).weights
        if self.weighting == "folds":
            return self.folds(options)[0]
        return dict.fromkeys(self.models, 1.0)

    def tuning(self, options: RetrievalOptions, fold: int = 0) -> TuneResult:
        if (options, fold) not in self._tunings:
            self._tunings[options, fold] = tune_on_validation(
                self._validation_sets(options, fold), self._val(fold), options
            )
        return self._tunings[options, fold]

    def folds(self, options: RetrievalOptions) -> tuple[dict[str, float], float]:
        """Weights tuned on each fold, averaged, and shrunk toward equal weights by the step of
        ``SHRINK_STEPS`` whose weights, tuned on one fold, score best on the others (mean mAP@10;
        ties go to the larger shrink): (weights, shrink)."""
        if options not in self._folds:
            folds = self._fold_numbers
            tuned = [self.tuning(options, fold).weights for fold in folds]
            held_out = {
                shrink: statistics.fmean(
                    self.validation(options, other, _shrunk(weights, shrink)).overall.map
                    for fold, weights in zip(folds, tuned, strict=True)
                    for other in folds
                    if other != fold
                )
                for shrink in SHRINK_STEPS
            }
            shrink = max(SHRINK_STEPS, key=lambda step: (round(held_out[step], 9), step))
            mean = {m: statistics.fmean(weights[m] for weights in tuned) for m in self.models}
            self._folds[options] = (_shrunk(mean, shrink), shrink)
        return self._folds[options]

    def validation(
        self, options: RetrievalOptions, fold: int = 0, weights: dict[str, float] | None = None
    ) -> Scores:
        """Validation scores on ``fold`` of this pipeline's ranking under ``options``, with its weights
        (or ``weights``)."""
        sets = self._validation_sets(options, fold)
        chosen = weights or self.weights(options)
        return _rank_and_score(sets, chosen, self._val(fold).truth, options)[0]

    def fold_validation(self, options: RetrievalOptions) -> list[Scores]:
        """Validation scores on every fold this pipeline has not trained on."""
        return [self.validation(options, fold) for fold in self._fold_numbers]

    @property
    def _fold_numbers(self) -> list[int]:
        return [0] if self.trains else list(range(self.settings.folds))

    def _on_fold(self, fold: int) -> dict[str, tuple[Workspace, str]]:
        if not fold:
            return self.models
        return {
            m: (self.settings.workspace(w.weights.root, fold=fold), b) for m, (w, b) in self.models.items()
        }

    def _val(self, fold: int) -> ValidationSet:
        if fold not in self._lists:
            workspace = next(iter(self._on_fold(fold).values()))[0]
            self._lists[fold] = validation_set(workspace, GROCERY_CATEGORY)
        return self._lists[fold]

    def _validation_sets(
        self, options: RetrievalOptions, fold: int
    ) -> dict[str, tuple[FeatureSet, FeatureSet]]:
        """Each model's validation features on ``fold`` as ``options`` rank them (self-trained once per
        options and fold)."""
        return {
            m: validation_features(w, b, GROCERY_CATEGORY, options)
            for m, (w, b) in self._on_fold(fold).items()
        }


def _shrunk(weights: dict[str, float], shrink: float) -> dict[str, float]:
    """``weights`` (normalised to sum 1) moved toward equal weights by ``shrink`` (0: as tuned, 1: equal)."""
    total = sum(weights.values())
    return {m: (1 - shrink) * w / total + shrink / len(weights) for m, w in weights.items()}


def _variant_scores(
    variants: tuple[QueryVariant, ...],
    settings: RunSettings,
    pipeline: _Pipeline,
    row_options: RetrievalOptions,
    console: Console,
) -> dict[str, Scores]:
    """Scores of the row's rankings for each variant (rotated queries, rotation TTA, transductive)."""
    scores = {}
    for variant in variants:
        options = settings.options_for(variant, row_options)
        variant_queries, truth = settings.queries_for(variant)
        scores[variant.name] = _rank_and_score(
            pipeline.sets(options, variant_queries), pipeline.weights(options), truth, options
        )[0]
        console.print(f"  {variant.name}: rank-1 {scores[variant.name].overall.rank1:.3f}")
    return scores


def _scores_text(protocol: Scores, test_only: Scores) -> str:
    return (
        f"rank-1 {protocol.overall.rank1:.3f} mAP@10 {protocol.overall.map:.3f} "
        f"(16 only: {test_only.overall.rank1:.3f} / {test_only.overall.map:.3f})"
    )


def _result(
    spec: RowSpec,
    seeds: tuple[int, ...],
    per_seed: list[tuple[Scores, Scores]],
    cpu: float,
    wall: float,
    sizes: tuple[int, int],
    note: str,
    epochs: int | str = "-",
    image_size: int | None = None,
    rotation: list[dict[str, Scores]] | None = None,
    validation: list[Scores] | None = None,
    folds: list[list[Scores]] | None = None,
) -> RowResult:
    by_variant: dict[str, tuple[float, ...]] = {}
    for variant in rotation[0] if rotation else ():
        by_variant[f"{variant} rank-1"] = tuple(seed[variant].overall.rank1 for seed in rotation)
        by_variant[f"{variant} mAP@10"] = tuple(seed[variant].overall.map for seed in rotation)
    return RowResult(
        name=spec.name,
        backbone=spec.backbone,
        branches=spec.branches,
        recipe=spec.label,
        seeds=seeds,
        epochs=epochs,
        image_size=image_size,
        rank1=tuple(protocol.overall.rank1 for protocol, _ in per_seed),
        map10=tuple(protocol.overall.map for protocol, _ in per_seed),
        cpu_seconds=cpu,
        wall_seconds=wall,
        queries=sizes[0],
        gallery=sizes[1],
        note=note,
        rank1_test_only=tuple(test_only.overall.rank1 for _, test_only in per_seed),
        map10_test_only=tuple(test_only.overall.map for _, test_only in per_seed),
        rotation=by_variant,
        val_rank1=tuple(scores.overall.rank1 for scores in validation or ()),
        val_map10=tuple(scores.overall.map for scores in validation or ()),
        folds_rank1=tuple(statistics.fmean(s.overall.rank1 for s in seed) for seed in folds or ()),
        folds_map10=tuple(statistics.fmean(s.overall.map for s in seed) for seed in folds or ()),
        folds_used=len(folds[0]) if folds else 0,
    )


def _test_features(
    workspace: Workspace,
    backbone: str,
    queries: list[ImageRef],
    gallery: list[ImageRef],
    options: RetrievalOptions,
) -> tuple[FeatureSet, FeatureSet]:
    """A model's test features as ``options`` rank them: self-trained on the run's device, if on, by the
    workspace's one map for these queries, gallery and options."""
    pair = workspace.pair_features(GROCERY_CATEGORY, backbone, queries, gallery, options, f"{backbone} test")
    key = ("test", backbone, tuple(ref.url for ref in queries), tuple(ref.url for ref in gallery))
    return workspace.self_trained(pair, options, key)


def measure_step_times(config: TrainConfig, data_root: Path, batches: int = 4, row: str = "") -> StepTimes:
    """Time data loading, forward and backward of ``batches`` training batches one stage at a time.

    Stages run back to back without the DataLoader's overlap (loading in this process), so each share
    is the stage's own cost; the first batch warms up allocators and is not counted.
    """
    config = resolved(config)
    layout = DataLayout(Path(data_root))
    data = load_training_data(layout, config)
    torch.manual_seed(config.seed)
    model_config = model_config_for(config, len(data.identities))
    model = create_model(model_config, pretrained=config.pretrained_weights)
    optimizer = build_optimizer(model, config)
    sampler = PKBatchSampler(
        data.groups, config.identities_per_batch, config.images_per_identity, config.seed
    )
    transform = train_transform(config.image_size, *model_config.normalization, augment=config.augment)
    dataset = ItemDataset(data.samples, layout.images, transform)
    model.train()
    totals = {"data": 0.0, "forward": 0.0, "backward": 0.0}
    epoch = 0
    for step in range(batches + 1):
        if step % len(sampler) == 0:
            sampler.set_epoch(epoch)
            epoch += 1
            loader = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=0, collate_fn=collate))
        timings = _time_step(model, optimizer, loader, config)
        if step:
            for stage, seconds in timings.items():
                totals[stage] += seconds
    return StepTimes(
        row or f"{config.backbone} {config.branches}",
        config.image_size,
        config.identities_per_batch * config.images_per_identity,
        batches,
        totals["data"] / batches,
        totals["forward"] / batches,
        totals["backward"] / batches,
    )


def _time_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterator[dict[str, torch.Tensor]],
    config: TrainConfig,
) -> dict[str, float]:
    marks = [time.perf_counter()]
    batch = next(loader)
    marks.append(time.perf_counter())
    loss = mgpa_losses(model(batch["images"]), batch["labels"], config)["loss"]
    marks.append(time.perf_counter())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    marks.append(time.perf_counter())
    return dict(
        zip(("data", "forward", "backward"), (b - a for a, b in itertools.pairwise(marks)), strict=True)
    )
