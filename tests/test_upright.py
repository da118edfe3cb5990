"""Which way is up: the turn classifier (jdfashion.upright) and the view it keeps per query."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from jdfashion.data.jdformat import Category
from jdfashion.options import RetrievalOptions
from jdfashion.search import best_view, keep_views, view_matches
from jdfashion.upright import fit_turn_classifier, stands_upright, training_turns
from jdfashion.workspace import Workspace, extract_validation

QUARTER_VIEWS = (0.0, 90.0, -90.0)


def turned_embeddings(count: int, turns: tuple[float, ...], seed: int) -> torch.Tensor:
    """(T, N, D) embeddings of N photos at each turn: the photo's own content, plus a direction that
    each turn adds (what a CNN sees of up and down), plus noise."""
    generator = torch.Generator().manual_seed(seed)
    content = torch.randn(count, 48, generator=generator)
    # Seed 99 for the turn directions in every call: training and test photos share what a turn looks like.
    directions = torch.randn(len(turns), 48, generator=torch.Generator().manual_seed(99))
    noise = torch.randn(len(turns), count, 48, generator=generator)
    return torch.nn.functional.normalize(content + 0.5 * directions[:, None] + 0.3 * noise, dim=-1)


def turn_between(angle: float, upright: float) -> float:
    turn = (angle - upright) % 360
    return turn - 360 if turn > 180 else turn


def test_the_turns_a_query_can_show() -> None:
    """A query whose view at b is upright shows a - b at its view a: quarter views show all four turns."""
    assert training_turns(QUARTER_VIEWS) == (0.0, -90.0, 90.0, 180.0)
    assert training_turns((0.0,)) == (0.0,)
    assert training_turns((0.0, 45.0)) == (0.0, -45.0, 45.0)


def test_the_classifier_finds_the_upright_view_of_unseen_turned_photos() -> None:
    turns = training_turns(QUARTER_VIEWS)
    classifier = fit_turn_classifier(turned_embeddings(300, turns, seed=0), turns)
    test = turned_embeddings(100, turns, seed=1)
    index = {turn: number for number, turn in enumerate(turns)}
    for upright in QUARTER_VIEWS:
        # A query whose view at ``upright`` is the upright photo shows at its view a the turn a - upright.
        shown = torch.stack([test[index[turn_between(a, upright)]] for a in QUARTER_VIEWS])
        votes = classifier.upright_votes(shown, QUARTER_VIEWS)
        assert votes.shape == (3, 100)
        picked = votes.argmax(0)
        assert float((picked == QUARTER_VIEWS.index(upright)).float().mean()) > 0.95, upright


def test_the_same_photos_fit_the_same_classifier() -> None:
    turns = training_turns(QUARTER_VIEWS)
    photos = turned_embeddings(50, turns, seed=0)
    first, second = fit_turn_classifier(photos, turns), fit_turn_classifier(photos, turns)
    assert torch.equal(first.weights, second.weights) and torch.equal(first.bias, second.bias)


def test_views_the_classifier_never_learned_are_refused() -> None:
    turns = training_turns((0.0, 90.0))
    classifier = fit_turn_classifier(turned_embeddings(20, turns, seed=0), turns)
    with pytest.raises(ValueError, match="not learned"):
        classifier.upright_votes(turned_embeddings(5, (0.0, 45.0), seed=1), (0.0, 45.0))
    with pytest.raises(ValueError, match="distinct turns"):
        fit_turn_classifier(turned_embeddings(20, (0.0, 90.0, 90.0), seed=0), (0.0, 90.0, 90.0))
    with pytest.raises(ValueError, match="distinct turns"):
        fit_turn_classifier(turned_embeddings(20, (0.0, 90.0), seed=0), turns)  # 2 turns for 3


def test_the_vote_moves_the_choice_only_where_it_outweighs_the_match() -> None:
    generator = torch.Generator().manual_seed(3)
    gallery = torch.nn.functional.normalize(torch.randn(12, 16, generator=generator), dim=-1)
    views = torch.stack(
        [gallery[:4], torch.nn.functional.normalize(torch.randn(4, 16, generator=generator), dim=-1)]
    )
    matches = view_matches(views, gallery)
    assert matches.shape == (2, 4) and np.allclose(matches[0], 1.0)  # view 0 matches exactly
    assert torch.equal(best_view(views, gallery), gallery[:4])
    against = np.array([[0.0] * 4, [5.0, 0.0, 0.0, 5.0]])
    chosen = keep_views(views, torch.from_numpy((matches + against).argmax(0)))
    assert torch.equal(chosen[[0, 3]], views[1, [0, 3]]) and torch.equal(chosen[[1, 2]], gallery[1:3])


def test_a_set_stands_upright_when_few_of_its_photos_keep_a_turned_view() -> None:
    """The whole set is decided at once, by the share of photos whose kept view is turned: views at
    -90 / 0 / 90 degrees, kept views as indexes into them."""
    angles = (-90.0, 0.0, 90.0)
    few = np.array([1] * 9 + [0])  # 1 in 10 turned
    half = np.array([1] * 5 + [0, 2] * 2 + [2])
    assert stands_upright(few, angles, 0.25) and not stands_upright(half, angles, 0.25)
    assert not stands_upright(few, angles, 0.0)  # 0: never taken as upright, always deskew and choose
    assert stands_upright(half, angles, 0.75)
    assert not stands_upright(np.zeros(4, dtype=int), (90.0, -90.0), 1.0)  # no unturned view: all turned
    assert stands_upright(np.zeros(4, dtype=int), (360.0, 90.0), 0.25)  # 360 degrees is upright
    with pytest.raises(ValueError, match="turned_share"):
        RetrievalOptions(turned_share=1.5)


def test_choosing_upright_needs_query_views() -> None:
    for rotations, side in (((0.0,), "query"), (QUARTER_VIEWS, "gallery")):
        with pytest.raises(ValueError, match="choose_upright"):
            RetrievalOptions(choose_upright=True, rotations=rotations, rotation_side=side)


def test_choose_upright_through_the_cli(
    tiny_resnet18: tuple[Path, Path, list[str | Path]], cli: Callable[..., str]
) -> None:
    """--choose-upright: the training photos are extracted deskewed at the four turns the query views can
    show (each cached under its own fingerprint) and validation keeps one vector per query."""
    data, weights, common = tiny_resnet18
    invoke = cli
    views = ["--deskew-queries", "--rotations", "0,90,-90"]
    invoke("extract", "--backbone", "resnet18", "--split", "val", *views, "--choose-upright", *common)
    indexes = [json.loads(path.read_text()) for path in (weights / "features").glob("*/index.json")]
    turns_by_images: dict[tuple[str, ...], list[float]] = {}
    for index in indexes:
        if index["deskew"]:
            turns_by_images.setdefault(tuple(index["ids"]), []).append(index["rotation"])
    assert sorted(sorted(turns) for turns in turns_by_images.values()) == [
        [-90.0, 0.0, 90.0],  # the validation queries' views
        [-90.0, 0.0, 90.0, 180.0],  # the training photos the classifier learns from
    ]
    invoke("fuse", "--tune", "--backbones", "resnet18", *views, "--choose-upright", *common)
    assert json.loads((weights / "fusion.json").read_text())
    # The same through the Python API: one of each query's views, whole, as its one vector.
    workspace = Workspace.at(data, weights, device="cpu")
    every_view = RetrievalOptions(
        deskew_queries=True, rotations=QUARTER_VIEWS, num_workers=0, show_progress=False
    )
    chosen = dataclasses.replace(every_view, choose_upright=True)
    (views_set, _), (chosen_set, _) = (
        extract_validation(workspace, "resnet18", Category.CLOTHES, options)
        for options in (every_view, chosen)
    )
    assert views_set.features.shape[0] == 3 and chosen_set.features.ndim == 2
    matches = (views_set.features == chosen_set.features[None]).all(-1)
    assert bool((matches.sum(0) >= 1).all())
