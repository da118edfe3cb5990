"""The three-backbone ensemble as a new user types it, on a small real subset of the Grocery Store photos:
import a manifest, split, train the three packaged backbones frozen (``--epochs 0``), tune fusion on
validation, submit, score; then the ensemble choosing each query's upright view together."""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from jdfashion.data.jdformat import Category
from jdfashion.data.manifest import grocery_iconic_images
from jdfashion.model.backbones import PACKAGED_BACKBONES
from jdfashion.options import TURNED_SHARE, RetrievalOptions
from jdfashion.submission import read_submission
from jdfashion.workspace import Workspace, backbone_models, pair_features, validation_set

pytestmark = [pytest.mark.slow, pytest.mark.realdata]
# Packaged products (classes 28-58): ten to train on (two of them held out for validation by `data
# split`), six unseen ones to query with; every other iconic image of a package is a distractor.
TRAIN_CLASSES = range(28, 38)
TEST_CLASSES = range(43, 49)
PHOTOS_PER_CLASS = 6


def write_manifest(dataset: Path, out: Path) -> Path:
    """A manifest a user would write: in-store photos are the consumer domain, iconic images the shop."""
    iconic = grocery_iconic_images(dataset)
    photos: dict[int, list[str]] = {}
    for line in (dataset / "train.txt").read_text().splitlines():
        path, fine, _ = (field.strip() for field in line.split(","))
        photos.setdefault(int(fine), []).append(path)
    rows = []
    for class_id in (*TRAIN_CLASSES, *TEST_CLASSES):
        role = "train" if class_id in TRAIN_CLASSES else "test"
        rows += [
            (dataset / path, class_id, "consumer", "clothes", role)
            for path in photos[class_id][:: max(1, len(photos[class_id]) // PHOTOS_PER_CLASS)][
                :PHOTOS_PER_CLASS
            ]
        ]
        rows.append((iconic[class_id][1], class_id, "shop", "clothes", role))
    rows += [(iconic[c][1], c, "shop", "clothes", "distractor") for c in range(38, 43)]
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "identity", "domain", "category", "role"])
        writer.writerows(rows)
    return manifest


def test_three_packaged_backbones_train_fuse_submit_and_score(
    shared_data: Path, tmp_path: Path, cli: Callable[..., str]
) -> None:
    dataset = shared_data / "grocery-store" / "dataset"
    if not dataset.is_dir():
        pytest.skip(f"{dataset} not found")
    data, weights = tmp_path / "data", tmp_path / "weights"
    invoke = cli
    invoke("data", "import-manifest", write_manifest(dataset, tmp_path), "--out", data)
    invoke("data", "split", "--data", data, "--val-fraction", "0.2")
    common = ("--data", data, "--weights-root", weights, "--workers", "0")
    for backbone in PACKAGED_BACKBONES:
        invoke(
            "train",
            "--backbone",
            backbone,
            "--pretrained",
            "package",
            "--epochs",
            "0",
            "--image-size",
            "128",
            *common,
        )
    tuned = invoke("fuse", "--tune", *common)
    fusion = json.loads((weights / "fusion.json").read_text())["weights"]["clothes"]
    assert set(fusion) == set(PACKAGED_BACKBONES) and sum(fusion.values()) == pytest.approx(1.0)
    assert "fused" in tuned
    invoke("submit", "--team", "ensemble", "--out", tmp_path / "submissions", *common)
    submission = tmp_path / "submissions" / "Item_ensemble.txt"
    queries = (data / "q_all.txt").read_text().splitlines()
    assert len(read_submission(submission)) == len(queries) == len(TEST_CLASSES) * PHOTOS_PER_CLASS
    scores = json.loads(invoke("score", submission, "--truth", data / "gt.txt", "--json"))
    # 6 unseen products among 12 shop images at 128 px (chance rank-1 0.08); 0.50 when written.
    assert scores["all"]["num_queries"] == len(queries) and scores["all"]["rank1"] >= 0.4

    # --choose-upright across the ensemble: every network keeps the same view of a query, the one their
    # summed turn votes put first, so the fused scores are of one photo.
    views = ("--deskew-queries", "--rotations", "0,90,-90")
    assert "fused" in invoke("fuse", "--tune", *views, "--choose-upright", *common)
    workspace = Workspace.at(data, weights, device="cpu")
    every_view = RetrievalOptions(
        deskew_queries=True, rotations=(0.0, 90.0, -90.0), num_workers=0, show_progress=False
    )
    chosen = dataclasses.replace(every_view, choose_upright=True, turned_share=0.0)
    models = backbone_models(workspace, PACKAGED_BACKBONES)
    val = validation_set(workspace.data, Category.CLOTHES)
    pairs, kept, gated, plain = (
        pair_features(models, Category.CLOTHES, val.queries, val.gallery, options, "val")
        for options in (
            every_view,
            chosen,
            dataclasses.replace(chosen, turned_share=TURNED_SHARE),
            RetrievalOptions(num_workers=0, show_progress=False),
        )
    )
    votes = sum(
        workspace.upright_votes(Category.CLOTHES, backbone, pairs[backbone][0], chosen) for backbone in models
    )
    for backbone in models:
        views_of_each, one_each = pairs[backbone][0].features, kept[backbone][0].features
        assert views_of_each.shape[0] == 3 and one_each.shape == views_of_each.shape[1:]
        kept_view = (views_of_each == one_each[None]).all(-1).float().argmax(0)
        assert torch.equal(kept_view, torch.from_numpy(votes.argmax(0)))
    # The validation photos are upright as taken: the networks together keep most of them unturned.
    assert float((kept_view == 0).float().mean()) >= 0.8
    # So by default the set stands upright and every network searches it as taken, as without the option.
    for backbone in models:
        assert torch.equal(
            torch.as_tensor(gated[backbone][0].features), torch.as_tensor(plain[backbone][0].features)
        )
