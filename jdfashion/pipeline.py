"""The competition chain over a data root and a weights root: features -> fusion -> submission -> score.

The CLI commands ``extract``, ``fuse``, ``submit`` and ``quickstart`` are thin wrappers of these
functions; notebooks call them the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from jdfashion.checkpoint import TrainedModel, load_trained
from jdfashion.data.jdformat import Category, ImageRef, read_images, read_truth
from jdfashion.features import ExtractOptions, FeatureCache, FeatureSet, Head, predicted_categories
from jdfashion.fusion import FusionWeights, TuneResult, fuse, tune_weights
from jdfashion.metrics import Scores, evaluate
from jdfashion.paths import ROUTER, DataLayout, WeightsLayout
from jdfashion.rerank import database_augmentation, k_reciprocal_rerank, query_expansion
from jdfashion.search import topk
from jdfashion.submission import submission_filename, write_submission

TOP_K = 10


@dataclass(frozen=True)
class RetrievalOptions:
    """Inference-time choices shared by validation and submission, so what was tuned is what is submitted."""

    flip: bool = False
    query_expansion: bool = False
    database_augmentation: bool = False
    k_reciprocal: bool = False
    batch_size: int = 64
    num_workers: int = 2
    show_progress: bool = True

    def extraction(self, head: Head = "embedding") -> ExtractOptions:
        return ExtractOptions(head, self.flip, self.batch_size, self.num_workers, self.show_progress)


@dataclass
class Workspace:
    data: DataLayout
    weights: WeightsLayout
    device: str | None = None
    _models: dict[Path, TrainedModel] = field(default_factory=dict, repr=False)

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
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def trained(self, task: Category | str, backbone: str) -> TrainedModel:
        """Each model is loaded (and its weights hashed) once per workspace."""
        directory = self.weights.model_dir(task, backbone)
        if directory not in self._models:
            self._models[directory] = load_trained(directory, self.run_device)
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


@dataclass
class ValidationSet:
    category: Category
    queries: list[ImageRef]
    gallery: list[ImageRef]
    truth: dict[str, list[str]]


def validation_set(workspace: Workspace, category: Category) -> ValidationSet:
    layout = workspace.data
    if not layout.val_queries(category).exists():
        raise FileNotFoundError(
            f"{layout.val_queries(category)} is missing: run `jdfashion data split` first"
        )
    return ValidationSet(
        category,
        read_images(layout.val_queries(category)),
        read_images(layout.val_gallery(category)),
        read_truth(layout.val_truth(category)),
    )


def extract_validation(
    workspace: Workspace, backbone: str, category: Category, options: RetrievalOptions
) -> tuple[FeatureSet, FeatureSet]:
    val = validation_set(workspace, category)
    name = f"{category.label}/{backbone} val"
    return (
        workspace.features(category, backbone, val.queries, options, f"{name} queries"),
        workspace.features(category, backbone, val.gallery, options, f"{name} gallery"),
    )


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


def route_test(workspace: Workspace, router_backbone: str, options: RetrievalOptions) -> TestAssignment:
    """Predict every test query's and gallery image's category with the trained router (cached)."""
    queries = read_images(workspace.data.queries)
    gallery = read_images(workspace.data.gallery)
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
    return (
        workspace.features(category, backbone, queries, options, f"{name} queries"),
        workspace.features(category, backbone, gallery, options, f"{name} gallery"),
    )


def ranked_lists(
    query_sets: dict[str, FeatureSet],
    gallery_sets: dict[str, FeatureSet],
    weights: dict[str, float],
    options: RetrievalOptions,
    k: int = TOP_K,
) -> dict[str, list[str]]:
    """Fused exact top-k per query: one search over the weighted concatenation of the models' features."""
    models = [name for name, weight in weights.items() if weight > 0]
    queries = fuse({m: query_sets[m].features for m in models}, weights)
    gallery = fuse({m: gallery_sets[m].features for m in models}, weights)
    if options.database_augmentation:
        gallery = database_augmentation(gallery)
    if options.query_expansion:
        queries = query_expansion(queries, gallery)
    if options.k_reciprocal:
        _, indices = k_reciprocal_rerank(queries, gallery, top=k)
    else:
        _, indices = topk(queries, gallery, min(k, len(gallery)))
    query_ids = query_sets[models[0]].ids
    gallery_ids = gallery_sets[models[0]].ids
    return {
        q: [gallery_ids[i] for i in row if i >= 0] for q, row in zip(query_ids, indices.tolist(), strict=True)
    }


def tune_fusion(
    workspace: Workspace,
    backbones: Sequence[str],
    categories: Sequence[Category],
    options: RetrievalOptions,
) -> tuple[FusionWeights, dict[Category, TuneResult]]:
    """Per category, the weights that maximise validation mAP@10 (never below the best single model)."""
    results: dict[Category, TuneResult] = {}
    for category in categories:
        val = validation_set(workspace, category)
        query_features, gallery_features = {}, {}
        for backbone in backbones:
            q, g = extract_validation(workspace, backbone, category, options)
            query_features[backbone], gallery_features[backbone] = q.features, g.features
        results[category] = tune_weights(
            query_features,
            gallery_features,
            [r.url for r in val.queries],
            [r.url for r in val.gallery],
            val.truth,
        )
    weights = FusionWeights({category.label: result.weights for category, result in results.items()})
    return weights, results


def evaluate_validation(
    workspace: Workspace, weights: FusionWeights, categories: Sequence[Category], options: RetrievalOptions
) -> Scores:
    """Fused validation scores over all categories (each category searched inside its own gallery)."""
    run, truth, query_category = {}, {}, {}
    for category in categories:
        val = validation_set(workspace, category)
        category_weights = weights.for_category(category.label)
        sets = {b: extract_validation(workspace, b, category, options) for b in category_weights}
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


def submit(
    workspace: Workspace,
    team: str,
    weights: FusionWeights,
    router_backbone: str,
    options: RetrievalOptions,
    out_dir: Path = Path("submissions"),
) -> Path:
    """Route, extract, fuse and search every category; write and validate ``Item_<team>.txt``."""
    assignment = route_test(workspace, router_backbone, options)
    ranked: dict[str, list[str]] = {}
    for category in Category:
        queries, gallery = assignment.subset(category)
        if not queries:
            continue
        category_weights = weights.for_category(category.label)
        if gallery:
            sets = {b: extract_test(workspace, b, category, assignment, options) for b in category_weights}
            ranked.update(
                ranked_lists(
                    {b: s[0] for b, s in sets.items()},
                    {b: s[1] for b, s in sets.items()},
                    category_weights,
                    options,
                )
            )
        ranked.update(fill_short_lists(queries, ranked, assignment, category))
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
