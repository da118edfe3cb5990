"""The rows of the Grocery Store table: what each pipeline is, which run by default, and a run's settings.

A row is a ``RowSpec``: the colour histogram, one model (a backbone, a branch set, a recipe: ``frozen``
= ``train --epochs 0``, the untouched pretrained network, or ``finetune``, the config recipe; the
``-tuned-`` rows' names predate that spelling and stay, as the docs cite them), or a
fusion of other rows' models with equal, tuned or fold-tuned weights; any of the last two may
self-train on the searched queries (``jdfashion.selftrain``, one seed per run). ``run`` runs them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from jdfashion.config import TrainConfig, recipe_config
from jdfashion.data.jdformat import ImageRef, read_images, read_truth
from jdfashion.data.manifest import GROCERY_CATEGORY
from jdfashion.model.backbones import BACKBONE_PRESETS, DEFAULT_BACKBONE, PACKAGED_BACKBONES
from jdfashion.options import ROTATION_TTA, RetrievalOptions, Runtime, ScoreNormalisation, SelfTraining
from jdfashion.paths import DataLayout
from jdfashion.realdata.protocol import ROTATED_DIR, fold_layouts
from jdfashion.realdata.settings import RealRun
from jdfashion.workspace import Workspace

RowKind = Literal["histogram", "model", "fused"]
Recipe = Literal["frozen", "finetune"]  # epochs 0, or config.RECIPES["finetune"]
# Fusion weights: equal, tuned on the protocol's validation (fold 0), or tuned per validation fold,
# averaged and shrunk toward equal by the amount that scored best across folds (``_Pipeline.folds``).
Weighting = Literal["equal", "tuned", "folds"]
# The backbones with ImageNet weights on this machine (the packaged ones), by their short row names.
SHORT_NAMES = {backbone: backbone.removeprefix("efficientnet_") for backbone in PACKAGED_BACKBONES}
BACKBONE = DEFAULT_BACKBONE  # the one every ablation row (branch sets, recipes, whitening) runs on
SHORT = SHORT_NAMES[BACKBONE]
# The other backbones' rows: the frozen branch sets that lead on Lite0, and its best pipeline.
OTHER_BACKBONE_BRANCHES = ("horizontal", "all")
ENSEMBLE = "+".join(SHORT_NAMES.values())
# The suffix of the frozen rows that keep each network's last stride (RowSpec.last_stride_one).
NATIVE = "native"
BRANCH_ROWS = ("global", "horizontal", "vertical", "annular", "all")
WHITENED_FROZEN = ("global", "horizontal", "all")
TUNED_BRANCHES = ("global", "horizontal", "all")
# Trained rows whose spread over seeds the table reports; frozen rows are deterministic (one run).
MULTI_SEED_BRANCHES = ("global", "all")
FUSED_MEMBERS = ("lite0-frozen-horizontal-white", "lite0-frozen-annular", "lite0-tuned-all")
# Self-trained rows map the frozen network's features: they use the frozen rows' models and caches.
SELF_TRAINED_BRANCHES = ("global", "horizontal", "annular", "all")
SELF_TRAINED_MEMBERS = ("lite0-frozen-horizontal", "lite0-frozen-annular", "lite0-frozen-all")

# Frozen rows also run through ONNX Runtime (issue 29): (branches, row suffix, runtime).
EXPORTED_ROWS: tuple[tuple[str, str, Runtime], ...] = (
    ("global", "onnx", "onnxruntime"),
    ("horizontal", "onnx", "onnxruntime"),
    ("horizontal", "int8", "onnxruntime-int8"),
)

# Each backbone at its pretraining size (RunSettings.size_for): Lite0's 224 px gives 14x14 maps with the
# last stride removed, so every 3-way part has 4-5 rows; the smoke run's 128 px still gives 8x8.
DEFAULT_EPOCHS = 2  # the finetune recipe's head-only epoch, then one epoch of the whole network
SMOKE_EPOCHS = 2
SMOKE_IMAGE_SIZE = 128
SMOKE_TRAIN_PHOTOS = 12  # consumer photos per training identity in the smoke run
SMOKE_ROWS = (
    "histogram",
    "lite0-frozen-global",
    "lite0-frozen-global-onnx",
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
IDENTITIES_PER_BATCH = 16
IMAGES_PER_IDENTITY = 4
# Loading is a few per cent of a step here, and in-process loading leaves both cores to the model.
LOADER_WORKERS = 0


@dataclass(frozen=True)
class QueryVariant:
    """The test queries as given or turned (``protocol.build_rotated_queries``), with or without
    rotation TTA and the transductive options: the extra columns of the table."""

    name: str
    rotated: bool
    tta: bool
    transductive: bool = False
    # Each query turned back by its own tilt (``--deskew-queries``).
    deskew: bool = False
    # Quarter-turn views of it, of which the one the turn classifier votes upright is kept
    # (``--rotations 0,90,-90 --choose-upright``). Scoring every view and keeping the best match per
    # pair instead ranked below it (docs/REALDATA-HISTORY.md), so the table no longer measures that.
    choose_upright: bool = False


# Rows whose TTA columns are measured: query-side TTA extracts the 923 queries 4 more times per
# query set (about 10 minutes a row here). Deskew + upright view (DESKEW_ROWS) has superseded it for
# turned queries (the best pipeline's turned photos: 0.714 rank-1 against TTA's 0.528), so only the
# frozen reference keeps TTA columns; the global, annular and best-pipeline ones are in
# docs/REALDATA-HISTORY.md.
TTA_ROWS = ("lite0-frozen-horizontal",)
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
    *(
        QueryVariant(
            f"{'rotated' if rotated else 'upright'} + deskew + upright view",
            rotated=rotated,
            tta=False,
            deskew=True,
            choose_upright=True,
        )
        for rotated in (False, True)
    ),
)
# Rows whose deskew columns are measured (issue 11): Lite0's best branch set, each backbone's best
# pipeline and their equal-weight ensemble. Per backbone, 923 queries x 8 extractions once (about 7
# minutes for Lite0 here) and the upright-view columns' turn classifier, 1,200 training photos x 4
# turns once (about 4 minutes). docs/REALDATA.md gives what they cost the default table.
DESKEW_ROWS = (
    "lite0-frozen-horizontal",
    *(f"{short}-selftrained-horizontal-transductive" for short in SHORT_NAMES.values()),
    f"fused-best-horizontal-{ENSEMBLE}-equal",
)
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
    runtime: Runtime = "torch"  # model rows: extracted through the model's ONNX export instead
    # False keeps the backbone's own last stride (the ``-native`` rows): a frozen network then sees its
    # last stage at the scale it was trained at, where removing the stride (PCB's finer maps) is what
    # training and self-training build on.
    last_stride_one: bool = True

    @property
    def trains(self) -> bool:
        """Whether the row's model, or a member's, learned from the training identities (which
        validation folds 1.. are made of, so only fold 0 validates it)."""
        if self.kind == "fused":
            return any(ROWS[member].trains for member in self.members)
        return ROWS[self.model_row].trains if self.model_row else self.recipe == "finetune"

    @property
    def multi_seed(self) -> bool:
        return (
            self.self_training
            or (self.recipe == "finetune" and self.branches in MULTI_SEED_BRANCHES)
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
        runtime = "" if self.runtime == "torch" else f", extracted by {self.runtime}"
        native = "" if self.last_stride_one else ", native last stride"
        return self.recipe + native + whitened + learned + runtime

    def options(self, base: RetrievalOptions, seed: int) -> RetrievalOptions:
        """The retrieval options of this row's ``seed``: self-training seeded by it, if on."""
        options = replace(base, **TRANSDUCTIVE) if self.transductive else base
        options = replace(options, score_normalisation=self.score_normalisation, runtime=self.runtime)
        return replace(options, self_training=SelfTraining(seed=seed)) if self.self_training else options


