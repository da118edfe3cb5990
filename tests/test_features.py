"""Feature extraction and its cache on a really trained tiny model and real image files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from jdfashion.checkpoint import load_trained
from jdfashion.config import TrainConfig
from jdfashion.data.images import url_to_path
from jdfashion.data.jdformat import Category, ImageRef, read_images
from jdfashion.features import INDEX_FILE, CategoryRouter, ExtractOptions, FeatureCache, FeatureExtractor
from jdfashion.paths import DataLayout
from jdfashion.train import train

QUIET = ExtractOptions(num_workers=0, show_progress=False)


@pytest.fixture(scope="module")
def trained_dir(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = TrainConfig(
        backbone="resnet18",
        category="clothes",
        epochs=1,
        image_size=48,
        identities_per_batch=2,
        num_workers=0,
    )
    return train(config, demo_data, tmp_path_factory.mktemp("weights"), show_progress=False).directory


@pytest.fixture
def gallery(demo_data: Path) -> list[ImageRef]:
    return read_images(DataLayout(demo_data).gallery)


def chunk_times(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.glob("chunk_*")}


def test_cache_is_reused_for_same_inputs_and_recomputed_on_change(trained_dir, demo_data, gallery, tmp_path):
    images = DataLayout(demo_data).images
    trained = load_trained(trained_dir)
    cache = FeatureCache(tmp_path, chunk_size=8)
    first = cache.extract(trained, gallery, images, QUIET)
    (directory,) = tmp_path.iterdir()
    before = chunk_times(directory)
    again = cache.extract(trained, gallery, images, QUIET)
    assert chunk_times(directory) == before
    assert torch.equal(first.features, again.features) and first.ids == [r.url for r in gallery]
    assert first.features.dtype == torch.float16
    assert torch.allclose(first.features.float().norm(dim=1), torch.ones(len(gallery)), atol=1e-2)

    flipped = cache.extract(
        trained, gallery, images, ExtractOptions(flip=True, num_workers=0, show_progress=False)
    )
    shorter = cache.extract(trained, gallery[:-1], images, QUIET)
    assert len(list(tmp_path.iterdir())) == 3
    assert not torch.equal(flipped.features, first.features)
    assert torch.allclose(shorter.features.float(), first.features[:-1].float(), atol=2e-3)


def test_interrupted_extraction_resumes_at_the_first_missing_chunk(trained_dir, demo_data, gallery, tmp_path):
    images = DataLayout(demo_data).images
    trained = load_trained(trained_dir)
    cache = FeatureCache(tmp_path, chunk_size=8)
    complete = cache.extract(trained, gallery, images, QUIET)
    (directory,) = tmp_path.iterdir()
    # What a kill leaves: some chunks written, no index.
    (directory / INDEX_FILE).unlink()
    last = sorted(directory.glob("chunk_*"))[-1]
    last.unlink()
    kept = chunk_times(directory)
    resumed = cache.extract(trained, gallery, images, QUIET)
    after = chunk_times(directory)
    assert {name: after[name] for name in kept} == kept and last.name in after
    assert torch.equal(resumed.features, complete.features)


def test_undecodable_images_are_reported_and_keep_their_place(trained_dir, demo_data, gallery, tmp_path):
    root = tmp_path / "images"
    refs = gallery[:4]
    for ref in refs:
        target = url_to_path(ref.url, root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(url_to_path(ref.url, DataLayout(demo_data).images), target)
    url_to_path(refs[1].url, root).write_bytes(b"\xff\xd8\xff\xe0 truncated")
    result = FeatureCache(tmp_path / "cache").extract(load_trained(trained_dir), refs, root, QUIET)
    assert result.ids == [r.url for r in refs] and result.failed == [refs[1].url]
    assert torch.count_nonzero(result.features[1]) == 0 and torch.count_nonzero(result.features[0]) > 0


def test_feature_extractor_matches_the_cached_features(trained_dir, demo_data, gallery, tmp_path):
    images = DataLayout(demo_data).images
    cached = FeatureCache(tmp_path).extract(load_trained(trained_dir), gallery, images, QUIET)
    direct = FeatureExtractor(trained_dir, device="cpu")(gallery, images)
    assert torch.allclose(direct.features.float(), cached.features.float(), atol=1e-3)


def test_category_router_learns_the_demo_categories(demo_data, tmp_path):
    config = TrainConfig(
        backbone="efficientnet_lite0",
        task="category",
        pretrained="package",
        epochs=4,
        lr=1e-3,
        image_size=64,
        identities_per_batch=6,
        num_workers=0,
        warmup_epochs=1,
    )
    router_dir = train(config, demo_data, tmp_path, show_progress=False).directory
    layout = DataLayout(demo_data)
    refs, labels = [], []
    for category in Category:
        queries = read_images(layout.val_queries(category))
        refs += queries
        labels += [int(category)] * len(queries)
    predicted = CategoryRouter(router_dir, device="cpu")(refs, layout.images)
    accuracy = float((predicted == np.asarray(labels)).mean())
    assert accuracy >= 0.8, accuracy  # chance is 1/3
