"""Score-level fusion of several backbones, S = sum_m w_m * cos_m(q, g), with weights per category.

:func:`fused_topk` forms that sum inside the chunked search from each model's own cached features
(no fused copy of the gallery). Re-ranking methods need one vector per image: for them :func:`fuse`
concatenates sqrt(w_m) * unit(f_m), whose dot products are the same weighted sum.

Weight specs (``parse_weights``): ``model=weight`` pairs separated by ``,``; an optional
``category:`` prefix scopes a group to one category (clothes/bags/shoes, or 0/1/2); groups are
separated by ``;``; a group without a prefix is the ``*`` default for categories not named::

    resnet101=0.3,resnet152=0.3,resnext101=0.2,densenet169=0.2
    clothes:resnet101=0.5,resnet152=0.5;bags:resnet101=1;resnet101=0.25,densenet169=0.75

or the path of a JSON file written by :meth:`FusionWeights.save`. Weights are normalised to sum 1.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table
from scipy.optimize import differential_evolution

from jdfashion.atomic import atomic_write_text
from jdfashion.blocks import is_half
from jdfashion.data.jdformat import Category
from jdfashion.metrics import ApNorm, average_precision, rank1, truth_matrix
from jdfashion.options import SCORE_NORMALISATIONS, ScoreNormalisation
from jdfashion.search import Features, Member, rank_rows, scale_column, search, unit_rows, views

DEFAULT = "*"
FORMAT = "jdfashion-fusion-weights"
FORMAT_VERSION = 1
ROW_CHUNK = 8192
SCORE_BUDGET_BYTES = 1 << 28


def _normalised(label: str, weights: Mapping[str, float]) -> dict[str, float]:
    """Checked weights of one category, scaled to sum 1; errors name the category and model."""
    if not weights:
        raise ValueError(f"{label}: no models")
    checked = {}
    for model, weight in weights.items():
        if not model or not isinstance(model, str):
            raise ValueError(f"{label}: model name {model!r} must be a non-empty string")
        if (
            isinstance(weight, bool)
            or not isinstance(weight, int | float)
            or not math.isfinite(weight)
            or weight < 0
        ):
            raise ValueError(f"{label}.{model}: weight {weight!r} must be a finite number >= 0")
        checked[model] = float(weight)
    total = sum(checked.values())
    if total <= 0:
        raise ValueError(f"{label}: weights sum to 0")
    return {model: weight / total for model, weight in checked.items()}


def _category_key(label: str) -> str:
    return DEFAULT if label == DEFAULT else Category.parse(label).label


@dataclass(frozen=True)
class FusionWeights:
    """Per category label (or ``*``, the default) the models' weights, each category summing to 1."""

    by_category: Mapping[str, Mapping[str, float]]

    def __post_init__(self) -> None:
        if not self.by_category:
            raise ValueError("fusion weights name no category")
        normalised = {}
        for label, weights in self.by_category.items():
            try:
                key = _category_key(label)
            except ValueError as error:
                raise ValueError(f"{label}: {error}") from error
            if key in normalised:
                raise ValueError(f"{label}: category given twice")
            normalised[key] = _normalised(key, weights)
        object.__setattr__(self, "by_category", normalised)

    def for_category(self, label: str) -> dict[str, float]:
        weights = self.by_category.get(_category_key(label), self.by_category.get(DEFAULT))
        if weights is None:
            raise ValueError(f"no fusion weights for category {label} and no '{DEFAULT}' default")
        return dict(weights)

    def to_json(self) -> str:
        return json.dumps(
            {"format": FORMAT, "version": FORMAT_VERSION, "weights": self.by_category},
            indent=1,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str, source: str = "<json>") -> FusionWeights:
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source}:{error.lineno}: {error.msg}") from error
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ValueError(f"{source}: format: not a {FORMAT} file")
        if document.get("version") != FORMAT_VERSION:
            raise ValueError(f"{source}: version: {document.get('version')!r} is not {FORMAT_VERSION}")
        weights = document.get("weights")
        if not isinstance(weights, dict) or not all(isinstance(group, dict) for group in weights.values()):
            raise ValueError(f"{source}: weights: expected {{category: {{model: weight}}}}")
        try:
            return cls(weights)
        except ValueError as error:
            raise ValueError(f"{source}: weights.{error}") from error

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> FusionWeights:
        return cls.from_json(Path(path).read_text(encoding="utf-8"), str(path))


