"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def shared_data() -> Path:
    """The read-only challenge and benchmark data beside the project (``../shared/data``), or skip."""
    root = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root}")
    return root


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny generated dataset in the official layout, already split into train and validation."""
    from jdfashion.data.demo import DemoConfig, make_demo
    from jdfashion.data.split import make_split
    from jdfashion.paths import DataLayout

    root = tmp_path_factory.mktemp("demo")
    make_demo(
        root,
        DemoConfig(train_identities=6, test_identities=4, consumer_photos=2, distractors=4, image_size=96),
    )
    layout = DataLayout(root)
    make_split(layout.pairs, layout, val_fraction=0.34, distractor_fraction=0.0, seed=0)
    return root
