"""Fusion: weight specs and files, the weighted concatenation, and validation tuning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console

from jdfashion.fusion import (
    FusionWeights,
    fuse,
    fused_topk,
    fusion_table,
    parse_weights,
    score_scales,
    simplex_grid,
    tune_weights,
    tune_weights_from_relevance,
)
from jdfashion.metrics import evaluate
from jdfashion.options import RetrievalOptions
from jdfashion.search import Member, search, topk


def test_a_global_spec_is_normalised() -> None:
    weights = parse_weights("resnet101=0.3, resnet152=0.3,resnext101=0.2,densenet169=0.2")
    assert weights.for_category("shoes") == pytest.approx(
        {"resnet101": 0.3, "resnet152": 0.3, "resnext101": 0.2, "densenet169": 0.2}
    )
    assert parse_weights("a=2,b=6").for_category("bags") == pytest.approx({"a": 0.25, "b": 0.75})


def test_per_category_groups_and_the_default() -> None:
    weights = parse_weights("tops:a=1,b=1;1:a=3,b=1;a=1")
    assert weights.for_category("clothes") == pytest.approx({"a": 0.5, "b": 0.5})
    assert weights.for_category("bags") == pytest.approx({"a": 0.75, "b": 0.25})
    assert weights.for_category("shoes") == {"a": 1.0}
    with pytest.raises(ValueError, match="no fusion weights for category shoes and no '\\*' default"):
        parse_weights("clothes:a=1").for_category("shoes")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty fusion weight spec"),
        ("a=1,b", "'b': expected model=weight"),
        ("a=1,=2", "'=2': expected model=weight"),
        ("a=x", "'a=x': weight 'x' is not a number"),
        ("a=1,b=-1", "'a=1,b=-1': \\*.b: weight -1.0 must be a finite number >= 0"),
        ("a=nan", "must be a finite number >= 0"),
        ("a=0,b=0", "weights sum to 0"),
        ("hats:a=1", "'hats:a=1': unknown category 'hats'"),
        ("a=1,a=2", "'a=2': model a given twice in \\*"),
        ("clothes:a=1;0:b=1", "'0:b=1': category clothes given twice"),
        ("a=1;", "'a=1;': group 2 is empty"),
        ("bags:", "'': expected model=weight"),
    ],
)
def test_bad_specs_name_the_token(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_weights(spec)


def test_json_round_trip_and_spec_paths(tmp_path: Path) -> None:
    weights = parse_weights("clothes:resnet101=0.5,resnet152=0.5;resnet101=1,densenet169=3")
    path = tmp_path / "deep" / "fusion.json"
    weights.save(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["fusion.json"]
    assert json.loads(path.read_text())["weights"]["*"] == {"densenet169": 0.75, "resnet101": 0.25}
    assert FusionWeights.load(path) == weights
    assert parse_weights(str(path)) == weights
    assert FusionWeights.from_json(weights.to_json()) == weights


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"format": "jdfashion-fusion-weights",\n "version": 1,\n "weights": {', r"fusion\.json:3: "),
        ('{"version": 1, "weights": {}}', r"fusion\.json: format: not a jdfashion-fusion-weights file"),
        ('{"format": "jdfashion-fusion-weights", "version": 7, "weights": {}}', "version: 7 is not 1"),
        ('{"format": "jdfashion-fusion-weights", "version": 1, "weights": {"*": 3}}', "weights: expected"),
        (
            '{"format": "jdfashion-fusion-weights", "version": 1, "weights": {"bags": {"a": "x"}}}',
            r"fusion\.json: weights\.bags\.a: weight 'x' must be a finite number",
        ),
        (
            '{"format": "jdfashion-fusion-weights", "version": 1, "weights": {"hats": {"a": 1}}}',
            "weights.hats",
        ),
    ],
)
def test_bad_weight_files_name_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "fusion.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        FusionWeights.load(path)


def test_weighted_concatenation_dot_equals_weighted_cosine_sum() -> None:
    rng = np.random.default_rng(0)
    dims = {"a": 8, "b": 5, "c": 12}
    queries = {m: rng.normal(size=(7, d)).astype(np.float32) * 3 for m, d in dims.items()}
    gallery = {m: torch.from_numpy(rng.normal(size=(11, d)).astype(np.float32)) for m, d in dims.items()}
    weights = {"a": 0.5, "b": 0.2, "c": 0.3}
    fused = fuse(queries, weights) @ fuse(gallery, weights).T

    def cosine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (
            y / np.linalg.norm(y, axis=1, keepdims=True)
        ).T

    expected = sum(w * cosine(queries[m], gallery[m].numpy()) for m, w in weights.items())
    np.testing.assert_allclose(fused.numpy(), expected, atol=1e-5)
    zero_weight = fuse(queries, {"a": 1.0, "b": 0.0})
    assert zero_weight.shape == (7, 8)
    assert fuse({m: torch.from_numpy(f).half() for m, f in queries.items()}, weights).dtype == torch.float16
    with pytest.raises(ValueError, match="no features for model\\(s\\) d"):
        fuse(queries, {"a": 0.5, "d": 0.5})


def test_simplex_grid_holds_every_step_vector_and_the_vertices_first() -> None:
    grid = simplex_grid(4, 0.1)
    assert len(grid) == math.comb(13, 3)
    np.testing.assert_allclose(grid.sum(axis=1), 1.0)
    np.testing.assert_array_equal(grid[:4], np.eye(4))
    assert len({tuple(np.round(row, 9)) for row in grid}) == len(grid)
    with pytest.raises(ValueError, match="grid_step must divide 1"):
        simplex_grid(3, 0.3)


def complementary_models(seed: int) -> tuple[dict, dict, np.ndarray]:
    """Model a finds the match for the first half of the queries only, model b for the second half."""
    rng = np.random.default_rng(seed)
    num_queries, gallery_size, dim = 40, 120, 16
    matches = rng.choice(gallery_size, size=num_queries, replace=False)
    gallery = {m: rng.normal(size=(gallery_size, dim)).astype(np.float32) for m in "ab"}
    queries = {}
    for model, informed in (("a", slice(0, 20)), ("b", slice(20, 40))):
        queries[model] = rng.normal(size=(num_queries, dim)).astype(np.float32)
        queries[model][informed] = gallery[model][matches[informed]] + 0.3 * rng.normal(size=(20, dim))
    relevant = np.zeros((num_queries, gallery_size), dtype=bool)
    relevant[np.arange(num_queries), matches] = True
    return queries, gallery, relevant


def test_fusing_complementary_models_beats_both() -> None:
    queries, gallery, relevant = complementary_models(seed=1)
    result = tune_weights_from_relevance(queries, gallery, relevant)
    best_single = max(score for score, _ in result.per_model.values())
    assert best_single < 0.65
    assert result.fused_map > best_single + 0.2
    assert min(result.weights.values()) > 0.2
    assert sum(result.weights.values()) == pytest.approx(1.0)


def run_of(queries: np.ndarray | torch.Tensor, gallery: np.ndarray | torch.Tensor) -> dict[str, list[str]]:
    _, indices = topk(queries, gallery, 10)
    return {f"q{row}": [f"g{i}" for i in ranked] for row, ranked in enumerate(indices.tolist())}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tuned_weights_never_lose_to_the_best_single_model_and_reproduce_in_search(seed: int) -> None:
    rng = np.random.default_rng(seed)
    gallery = {m: rng.normal(size=(150, 24)).astype(np.float32) for m in ("x", "y", "z")}
    noise = {"x": 1.2, "y": 1.6, "z": 2.0}
    queries = {
        m: g[:50] + noise[m] * rng.normal(size=(50, 24)).astype(np.float32) for m, g in gallery.items()
    }
    truth = {f"q{i}": [f"g{i}", f"g{50 + i}"] if i % 5 == 0 else [f"g{i}"] for i in range(50)}
    gallery_ids = [f"g{i}" for i in range(150)]
    result = tune_weights(
        queries, gallery, list(truth), gallery_ids, truth, grid_step=0.25, refine_iterations=10
    )
    assert result.fused_map >= max(score for score, _ in result.per_model.values())
    for model, (map_value, rank1_value) in result.per_model.items():
        alone = evaluate(run_of(queries[model], gallery[model]), truth).overall
        assert (map_value, rank1_value) == pytest.approx((alone.map, alone.rank1))
    fused = evaluate(run_of(fuse(queries, result.weights), fuse(gallery, result.weights)), truth).overall
    assert (fused.map, fused.rank1) == pytest.approx((result.fused_map, result.fused_rank1))


def test_ids_and_matrix_forms_agree_and_the_table_shows_every_model() -> None:
    queries, gallery, relevant = complementary_models(seed=2)
    truth = {f"q{i}": [f"g{j}" for j in np.flatnonzero(row)] for i, row in enumerate(relevant)}
    by_ids = tune_weights(queries, gallery, list(truth), [f"g{j}" for j in range(relevant.shape[1])], truth)
    assert by_ids == tune_weights_from_relevance(queries, gallery, relevant)
    console = Console(record=True, width=100)
    console.print(fusion_table(by_ids, title="clothes"))
    text = console.export_text()
    for model, (map_value, _) in by_ids.per_model.items():
        rows = [line.replace("│", " ").split() for line in text.splitlines()]
        assert [model, f"{by_ids.weights[model]:.3f}", f"{map_value:.4f}"] in [row[:3] for row in rows]
    assert f"{by_ids.fused_map:.4f}" in text


def spread_models(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Two models whose cosines spread differently per query: 'wide' sees the product sharply (and
    noisily), 'narrow' faintly; raw sums let 'wide' outvote 'narrow' query by query."""
    generator = torch.Generator().manual_seed(seed)
    gallery = {m: torch.randn(60, 16, generator=generator) for m in ("wide", "narrow")}
    queries = {
        "wide": gallery["wide"][:20] * 3 + 4 * torch.randn(20, 16, generator=generator),
        "narrow": gallery["narrow"][:20] + 0.5 * torch.randn(20, 16, generator=generator),
    }
    return queries, gallery


