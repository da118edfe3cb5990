"""Feature extraction and its cache on a really trained tiny model and real image files."""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

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
    extractor = FeatureExtractor(trained_dir, device="cpu")
    direct = extractor(gallery, images)
    assert torch.allclose(direct.features.float(), cached.features.float(), atol=1e-3)
    # Extraction runs the model in channels_last and hands it back contiguous: it can still be saved.
    assert all(tensor.is_contiguous() for tensor in extractor.trained.model.state_dict().values())
    save_file(extractor.trained.model.state_dict(), tmp_path / "after-extraction.safetensors")


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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _extract_as_rank(
    rank: int, world_size: int, port: int, model_dir: Path, image_root: Path, cache_root: Path
) -> None:
    """One torchrun-like process: joins a gloo group and extracts its share of the chunks."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        refs = read_images(image_root.parent / "s.txt")
        FeatureCache(cache_root, chunk_size=8).extract(load_trained(model_dir), refs, image_root, QUIET)
    finally:
        dist.destroy_process_group()


def test_two_processes_extract_the_same_cache_as_one(trained_dir, demo_data, gallery, tmp_path):
    """torchrun-style extraction with 2 CPU processes (gloo): each writes every other chunk, and the
    cache they leave holds the same features as a one-process run."""
    import torch.multiprocessing as mp

    images = DataLayout(demo_data).images
    mp.spawn(
        _extract_as_rank, args=(2, free_port(), trained_dir, images, tmp_path / "two"), nprocs=2, join=True
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic as each rank's
    try:
        one = FeatureCache(tmp_path / "one", chunk_size=8).extract(
            load_trained(trained_dir), gallery, images, QUIET
        )
    finally:
        torch.set_num_threads(threads)
    (two_dir,) = (tmp_path / "two").iterdir()
    assert two_dir.name == next((tmp_path / "one").iterdir()).name
    assert len(list(two_dir.glob("chunk_*"))) == -(-len(gallery) // 8) >= 2
    two = FeatureCache.load(two_dir)
    assert two.ids == one.ids and torch.equal(two.features, one.features)


@pytest.mark.slow
def test_extract_under_torchrun_writes_the_one_process_cache(trained_dir, demo_data, tmp_path):
    """The CLI under ``torchrun --nproc_per_node 2`` (gloo on CPU): one cache per list, same features."""
    import subprocess
    import sys

    weights = tmp_path / "weights"
    shutil.copytree(trained_dir, weights / "clothes" / "resnet18")
    command = [
        "extract",
        "--backbone",
        "resnet18",
        "--category",
        "clothes",
        "--split",
        "val",
        "--workers",
        "0",
    ]
    roots = ["--data", str(demo_data), "--weights-root"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
    ]
    two = subprocess.run(
        [*launcher, "-m", "jdfashion", *command, *roots, str(weights)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    assert len(re.findall(r"clothes/resnet18 val: \d+ queries", two.stdout)) == 1, "only rank 0 reports"
    shutil.copytree(trained_dir, tmp_path / "single" / "clothes" / "resnet18")
    one = subprocess.run(
        [sys.executable, "-m", "jdfashion", *command, *roots, str(tmp_path / "single")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    caches = sorted((weights / "features").iterdir()), sorted((tmp_path / "single" / "features").iterdir())
    assert [c.name for c in caches[0]] == [c.name for c in caches[1]] and len(caches[0]) == 2
    for two_dir, one_dir in zip(*caches, strict=True):
        assert torch.equal(FeatureCache.load(two_dir).features, FeatureCache.load(one_dir).features)


def test_chunks_written_on_another_machine_are_named_not_indexed(
    trained_dir, demo_data, gallery, tmp_path, monkeypatch
):
    """Rank 0 of 2 whose partner wrote to a disk this machine does not see: no index over missing
    chunks; the error names them, and copying them in (here: a one-process run) completes the cache."""
    import jdfashion.features as features_module

    images, trained = DataLayout(demo_data).images, load_trained(trained_dir)
    monkeypatch.setattr(features_module, "shard", lambda: (0, 2))
    monkeypatch.setattr(features_module, "barrier", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"chunk\(s\) missing \(chunk_00001"):
        FeatureCache(tmp_path, chunk_size=8).extract(trained, gallery, images, QUIET)
    (directory,) = tmp_path.iterdir()
    assert not (directory / INDEX_FILE).exists()
    written = chunk_times(directory)
    monkeypatch.undo()
    complete = FeatureCache(tmp_path, chunk_size=8).extract(trained, gallery, images, QUIET)
    assert len(complete) == len(gallery) and all(
        chunk_times(directory)[name] == t for name, t in written.items()
    )
