"""The layouts: which models a weights root holds, and which command creates a missing file."""

from __future__ import annotations

from pathlib import Path

import pytest

from jdfashion.data.jdformat import Category
from jdfashion.paths import MODEL_CONFIG, MODEL_WEIGHTS, WeightsLayout, fixing_command


def model(root: Path, *files: str) -> None:
    root.mkdir(parents=True)
    for name in files:
        (root / name).write_text("{}")


def test_discovery_finds_complete_models_of_each_category_only(tmp_path: Path) -> None:
    model(tmp_path / "clothes" / "resnet18", MODEL_CONFIG, MODEL_WEIGHTS)
    model(tmp_path / "clothes" / "efficientnet_lite0", MODEL_CONFIG, MODEL_WEIGHTS)
    model(tmp_path / "clothes" / "half_trained", "last.ckpt", MODEL_CONFIG)
    model(tmp_path / "shoes" / "resnet50", MODEL_WEIGHTS, MODEL_CONFIG)
    model(tmp_path / "router" / "efficientnet_lite0", MODEL_CONFIG, MODEL_WEIGHTS)
    model(tmp_path / "features" / "abc123", MODEL_CONFIG, MODEL_WEIGHTS)
    layout = WeightsLayout(tmp_path)
    assert layout.trained_backbones(Category.CLOTHES) == ["efficientnet_lite0", "resnet18"]
    assert layout.trained_backbones(Category.BAGS) == []
    assert layout.trained_models() == [
        (Category.CLOTHES, "efficientnet_lite0"),
        (Category.CLOTHES, "resnet18"),
        (Category.SHOES, "resnet50"),
    ]


@pytest.mark.parametrize(
    ("path", "command"),
    [
        ("d/p.txt", "jdfashion data import-manifest YOUR.csv --out d"),
        ("d/q_all.txt", "jdfashion data import-manifest YOUR.csv --out d"),
        ("d/split/val/bags/s.txt", "jdfashion data split --data d"),
        ("split/train.txt", "jdfashion data split --data ."),
        ("w/fusion.json", "jdfashion fuse --tune --weights-root w"),
        (
            "w/shoes/resnet50/model.safetensors",
            "jdfashion train --backbone resnet50 --category shoes --weights-root w",
        ),
        ("w/router/rn/config.json", "jdfashion train --task category --backbone rn --weights-root w"),
        ("w/other/rn/config.json", None),
        ("notes.txt", None),
    ],
)
def test_each_missing_layout_file_names_the_command_that_creates_it(path: str, command: str | None) -> None:
    assert fixing_command(Path(path)) == command