def _row_specs() -> dict[str, RowSpec]:
    specs = [RowSpec("histogram", "histogram")]
    specs += [RowSpec(f"{SHORT}-frozen-{b}", "model", BACKBONE, b) for b in BRANCH_ROWS]
    specs += [
        RowSpec(f"{SHORT}-frozen-{b}-white", "model", BACKBONE, b, whitening="supervised")
        for b in WHITENED_FROZEN
    ]
    specs += [RowSpec(f"{SHORT}-tuned-{b}", "model", BACKBONE, b, recipe="finetune") for b in TUNED_BRANCHES]
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
    # The frozen models extracted through their ONNX exports: the same lists (fp32), or int8's.
    specs += [
        RowSpec(
            f"{SHORT}-frozen-{b}-{suffix}",
            "model",
            BACKBONE,
            b,
            model_row=f"{SHORT}-frozen-{b}",
            runtime=runtime,
        )
        for b, suffix, runtime in EXPORTED_ROWS
    ]
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
    specs += [
        RowSpec(f"{short}-frozen-horizontal-{NATIVE}", "model", backbone, "horizontal", last_stride_one=False)
        for backbone, short in SHORT_NAMES.items()
    ]
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
    normalisation buy, side by side; and the frozen networks at their native last stride, raw cosines."""
    members = tuple(f"{short}-frozen-horizontal" for short in SHORT_NAMES.values())
    native = tuple(f"{member}-{NATIVE}" for member in members)
    levels = (
        ("frozen", members, {}, ("none", "zscore")),
        ("best", members, {"self_training": True, "transductive": True}, ("none", "zscore")),
        (f"frozen-{NATIVE}", native, {}, ("none",)),
    )
    specs = []
    for level, level_members, learned, normalisations in levels:
        for normalisation, weighting in itertools.product(normalisations, ("equal", "tuned", "folds")):
            suffix = "" if normalisation == "none" else f"-{normalisation}"
            specs.append(
                RowSpec(
                    f"fused-{level}-horizontal-{ENSEMBLE}-{weighting}{suffix}",
                    "fused",
                    ENSEMBLE,
                    "horizontal",
                    members=level_members,
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
# and its branch-set fusions (the ensemble across backbones supersedes them), the z-scored ensembles
# (within 0.001 of raw cosines at equal weights), and the native last stride's frozen rows and their
# ensembles (the stride stays removed: the fused frozen rows gain nothing with it, the best pipeline
# loses 0.11).
def _runs_by_default(spec: RowSpec) -> bool:
    if (
        spec.whitening != "none"
        or spec.recipe == "finetune"
        or spec.score_normalisation != "none"
        or not spec.last_stride_one
    ):
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
        key=lambda name: ROWS[name].recipe == "finetune",
    )
)


@dataclass(frozen=True)
class RunSettings:
    """A run (:class:`jdfashion.realdata.settings.RealRun`) as its rows see it: the retrieval options
    they start from, and the workspaces they share. With ``run.rotation`` the rows score
    QUERY_VARIANTS too: the TTA ones for TTA_ROWS, the deskew ones for DESKEW_ROWS, neither in smoke."""

    run: RealRun
    options: RetrievalOptions
    # One workspace per model for the whole run: rows on the same model (a self-trained row, its
    # transductive twin, their fusion, the variant columns) then share its loaded weights and every
    # self-trained map, each learned once per query set and options.
    _workspaces: dict[tuple[Path, int], Workspace] = field(default_factory=dict, repr=False, compare=False)

    @property
    def data_root(self) -> Path:
        """The protocol's data (``build_protocol``'s output): training, validation and test lists."""
        return self.run.out / "data"

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
        if not self.run.rotation:
            return ()
        tta = spec.name in TTA_ROWS and not self.run.smoke
        deskew = spec.name in DESKEW_ROWS and not self.run.smoke
        return tuple(
            variant
            for variant in QUERY_VARIANTS
            if (tta or not variant.tta) and (deskew or not variant.deskew)
        )

    def validates_variants(self, spec: RowSpec) -> bool:
        """Whether the row's variants are also scored on validation (upright and turned): the deskew
        rows, whose columns decide the rotation options' default without the test's labels."""
        return spec.name in DESKEW_ROWS and bool(self.variants(spec))

    def options_for(self, variant: QueryVariant, row_options: RetrievalOptions) -> RetrievalOptions:
        """``row_options`` (the row's own, e.g. self-training) with the variant's on top."""
        options = replace(row_options, **TRANSDUCTIVE) if variant.transductive else row_options
        if variant.deskew:
            views = QUARTER_VIEWS if variant.choose_upright else (0.0,)
            return replace(
                options,
                deskew_queries=True,
                rotations=views,
                rotation_side="query",
                choose_upright=variant.choose_upright,
            )
        if not variant.tta:
            return options
        return replace(options, rotations=ROTATION_TTA, rotation_side=self.run.rotation_side)

    def queries_for(self, variant: QueryVariant) -> tuple[list[ImageRef], dict[str, list[str]]]:
        layout = DataLayout(self.data_root / ROTATED_DIR if variant.rotated else self.data_root)
        return read_images(layout.queries), read_truth(layout.truth)

    def epochs_for(self, spec: RowSpec) -> int:
        if spec.recipe == "frozen":
            return 0
        return self.run.epochs or (SMOKE_EPOCHS if self.run.smoke else DEFAULT_EPOCHS)

    def size_for(self, spec: RowSpec) -> int:
        """The given size, else the smoke run's, else the row's backbone's native size (224 / 240 / 260
        for Lite0 / 1 / 2, from timm's pretrained configs)."""
        if self.run.image_size or self.run.smoke:
            return self.run.image_size or SMOKE_IMAGE_SIZE
        return BACKBONE_PRESETS[spec.backbone].native_size

    def seeds_for(self, spec: RowSpec) -> tuple[int, ...]:
        return self.run.seeds if spec.multi_seed else self.run.seeds[:1]

    def weights_root(self, spec_name: str, seed: int) -> Path:
        return self.run.out / "weights" / spec_name / f"seed{seed}"


def train_config(spec: RowSpec, seed: int, epochs: int, image_size: int) -> TrainConfig:
    """One row's training run. Frozen rows: ``epochs=0`` (the reference). Others: their config recipe
    (``finetune``, shipped as the default for pretrained backbones)."""
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
        "last_stride_one": spec.last_stride_one,
    }
    if spec.recipe == "frozen":
        return TrainConfig(**fields)
    return recipe_config(spec.recipe, **fields)
