"""One split's features to ranked lists, with no files or models in sight: centring, query
augmentation and rotation views per model before the fused search, re-ranking on fused vectors.

Self-training is a stage of its own before all of them: :func:`self_trained` maps one model's query
and gallery features once (the workspace applies it where features become "as ranked",
:meth:`jdfashion.workspace.Workspace.self_trained_once`); the ranking functions rank what they are
given and refuse features that options say should be mapped and are not."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch

from jdfashion.features import (
    FeatureSet,
)
from jdfashion.fusion import (
    fuse,
    fused_topk,
    score_scales,
)
from jdfashion.options import RetrievalOptions
from jdfashion.rerank import database_augmentation, domain_centring, k_reciprocal_rerank, query_expansion
from jdfashion.search import Features, best_view, topk, views
from jdfashion.selftrain import apply_part_map, confident_queries, learn_part_map, part_view
from jdfashion.submission import TOP_K


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
    return topk(queries, gallery, k, precision=options.search_precision)


def searched_sides(
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


def model_query_scales(
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
    query_features, gallery_features = searched_sides(query_sets, gallery_sets, models, options)
    if not options.reranks:
        scales = model_query_scales(query_features, gallery_features, options) if len(models) > 1 else None
        return fused_topk(
            query_features,
            gallery_features,
            weights,
            k,
            query_scales=scales,
            precision=options.search_precision,
        )
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
    back unchanged without self-training in ``options``; features mapped already are refused (a map
    learned on mapped features would be applied on top of the first)."""
    settings = options.self_training
    if query_set.part_mapped or gallery_set.part_mapped:
        mapped = "query" if query_set.part_mapped else "gallery"
        raise ValueError(f"the {mapped} features are part-mapped already: self-train each pair once")
    if settings is None:
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


def require_mapped(
    query_sets: dict[str, FeatureSet],
    gallery_sets: dict[str, FeatureSet],
    models: Sequence[str],
    options: RetrievalOptions,
) -> None:
    """With self-training on, every model's features must come through :func:`self_trained`."""
    if options.self_training is None:
        return
    unmapped = [m for m in models if not (query_sets[m].part_mapped and gallery_sets[m].part_mapped)]
    if unmapped:
        raise ValueError(
            f"self-training is on but the features of {', '.join(unmapped)} are not mapped: pass each "
            "model's (query, gallery) through ranking.self_trained (or Workspace.self_trained_once) first"
        )


def ranked_lists(
    query_sets: dict[str, FeatureSet],
    gallery_sets: dict[str, FeatureSet],
    weights: dict[str, float],
    options: RetrievalOptions,
    k: int = TOP_K,
) -> dict[str, list[str]]:
    """Fused exact top-k gallery ids per query under ``options`` (see :func:`_ranking`); with
    self-training, of features each model's :func:`self_trained` has mapped."""
    models = [name for name, weight in weights.items() if weight > 0]
    require_mapped(query_sets, gallery_sets, models, options)
    width = min(k, len(gallery_sets[models[0]].ids))
    _, indices = _ranking(query_sets, gallery_sets, weights, options, width)
    query_ids = query_sets[models[0]].ids
    gallery_ids = gallery_sets[models[0]].ids
    return {
        q: [gallery_ids[i] for i in row if i >= 0] for q, row in zip(query_ids, indices.tolist(), strict=True)
    }