@pytest.mark.parametrize("normalisation", ["zscore", "minmax"])
def test_score_scales_are_the_inverse_spread_of_each_querys_cosines(normalisation: str) -> None:
    queries, gallery = spread_models(seed=0)
    views = torch.stack([queries["wide"], queries["narrow"]])  # (V, Q, D): each view its own scale
    scales = score_scales(views, gallery["wide"], normalisation)
    assert scales.shape == (2, 20)
    cosines = (
        torch.nn.functional.normalize(views.double(), dim=-1)
        @ torch.nn.functional.normalize(gallery["wide"].double(), dim=-1).T
    )
    spread = (
        cosines.std(-1, unbiased=False) if normalisation == "zscore" else cosines.amax(-1) - cosines.amin(-1)
    )
    assert torch.allclose(scales, 1 / spread)
    assert score_scales(views, gallery["wide"], "none") is None
    with pytest.raises(ValueError, match="score normalisation"):
        score_scales(views, gallery["wide"], "softmax")


@pytest.mark.parametrize("normalisation", ["zscore", "minmax"])
def test_normalised_fusion_ranks_by_the_normalised_score_sum_and_tunes_what_it_ranks(
    normalisation: str,
) -> None:
    """The fused search with per-query scales equals a float64 ranking of sum_m w_m (s - mean) / spread,
    the mean-free form being the same ranking; and the tuner scores exactly those rankings."""
    queries, gallery = spread_models(seed=1)
    weights = {"wide": 0.4, "narrow": 0.6}
    scales = {m: score_scales(queries[m], gallery[m], normalisation) for m in queries}
    _, indices = fused_topk(queries, gallery, weights, 10, query_scales=scales)
    expected = sum(
        weights[m]
        * scales[m][:, None]
        * (
            torch.nn.functional.normalize(queries[m].double(), dim=-1)
            @ torch.nn.functional.normalize(gallery[m].double(), dim=-1).T
        )
        for m in queries
    )
    assert np.array_equal(
        indices, torch.sort(expected, dim=1, descending=True, stable=True).indices[:, :10].numpy()
    )
    assert not np.array_equal(indices, fused_topk(queries, gallery, weights, 10)[1])
    truth = {f"q{i}": [f"g{i}"] for i in range(20)}
    gallery_ids = [f"g{i}" for i in range(60)]
    result = tune_weights(
        queries,
        gallery,
        list(truth),
        gallery_ids,
        truth,
        grid_step=0.25,
        refine_iterations=5,
        query_scales=scales,
    )
    _, tuned = fused_topk(queries, gallery, result.weights, 10, query_scales=scales)
    run = {f"q{row}": [f"g{i}" for i in ranked] for row, ranked in enumerate(tuned.tolist())}
    assert evaluate(run, truth).overall.map == pytest.approx(result.fused_map)


def test_a_query_scale_of_the_wrong_shape_or_sign_is_refused() -> None:
    queries, gallery = spread_models(seed=2)
    for scale in (torch.ones(19), -torch.ones(20), torch.full((20,), float("nan"))):
        with pytest.raises(ValueError, match="query_scale"):
            search([Member(queries["wide"], gallery["wide"], 1.0, scale)], 5)


def test_score_normalisation_is_refused_where_fused_vectors_are_searched() -> None:
    with pytest.raises(ValueError, match="score normalisation"):
        RetrievalOptions(score_normalisation="zscore", query_expansion=True)
    with pytest.raises(ValueError, match="score_normalisation must be one of"):
        RetrievalOptions(score_normalisation="softmax")
