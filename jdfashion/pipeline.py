"""The competition chain over a workspace: tune fusion on validation, evaluate, submit.

The CLI commands ``fuse``, ``submit`` and ``quickstart`` are thin wrappers of these functions;
notebooks call them the same way. Features come from :mod:`jdfashion.workspace`, rankings from
:mod:`jdfashion.ranking`, the settings from :mod:`jdfashion.options`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jdfashion.data.jdformat import Category, ImageRef
from jdfashion.features import (
    FeatureSet,
)
from jdfashion.fusion import (
    FusionWeights,
    TuneResult,
    tune_weights,
)
from jdfashion.metrics import Scores, evaluate
from jdfashion.options import RetrievalOptions
from jdfashion.ranking import model_query_scales, ranked_lists, require_mapped, searched_sides
from jdfashion.submission import TOP_K, submission_filename, write_submission
from jdfashion.workspace import (
    TestAssignment,
    ValidationSet,
    Workspace,
    as_ranked,
    assign_test,
    backbone_models,
    validation_as_ranked,
    validation_set,
)


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
        models = backbone_models(workspace, workspace.backbones(category, backbones))
        sets = validation_as_ranked(models, category, options)
        results[category] = tune_on_validation(sets, validation_set(workspace.data, category), options)
    weights = FusionWeights({category.label: result.weights for category, result in results.items()})
    return weights, results


def tune_on_validation(
    sets: dict[str, tuple[FeatureSet, FeatureSet]], val: ValidationSet, options: RetrievalOptions
) -> TuneResult:
    """Fusion weights from each model's validation (query, gallery) features, scored as ``options``
    rank: views by their best pair, centring and query augmentation, which act per model before the
    weighted sum (the options that need fused vectors, DBA, QE and k-reciprocal, are not tuned for);
    with self-training, of features each model's :func:`jdfashion.ranking.self_trained` has mapped."""
    require_mapped(
        {m: q for m, (q, _) in sets.items()}, {m: g for m, (_, g) in sets.items()}, list(sets), options
    )
    queries, gallery = searched_sides(
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
        query_scales=model_query_scales(queries, gallery, options),
    )


def evaluate_validation(
    workspace: Workspace, weights: FusionWeights, categories: Sequence[Category], options: RetrievalOptions
) -> Scores:
    """Fused validation scores over all categories (each category searched inside its own gallery)."""
    run, truth, query_category = {}, {}, {}
    for category in categories:
        val = validation_set(workspace.data, category)
        category_weights = weights_for(workspace, weights, category)
        sets = validation_as_ranked(backbone_models(workspace, list(category_weights)), category, options)
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
            models = backbone_models(workspace, list(category_weights))
            sets = as_ranked(models, routed, queries, gallery, options, "test")
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
