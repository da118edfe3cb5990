"""Shared pytest fixtures."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def shared_data() -> Path:
    """The read-only challenge and benchmark data beside the project (``../shared/data``), or skip."""
    root = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root}")
    return root


def split_demo(root: Path, identities: int, photos: int) -> Path:
    """A generated dataset in the official layout, already split into train and validation."""
    from jdfashion.data.demo import DemoConfig, make_demo
    from jdfashion.data.split import make_split
    from jdfashion.paths import DataLayout

    config = DemoConfig(
        train_identities=identities, test_identities=4, consumer_photos=photos, distractors=4, image_size=96
    )
    make_demo(root, config)
    layout = DataLayout(root)
    make_split(layout.pairs, layout, val_fraction=0.34, distractor_fraction=0.0, seed=0)
    return root


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny: 2 validation shop images a category, enough to run validation, too few to rank by it."""
    return split_demo(tmp_path_factory.mktemp("demo"), identities=6, photos=2)


@pytest.fixture(scope="session")
def roomy_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """7 validation identities (21 queries) a category: validation scores that tell models apart."""
    return split_demo(tmp_path_factory.mktemp("roomy-demo"), identities=20, photos=3)


@pytest.fixture(scope="session")
def clothes_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's own one-category dataset: a CSV manifest of the demo's clothes images, read in place.

    Train rows come from p.txt, test rows from gt.txt, and every other clothes image in s.txt is a
    distractor, so the gallery is larger than the ten results a submission lists.
    """
    import csv

    from jdfashion.data.demo import DemoConfig, make_demo
    from jdfashion.data.images import url_to_path
    from jdfashion.data.jdformat import Category, read_images, read_pairs, read_truth

    root = tmp_path_factory.mktemp("clothes")
    images = root / "demo" / "images"
    make_demo(
        root / "demo",
        DemoConfig(train_identities=6, test_identities=3, consumer_photos=2, distractors=8, image_size=64),
    )

    def identity(url: str) -> str:
        return url.rsplit("/", 1)[1].split("_")[0]

    rows: dict[tuple[str, str], list[str]] = {}  # (path, role) -> row: an image is listed once per role

    def add(url: str, domain: str, role: str, name: str | None = None) -> None:
        path = str(url_to_path(url, images))
        rows.setdefault((path, role), [path, name or identity(url), domain, "clothes", role])

    for pair in read_pairs(root / "demo" / "p.txt"):
        if pair.category == Category.CLOTHES:
            add(pair.consumer.url, "consumer", "train")
            add(pair.shop.url, "shop", "train")
    matched = set()
    for query, shops in read_truth(root / "demo" / "gt.txt").items():
        if "/clothes/" in query:
            add(query, "consumer", "test")
            for shop in shops:
                add(shop, "shop", "test")
                matched.add(shop)
    for index, ref in enumerate(read_images(root / "demo" / "s.txt")):
        if "/clothes/" in ref.url and ref.url not in matched:
            add(ref.url, "shop", "distractor", f"distractor-{index}")
    manifest = root / "my.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([["path", "identity", "domain", "category", "role"], *rows.values()])
    return manifest


@pytest.fixture
def cli() -> Callable[..., str]:
    """Runs one ``jdfashion`` command in-process and returns its output; a non-zero exit fails the
    test with that output."""
    from click.testing import CliRunner

    from jdfashion.cli import main

    def invoke(*args: str | Path) -> str:
        result = CliRunner().invoke(main, [str(arg) for arg in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    return invoke


@pytest.fixture
def tiny_resnet18(
    demo_data: Path, tmp_path: Path, cli: Callable[..., str]
) -> tuple[Path, Path, list[str | Path]]:
    """A copy of the demo data with resnet18 trained on its clothes for one epoch at 48 px: (data root,
    weights root, the options every command takes: data, weights, category, loader)."""
    data, weights = tmp_path / "data", tmp_path / "weights"
    shutil.copytree(demo_data, data)
    common: list[str | Path] = [
        "--data",
        data,
        "--weights-root",
        weights,
        "--category",
        "clothes",
        "--workers",
        "0",
    ]
    tiny = ["--epochs", "1", "--image-size", "48", "--identities-per-batch", "2"]
    cli("train", "--backbone", "resnet18", *tiny, *common)
    return data, weights, common