def parse_weights(spec: str) -> FusionWeights:
    """A weight spec (see the module docstring) or a JSON file path; errors quote the bad token."""
    text = spec.strip()
    if not text:
        raise ValueError("empty fusion weight spec")
    if text.endswith(".json") or Path(text).is_file():
        return FusionWeights.load(text)
    by_category: dict[str, dict[str, float]] = {}
    for number, group in enumerate(text.split(";"), start=1):
        if not group.strip():
            raise ValueError(f"{text!r}: group {number} is empty")
        head, colon, rest = group.partition(":")
        label, body = (head.strip(), rest) if colon and "=" not in head else (DEFAULT, group)
        try:
            key = _category_key(label)
        except ValueError as error:
            raise ValueError(f"{group.strip()!r}: {error}") from error
        if key in by_category:
            raise ValueError(f"{group.strip()!r}: category {key} given twice")
        weights: dict[str, float] = {}
        for token in body.split(","):
            model, equals, value = (part.strip() for part in token.partition("="))
            if not equals or not model:
                raise ValueError(f"{token.strip()!r}: expected model=weight")
            if model in weights:
                raise ValueError(f"{token.strip()!r}: model {model} given twice in {key}")
            try:
                weights[model] = float(value)
            except ValueError:
                raise ValueError(f"{token.strip()!r}: weight {value!r} is not a number") from None
        try:
            by_category[key] = _normalised(key, weights)
        except ValueError as error:
            raise ValueError(f"{group.strip()!r}: {error}") from error
    return FusionWeights(by_category)


def weighted_models(features: Mapping[str, Features], weights: Mapping[str, float]) -> list[str]:
    """The models with a positive weight, sorted, each with features; errors name what is missing."""
    models = sorted(model for model, weight in weights.items() if weight > 0)
    if any(weight < 0 or not math.isfinite(weight) for weight in weights.values()):
        raise ValueError(f"weights must be finite and >= 0, got {dict(weights)}")
    if not models:
        raise ValueError("no model has a positive weight")
    missing = [model for model in models if model not in features]
    if missing:
        raise ValueError(
            f"no features for model(s) {', '.join(missing)} (have {', '.join(sorted(features))})"
        )
    return models


def score_scales(
    queries: Features, gallery: Features, normalisation: ScoreNormalisation
) -> torch.Tensor | None:
    """Per query (view), the factor that puts one model's cosines on a common scale: 1 / their standard
    deviation over the gallery (``zscore``) or 1 / their range (``minmax``); None for ``none``.

    Subtracting each query's mean (or minimum) would shift all of its scores alike, which changes no
    ranking, so both normalisations are exactly per-query weights (:class:`jdfashion.search.Member`)
    and the fused search stays chunked. Statistics are taken over every gallery row and view, in
    float64, one gallery chunk at a time. (V, Q, D) queries give (V, Q), (Q, D) give (Q,)."""
    if normalisation == "none":
        return None
    if normalisation not in SCORE_NORMALISATIONS:
        raise ValueError(f"score normalisation must be one of {SCORE_NORMALISATIONS}, got {normalisation!r}")
    device = torch.device("cpu")
    query_views = [
        unit_rows(v, np.arange(v.shape[0]), device, "query", torch.float64) for v in views(queries)
    ]
    gallery_size = gallery.shape[-2]
    total = [torch.zeros(len(q), dtype=torch.float64) for q in query_views]
    squares = [torch.zeros(len(q), dtype=torch.float64) for q in query_views]
    highest = [torch.full((len(q),), -math.inf, dtype=torch.float64) for q in query_views]
    lowest = [torch.full((len(q),), math.inf, dtype=torch.float64) for q in query_views]
    for start in range(0, gallery_size, ROW_CHUNK):
        rows = np.arange(start, min(start + ROW_CHUNK, gallery_size))
        for gallery_view in views(gallery):
            block = unit_rows(gallery_view, rows, device, "gallery", torch.float64)
            for number, query in enumerate(query_views):
                scores = query @ block.T
                total[number] += scores.sum(1)
                squares[number] += (scores * scores).sum(1)
                highest[number] = torch.maximum(highest[number], scores.amax(1))
                lowest[number] = torch.minimum(lowest[number], scores.amin(1))
    count = gallery_size * len(views(gallery))
    spreads = []
    for number in range(len(query_views)):
        if normalisation == "zscore":
            mean = total[number] / count
            spreads.append((squares[number] / count - mean * mean).clamp_min(0).sqrt())
        else:
            spreads.append(highest[number] - lowest[number])
    spread = torch.stack(spreads) if queries.ndim == 3 else spreads[0]
    # A query whose scores do not spread (a one-image gallery) keeps weight 1 rather than infinity.
    return torch.where(spread > 1e-12, 1 / spread.clamp_min(1e-12), torch.ones_like(spread))


