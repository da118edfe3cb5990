"""Rotation TTA: views of one side's images at several in-plane angles, a pair scored by its best view."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from jdfashion.data.jdformat import read_images
from jdfashion.data.loader import eval_transform
from jdfashion.fusion import fuse, tune_weights_from_relevance
from jdfashion.options import ROTATION_TTA, RetrievalOptions, parse_rotations
from jdfashion.search import best_view, topk
from jdfashion.submission import validate_submission


def unit(tensor: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(tensor, dim=-1)


def best_pair_scores(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """The definition, in float64: max over every (query view, gallery view) of the cosine."""
    q = unit(queries.double()).reshape(-1, *queries.shape[-2:])
    g = unit(gallery.double()).reshape(-1, *gallery.shape[-2:])
    return torch.stack([qv @ gv.T for qv in q for gv in g]).amax(dim=0)


@pytest.mark.parametrize(
    ("query_views", "gallery_views", "chunk"),
    [(5, 0, 7), (0, 3, 7), (2, 3, 4), (5, 0, 1000)],
)
def test_views_rank_by_the_best_pair_whatever_the_chunking(query_views, gallery_views, chunk) -> None:
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(*([query_views] if query_views else []), 23, 16, generator=generator)
    gallery = torch.randn(*([gallery_views] if gallery_views else []), 41, 16, generator=generator)
    scores, indices = topk(queries, gallery, 10, chunk_size=chunk, query_chunk_size=6)
    expected = best_pair_scores(queries, gallery)
    reference = torch.sort(expected, dim=1, descending=True, stable=True)
    assert np.array_equal(indices, reference.indices[:, :10].numpy())
    assert np.allclose(scores, reference.values[:, :10].numpy(), atol=1e-5)


def test_a_turned_query_finds_its_match_through_the_turned_view() -> None:
    """View 1 of each query is its match exactly; view 0 is noise that points elsewhere."""
    generator = torch.Generator().manual_seed(2)
    gallery = unit(torch.randn(30, 32, generator=generator))
    matches = torch.arange(10) * 3
    noise = unit(gallery[(matches + 1) % 30] + 0.1 * torch.randn(10, 32, generator=generator))
    views = torch.stack([noise, gallery[matches]])
    assert not np.array_equal(topk(views[0], gallery, 1)[1][:, 0], matches.numpy())
    assert np.array_equal(topk(views, gallery, 1)[1][:, 0], matches.numpy())
    assert torch.equal(torch.as_tensor(best_view(views, gallery)), gallery[matches])
    relevant = np.zeros((10, 30), dtype=bool)
    relevant[np.arange(10), matches.numpy()] = True
    tuned = tune_weights_from_relevance(
        {"a": views, "b": views[:, :, :16]}, {"a": gallery, "b": gallery[:, :16]}, relevant
    )
    assert tuned.fused_map == 1.0, "validation tuning must score views the way the search does"


def test_fused_views_are_the_views_fused() -> None:
    generator = torch.Generator().manual_seed(3)
    features = {
        "a": torch.randn(3, 5, 8, generator=generator),
        "b": torch.randn(3, 5, 4, generator=generator),
    }
    weights = {"a": 0.7, "b": 0.3}
    fused = fuse(features, weights)
    assert fused.shape == (3, 5, 12)
    for view in range(3):
        assert torch.allclose(fused[view], fuse({m: f[view] for m, f in features.items()}, weights))
    with pytest.raises(ValueError, match="every model's features have views"):
        fuse({"a": features["a"], "b": features["b"][0]}, weights)


def test_a_quarter_turn_is_exact_and_turns_counter_clockwise() -> None:
    image = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    stats = ((0.0,) * 3, (1.0,) * 3)
    upright = eval_transform(24, *stats)(image=image)["image"]
    turned = eval_transform(24, *stats, rotation=90)(image=image)["image"]
    assert torch.allclose(turned, torch.rot90(upright, 1, dims=(1, 2)), atol=1e-6)
    assert torch.equal(eval_transform(24, *stats, rotation=360)(image=image)["image"], upright)


def test_rotation_options_are_checked() -> None:
    assert parse_rotations("tta") == ROTATION_TTA
    assert parse_rotations("-90,0,90") == (-90.0, 0.0, 90.0)
    with pytest.raises(ValueError, match="comma-separated degrees"):
        parse_rotations("0,ninety")
    with pytest.raises(ValueError, match="distinct"):
        parse_rotations("0,0")
    with pytest.raises(ValueError, match="query side"):
        RetrievalOptions(k_reciprocal=True, rotations=ROTATION_TTA, rotation_side="gallery")
    assert RetrievalOptions(rotations=ROTATION_TTA).angles("gallery") == (0.0,)


def test_rotation_tta_through_the_cli(
    tiny_resnet18: tuple[Path, Path, list[str | Path]], cli: Callable[..., str], tmp_path: Path
) -> None:
    """extract, fuse --tune and submit with --rotations: one cache per angle, a valid submission."""
    data, weights, common = tiny_resnet18
    invoke = cli
    invoke("extract", "--backbone", "resnet18", "--split", "val", "--rotations", "-90,0,90", *common)
    rotations = [
        json.loads(index.read_text()).get("rotation") for index in (weights / "features").glob("*/index.json")
    ]
    assert sorted(rotations) == [-90.0, 0.0, 0.0, 90.0], "three query views and one gallery"
    invoke("fuse", "--tune", "--rotations", "tta", *common)
    invoke("submit", "--team", "tta", "--rotations", "tta", "--out", tmp_path / "subs", *common)
    item = tmp_path / "subs" / "Item_tta.txt"
    queries = [ref.url for ref in read_images(data / "q_all.txt")]
    assert validate_submission(item, queries, {ref.url for ref in read_images(data / "s.txt")}) == []
    gallery_side = invoke(
        "extract",
        "--backbone",
        "resnet18",
        "--split",
        "val",
        "--rotations",
        "tta",
        "--rotation-side",
        "gallery",
        *common,
    )
    assert "clothes/resnet18 val" in gallery_side