def fused_topk(
    query_features: Mapping[str, Features],
    gallery_features: Mapping[str, Features],
    weights: Mapping[str, float],
    k: int,
    query_scales: Mapping[str, torch.Tensor | None] | None = None,
    **options: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by sum_m w_m s_mq cos_m(q, g), fused chunk by chunk inside the search
    (:func:`jdfashion.search.search`): no fused copy of the gallery, the same ranking as
    ``topk(fuse(queries), fuse(gallery))`` without its fp16 rounding. ``query_scales`` (per model, from
    :func:`score_scales`) are the per-query factors s_mq, 1 without. ``options`` as for the search."""
    models = weighted_models(query_features, weights)
    weighted_models(gallery_features, weights)
    scales = query_scales or {}
    members = [Member(query_features[m], gallery_features[m], weights[m], scales.get(m)) for m in models]
    return search(members, k, **options)


def fuse(features: Mapping[str, Features], weights: Mapping[str, float]) -> torch.Tensor:
    """Concatenate sqrt(w_m) * unit(f_m) over the models with w_m > 0, in sorted model order.

    fuse(q) . fuse(g) = sum_m w_m cos_m(q, g). The result is fp16 when every input is fp16 (the
    fused test gallery is large) and fp32 otherwise; rows are converted in chunks. (V, N, D) views
    (rotation TTA) fuse view by view into (V, N, sum D): view v of every model is the same image
    turned by the same angle.
    """
    view_counts = {len(views(f)) if f.ndim == 3 else 0 for f in features.values()}
    if len(view_counts) > 1:
        raise ValueError("either every model's features have views (V, N, D) with the same V, or none")
    if view_counts != {0}:
        return torch.stack(
            [
                fuse({model: f[view] for model, f in features.items()}, weights)
                for view in range(view_counts.pop())
            ]
        )
    models = weighted_models(features, weights)
    rows = {len(features[model]) for model in models}
    if len(rows) != 1 or any(features[model].ndim != 2 for model in models):
        raise ValueError("every model's features must be (N, D) with the same N")
    count = rows.pop()
    half = all(is_half(features[model]) for model in models)
    dims = [features[model].shape[1] for model in models]
    fused = torch.empty((count, sum(dims)), dtype=torch.float16 if half else torch.float32)
    offset = 0
    for model, dim in zip(models, dims, strict=True):
        scale = math.sqrt(weights[model])
        for start in range(0, count, ROW_CHUNK):
            chunk = np.arange(start, min(start + ROW_CHUNK, count))
            block = unit_rows(features[model], chunk, torch.device("cpu"), model)
            fused[start : start + len(chunk), offset : offset + dim] = scale * block
        offset += dim
    return fused


def simplex_grid(num_models: int, step: float) -> np.ndarray:
    """All weight vectors with entries in multiples of ``step`` summing to 1; row i < M is model i alone."""
    divisions = round(1 / step)
    if divisions < 1 or not math.isclose(divisions * step, 1.0, rel_tol=1e-9):
        raise ValueError(f"grid_step must divide 1 (e.g. 0.1, 0.05, 0.25), got {step}")
    points = []
    for bars in itertools.combinations(range(divisions + num_models - 1), num_models - 1):
        edges = np.array([-1, *bars, divisions + num_models - 1])
        points.append(np.diff(edges) - 1)
    grid = np.array(points, dtype=np.float64) / divisions
    return np.concatenate([np.eye(num_models), grid[grid.max(axis=1) < 1]])


@dataclass(frozen=True)
class TuneResult:
    weights: dict[str, float]
    fused_map: float
    fused_rank1: float
    per_model: dict[str, tuple[float, float]]
    evaluations: int
    k: int = 10


@dataclass
class _ValidationScorer:
    """Scores weight vectors on validation: one (M, V, Q, G) fp32 score stack (V pairs of query and
    gallery views, a pair scored by its best views of the fused score, as the search does)."""

    scores: torch.Tensor
    relevant: torch.Tensor
    truth_sizes: np.ndarray
    k: int
    ap_norm: ApNorm
    best: tuple[float, float, np.ndarray] | None = None
    evaluations: int = 0
    _query_rows: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self._query_rows = torch.arange(self.scores.shape[2]).unsqueeze(1)

    def __call__(self, weight_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mAP, rank-1) per row of ``weight_rows`` (B, M); keeps the best seen (ties keep the earlier)."""
        _, num_views, num_queries, gallery_size = self.scores.shape
        batch = max(1, SCORE_BUDGET_BYTES // (4 * num_views * num_queries * gallery_size))
        maps, firsts = [], []
        for start in range(0, len(weight_rows), batch):
            rows = weight_rows[start : start + batch]
            fused = torch.tensordot(torch.from_numpy(rows).float(), self.scores, dims=1).amax(dim=1)
            _, columns = rank_rows(fused.reshape(-1, gallery_size), min(self.k, gallery_size))
            flags = self.relevant[self._query_rows.repeat(len(rows), 1), columns].numpy()
            flags = np.pad(flags, ((0, 0), (0, self.k - flags.shape[1]))).reshape(
                len(rows), num_queries, self.k
            )
            maps.append(average_precision(flags, self.truth_sizes, ap_norm=self.ap_norm).mean(axis=1))
            firsts.append(rank1(flags).mean(axis=1))
        map_values, rank1_values = np.concatenate(maps), np.concatenate(firsts)
        self.evaluations += len(weight_rows)
        for row, map_value, rank1_value in zip(weight_rows, map_values, rank1_values, strict=True):
            if self.best is None or (map_value, rank1_value) > self.best[:2]:
                self.best = (float(map_value), float(rank1_value), row.copy())
        return map_values, rank1_values


def tune_weights_from_relevance(
    query_features: Mapping[str, Features],
    gallery_features: Mapping[str, Features],
    relevant: np.ndarray,
    truth_sizes: np.ndarray | None = None,
    *,
    k: int = 10,
    ap_norm: ApNorm = "min",
    grid_step: float = 0.1,
    refine_iterations: int = 30,
    seed: int = 0,
    query_scales: Mapping[str, torch.Tensor | None] | None = None,
) -> TuneResult:
    """Weights maximising validation mAP@k, given (Q, G) relevance (|T_q| defaults to its row sums),
    each model's scores times its per-query ``query_scales`` as :func:`fused_topk` ranks them.

    A simplex grid (its vertices are the single models, so the result is never below the best one)
    finds the region; differential evolution, seeded with the best grid points, then searches
    between them. mAP is piecewise constant in the weights, so gradients are zero almost everywhere:
    DE only compares values, and its population jumps across plateaus where a local simplex method
    would shrink in place. The best vector ever evaluated is returned.
    """
    models = sorted(query_features)
    if not models or sorted(gallery_features) != models:
        raise ValueError(
            f"query and gallery features name different models: {models} vs {sorted(gallery_features)}"
        )
    relevant = np.asarray(relevant, dtype=bool)
    num_queries, gallery_size = query_features[models[0]].shape[-2], gallery_features[models[0]].shape[-2]
    if relevant.shape != (num_queries, gallery_size):
        raise ValueError(
            f"relevance must be (queries, gallery) = {(num_queries, gallery_size)}, got {relevant.shape}"
        )
    sizes = relevant.sum(axis=1) if truth_sizes is None else np.asarray(truth_sizes)
    device = torch.device("cpu")
    view_counts = {(len(views(query_features[m])), len(views(gallery_features[m]))) for m in models}
    if len(view_counts) > 1:
        raise ValueError(f"models have different numbers of (query, gallery) views: {sorted(view_counts)}")
    rows = (np.arange(num_queries), np.arange(gallery_size))
    scales = query_scales or {}
    scores = torch.stack(
        [
            torch.stack(
                [
                    (
                        unit_rows(query, rows[0], device, f"{m} query")
                        * scale_column(scales.get(m), number, rows[0])
                    ).float()
                    @ unit_rows(gallery, rows[1], device, f"{m} gallery").T
                    for (number, query), gallery in itertools.product(
                        enumerate(views(query_features[m])), views(gallery_features[m])
                    )
                ]
            )
            for m in models
        ]
    )
    scorer = _ValidationScorer(scores, torch.from_numpy(relevant), sizes, k, ap_norm)
    grid = simplex_grid(len(models), grid_step)
    grid_maps, grid_rank1s = scorer(grid)
    per_model = {m: (float(grid_maps[i]), float(grid_rank1s[i])) for i, m in enumerate(models)}
    if len(models) > 1 and refine_iterations > 0:
        population_size = max(5, 4 * len(models))
        population = grid[np.argsort(-grid_maps, kind="stable")[:population_size]]
        if len(population) < 5:
            extra = np.random.default_rng(seed).dirichlet(np.ones(len(models)), 5 - len(population))
            population = np.concatenate([population, extra])

        def negative_map(candidates: np.ndarray) -> np.ndarray:
            # DE passes (M, S) columns; weights are the columns scaled onto the simplex.
            totals = candidates.sum(axis=0, keepdims=True)
            uniform = np.full_like(candidates, 1 / len(models))
            weights = np.where(totals > 0, candidates / np.where(totals > 0, totals, 1), uniform)
            return -scorer(weights.T)[0]

        differential_evolution(
            negative_map,
            bounds=[(0.0, 1.0)] * len(models),
            init=population,
            maxiter=refine_iterations,
            seed=seed,
            polish=False,
            tol=0,
            updating="deferred",
            vectorized=True,
        )
    assert scorer.best is not None
    best_map, best_rank1, best_weights = scorer.best
    return TuneResult(
        weights={m: float(w) for m, w in zip(models, best_weights, strict=True)},
        fused_map=best_map,
        fused_rank1=best_rank1,
        per_model=per_model,
        evaluations=scorer.evaluations,
        k=k,
    )


def tune_weights(
    query_features: Mapping[str, Features],
    gallery_features: Mapping[str, Features],
    query_ids: Sequence[str],
    gallery_ids: Sequence[str],
    truth: Mapping[str, Collection[str]],
    **options: Any,
) -> TuneResult:
    """:func:`tune_weights_from_relevance` with the relevance built from ids and a truth mapping."""
    relevant, sizes = truth_matrix(query_ids, gallery_ids, truth)
    return tune_weights_from_relevance(query_features, gallery_features, relevant, sizes, **options)


def fusion_table(result: TuneResult, title: str | None = None) -> Table:
    """Each single model's validation scores beside the fused ones, with the chosen weights."""
    table = Table(title=title, caption=f"{result.evaluations} weight vectors evaluated")
    table.add_column("model")
    table.add_column("weight", justify="right")
    table.add_column(f"mAP@{result.k}", justify="right")
    table.add_column("rank-1", justify="right")
    for model, (map_value, rank1_value) in result.per_model.items():
        table.add_row(model, f"{result.weights[model]:.3f}", f"{map_value:.4f}", f"{rank1_value:.2%}")
    table.add_row("fused", "1.000", f"{result.fused_map:.4f}", f"{result.fused_rank1:.2%}", style="bold")
    return table
